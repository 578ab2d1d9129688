"""Structured outputs in the engine (offline API, the bundled model): every output that ends as "stop" matches
its constraint, a grammar that does not compile fails only its own request, "length" stays "length"."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest

from pagoda import LLM, SamplingParams
from pagoda.api.params import StructuredOutputsParams

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module", params=["xgrammar", "guidance"])
def llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    yield LLM("smollm2-135m", max_model_len=1024, kv_cache_gib=0.2, structured_outputs_backend=request.param)


def _chat(llm: LLM, text: str) -> str:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}])


def _params(seed: int, **structured: object) -> SamplingParams:
    return SamplingParams(temperature=0.9, seed=seed, max_tokens=96, structured_outputs=StructuredOutputsParams(**structured))


def test_every_kind_of_constraint_holds_over_seeded_samples(llm: LLM) -> None:
    prompt = _chat(llm, "Describe a person in JSON.")
    grammar = 'root ::= "color: " ("red" | "green" | "blue") "."'
    kinds = [({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
             ({"json_object": True}, lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
             ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) or pytest.fail(t)),
             ({"choice": ["yes", "no", "it \"depends\""]}, lambda t: t in ("yes", "no", 'it "depends"') or pytest.fail(t)),
             ({"grammar": grammar}, lambda t: re.fullmatch(r"color: (red|green|blue)\.", t) or pytest.fail(t))]
    requests = [(spec, check, seed) for spec, check in kinds for seed in range(4)]
    outs = llm.generate([prompt] * len(requests), [_params(seed, **spec) for spec, _, seed in requests], use_tqdm=False)
    stops = 0
    for (spec, check, _), out in zip(requests, outs):
        choice = out.outputs[0]
        if choice.finish_reason == "stop":
            stops += 1
            check(choice.text)
        else:
            assert choice.finish_reason == "length", (spec, choice)
    assert stops >= len(requests) - 4  # most end inside 96 tokens; those that do not say "length"


def test_too_few_tokens_is_length_never_a_cut_stop(llm: LLM) -> None:
    out = llm.generate(_chat(llm, "A person as JSON."), SamplingParams(
        temperature=0, max_tokens=3, structured_outputs=StructuredOutputsParams(json=PERSON)), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"


def test_a_grammar_that_does_not_compile_fails_alone(llm: LLM) -> None:
    prompt = _chat(llm, "Hi")
    outs = llm.generate([prompt, prompt], [
        SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(grammar="root ::= (\"a\"")),
        SamplingParams(temperature=0, max_tokens=4)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "structured_outputs.grammar" in outs[0].error
    assert "grammar_parser" not in outs[0].error and ".cc:" not in outs[0].error  # no source location
    assert outs[1].outputs[0].finish_reason == "length" and outs[1].outputs[0].text
    assert llm.engine.core.scheduler.kv.pool.num_free_blocks == llm.engine.num_blocks  # nothing held


def test_n_children_each_follow_the_grammar_and_compiles_are_cached(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta", "gamma"]))
    out = llm.generate(_chat(llm, "Pick one."), params, use_tqdm=False)[0]
    assert {c.text for c in out.outputs} <= {"alpha", "beta", "gamma"} and len(out.outputs) == 3
    manager = llm.engine.core.structured
    cached = len(manager._cache)
    llm.generate(_chat(llm, "Again."), params, use_tqdm=False)
    assert len(manager._cache) == cached and not manager.active and not manager.pending


@pytest.mark.parametrize(("fields", "named"), [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"json": "{nope"}, "structured_outputs.json"),
    ({"choice": ["x"] * 300}, "structured_outputs.choice"), ({"regex": ""}, "structured_outputs.regex"),
])
def test_bad_structured_params_name_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        StructuredOutputsParams(**fields)


def test_structured_outputs_refuse_stops_that_would_cut_them() -> None:
    spec = StructuredOutputsParams(json_object=True)
    with pytest.raises(ValueError, match="^stop"):
        SamplingParams(stop=["}"], structured_outputs=spec)
    with pytest.raises(ValueError, match="^min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=spec)


@pytest.mark.parametrize(("backend", "schema", "named"), [
    ("xgrammar", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems (at /)"),
    ("xgrammar", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not (at /properties/a)"),
    ("xgrammar", {"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf (at /)"),
    ("guidance", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ("guidance", {"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
])
def test_a_schema_feature_the_backend_would_drop_is_refused_by_name(backend: str, schema: dict, named: str) -> None:
    from pagoda.engine.core.structured_output import StructuredOutputManager
    from pagoda.engine.core.grammar_backends import GrammarCompileError

    manager = StructuredOutputManager(_tokenizer(), 49152, backend)  # type: ignore[arg-type]
    with pytest.raises(GrammarCompileError, match=re.escape(named)):
        manager._compile(StructuredOutputsParams(json=schema))


def test_auto_compiles_with_guidance_what_xgrammar_would_drop() -> None:
    from pagoda.engine.core.structured_output import StructuredOutputManager

    manager = StructuredOutputManager(_tokenizer(), 49152, "auto")
    compiled = manager._compile(StructuredOutputsParams(json={"allOf": [{"type": "integer"}, {"minimum": 3}]}))
    assert compiled.backend.name == "guidance"
    assert manager._compile(StructuredOutputsParams(json=PERSON)).backend.name == "xgrammar"


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_matcher_rolls_back_to_an_earlier_state(backend: str) -> None:
    from pagoda.engine.core.structured_output import RequestGrammar, StructuredOutputManager
    import concurrent.futures

    manager = StructuredOutputManager(_tokenizer(), 49152, backend)  # type: ignore[arg-type]
    compiled = manager._compile(StructuredOutputsParams(choice=["alpha beta", "alpha gamma"]))
    tok = _tokenizer().tokenizer
    grammar = RequestGrammar(concurrent.futures.Future(), matcher=compiled.backend.matcher(compiled.grammar))
    beta, gamma = (tok.encode(t, add_special_tokens=False).ids for t in ("alpha beta", "alpha gamma"))
    common = next(i for i, (a, b) in enumerate(zip(beta, gamma)) if a != b)
    assert grammar.accept(beta) == len(beta)
    grammar.rollback(len(beta) - common)
    assert grammar.accept(gamma[common:]) == len(gamma) - common  # the other branch is open again
    with pytest.raises(ValueError, match="roll back"):
        grammar.rollback(len(gamma) + 1)


def _tokenizer():  # type: ignore[no-untyped-def]
    from pagoda.model.gguf_file import GGUFFile
    from pagoda.model.loader import resolve_model
    from pagoda.model.tokenizer_source import tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(resolve_model("smollm2-135m").path).metadata)


def test_a_compile_over_its_time_limit_fails_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagoda.engine.core import structured_output

    monkeypatch.setattr(structured_output, "COMPILE_TIMEOUT_S", 0.0)  # the real limit is too long for a test
    deep: dict = {"type": "integer"}
    for _ in range(60):  # ~0.1 s to compile: over a limit of 0
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    prompt = _chat(llm, "Hi")
    outs = llm.generate([prompt, prompt], [
        SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json=deep)),
        SamplingParams(temperature=0, max_tokens=4)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "took longer than 0 s" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length" and outs[1].outputs[0].text
    assert llm.engine.core.scheduler.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_a_schema_nested_too_deep_is_refused_before_compiling() -> None:
    deep: dict = {"type": "integer"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ValueError, match="structured_outputs.json nests objects and arrays more than 128"):
        StructuredOutputsParams(json=deep)


def test_tool_call_structural_tags_hold_on_each_backend(llm: LLM) -> None:
    from pagoda.server.protocol import Tool
    from pagoda.server.tool_parsers import TOOL_FORMATS, ToolCallParser
    from pagoda.server.tools import ToolUse

    tool = Tool.model_validate({"type": "function", "function": {"name": "person", "parameters": PERSON}})
    stops = 0
    for fmt in TOOL_FORMATS.values():
        spec = ToolUse([tool], "required", False, fmt).constraint()
        outs = llm.generate([_chat(llm, "Call the person tool.")] * 3, [SamplingParams(
            temperature=1.0, seed=s, max_tokens=96, structured_outputs=spec) for s in range(3)], use_tqdm=False)
        for out in outs:
            choice = out.outputs[0]
            parser = ToolCallParser(fmt)
            parser.feed(choice.text, final=True)
            if choice.finish_reason == "stop":
                stops += 1
                (call,) = parser.result()[1]
                assert call["function"]["name"] == "person" and parser.complete == 1
                jsonschema.validate(json.loads(call["function"]["arguments"]), PERSON)
    assert stops >= 3, stops


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cpu_mask_kernel_matches_the_torch_path(dtype: str) -> None:
    import numpy as np
    import torch

    from pagoda.engine.step import GrammarBitmask
    from pagoda.engine.worker.model_runner import apply_grammar_bitmask, mask_logits_torch
    from pagoda.model.cpu_kernels import load_cpu_kernels

    if load_cpu_kernels() is None:
        pytest.skip("the C++ kernels are not built here")
    rng = np.random.default_rng(0)
    vocab, words = 1000, (1000 + 31) // 32
    bits = rng.integers(-2**31, 2**31, (3, words), dtype=np.int64).astype(np.int32)
    bits[0, :5], bits[1, 5:9], bits[2, -1] = 0, -1, 0x5  # all forbidden, all allowed, and a last partial word
    logits = torch.randn(5, vocab).to(getattr(torch, dtype))
    mask = GrammarBitmask(["a", "b", "c"], bits)
    expected = mask_logits_torch(logits.clone(), bits[[2, 0, 1]], [0, 2, 4])
    got = apply_grammar_bitmask(logits.clone(), mask, ["c", "x", "a", "y", "b"])
    assert torch.equal(got, expected)
    assert torch.isinf(got[0, 992:994]).tolist() == [False, True]  # 0x5 allows the word's tokens 0 and 2
