"""Fail-closed, property-based: over many generated JSON schemas (nested objects, arrays with bounds, enums,
anyOf, patterns, required and optional properties, $ref), every output that ends as "stop" validates against
its schema (the jsonschema validator), on each backend; the others end as "length", never cut as "stop".

Schemas are drawn a batch at a time (one engine run per batch), derandomized so CI runs the same ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagoda import LLM, SamplingParams
from pagoda.api.params import StructuredOutputsParams

NAMES = ["a", "b", "name", "count", "items", "kind"]
PATTERNS = ["^[a-z]{1,8}$", "^[0-9]{3}-[0-9]{2}$", "^(red|green|blue)$", "^[A-Z][a-z]*$"]

leaf = st.one_of(
    st.integers(1, 16).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.just({"type": "number"}), st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.lists(st.one_of(st.text("abxyz ", min_size=1, max_size=6), st.integers(-5, 5)), min_size=1, max_size=4,
             unique=True).map(lambda values: {"enum": values}),
    st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
)


def _object(props: dict[str, Any]) -> Any:
    return st.sets(st.sampled_from(sorted(props))).map(lambda required: {
        "type": "object", "properties": props, "required": sorted(required), "additionalProperties": False})


def _extend(children: Any) -> Any:
    return st.one_of(
        st.dictionaries(st.sampled_from(NAMES), children, min_size=1, max_size=3).flatmap(_object),
        st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}),
        st.lists(children, min_size=2, max_size=3).map(lambda options: {"anyOf": options}),
    )


schemas = st.recursive(leaf, _extend, max_leaves=6)
with_refs = st.tuples(schemas, schemas).map(lambda t: {
    "$defs": {"part": t[0]}, "type": "object", "additionalProperties": False, "required": ["part"],
    "properties": {"part": {"$ref": "#/$defs/part"}, "other": t[1]}})
roots = st.one_of(schemas.flatmap(lambda s: _object({"value": s})), with_refs)


@pytest.fixture(scope="module", params=["xgrammar", "guidance"])
def llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    yield LLM("smollm2-135m", max_model_len=1024, kv_cache_gib=0.2, structured_outputs_backend=request.param)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(roots, min_size=12, max_size=12))
def test_every_stopped_output_validates_against_its_schema(llm: LLM, batch: list[dict[str, Any]]) -> None:
    prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Answer in JSON."}])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=128,
                             structured_outputs=StructuredOutputsParams(json=schema)) for i, schema in enumerate(batch)]
    outs = llm.generate([prompt] * len(batch), params, use_tqdm=False)
    stops = 0
    for schema, out in zip(batch, outs):
        choice = out.outputs[0]
        assert choice.finish_reason in ("stop", "length"), (json.dumps(schema), out.error)
        if choice.finish_reason == "stop":
            stops += 1
            jsonschema.validate(json.loads(choice.text), schema, cls=jsonschema.Draft202012Validator)
    print(f"{stops} of {len(batch)} stopped")
    assert stops >= len(batch) // 2  # most fit in 128 tokens: the property is checked, not skipped
