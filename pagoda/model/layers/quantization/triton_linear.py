"""Quantized layers on CUDA: one Triton kernel multiplies x by weight rows as the CPU kernels store them,
dequantizing each 32-weight block in registers, so a GPU reads the quantized bytes instead of a dequantized
copy. Row layouts (``KIND``):

- int4 (int4.py: ``--quantization int4``, GPTQ, AWQ): [nibbles | fp16 scales | uint8 zeros], a scale and zero
  per group of ``group_size`` columns; w = scale * (q - zero).
- int8 (int8.py without the CPU kernels: ``--quantization int8``, int4's vocabulary projection): int8 codes,
  one scale per row passed beside them; w = scale * q.
- GGUF Q4_0 / Q4_1 / Q8_0, regrouped at load (gguf.py): [quants | fp16 d per block (| Q4_1's fp16 m per
  block)]; w = d * q - 8 d, d * q + m, d * (q - 128) (Q8_0's quants stored plus 128).

In both 4-bit layouts byte j of a block's 16 holds weights j (low nibble) and j + 16. The GPU twin of the C++
kernels (pagoda/csrc/gguf_linear.cpp, int4_linear.cpp); the torch path (dequantize, then matmul) stays the
reference. Importing this module needs ``triton``; on a CPU it runs only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

# The row layouts, by the kernel's KIND: 0 and 1 for Pagoda's int4 and int8 rows, GGML's type ids for the GGUF ones.
INT4, INT8, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
_WEIGHT_BLOCK = 32  # the unit along K: it lies in one int4 group, since group sizes are multiples of 32


@dataclass(frozen=True)
class Tiles:
    """One launch's work split: ``block_m`` input rows (tl.dot needs 16 or more) by ``block_n`` weight rows per
    program. Every tiling adds each output's products in the same order, block by block along K."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4


# What ``tiles_for`` chooses from (scripts/triton_resources.py compiles each).
DECODE_TILES = (Tiles(block_m=16, block_n=64), Tiles(block_m=16, block_n=16))


def prefill_tiles(dtype: torch.dtype) -> Tiles:
    # fp32's 64-row programs spill registers on sm_80
    return Tiles(block_m=32 if dtype == torch.float32 else 64, block_n=64)


@lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def tiles_for(rows: int, n: int, device: torch.device, dtype: torch.dtype) -> Tiles:
    """Decode-sized inputs stream the weights once: wide weight tiles where they still give every
    multiprocessor two programs, else narrow ones (a 4096-row projection makes 64 programs of 64 rows for an
    H100's 132 multiprocessors). Prompts reuse each dequantized tile over 64 input rows. (Chosen by occupancy,
    not yet timed: scripts/bench_quantized_gpu.py times these against other tilings.)"""
    if rows > 16:
        return prefill_tiles(dtype)
    programs = 2 * _multiprocessors(device)
    return next((t for t in DECODE_TILES if -(-n // t.block_n) >= programs), DECODE_TILES[-1])


@triton.jit
def _load_half(at, mask):
    """An fp16 stored at ``at`` as two bytes (a row's scales need not be 2-byte aligned), as fp32."""
    lo = tl.load(at, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(at + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _quantized_linear_kernel(x_ptr, qweight_ptr, scale_ptr, bias_ptr, out_ptr, rows, n, k, stride_xm, stride_om,
                             row_bytes, groups, group_size, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                             PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m_offs < rows
    n_ok = n_offs < n
    half = tl.arange(0, 16)
    w_rows = qweight_ptr + n_offs.to(tl.int64) * row_bytes  # [BLOCK_N] row starts
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_blocks = k // 32
    for block in range(num_blocks):
        if KIND == 1 or KIND == 8:  # int8 rows / Q8_0: a byte per weight
            low_at = w_rows[None, :] + block * 32 + half[:, None]
            if KIND == 1:
                q_low = tl.load(low_at, mask=n_ok[None, :], other=0).to(tl.float32)
                q_high = tl.load(low_at + 16, mask=n_ok[None, :], other=0).to(tl.float32)
                w_low = q_low  # the row's scale multiplies the sums
                w_high = q_high
            else:
                d = _load_half(w_rows + k + 2 * block, n_ok)
                q_low = tl.load(low_at, mask=n_ok[None, :], other=128).to(tl.float32) - 128.0
                q_high = tl.load(low_at + 16, mask=n_ok[None, :], other=128).to(tl.float32) - 128.0
                w_low = d[None, :] * q_low
                w_high = d[None, :] * q_high
        else:
            packed = tl.load(w_rows[None, :] + block * 16 + half[:, None], mask=n_ok[None, :], other=0)  # [16, N]
            q_low = (packed & 0x0F).to(tl.float32)
            q_high = (packed >> 4).to(tl.float32)
            if KIND == 0:
                g = (block * 32) // group_size
                scale = _load_half(w_rows + k // 2 + 2 * g, n_ok)
                zero = tl.load(w_rows + k // 2 + 2 * groups + g, mask=n_ok, other=0).to(tl.float32)
                w_low = scale[None, :] * (q_low - zero[None, :])
                w_high = scale[None, :] * (q_high - zero[None, :])
            else:
                d = _load_half(w_rows + k // 2 + 2 * block, n_ok)
                if KIND == 2:  # Q4_0
                    m = -8.0 * d
                else:  # Q4_1
                    m = _load_half(w_rows + k // 2 + 2 * num_blocks + 2 * block, n_ok)
                w_low = d[None, :] * q_low + m[None, :]
                w_high = d[None, :] * q_high + m[None, :]
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
    if KIND == 1:  # rounded to x's dtype first, as the torch path multiplies its dtype's product by the scale
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc *= tl.load(scale_ptr + n_offs, mask=n_ok, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_offs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + m_offs[:, None].to(tl.int64) * stride_om + n_offs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quantized_linear_constexprs(kind: int, dtype: torch.dtype, has_bias: bool, tiles: Tiles) -> dict[str, object]:
    """The kernel's compile-time parameters (scripts/triton_resources.py compiles the same)."""
    return {"KIND": kind, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "HAS_BIAS": has_bias,
            # fp32 products must not be rounded to TF32.
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_FP32": dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"}


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, kind: int, in_features: int,
                     bias: torch.Tensor | None, group_size: int = _WEIGHT_BLOCK, scale: torch.Tensor | None = None,
                     tiles: Tiles | None = None) -> torch.Tensor:
    """x [rows, in_features] (dense rows) times the weight rows ``qweight`` [out, row bytes] of layout ``kind``
    (``group_size``: int4's; ``scale`` [out]: int8 rows'); returns [rows, out] in x's dtype (+ bias).
    ``tiles``: the work split (default ``tiles_for``)."""
    if x.dim() != 2 or x.shape[1] != in_features or x.stride(1) != 1:
        raise ValueError(f"quantized_linear: x must be [rows, {in_features}] with dense rows, got {tuple(x.shape)}")
    # The row length is the layer's to check (int4.row_bytes, gguf.row_bytes), as it allocated the rows.
    code_dtype = torch.int8 if kind == INT8 else torch.uint8
    if in_features % _WEIGHT_BLOCK or qweight.dtype != code_dtype or qweight.dim() != 2:
        raise ValueError(f"quantized_linear: qweight must be {code_dtype} [out, row bytes] and in_features a multiple "
                         f"of 32, got {qweight.dtype} {tuple(qweight.shape)} and {in_features}")
    if (kind == INT8) != (scale is not None):
        raise ValueError("quantized_linear: int8 rows need their scales, other layouts have theirs in the rows")
    rows, n = x.shape[0], qweight.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        tiles = tiles or tiles_for(rows, n, x.device, x.dtype)
        grid = (triton.cdiv(rows, tiles.block_m), triton.cdiv(n, tiles.block_n))
        _quantized_linear_kernel[grid](x, qweight, scale if scale is not None else out,
                                       bias if bias is not None else out, out, rows, n, in_features,
                                       x.stride(0), out.stride(0), qweight.stride(0), -(-in_features // group_size),
                                       group_size, **quantized_linear_constexprs(kind, x.dtype, bias is not None, tiles),
                                       num_warps=tiles.num_warps)
    return out
