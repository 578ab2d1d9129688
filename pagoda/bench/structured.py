"""`pagoda bench structured`: what structured outputs cost, in one run.

    pagoda bench structured --concurrency 32 --out bench_results/structured.json
    pagoda bench structured --structured-outputs-backend guidance

- Throughput: --concurrency JSON-schema requests at once (the schemas below, cycled), then the same prompts
  unconstrained with each request's max_tokens set to what its constrained run generated and ignore_eos, so
  both runs decode the same tokens per request and the ratio of output tok/s is the constraint's cost;
  --rounds of each, interleaved, medians compared.
- Per-step mask cost: time filling the bitmask of the constrained rows (engine core) and applying it to the
  logits (runner), per step that had constrained rows, and as a share of the constrained run's wall time.
- Compile time: p50/p99 over the schemas and --variants generated variations of them, each compiled cold
  (a fresh manager, nothing cached).
- TTFT: one request whose schema was never compiled (cold) vs the same schema again (cached), --repeats
  different schemas.

Every engine flag of `pagoda serve` applies.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from pagoda.bench import write_json

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", {"type": "object", "additionalProperties": False, "required": ["name", "age", "email"],
                  "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0,
                                 "maximum": 150}, "email": {"type": "string", "maxLength": 60}}}),
    ("an order", {"type": "object", "additionalProperties": False, "required": ["id", "items", "total"],
                  "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}, "total": {"type": "number"},
                                 "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
                                     "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                                     "properties": {"sku": {"type": "string", "maxLength": 12},
                                                    "qty": {"type": "integer", "minimum": 1}}}}}}),
    ("the weather", {"type": "object", "additionalProperties": False, "required": ["city", "unit", "temperature"],
                     "properties": {"city": {"type": "string", "maxLength": 30},
                                    "unit": {"enum": ["celsius", "fahrenheit"]}, "temperature": {"type": "number"}}}),
    ("a calendar event", {"$defs": {"time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
                          "type": "object", "additionalProperties": False, "required": ["title", "start", "end"],
                          "properties": {"title": {"type": "string", "maxLength": 40}, "start": {"$ref": "#/$defs/time"},
                                         "end": {"$ref": "#/$defs/time"}, "room": {"type": ["string", "null"]}}}),
    ("a book review", {"type": "object", "additionalProperties": False, "required": ["title", "stars", "summary"],
                       "properties": {"title": {"type": "string", "maxLength": 50}, "stars": {"enum": [1, 2, 3, 4, 5]},
                                      "summary": {"type": "string", "maxLength": 120}}}),
    ("a to-do list", {"type": "object", "additionalProperties": False, "required": ["tasks"],
                      "properties": {"tasks": {"type": "array", "maxItems": 5, "items": {"anyOf": [
                          {"type": "string", "maxLength": 40},
                          {"type": "object", "additionalProperties": False, "required": ["task", "done"],
                           "properties": {"task": {"type": "string", "maxLength": 40}, "done": {"type": "boolean"}}}]}}}}),
]


def variants(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` schemas made from SCHEMAS by renaming, nesting and wrapping, so none is in a cache."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        schema = copy.deepcopy(SCHEMAS[i % len(SCHEMAS)][1])
        props = schema.get("properties", {})
        for name in list(props):
            if rng.random() < 0.5:
                props[f"{name}_{i}"] = props.pop(name)
                schema["required"] = [f"{r}_{i}" if r == name else r for r in schema.get("required", [])]
        if rng.random() < 0.5:
            defs = schema.pop("$defs", None)  # references are from the root: the definitions stay there
            schema = {"type": "object", "additionalProperties": False, "required": ["data"],
                      "properties": {"data": schema, "note": {"type": "string", "maxLength": rng.randint(5, 50)}},
                      **({"$defs": defs} if defs else {})}
        out.append(schema)
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _Timer:
    """Wraps a callable and sums the seconds spent in it (calls that returned something, for the mask)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = self.fn(*args, **kwargs)
        if result is not None:
            self.seconds += time.perf_counter() - start
            self.calls += 1
        return result


