"""Group-wise int4 layers on CUDA: one Triton kernel multiplies x by the packed rows of int4.py as they are
stored ([nibbles | fp16 scales | uint8 zeros] per output row), dequantizing each 32-weight block in registers,
so a GPU reads the 4-bit weights (plus 3 bytes per group) instead of a dequantized copy. The GPU twin of the
C++ kernel (pagoda/csrc/int4_linear.cpp); the torch path (dequantize, then matmul) stays the reference.

Importing this module needs ``triton``; on a CPU the kernel runs only under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Output rows (weight rows) and input rows one program computes. A block of 32 weights (16 bytes of nibbles:
# byte j holds weights j and j + 16) is the unit along K, and lies in one quantization group, since group sizes
# are multiples of 32.
BLOCK_N = 64
BLOCK_M = 16
_WEIGHT_BLOCK = 32


@triton.jit
def _int4_linear_kernel(x_ptr, qweight_ptr, bias_ptr, out_ptr, rows, n, k, stride_xm, stride_om, row_bytes,
                        groups, group_size, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m_offs < rows
    n_ok = n_offs < n
    half = tl.arange(0, 16)
    w_rows = qweight_ptr + n_offs.to(tl.int64) * row_bytes  # [BLOCK_N] row starts
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(k // 32):
        g = (block * 32) // group_size
        # The group's fp16 scale from its two bytes (a row's scales need not be 2-byte aligned), and its zero.
        scale_at = w_rows + k // 2 + 2 * g
        lo = tl.load(scale_at, mask=n_ok, other=0).to(tl.uint16)
        hi = tl.load(scale_at + 1, mask=n_ok, other=0).to(tl.uint16)
        scale = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        zero = tl.load(w_rows + k // 2 + 2 * groups + g, mask=n_ok, other=0).to(tl.float32)
        packed = tl.load(w_rows[None, :] + block * 16 + half[:, None], mask=n_ok[None, :], other=0)  # [16, N]
        w_low = ((packed & 0x0F).to(tl.float32) - zero[None, :]) * scale[None, :]
        w_high = ((packed >> 4).to(tl.float32) - zero[None, :]) * scale[None, :]
        x_cols = x_ptr + m_offs[:, None].to(tl.int64) * stride_xm + block * 32 + half[None, :]
        x_low = tl.load(x_cols, mask=m_ok[:, None], other=0.0)
        x_high = tl.load(x_cols + 16, mask=m_ok[:, None], other=0.0)
        # The weights rounded to x's dtype, as the torch path's dequantized matrix is.
        w_low = w_low.to(x_low.dtype)
        w_high = w_high.to(x_high.dtype)
        if DOT_FP32:  # the interpreter multiplies half-precision operands upcast (see triton_kernels.py)
            acc += tl.dot(x_low.to(tl.float32), w_low.to(tl.float32), input_precision=PRECISION)
            acc += tl.dot(x_high.to(tl.float32), w_high.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(x_low, w_low, input_precision=PRECISION)
            acc += tl.dot(x_high, w_high, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_offs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + m_offs[:, None].to(tl.int64) * stride_om + n_offs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int4_linear_constexprs(dtype: torch.dtype, has_bias: bool) -> dict[str, object]:
    """The kernel's compile-time parameters for x of ``dtype`` (scripts/triton_resources.py compiles the same)."""
    return {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "HAS_BIAS": has_bias,
            # fp32 products must not be rounded to TF32.
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_FP32": dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"}


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, group_size: int, in_features: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in_features] (dense rows) times the packed int4 rows ``qweight`` [out, row bytes] of int4.py;
    returns [rows, out] in x's dtype (+ bias)."""
    groups = -(-in_features // group_size)
    if x.dim() != 2 or x.shape[1] != in_features or x.stride(1) != 1:
        raise ValueError(f"int4_linear: x must be [rows, {in_features}] with dense rows, got {tuple(x.shape)}")
    if in_features % _WEIGHT_BLOCK or qweight.dtype != torch.uint8 or qweight.dim() != 2 \
            or qweight.shape[1] != in_features // 2 + 3 * groups:
        raise ValueError(f"int4_linear: qweight must be uint8 [out, {in_features // 2 + 3 * groups}] for "
                         f"in_features {in_features} (a multiple of 32) in groups of {group_size}, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    rows, n = x.shape[0], qweight.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _int4_linear_kernel[grid](x, qweight, bias if bias is not None else out, out, rows, n, in_features,
                                  x.stride(0), out.stride(0), qweight.stride(0), groups, group_size,
                                  **int4_linear_constexprs(x.dtype, bias is not None))
    return out
