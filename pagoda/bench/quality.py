"""What quantization costs in accuracy: perplexity on a fixed text and top-1 agreement with the fp32 model.

    pagoda bench quality                                  # every mode on the bundled model
    pagoda bench quality --modes fp32,bf16,int8 --group-size 64 --out results/quality.json
    pagoda bench quality --modes gguf,kv-int8 --decode-rows 6     # scored by decode steps of 6 rows

The text is shipped with Pagoda (pagoda/data/eval_text.txt: Jane Austen, public domain; see SOURCES.md), cut
into windows of --window tokens, each scored as its own prompt through the engine (prompt logprobs, prefix
cache off, prefill in chunks of --chunk tokens so that later chunks read the earlier ones' keys and values
from the KV cache, as serving does). For every position after a window's first: the log-probability of the
text's next token (perplexity = exp of their negated mean) and the most likely token, compared with the fp32
model's (top-1 agreement). With --decode-rows N the positions after a window's first 16 tokens are scored
through decode steps instead, N rows a step (a token and N - 1 drafts, as speculative decoding verifies them),
so that the decode kernels' own arithmetic is what is measured (the paged decode attention, the one-call decode;
prefill attends through torch's SDPA). Modes:

* fp32, bf16: the model's own weights (a GGUF file dequantized) in that dtype; fp32 is the reference;
* gguf: a GGUF file's blocks as stored (--dtype auto);
* int8, int4: --quantization at load (bf16 activations; int4 in groups of --group-size, its vocabulary
  projection int8);
* rtn, gptq, awq: checkpoints written by `pagoda quantize --method int4|gptq|awq` (4-bit, groups of
  --group-size, asymmetric; the same layout, so they differ only in how the codes were chosen), written to
  --work-dir on first use;
* kv-int8, kv-fp8: bf16 weights with the KV cache in int8 (scales per token and head) or fp8 e4m3.

Goals (issue 17): int8 within 1% of bf16's perplexity; int4, GPTQ and AWQ within 5%; GPTQ and AWQ below
round-to-nearest at the same group size. Also reported: the weight bytes each mode keeps resident.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.bench import free_device_memory, write_json
from pagoda.config import MAX_SPECULATIVE_TOKENS

EVAL_TEXT = "eval_text.txt"
CHECKPOINT_METHODS = {"rtn": "int4", "gptq": "gptq", "awq": "awq"}
DECODE_PREFILL = 16  # a window's first tokens, prefilled before --decode-rows steps score the rest
MAX_DECODE_ROWS = MAX_SPECULATIVE_TOKENS + 1  # a token and the most drafts one step verifies


@dataclass(frozen=True)
class Mode:
    name: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # a `pagoda quantize` method whose checkpoint is the model


def modes(group_size: int) -> dict[str, Mode]:
    bf16 = {"dtype": "bfloat16"}
    return {mode.name: mode for mode in [
        Mode("fp32", {"dtype": "float32"}),
        Mode("bf16", bf16),
        Mode("gguf", {"dtype": "auto"}),
        Mode("int8", bf16 | {"quantization": "int8"}),
        Mode("int4", bf16 | {"quantization": "int4", "quantization_group_size": group_size}),
        *(Mode(name, bf16, checkpoint=method) for name, method in CHECKPOINT_METHODS.items()),
        Mode("kv-int8", bf16 | {"kv_cache_dtype": "int8"}),
        Mode("kv-fp8", bf16 | {"kv_cache_dtype": "fp8_e4m3"}),
    ]}


@dataclass
class Scores:
    logprobs: list[float]  # of the text's next token, at every scored position
    top1: list[int]  # the most likely token there
    weight_bytes: int
    seconds: float

    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


def score(model: str, mode: Mode, window: int, chunk: int, decode_rows: int = 0) -> Scores:
    """The mode's logprobs of the shipped text, window by window: prompts prefilled in chunks, or (decode_rows > 0)
    decode steps of that many rows."""
    from pagoda import LLM, SamplingParams
    from pagoda.bench.latency import decode_weight_bytes
    from pagoda.quantize.calibration import shipped_text

    started = time.perf_counter()
    llm = LLM(model=model, **mode.engine_args, enable_prefix_caching=False, max_num_batched_tokens=chunk,
              max_model_len=window + 1, kv_cache_gib=max(0.05, window * 2**-14))
    ids = llm.get_tokenizer().encode(shipped_text(EVAL_TEXT), add_special_tokens=False)
    count = len(ids) // window
    if count == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one --window of {window}")
    windows = [ids[i * window : (i + 1) * window] for i in range(count)]
    logprobs: list[float] = []
    top1: list[int] = []
    if decode_rows:
        for tokens in windows:
            _score_by_decode_steps(llm, tokens, decode_rows, logprobs, top1)
    else:
        prompts = [{"prompt_token_ids": tokens} for tokens in windows]
        outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1))
        for tokens, output in zip(windows, outputs):
            for token, position in zip(tokens[1:], output.prompt_logprobs[1:]):
                logprobs.append(position[token].logprob)
                top1.append(next(t for t, lp in position.items() if lp.rank == 1))
    weight_bytes = decode_weight_bytes(llm.engine.runner.model)
    del llm
    free_device_memory()
    return Scores(logprobs, top1, weight_bytes, time.perf_counter() - started)


def _score_by_decode_steps(llm: Any, tokens: list[int], rows: int, logprobs: list[float], top1: list[int]) -> None:
    """Appends the logprob and top-1 token at every position of ``tokens`` but the last: the first
    DECODE_PREFILL rows from their prefill, the rest from decode steps of ``rows`` rows over the KV cache. The
    engine is idle (no request holds a block), so the window's KV goes to its first blocks."""
    import torch

    runner = llm.engine.runner
    blocks = list(range(-(-len(tokens) // runner.block_size)))
    start = 0
    with torch.inference_mode():
        while start < len(tokens) - 1:
            count = min(DECODE_PREFILL if start == 0 else rows, len(tokens) - 1 - start)
            hidden = runner.hidden_states(tokens, start, count, blocks)
            scores = runner.model.compute_logits(hidden).float().log_softmax(-1)
            following = torch.tensor(tokens[start + 1 : start + 1 + count])
            logprobs += scores[torch.arange(count), following].tolist()
            top1 += scores.argmax(-1).tolist()
            start += count


def checkpoint(model: str, method: str, group_size: int, work_dir: Path) -> str:
    """The folder of `pagoda quantize --method METHOD` for this model and group size, written if missing."""
    from pagoda.model.loader import resolve_model
    from pagoda.quantize import cli as quantize

    folder = work_dir / f"{resolve_model(model).name}-{method}-g{group_size}"
    if not (folder / "config.json").exists():
        parser = argparse.ArgumentParser()
        quantize.add_arguments(parser)
        quantize.run(parser.parse_args(["--method", method, "--group-size", str(group_size), model, str(folder)]))
    return str(folder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--modes", default=",".join(modes(128)), help="comma-separated, from: " + ", ".join(modes(128)))
    parser.add_argument("--group-size", type=int, default=64,
                        help="int4 / rtn / gptq / awq groups (64 divides the bundled model's widths; AWQ needs that)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per scored prompt")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk (max_num_batched_tokens)")
    parser.add_argument("--decode-rows", type=int, default=0,
                        help="score by decode steps of this many rows (a token and its drafts) instead of prefill")
    parser.add_argument("--work-dir", type=Path, default=Path("results/quality-checkpoints"),
                        help="where the rtn / gptq / awq checkpoints are written and reused")
    parser.add_argument("--out", default=None, help="write the results here as JSON")


def run(args: argparse.Namespace) -> int:
    table = modes(args.group_size)
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in table]
    if unknown:
        raise ValueError(f"unknown --modes {', '.join(unknown)}; known: {', '.join(table)}")
    if args.window < 2 or args.chunk < 1:
        raise ValueError("--window must be >= 2 and --chunk >= 1")
    if not 0 <= args.decode_rows <= MAX_DECODE_ROWS:
        raise ValueError(f"--decode-rows must be 0 (prefill) to {MAX_DECODE_ROWS}, got {args.decode_rows}")
    if "fp32" not in wanted:
        wanted.insert(0, "fp32")  # the reference every agreement is measured against
    results: dict[str, dict[str, Any]] = {}
    reference: Scores | None = None
    for name in sorted(wanted, key=lambda n: n != "fp32"):
        mode = table[name]
        model = checkpoint(args.model, mode.checkpoint, args.group_size, args.work_dir) if mode.checkpoint else args.model
        scores = score(model, mode, args.window, args.chunk, args.decode_rows)
        reference = reference or scores
        if len(scores.top1) != len(reference.top1):
            raise ValueError(f"mode {name} tokenized the text differently from fp32")
        agree = sum(a == b for a, b in zip(scores.top1, reference.top1)) / len(reference.top1)
        results[name] = {"perplexity": round(scores.perplexity(), 4), "top1_agreement": round(agree, 4),
                         "weight_mb": round(scores.weight_bytes / 1e6, 1), "seconds": round(scores.seconds, 1),
                         "positions": len(scores.logprobs), "model": model, **mode.engine_args}
        print(json.dumps({"mode": name} | results[name]), flush=True)
    report = {"model": args.model, "group_size": args.group_size, "window": args.window, "chunk": args.chunk,
              "decode_rows": args.decode_rows,
              "modes": results, "goals": goals(results)}
    print(_table(results))
    print(json.dumps(report["goals"]))
    if args.out:
        write_json(args.out, report)
    return 0


def goals(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 17's accuracy goals, for the modes that ran: perplexity change against bf16, and GPTQ/AWQ vs RTN."""
    if "bf16" not in results:
        return {}
    base = results["bf16"]["perplexity"]
    out: dict[str, Any] = {}
    for name, limit in (("int8", 0.01), ("int4", 0.05), ("rtn", 0.05), ("gptq", 0.05), ("awq", 0.05)):
        if name in results:
            change = results[name]["perplexity"] / base - 1
            out[f"{name}_vs_bf16"] = {"change": round(change, 4), "limit": limit, "met": change <= limit}
    for name in ("gptq", "awq"):
        if name in results and "rtn" in results:
            out[f"{name}_below_rtn"] = results[name]["perplexity"] < results["rtn"]["perplexity"]
    return out


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| mode | perplexity | top-1 agreement with fp32 | weights MB |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['perplexity']:.3f} | {r['top1_agreement']:.4f} | {r['weight_mb']} |"
              for name, r in results.items()]
    return "\n".join(lines)