def throughput(llm: Any, concurrency: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    from pagoda import SamplingParams
    from pagoda.api.params import StructuredOutputsParams
    from pagoda.engine.worker import model_runner

    tok = llm.get_tokenizer()
    picked = [SCHEMAS[i % len(SCHEMAS)] for i in range(concurrency)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe {what} as JSON. Request {i}."}])
               for i, (what, _) in enumerate(picked)]
    constrained = [SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens,
                                  structured_outputs=StructuredOutputsParams(json=schema))
                   for i, (_, schema) in enumerate(picked)]
    llm.generate(prompts, constrained, use_tqdm=False)  # warm: compiles cached, kernels loaded
    manager = llm.engine.core.structured
    fill, apply = _Timer(manager.bitmask), _Timer(model_runner.apply_grammar_bitmask)
    constrained_s, plain_s, steps, lengths, stopped = [], [], 0, None, 0
    for _ in tqdm(range(rounds), desc="rounds (constrained, then plain)", leave=False):  # interleaved
        manager.bitmask, model_runner.apply_grammar_bitmask = fill, apply
        try:
            steps0 = llm.engine.stats.num_steps
            start = time.perf_counter()
            outs = llm.generate(prompts, constrained, use_tqdm=False)
            constrained_s.append(time.perf_counter() - start)
            steps += llm.engine.stats.num_steps - steps0
        finally:
            manager.bitmask, model_runner.apply_grammar_bitmask = fill.fn, apply.fn
        if lengths is None:
            lengths = [len(o.outputs[0].token_ids) for o in outs]
            stopped = sum(o.outputs[0].finish_reason == "stop" for o in outs)
        assert [len(o.outputs[0].token_ids) for o in outs] == lengths, "seeded: every round decodes the same"
        plain = [SamplingParams(temperature=0.8, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
        start = time.perf_counter()
        plain_outs = llm.generate(prompts, plain, use_tqdm=False)
        plain_s.append(time.perf_counter() - start)
        assert [len(o.outputs[0].token_ids) for o in plain_outs] == lengths
    tokens = sum(lengths or [])
    c_s, p_s = statistics.median(constrained_s), statistics.median(plain_s)
    return {
        "concurrency": concurrency, "rounds": rounds, "output_tokens": tokens, "stopped": stopped,
        "steps": steps // rounds, "constrained_tok_per_s": round(tokens / c_s, 1),
        "unconstrained_tok_per_s": round(tokens / p_s, 1), "ratio": round(p_s / c_s, 3),
        "constrained_s": [round(t, 3) for t in constrained_s], "unconstrained_s": [round(t, 3) for t in plain_s],
        "mask_fill_ms_per_step": round(1e3 * fill.seconds / max(fill.calls, 1), 3),
        "mask_apply_ms_per_step": round(1e3 * apply.seconds / max(apply.calls, 1), 3),
        "mask_share_of_wall": round((fill.seconds + apply.seconds) / sum(constrained_s), 4),
        "step_ms_constrained": round(1e3 * c_s / max(steps // rounds, 1), 3),
    }


def compile_times(llm: Any, count: int, backend: str) -> dict[str, Any]:
    from pagoda.api.params import StructuredOutputsParams
    from pagoda.engine.core.structured_output import StructuredOutputManager

    info = llm.engine.core.info
    manager = StructuredOutputManager(info.tokenizer, info.vocab_size, backend)  # type: ignore[arg-type]
    manager._compile(StructuredOutputsParams(json_object=True))  # build the backend (tokenizer tables) first
    times = []
    for schema in tqdm([s for _, s in SCHEMAS] + variants(count), desc="compile", leave=False):
        start = time.perf_counter()
        manager._compile(StructuredOutputsParams(json=schema))
        times.append(1e3 * (time.perf_counter() - start))
    return {"schemas": len(times), "p50_ms": round(_percentile(times, 0.5), 2),
            "p99_ms": round(_percentile(times, 0.99), 2), "max_ms": round(max(times), 2)}


def ttft(llm: Any, repeats: int) -> dict[str, Any]:
    from pagoda import SamplingParams
    from pagoda.api.params import StructuredOutputsParams

    prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Answer in JSON."}])
    cold, cached = [], []
    for schema in variants(repeats, seed=1 + int(time.time())):  # never seen by this engine
        params = SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(json=schema))
        for into in (cold, cached):
            start = time.perf_counter()
            for out in llm.generate_stream(prompt, params):
                if out.outputs and out.outputs[0].token_ids:
                    into.append(1e3 * (time.perf_counter() - start))
                    break
    return {"repeats": repeats, "cold_p50_ms": round(statistics.median(cold), 1),
            "cached_p50_ms": round(statistics.median(cached), 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pagoda.cli import add_engine_args

    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="constrained and plain runs, interleaved (median)")
    parser.add_argument("--variants", type=int, default=60, help="generated schemas for the compile times")
    parser.add_argument("--repeats", type=int, default=8, help="schemas for the cold/cached TTFT")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    add_engine_args(parser, positional_model=False)


def run(args: argparse.Namespace) -> int:
    from pagoda import LLM
    from pagoda.cli import engine_kwargs

    for flag, value in (("--concurrency", args.concurrency), ("--max-tokens", args.max_tokens), ("--rounds", args.rounds),
                        ("--variants", args.variants), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    engine_args = engine_kwargs(args)
    llm = LLM(**engine_args)
    backend = engine_args.get("structured_outputs_backend", "auto")
    result = {"engine_args": engine_args, "throughput": throughput(llm, args.concurrency, args.max_tokens, args.rounds),
              "compile": compile_times(llm, args.variants, backend), "ttft": ttft(llm, args.repeats)}
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)
    return 0
