"""Host cost per step of the sampler's penalties: 64 rows with repetition, frequency and presence penalties,
after 128 and after 1024 output tokens (the cost should not grow with the output).

    python scripts/penalty_cost.py
    git show <commit>:pagoda/engine/worker/sampler.py > /tmp/old_sampler.py && python scripts/penalty_cost.py --sampler-file /tmp/old_sampler.py
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time

import torch

from pagoda.api.params import SamplingParams
from pagoda.engine.step import NewRequestData
from pagoda.engine.worker.input_batch import CachedRequestState

VOCAB, ROWS, PROMPT, STEPS = 49152, 64, 128, 20


def load_sampler(path: str | None) -> type:
    if path is None:
        from pagoda.engine.worker.sampler import Sampler

        return Sampler
    spec = importlib.util.spec_from_file_location("sampler_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Sampler


def requests(history: int, rng: random.Random) -> list[CachedRequestState]:
    params = SamplingParams(temperature=1.0, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2)
    out = []
    for i in range(ROWS):
        prompt = [rng.randrange(VOCAB) for _ in range(PROMPT)]
        r = CachedRequestState.from_new(NewRequestData(f"r{i}", prompt, params, frozenset({0}), [], 0))
        r.output_token_ids.extend(rng.randrange(VOCAB) for _ in range(history))
        out.append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler-file", default=None, help="a sampler.py to measure instead of the installed one")
    args = parser.parse_args()
    sampler = load_sampler(args.sampler_file)()
    rng = random.Random(0)
    logits = torch.randn(ROWS, VOCAB)
    for history in (128, 1024):
        batch = requests(history, rng)
        sampler._process(logits, batch)  # the first step builds any per-request state
        times = []
        for _ in range(STEPS):
            for r in batch:
                r.output_token_ids.append(rng.randrange(VOCAB))
            start = time.perf_counter()
            sampler._process(logits, batch)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"after {history} output tokens: {times[STEPS // 2] * 1e3:.2f} ms per step (median of {STEPS}, {ROWS} rows)")


if __name__ == "__main__":
    main()
