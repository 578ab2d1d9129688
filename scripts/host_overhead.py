"""Host-side cost of one engine step: scheduling, input preparation, sampling bookkeeping and output
processing, with the model replaced by a stub that returns at once. On a GPU this work runs between
kernel launches and adds to every step, so it bounds throughput at large batch sizes.

    python scripts/host_overhead.py --num-seqs 256 --output-len 128

Uses a bare config (2 tiny layers, dummy weights) and the bundled tokenizer; prints ms per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pagoda import LLM, SamplingParams
from pagoda.api.outputs import RequestOutputKind

STUB_VOCAB = 512  # logits of the stub: small, so argmax costs nothing next to the host work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--input-len", type=int, nargs=2, default=[128, 256])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        llm = LLM(str(path), load_format="dummy", dtype="float32", max_model_len=2048, max_num_seqs=args.num_seqs,
                  max_num_batched_tokens=8192, kv_cache_gib=2)
    model = llm.engine.runner.model
    logits = torch.randn(args.num_seqs, STUB_VOCAB)
    model.forward = lambda input_ids, *a, **k: torch.zeros(input_ids.shape[0], config["hidden_size"])
    model.compute_logits = lambda hidden: logits[: hidden.shape[0]]
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(100, 49000, int(rng.integers(args.input_len[0],
                                                                             args.input_len[1] + 1))).tolist()}
               for _ in range(args.num_seqs)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    engine = llm.engine
    per_run = []
    step_times: list[float] = []
    for run in range(args.repeats + 1):  # the first run warms up
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{run}-{i}", prompt, params, output_kind=RequestOutputKind.FINAL_ONLY)
        steps, start = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            begin = time.perf_counter()
            engine.step()
            if run:
                step_times.append(time.perf_counter() - begin)
            steps += 1
        per_run.append((time.perf_counter() - start) / steps)
    print(json.dumps({"num_seqs": args.num_seqs, "output_len": args.output_len,
                      # One step with everything that runs between two model calls; a run's mean adds the
                      # prefill steps and the final detokenization spread over its steps.
                      "host_ms_per_step_median": round(statistics.median(step_times) * 1e3, 3),
                      "host_ms_per_step_mean_per_run": [round(t * 1e3, 2) for t in per_run[1:]]}))


if __name__ == "__main__":
    main()
