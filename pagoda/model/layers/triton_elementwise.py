"""The fused per-token operations of a decoder layer as Triton kernels for CUDA devices: the GPU twins of
the C++ CPU kernels (csrc/elementwise.cpp), with the same signatures and the same arithmetic (inputs read
once, fp32 math, one rounding on the store).

In torch each of these is two to ten kernels (rotary alone: two concatenations, two casts, a negation,
three products and sums, a copy). A batch-1 decode step is hundreds of such tiny kernels, each costing
microseconds of launch and tail whatever its size; one kernel per operation cuts a Llama-3.1-8B decode
step from 696 launches to 327 (21.5 -> 10 per layer; scripts/count_launches.py). Importing this module needs ``triton``; on a CPU the kernels
run only under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one row a program handles at once in silu_and_mul (rows of the MLP are wide: 14336 for 8B).
SILU_BLOCK = 1024
# Heads of one token a rotary program rotates: small tiles (32 registers per thread on sm_90), and a
# batch-1 decode step still spreads over several programs.
ROTARY_HEADS = 8


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                     BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        # residual = x + residual, rounded to the model dtype as an unfused add would store it; the norm
        # then reads the rounded values.
        summed = x + tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        rounded = summed.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, rounded, mask=ok)
        x = rounded.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inv * w).to(out_ptr.dtype.element_ty), mask=ok)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 1 or weight.shape[0] != x.shape[1] or x.stride(1) != 1:
        raise ValueError(f"rms_norm: x must be [rows, n] with dense rows and weight [n], got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, n = x.shape
    if rows:
        r = x if residual is None else residual
        _rms_norm_kernel[(rows,)](x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), n, eps,
                                  BLOCK=triton.next_power_of_2(n), ADD=residual is not None)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [rows, n]; returns norm(x) * weight as a new tensor."""
    return _norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place (both [rows, n], residual with dense rows); returns norm(residual) * weight."""
    if residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype:
        raise ValueError("add_rms_norm: residual must match x's shape and dtype, with dense rows")
    return _norm(x, residual, weight, eps)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [rows, 2n] (gate then up) -> [rows, n] = silu(gate) * up."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_and_mul: [rows, 2 * n] with dense rows expected, got {tuple(gate_up.shape)}")
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                               BLOCK=SILU_BLOCK)
    return out


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, heads, half,
                   HEADS: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    i = tl.arange(0, HALF_PAD)
    ok = (h[:, None] < heads) & (i[None, :] < half)
    cos = tl.load(cos_ptr + token * stride_c + i, mask=i < half, other=0.0)[None, :]
    sin = tl.load(sin_ptr + token * stride_c + i, mask=i < half, other=0.0)[None, :]
    first = x_ptr + token * stride_t + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=ok, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(first + half, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=ok)


def rotary_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half rotary embedding of x [tokens, heads, dim] in place (heads x dim dense per token; tokens
    may be strided, e.g. q and k inside the fused qkv output); cos, sin: fp32 [tokens, dim / 2]."""
    if x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        raise ValueError(f"rotary: x must be [tokens, heads, dim] with dense heads, got {tuple(x.shape)}")
    tokens, heads, dim = x.shape
    if cos.dtype != torch.float32 or cos.shape != (tokens, dim // 2) or sin.shape != cos.shape:
        raise ValueError("rotary: cos and sin must be fp32 [tokens, dim / 2]")
    cos, sin = cos.contiguous(), sin.contiguous()
    if tokens:
        _rotary_kernel[(tokens, triton.cdiv(heads, ROTARY_HEADS))](
            x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads, dim // 2,
            HEADS=ROTARY_HEADS, HALF_PAD=triton.next_power_of_2(dim // 2))
