"""The Triton elementwise kernels (the GPU twins of the C++ ones) under TRITON_INTERPRET=1 on CPU tensors,
against the C++ kernels (same arithmetic) and the torch paths."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton")

from pagoda.model.cpu_kernels import load_cpu_kernels  # noqa: E402
from pagoda.model.layers import triton_elementwise as tri  # noqa: E402
from pagoda.model.layers.rotary import RotaryAngles, RotaryEmbedding, apply_rotary_, inverse_frequencies  # noqa: E402

# bf16: two units of rounding (the interpreter truncates where the GPU rounds, see below).
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 2**-6)]


@pytest.fixture(scope="module")
def cpu_ops():
    ops = load_cpu_kernels()
    assert ops is not None, "the C++ CPU kernels did not build"
    return ops


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_rms_norm_and_add_rms_norm(cpu_ops, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    n = 200  # not a power of two: the masked tail
    x = torch.randn(5, 2 * n).to(dtype)[:, :n]  # strided rows
    residual = torch.randn(5, n).to(dtype)
    weight = torch.randn(n).to(dtype)
    torch.testing.assert_close(tri.rms_norm(x, weight, 1e-5), cpu_ops.rms_norm(x, weight, 1e-5), atol=tol, rtol=tol)
    torch.testing.assert_close(tri.rms_norm(x, weight, 1e-5), F.rms_norm(x, (n,), weight, 1e-5), atol=tol * 4,
                               rtol=tol * 4)
    res_tri, res_cpu = residual.clone(), residual.clone()
    out_tri = tri.add_rms_norm(x, res_tri, weight, 1e-5)
    out_cpu = cpu_ops.add_rms_norm(x.contiguous(), res_cpu, weight, 1e-5)
    # The residual stream: one rounded add. Bit for bit in fp32; in bf16 within one unit of rounding, as
    # Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest (cvt.rn, checked in
    # test_triton_compile.py).
    ulp = 0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(res_tri, res_cpu, atol=1e-6, rtol=ulp)
    torch.testing.assert_close(res_tri, residual + x, atol=1e-6, rtol=ulp)
    torch.testing.assert_close(out_tri, out_cpu, atol=tol, rtol=tol)
    assert tri.rms_norm(x[:0], weight, 1e-5).shape == (0, n)
    with pytest.raises(ValueError, match="rms_norm"):
        tri.rms_norm(x, weight[:-1], 1e-5)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_silu_and_mul(cpu_ops, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    n = tri.SILU_BLOCK + 37  # two column blocks, the second partial
    gate_up = (torch.randn(3, 2 * n) * 4).to(dtype)
    out = tri.silu_and_mul(gate_up)
    torch.testing.assert_close(out, cpu_ops.silu_and_mul(gate_up), atol=tol, rtol=tol)
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(out.float(), F.silu(gate) * up, atol=tol * 4, rtol=tol * 4)
    with pytest.raises(ValueError, match="silu_and_mul"):
        tri.silu_and_mul(gate_up[:, :-1])


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_rotary_in_place_inside_a_fused_qkv(cpu_ops, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 6, 9, 2, 32  # 11 of the 13 heads rotate (q and k; two programs), v stays
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    positions = torch.tensor([0, 1, 2, 100, 2047, 5])
    angles = RotaryEmbedding(inverse_frequencies(dim, 10000.0, None)).angles(positions)
    results = []
    for rotate in (tri.rotary_inplace, cpu_ops.rotary_inplace):
        x = qkv.clone()
        rotate(x[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim), angles.cos, angles.sin)
        results.append(x)
    torch.testing.assert_close(results[0], results[1], atol=tol, rtol=tol)
    assert torch.equal(results[0][:, (heads + kv_heads) * dim:], qkv[:, (heads + kv_heads) * dim:])  # v untouched
    # The torch path (HF's arithmetic: cos/sin and products in the model dtype).
    reference = qkv[:, : (heads + kv_heads) * dim].reshape(tokens, heads + kv_heads, dim).clone()
    ops_off = RotaryAngles(angles.cos, angles.sin)
    torch.testing.assert_close(results[0][:, : (heads + kv_heads) * dim].view(tokens, -1, dim),
                               _torch_rotary(reference, ops_off), atol=tol * 8, rtol=tol * 8)
    with pytest.raises(ValueError, match="rotary"):
        tri.rotary_inplace(qkv.view(tokens, -1, dim), angles.cos[:, :-1], angles.sin)


def test_float16_against_the_torch_paths() -> None:
    """float16 (which the C++ kernels do not take) through the Triton kernels, against torch in fp32."""
    torch.manual_seed(0)
    tol = 2**-9  # two units of fp16 rounding near 1
    x, residual, weight = torch.randn(4, 96).half(), torch.randn(4, 96).half(), torch.randn(96).half()
    torch.testing.assert_close(tri.rms_norm(x, weight, 1e-5).float(),
                               F.rms_norm(x.float(), (96,), weight.float(), 1e-5), atol=tol * 8, rtol=tol * 4)
    summed = residual.clone()
    out = tri.add_rms_norm(x, summed, weight, 1e-5)
    torch.testing.assert_close(summed.float(), x.float() + residual.float(), atol=tol * 8, rtol=tol * 2)
    torch.testing.assert_close(out.float(), F.rms_norm(summed.float(), (96,), weight.float(), 1e-5), atol=tol * 8,
                               rtol=tol * 4)
    gate_up = torch.randn(3, 64).half()
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(tri.silu_and_mul(gate_up).float(), F.silu(gate) * up, atol=tol * 8, rtol=tol * 4)
    qk = torch.randn(2, 3, 32).half()
    angles = RotaryEmbedding(inverse_frequencies(32, 10000.0, None)).angles(torch.tensor([3, 700]))
    expected = _torch_rotary(qk.float(), angles)
    tri.rotary_inplace(qk, angles.cos, angles.sin)
    torch.testing.assert_close(qk.float(), expected, atol=tol * 8, rtol=tol * 4)


def _torch_rotary(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    cos = torch.cat((angles.cos, angles.cos), dim=-1)[:, None, :].to(x.dtype)
    sin = torch.cat((angles.sin, angles.sin), dim=-1)[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_a_model_through_the_triton_kernels_matches_the_cpp_kernels(make_tiny_model, monkeypatch) -> None:
    """The whole decoder (Qwen3: q/k norms, rotary inside the fused qkv, residual norms, MLP) with every fused
    operation routed to the Triton kernels, as on a GPU: the same greedy tokens and near logprobs."""
    from pagoda import LLM, SamplingParams
    from pagoda.model import fused_ops

    folder, _ = make_tiny_model("qwen3", seed=4)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1)
    prompts = ["The capital of France is", "1, 2, 3,"]
    runs = []
    for route in (False, True):
        if route:
            monkeypatch.setattr(fused_ops, "for_tensor", lambda x: tri if x.dtype in fused_ops.FUSED_DTYPES else None)
        llm = LLM(str(folder), dtype="float32", num_kv_blocks=32, seed=0)
        runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
    for cpp, triton_run in zip(*runs):
        assert cpp.token_ids == triton_run.token_ids
        assert abs(cpp.cumulative_logprob - triton_run.cumulative_logprob) < 1e-4


def test_the_gpu_decode_step_launches_fewer_kernels_with_the_fused_ones() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    counts = []
    for flag in ([], ["--fused"]):
        done = subprocess.run([sys.executable, str(root / "scripts" / "count_launches.py"), "--model",
                               str(root / "configs" / "qwen3-0.6b.json"), *flag],
                              capture_output=True, text=True, timeout=600, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        counts.append(json.loads(done.stdout.splitlines()[-1]))
    torch_path, fused = counts
    assert {"cat", "neg", "silu"} <= set(torch_path["torch_ops"])  # rotary and the MLP in torch pieces
    assert set(fused["triton"]) >= {"_rms_norm_kernel", "_rotary_kernel", "_silu_and_mul_kernel"}
    assert not {"neg", "silu", "rms_norm"} & set(fused["torch_ops"])
    assert fused["torch_ops"].get("cat", 0) == fused["layers"]  # only Qwen3's join of the normed q and k
    assert fused["launches_per_step"] < torch_path["launches_per_step"]
