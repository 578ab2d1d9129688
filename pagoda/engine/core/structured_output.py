"""Structured outputs in the engine core (xgrammar): grammars compiled off the step loop, one matcher per
request, and each step the allowed-token bitmask of the constrained rows.

A request whose grammar is still compiling waits (the scheduler skips it) while the others run. Compiled
grammars are cached by (kind, text): the engine has one tokenizer. xgrammar (which imports transformers,
~2 s) is loaded by the compile thread on the first structured request, so an engine that never gets one
never pays for it. JSON is generated without free whitespace (", " and ": " between items): a small model
given the choice fills its budget with newlines.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagoda.api.params import StructuredOutputsParams
from pagoda.engine.step import GrammarBitmask
from pagoda.model.tokenizer_source import TokenizerSource

if TYPE_CHECKING:
    from pagoda.engine.core.request import Request

logger = logging.getLogger(__name__)
CACHE_SIZE = 256  # compiled grammars kept
MAX_WAIT_S = 0.01  # how long an idle step waits for a compile before looking again


class GrammarCompileError(ValueError):
    """The grammar, schema or regex could not be compiled; the message names what."""


@dataclass(eq=False)
class RequestGrammar:
    """One request's constraint: the compile it waits for, then its matcher."""

    compiled: concurrent.futures.Future[Any]
    matcher: Any = None  # xgrammar.GrammarMatcher once compiled

    def accept(self, tokens: list[int]) -> int:
        """Advance over ``tokens``; how many it accepted (all, unless the model left the grammar)."""
        for i, token in enumerate(tokens):
            if not self.matcher.accept_token(token):
                return i
        return len(tokens)

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class StructuredOutputManager:
    def __init__(self, tokenizer: TokenizerSource, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()  # the compiler is built once, by the first compile
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], concurrent.futures.Future[Any]] = OrderedDict()
        self.pending: dict[str, Request] = {}  # requests waiting for their compile, by id
        self._live: set[str] = set()  # constrained requests the engine holds

    def submit(self, request: Request) -> None:
        params = request.sampling_params.structured_outputs
        assert params is not None
        key = params.key
        future = self._cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._pool.submit(self._compile, params)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        request.grammar = RequestGrammar(future)
        self.pending[request.request_id] = request
        self._live.add(request.request_id)

    @property
    def active(self) -> bool:
        return bool(self._live)

    def collect_compiled(self, wait: bool) -> list[tuple[Request, str]]:
        """Give each pending request whose compile finished its matcher; returns those whose compile failed,
        with the reason. ``wait``: nothing else to do, so block briefly for one to finish."""
        if not self.pending:
            return []
        if wait:
            concurrent.futures.wait([r.grammar.compiled for r in self.pending.values()], MAX_WAIT_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        failed = []
        for request in [r for r in self.pending.values() if r.grammar.compiled.done()]:
            grammar = request.grammar
            del self.pending[request.request_id]
            error = grammar.compiled.exception()
            if error is not None:
                failed.append((request, str(error)))
                continue
            # A compile succeeded, so the compile thread has imported xgrammar: this import cannot stall the loop.
            import xgrammar as xgr

            grammar.matcher = xgr.GrammarMatcher(grammar.compiled.result())
        return failed

    def forget(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        self._live.discard(request_id)

    def bitmask(self, rows: list[Request]) -> GrammarBitmask | None:
        """The allowed tokens of each constrained request about to sample, packed 32 to an int32."""
        constrained = [r for r in rows if r.grammar is not None and r.grammar.matcher is not None]
        if not constrained:
            return None
        import torch

        mask = torch.full((len(constrained), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for i, request in enumerate(constrained):
            request.grammar.matcher.fill_next_token_bitmask(mask, i)
        return GrammarBitmask([r.request_id for r in constrained], mask.numpy())

    def _compile(self, params: StructuredOutputsParams) -> Any:
        try:
            import xgrammar as xgr
        except ImportError:
            raise GrammarCompileError("structured_outputs need xgrammar in the engine's environment "
                                      "(pip install xgrammar, after torch)") from None

        with self._lock:
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(self._tokenizer_info(xgr), max_threads=1)
        compiler = self._compiler
        kind = params.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(params.json, strict_mode=True, any_whitespace=False)
            if kind == "json_object":  # an object, as OpenAI's json_object promises (the builtin takes any value)
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(_choice_ebnf(params.choice or []))
            return compiler.compile_grammar(params.grammar)
        except Exception as exc:  # xgrammar reports a bad grammar as RuntimeError or ValueError
            text = str(exc).strip()
            # xgrammar prefixes "[hh:mm:ss] /path/file.cc:line: ": the user needs only what follows.
            message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0]) if text else type(exc).__name__
            raise GrammarCompileError(f"structured_outputs.{kind} could not be compiled: {message}") from None

    def _tokenizer_info(self, xgr: Any) -> Any:
        vocab = self.tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        encoded = [""] * max(max(vocab.values()) + 1, 0)
        for text, token_id in vocab.items():
            encoded[token_id] = text
        return xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                 stop_token_ids=list(self.tokenizer.eos_token_ids), add_prefix_space=False)


def _choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (each as a quoted literal)."""
    def literal(text: str) -> str:
        return '"' + "".join(_EBNF_ESCAPES.get(c, c) for c in text) + '"'

    return "root ::= " + " | ".join(literal(c) for c in choices)


_EBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
