"""Structured outputs in the engine core: grammars compiled off the step loop, one matcher per request, and
each step the allowed-token bitmask of the constrained rows.

A request whose grammar is still compiling waits (the scheduler skips it) while the others run. Compiled
grammars are cached by (kind, text): the engine has one tokenizer. The backend (grammar_backends.py) is
loaded by the compile thread on the first structured request, so an engine that never gets one never pays
for it. ``auto`` compiles with xgrammar and, where it cannot (a schema feature it does not enforce), with
llguidance. A compile that takes longer than COMPILE_TIMEOUT_S rejects its request; it cannot be
interrupted, so the pool has a second thread for everyone else meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagoda.api.params import StructuredOutputsParams
from pagoda.config import StructuredOutputsBackend
from pagoda.engine.core.grammar_backends import GrammarCompileError, GuidanceBackend, XGrammarBackend
from pagoda.engine.step import GrammarBitmask
from pagoda.model.tokenizer_source import TokenizerSource

if TYPE_CHECKING:
    from pagoda.engine.core.request import Request

logger = logging.getLogger(__name__)
CACHE_SIZE = 256  # compiled grammars kept
MAX_WAIT_S = 0.01  # how long an idle step waits for a compile before looking again
COMPILE_TIMEOUT_S = 10.0
COMPILE_THREADS = 2
_BACKEND_ORDER = {"auto": ("xgrammar", "guidance"), "xgrammar": ("xgrammar",), "guidance": ("guidance",)}
_BACKENDS = {"xgrammar": XGrammarBackend, "guidance": GuidanceBackend}
_BACKEND_PACKAGES = {"xgrammar": "xgrammar", "guidance": "llguidance"}


@dataclass
class Compiled:
    backend: Any  # the backend that compiled it, which makes its matchers
    grammar: Any


@dataclass(eq=False)
class RequestGrammar:
    """One request's constraint: the compile it waits for, then its matcher."""

    compiled: concurrent.futures.Future[Compiled]
    submitted: float = field(default_factory=time.monotonic)
    matcher: Any = None  # a backend's matcher once compiled
    accepted: int = 0  # tokens the matcher holds (what rollback can undo)

    def accept(self, tokens: list[int]) -> int:
        """Advance over ``tokens``; how many it accepted (all, unless the model left the grammar)."""
        for i, token in enumerate(tokens):
            if not self.matcher.accept(token):
                self.accepted += i
                return i
        self.accepted += len(tokens)
        return len(tokens)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted (speculative tokens the target model rejected)."""
        if not 0 <= num_tokens <= self.accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens; the matcher holds {self.accepted}")
        self.matcher.rollback(num_tokens)
        self.accepted -= num_tokens

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.terminated)


class StructuredOutputManager:
    def __init__(self, tokenizer: TokenizerSource, vocab_size: int, backend: StructuredOutputsBackend) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.backend_names = _BACKEND_ORDER[backend]
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()  # each backend is built once, by the first compile that needs it
        self._backends: dict[str, Any] = {}
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
        now = time.monotonic()
        for request in list(self.pending.values()):
            grammar = request.grammar
            if not grammar.compiled.done():
                if now - grammar.submitted > COMPILE_TIMEOUT_S:
                    del self.pending[request.request_id]
                    failed.append((request, f"structured_outputs.{request.sampling_params.structured_outputs.kind} "
                                            f"took longer than {COMPILE_TIMEOUT_S:g} s to compile; simplify it"))
                continue
            del self.pending[request.request_id]
            error = grammar.compiled.exception()
            if error is not None:
                failed.append((request, str(error)))
                continue
            compiled = grammar.compiled.result()
            grammar.matcher = compiled.backend.matcher(compiled.grammar)
        return failed

    def forget(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        self._live.discard(request_id)

    def bitmask(self, rows: list[Request], drafts: dict[str, list[int]]) -> GrammarBitmask | None:
        """The allowed tokens of each constrained request about to sample, packed 32 to an int32: one row, or
        with drafts to verify one row per position, each after the drafts before it (the matcher advanced
        through them, then rolled back)."""
        constrained = [r for r in rows if r.grammar is not None and r.grammar.matcher is not None]
        if not constrained:
            return None
        import torch

        counts = [len(drafts.get(r.request_id, ())) + 1 for r in constrained]
        mask = torch.full((sum(counts), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        req_ids: list[str] = []
        row = 0
        for request, count in zip(constrained, counts):
            matcher = request.grammar.matcher
            matcher.fill(mask, row)
            advanced = 0
            for draft in drafts.get(request.request_id, ())[: count - 1]:
                allowed = (int(mask[row + advanced, draft // 32]) >> (draft % 32)) & 1
                if not allowed or not matcher.accept(draft):
                    break  # verification stops at this draft: the rows after it are never sampled from
                advanced += 1
                if matcher.terminated:  # the draft ended the output: nothing after it is sampled
                    break
                matcher.fill(mask, row + advanced)
            if advanced:
                matcher.rollback(advanced)
            req_ids += [request.request_id] * count
            row += count
        return GrammarBitmask(req_ids, mask.numpy())

    def _compile(self, params: StructuredOutputsParams) -> Compiled:
        errors = []
        for name in self.backend_names:
            try:
                backend = self._backend(name)
                return Compiled(backend, backend.compile(params))
            except GrammarCompileError as exc:
                errors.append(str(exc))
        raise GrammarCompileError(errors[0] if len(errors) == 1 else
                                  "; ".join(f"{n}: {e}" for n, e in zip(self.backend_names, errors)))

    def _backend(self, name: str) -> Any:
        with self._lock:
            if name not in self._backends:
                try:
                    self._backends[name] = _BACKENDS[name](self.tokenizer, self.vocab_size)
                except ImportError:
                    raise GrammarCompileError(f"structured_outputs need {_BACKEND_PACKAGES[name]} in the engine's "
                                              f"environment (pip install {_BACKEND_PACKAGES[name]}, after torch)"
                                              ) from None
            return self._backends[name]
