"""The grammar engines behind structured outputs: xgrammar and llguidance, each compiling a
StructuredOutputsParams into a grammar (in the compile thread) and making one matcher per request (in the
step loop). Both are imported lazily, in the compile thread, so an engine without constrained requests never
loads them.

Fail-closed: a JSON-schema keyword a backend would silently drop is an error naming it, never an output that
does not validate. llguidance reports its own ("Unimplemented keys"); xgrammar accepts and ignores the
keywords in XGRAMMAR_UNENFORCED, so they are looked for before it compiles.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pagoda.api.params import StructuredOutputsParams
from pagoda.model.tokenizer_source import TokenizerSource

# JSON Schema keywords xgrammar 0.2 compiles without enforcing (checked by generating violating strings).
XGRAMMAR_UNENFORCED = frozenset({"allOf", "oneOf", "not", "if", "then", "else", "uniqueItems", "dependentRequired",
                                 "dependentSchemas", "unevaluatedItems", "maxContains", "minContains"})
# Subschema positions in a schema, by how their values hold schemas.
_SCHEMA_VALUED = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
                  "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class GrammarCompileError(ValueError):
    """The grammar, schema or regex could not be compiled; the message names what."""


def schema_keywords(schema: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every (keyword, JSON pointer of the schema holding it) in ``schema`` and its subschemas."""
    if not isinstance(schema, dict):
        return
    for keyword in schema:
        yield keyword, path or "/"
    for key in _SCHEMA_VALUED:
        if key in schema:
            yield from schema_keywords(schema[key], f"{path}/{key}")
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield from schema_keywords(sub, f"{path}/{key}/{i}")
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from schema_keywords(sub, f"{path}/{key}/{name}")


def check_enforced(schema_text: str, unenforced: frozenset[str], backend: str, param: str) -> None:
    found = [(k, p) for k, p in schema_keywords(json.loads(schema_text)) if k in unenforced]
    if found:
        shown = ", ".join(f"{k} (at {p})" for k, p in found[:5])
        raise GrammarCompileError(f"{param} uses JSON Schema features the {backend} backend does not enforce: "
                                  f"{shown}; remove them or serve with --structured-outputs-backend guidance")


def structural_tag_schemas(node: Any) -> Iterator[dict[str, Any]]:
    """The json_schema contents of a structural tag (xgrammar's format), to be checked and rewritten."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            yield node
        for value in node.values():
            yield from structural_tag_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from structural_tag_schemas(value)


def _error_text(exc: Exception) -> str:
    text = str(exc).strip()
    # xgrammar prefixes "[hh:mm:ss] /path/file.cc:line: ": the user needs only what follows.
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0]) if text else type(exc).__name__


# ---- xgrammar ------------------------------------------------------------------------------------
@dataclass(eq=False)
class XGrammarMatcher:
    matcher: Any

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def fill(self, mask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(mask, row)


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: TokenizerSource, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(self._tokenizer_info(tokenizer, vocab_size), max_threads=1)

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind, compiler = params.kind, self._compiler
        param = f"structured_outputs.{kind}"
        if kind == "json":
            check_enforced(params.json, XGRAMMAR_UNENFORCED, self.name, param)
        try:
            if kind == "json":
                return compiler.compile_json_schema(params.json, strict_mode=True, any_whitespace=False)
            if kind == "json_object":  # an object, as OpenAI's json_object promises (the builtin takes any value)
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(_choice_ebnf(params.choice or []))
            if kind == "structural_tag":
                return compiler.compile_structural_tag(self._compact_structural_tag(params.structural_tag))
            return compiler.compile_grammar(params.grammar)
        except GrammarCompileError:
            raise
        except Exception as exc:  # xgrammar reports a bad grammar as RuntimeError or ValueError
            raise GrammarCompileError(f"{param} could not be compiled: {_error_text(exc)}") from None

    def matcher(self, compiled: Any) -> XGrammarMatcher:
        return XGrammarMatcher(self._xgr.GrammarMatcher(compiled))

    def _compact_structural_tag(self, text: str | None) -> str:
        """The tag with each JSON schema as a compact grammar: xgrammar's structural-tag JSON otherwise allows
        free whitespace, which a small model fills its budget with."""
        tag = json.loads(text or "{}")
        for node in structural_tag_schemas(tag):
            schema = json.dumps(node.pop("json_schema"))
            check_enforced(schema, XGRAMMAR_UNENFORCED, self.name, "tools[].function.parameters")
            grammar = self._xgr.Grammar.from_json_schema(schema, strict_mode=True, any_whitespace=False)
            node.clear()
            node.update({"type": "grammar", "grammar": str(grammar)})
        return json.dumps(tag)

    @staticmethod
    def _tokenizer_info(tokenizer: TokenizerSource, vocab_size: int) -> Any:
        import xgrammar as xgr

        vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        encoded = [""] * max(max(vocab.values()) + 1, 0)
        for text, token_id in vocab.items():
            encoded[token_id] = text
        return xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                 stop_token_ids=list(tokenizer.eos_token_ids), add_prefix_space=False)


def _choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (each as a quoted literal)."""
    def literal(text: str) -> str:
        return '"' + "".join(_EBNF_ESCAPES.get(c, c) for c in text) + '"'

    return "root ::= " + " | ".join(literal(c) for c in choices)


_EBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# ---- llguidance ----------------------------------------------------------------------------------
# The same compact JSON as the xgrammar backend: ", " and ": ", no free whitespace.
_GUIDANCE_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(eq=False)
class GuidanceMatcher:
    matcher: Any
    _fill: Any

    def accept(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token)) and not self.matcher.is_error()

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_stopped())

    def fill(self, mask: Any, row: int) -> None:
        self._fill(self.matcher, mask.numpy(), row)


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: TokenizerSource, vocab_size: int) -> None:
        import llguidance
        import llguidance.numpy

        self._llg = llguidance
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab_size,
                                                 eos_token=sorted(tokenizer.eos_token_ids))

    def compile(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher over the compiled grammar; each request gets a copy of it."""
        kind = params.kind
        param = f"structured_outputs.{kind}"
        llg = self._llg
        try:
            if kind == "json":
                grammar = llg.LLMatcher.grammar_from_json_schema(params.json, defaults=_GUIDANCE_JSON)
            elif kind == "json_object":
                grammar = llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_GUIDANCE_JSON)
            elif kind == "regex":
                grammar = llg.grammar_from("regex", params.regex)
            elif kind == "choice":
                grammar = llg.grammar_from("choice", json.dumps(params.choice))
            elif kind == "structural_tag":
                grammar = structural_tag_lark(json.loads(params.structural_tag or "{}"))
            else:
                grammar = llg.grammar_from("ebnf", params.grammar)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is the grammar's fault
            raise GrammarCompileError(f"{param} could not be compiled: {_error_text(exc)}") from None
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarCompileError(f"{param} could not be compiled: {matcher.get_error()}")
        return matcher

    def matcher(self, compiled: Any) -> GuidanceMatcher:
        return GuidanceMatcher(compiled.deep_copy(), self._fill)


def structural_tag_lark(tag: dict[str, Any]) -> str:
    """xgrammar's structural-tag JSON (the subset tool calling uses) as an llguidance Lark grammar."""
    rules: list[str] = []
    start = _lark_format(tag.get("format", tag), rules)
    return "\n".join(["%llguidance {}", f"start: {start}", "TEXT: /(.|\\n)*/", *rules])


def _lark_format(fmt: dict[str, Any], rules: list[str]) -> str:
    kind = fmt.get("type")
    if kind == "const_string":
        return json.dumps(fmt["value"])
    if kind == "json_schema":
        return "%json " + json.dumps({**fmt["json_schema"], "x-guidance": _GUIDANCE_JSON})
    if kind == "sequence":
        return " ".join(_lark_format(e, rules) for e in fmt["elements"])
    if kind == "or":
        return "(" + " | ".join(_lark_format(e, rules) for e in fmt["elements"]) + ")"
    if kind == "tag":
        parts = [json.dumps(fmt["begin"]) if fmt["begin"] else "", _lark_format(fmt["content"], rules),
                 json.dumps(fmt["end"]) if fmt["end"] else ""]
        return " ".join(p for p in parts if p)
    if kind == "tags_with_separator":
        one = "(" + " | ".join(_lark_format(t, rules) for t in fmt["tags"]) + ")"
        if fmt.get("stop_after_first"):
            return one if fmt.get("at_least_one") else f"{one}?"
        more = f"{one} ({json.dumps(fmt.get('separator', ''))} {one})*"
        return more if fmt.get("at_least_one") else f"({more})?"
    if kind == "triggered_tags":
        # Free text up to a trigger (a lazy lexeme: it ends at the trigger's first occurrence), then the tag.
        tags = []
        for tag in fmt["tags"]:
            trigger = next((t for t in fmt["triggers"] if tag["begin"].startswith(t)), None)
            if trigger is None:
                raise GrammarCompileError(f"structured_outputs.structural_tag: tag {tag['begin']!r} starts "
                                          "with none of the triggers")
            name = f"tag_{len(rules)}"
            rules.append(f"{name}_trigger[lazy]: TEXT {json.dumps(trigger)}")
            rest = {**tag, "begin": tag["begin"][len(trigger):]}
            rules.append(f"{name}: {name}_trigger {_lark_format(rest, rules)}")
            tags.append(name)
        one = "(" + " | ".join(tags) + ")"
        if fmt.get("stop_after_first"):
            return one if fmt.get("at_least_one") else f"({one} | TEXT)"
        return f"{one}+ TEXT" if fmt.get("at_least_one") else f"{one}* TEXT"
    raise GrammarCompileError(f"structured_outputs.structural_tag: format type {kind!r} is not supported")
