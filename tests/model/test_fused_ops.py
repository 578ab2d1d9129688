"""The fused C++ layer ops against their torch formulations (fp32 tight, bf16 within rounding)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pagoda.model.cpu_kernels import load_cpu_kernels

ops = load_cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ kernels not built")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [576, 64, 37])  # vector body, exactly one vector, scalar tail
def test_rms_norm_and_fused_residual_add(dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, width, generator=gen).to(dtype)
    residual = torch.randn(9, width, generator=gen).to(dtype)
    weight = torch.randn(width, generator=gen).to(dtype)
    want = F.rms_norm(x.float(), (width,), weight.float(), 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5).float(), want, atol=TOL[dtype], rtol=TOL[dtype])
    summed = (x + residual).float()
    out = ops.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual.float(), summed, atol=TOL[dtype], rtol=TOL[dtype])  # updated in place
    want = F.rms_norm(summed, (width,), weight.float(), 1e-5)
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    gate_up = (torch.randn(7, 2 * 100, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    torch.testing.assert_close(ops.silu_and_mul(gate_up).float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 40])
def test_rotary_in_place_on_a_strided_view(dtype: torch.dtype, dim: int) -> None:
    gen = torch.Generator().manual_seed(2)
    tokens, heads, extra = 5, 4, 3
    fused = torch.randn(tokens, (heads + extra) * dim, generator=gen).to(dtype)  # like q|k inside qkv
    x = fused[:, : heads * dim].view(tokens, heads, dim)
    angles = torch.rand(tokens, dim // 2, generator=gen) * 50
    cos, sin = angles.cos(), angles.sin()
    ref = x.float().clone()
    half = dim // 2
    c = torch.cat((cos, cos), dim=-1)[:, None, :]
    s = torch.cat((sin, sin), dim=-1)[:, None, :]
    want = ref * c + torch.cat((-ref[..., half:], ref[..., :half]), dim=-1) * s
    untouched = fused[:, heads * dim :].clone()
    ops.rotary_inplace(x, cos, sin)
    torch.testing.assert_close(x.float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    assert torch.equal(fused[:, heads * dim :], untouched)


def test_rotary_angles_from_the_growing_table_are_those_computed() -> None:
    """The CPU keeps the angles of the positions seen so far in tables that double as sequences grow: looked up,
    they are bit for bit what computing them for the step's positions gives, before and after each growth."""
    from pagoda.model.layers.rotary import RotaryEmbedding, inverse_frequencies

    rotary = RotaryEmbedding(inverse_frequencies(64, 10000.0, {"rope_type": "llama3", "factor": 8.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 8192}))
    sizes = []
    for positions in ([0, 3, 1023], [1024, 5, 2047], [4096, 17], list(range(100))):
        at = torch.tensor(positions)
        looked_up = rotary.angles(at)
        freqs = at.float()[:, None] * rotary.inv_freq[None, :]
        assert torch.equal(looked_up.cos, freqs.cos()) and torch.equal(looked_up.sin, freqs.sin())
        sizes.append(len(rotary.cos_table))
    assert sizes == [1024, 2048, 4097, 4097]
