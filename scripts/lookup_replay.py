"""Replay prompt lookup on the grounded prompts' greedy outputs (pagoda/data/spec_prompts.json, no speculation):
each decode step proposes drafts from the tokens known so far, keeps those that match the real continuation, and
the estimated speed-up prices a step at --step-ms and each verified draft at --row-ms. Compares lookup settings
without the noise of timing runs (the adaptive policy's trimming is left out).

    python scripts/lookup_replay.py --step-ms 5.9 --row-ms 1.0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from pagoda import LLM, SamplingParams
from pagoda.bench.spec import grounded_prompts
from pagoda.engine.worker.ngram_proposer import NgramProposer
from pagoda.model.loader import resolve_model

Propose = Callable[[np.ndarray, int], list[int]]  # known tokens, most drafts -> drafts


def replay(sequences: list[tuple[list[int], list[int]]], propose: Propose, num_drafts: int, step_ms: float,
           row_ms: float) -> dict[str, float]:
    steps = rows = tokens = drafted = 0
    for prompt, output in sequences:
        seq = prompt + output
        at = len(prompt) + 1  # the first output token comes with the prompt's step
        while at < len(seq):
            drafts = propose(np.asarray(seq[:at]), min(num_drafts, len(seq) - at))
            kept = 0
            while kept < len(drafts) and drafts[kept] == seq[at + kept]:
                kept += 1
            steps, rows, tokens, drafted = steps + 1, rows + len(drafts), tokens + kept + 1, drafted + bool(drafts)
            at += kept + 1
    return {"steps": steps, "steps_with_drafts": drafted, "verified_drafts": rows, "tokens": tokens,
            "estimated_speedup": round(tokens * step_ms / (steps * step_ms + rows * row_ms), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=5.9, help="a decode step of one row")
    parser.add_argument("--row-ms", type=float, default=1.0, help="each further row a step verifies")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(str(resolve_model("smollm2-135m").path))
    prompts = grounded_prompts(llm.get_tokenizer())
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    sequences = [(p["prompt_token_ids"], list(o.outputs[0].token_ids)) for p, o in zip(prompts, outputs)]
    one_token = NgramProposer(1, 1, 1)
    settings: dict[str, tuple[Propose, int]] = {
        f"lookup {lo}-{hi}, {k} drafts": (NgramProposer(lo, hi, k).propose, k)
        for lo, hi, k in ((2, 5, 5), (2, 5, 3), (2, 5, 8), (1, 5, 5), (3, 8, 5))
    }
    default = NgramProposer(2, 5, 5)
    settings["lookup 2-5, else one draft from a 1-token match"] = (
        lambda known, limit: default.propose(known, limit) or one_token.propose(known, limit), 5)
    for name, (propose, num_drafts) in settings.items():
        print(f"{name}: {replay(sequences, propose, num_drafts, args.step_ms, args.row_ms)}", flush=True)


if __name__ == "__main__":
    main()
