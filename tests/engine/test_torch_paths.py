"""The engine with Pagoda's C++ CPU kernels switched off runs the pure-torch paths that a GPU runs (torch
norms, rotary, activation, attention gather, argmax and sampling on the logits' device). Its tokens must
equal the kernels' tokens: greedy in fp32, and seeded sampling with penalties, bias and logprobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
from pagoda import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", num_kv_blocks=64, max_num_seqs=4)
prompts = [{"prompt_token_ids": list(range(200 + i, 200 + i + n))} for i, n in enumerate([5, 23, 9, 40])]
greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
sampled = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True,
                         repetition_penalty=1.2, presence_penalty=0.3, logit_bias={300: 2.0}, logprobs=2)
out = {}
for name, params in (("greedy", greedy), ("sampled", sampled)):
    outs = llm.generate(prompts, params, use_tqdm=False)
    out[name] = [o.outputs[0].token_ids for o in outs]
out["logprobs"] = [[round(lp[t].logprob, 4) for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                   for o in outs]
print(json.dumps(out))
"""


def _run(folder: str, disable_kernels: bool) -> dict:
    env = {**os.environ, "PAGODA_DISABLE_CPU_KERNELS": "1" if disable_kernels else "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, folder], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_torch_paths_match_the_kernels(make_tiny_model) -> None:
    folder, _ = make_tiny_model("qwen3", seed=4)
    kernels, torch_only = _run(str(folder), False), _run(str(folder), True)
    assert torch_only["greedy"] == kernels["greedy"]
    assert torch_only["sampled"] == kernels["sampled"]
    for a, b in zip(torch_only["logprobs"], kernels["logprobs"]):
        assert a == b or max(abs(x - y) for x, y in zip(a, b)) < 1e-3
