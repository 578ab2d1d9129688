"""Triton kernels for the paged KV cache: writing new K/V through the slot mapping, and paged attention for
mixed prefill + decode batches (variable lengths, block tables, grouped-query attention). Attention runs
one program per query block: a decode token alone, a prefill's tokens several at a time.

The cache may be quantized (pagoda/model/attention/kv_format.py): KV_KIND 1 is int8 rows of HEAD_DIM codes
followed by their fp32 scale, 2 is float8 e4m3 with per-tensor scales; the write kernel encodes, attention
decodes each tile as it loads it.

On a GPU they compile for the device; on a CPU they run only under ``TRITON_INTERPRET=1`` (how the tests
check them against the torch backend at tiny sizes). Importing this module needs ``triton``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

# tl.dot wants every dimension >= 16: a program's query rows are padded up to this.
MIN_DOT_ROWS = 16
# Rows of a prefill program (query tokens x the query heads of one KV head): each key/value tile it loads
# serves all of them, so a prefill re-reads its context once per this many rows instead of once per token.
# Half as many in fp32, whose 64-row programs spill registers on sm_80 (scripts/triton_resources.py).
PREFILL_ROWS = 64
# Keys per inner-loop step; independent of the cache's block size (each key looks up its own block).
# With 32 a bf16 prefill program needs 168 registers per thread on sm_90 instead of 128, and fp32 prefill
# programs spill (scripts/triton_resources.py); which tile is faster is for a GPU to measure.
TILE_KEYS = 16


KV_KINDS = {"auto": 0, "int8": 1, "fp8_e4m3": 2}
# Triton has float8 e4m3 (e4nv) from compute capability 8.9 (Ada, Hopper) on.
FP8_MIN_ARCH = 89


@triton.jit
def _round_half_even(x):
    """As torch.round: to the nearest integer, ties to even (the torch backend's int8 codes, bit for bit)."""
    f = tl.floor(x)
    diff = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(diff > 0.5, f + 1.0, tl.where(diff < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _encode_row(x, row_ptr, scale, HEAD_DIM: tl.constexpr, KV_KIND: tl.constexpr):
    """Store one row (one token of one KV head) in the cache's format."""
    d = tl.arange(0, HEAD_DIM)
    if KV_KIND == 1:
        xf = x.to(tl.float32)
        row_scale = tl.max(tl.abs(xf), 0) / 127.0
        safe = tl.where(row_scale > 0, row_scale, 1.0)
        tl.store(row_ptr + d, _round_half_even(xf / safe).to(tl.int8))
        tl.store((row_ptr + HEAD_DIM).to(tl.pointer_type(tl.float32)), row_scale)
    elif KV_KIND == 2:  # saturated at e4m3's largest finite value (kv_format.FP8_MAX)
        xf = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -448.0), 448.0)
        tl.store(row_ptr + d, xf.to(tl.float8e4nv))
    else:
        tl.store(row_ptr + d, x)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     HEAD_DIM: tl.constexpr, KV_KIND: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d)
    _encode_row(k, k_cache_ptr + slot * stride_cs + head * stride_ch, k_scale, HEAD_DIM, KV_KIND)
    _encode_row(v, v_cache_ptr + slot * stride_cs + head * stride_ch, v_scale, HEAD_DIM, KV_KIND)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_kind: str = "auto", kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """k, v: [tokens, kv_heads, dim]; caches: [num_blocks, block_size, kv_heads, row width] in the ``kv_kind``
    format; slot = block * size + offset."""
    tokens, kv_heads, head_dim = k.shape
    if head_dim < MIN_DOT_ROWS or head_dim & (head_dim - 1):
        raise ValueError(f"the triton backend needs a power-of-two head_dim >= {MIN_DOT_ROWS}, got {head_dim}")
    if tokens == 0:
        return
    k_flat = k_cache.view(-1, kv_heads, k_cache.shape[-1])
    v_flat = v_cache.view(-1, kv_heads, v_cache.shape[-1])
    _write_kv_kernel[(tokens, kv_heads)](
        k, v, k_flat, v_flat, slot_mapping, kv_scales[0], kv_scales[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_flat.stride(0), k_flat.stride(1),
        HEAD_DIM=head_dim, KV_KIND=KV_KINDS[kv_kind],
    )


@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr,
                            qb_seq_ptr, qb_token_ptr, qb_count_ptr, qb_len_ptr,
                            scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
                            stride_cb, stride_cs, stride_ch,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                            PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, KV_KIND: tl.constexpr):
    # One program: one query block (up to BLOCK_Q consecutive query tokens of one sequence) x one KV head.
    # Its rows are those tokens x the GROUP query heads sharing that KV head, so every key/value tile
    # loaded serves BLOCK_Q * GROUP rows (a prefill reads its context once per block, not once per token).
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(qb_seq_ptr + qblock)
    first_token = tl.load(qb_token_ptr + qblock)
    first_len = tl.load(qb_len_ptr + qblock)  # keys the block's first token attends to (itself included)
    if BLOCK_Q == 1:
        count = 1
    else:
        count = tl.load(qb_count_ptr + qblock)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    r = rows // GROUP_PAD  # token within the block
    g = rows % GROUP_PAD  # query head within the KV head's group
    row_ok = (r < count) & (g < GROUP)
    row_len = first_len + r  # causal: each later token sees one more key
    max_len = first_len + count - 1
    d = tl.arange(0, HEAD_DIM)
    tokens = first_token + r
    heads = kv_head * GROUP + g
    # Operands stay in the model dtype (bf16: tensor-core products, fp32 accumulation); fp32 models multiply
    # in full fp32 (PRECISION "ieee"), not TF32, so that they match the torch backend.
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    key_idx = tl.arange(0, TILE)
    # Every row sees key 0, so the first tile leaves each row's running max finite.
    for t in range(0, tl.cdiv(max_len, TILE)):
        pos = t * TILE + key_idx
        key_ok = pos < max_len
        # Each key's cache block from the block table (a tile may span blocks); 64-bit offsets, as a
        # layer's cache may hold more than 2^31 elements.
        block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=key_ok, other=0)
        key_off = block.to(tl.int64) * stride_cb + ((pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch)
        k = tl.load((k_cache_ptr + key_off)[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load((v_cache_ptr + key_off)[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
        # Quantized rows convert exactly to q's dtype (int8 codes, fp8 values); their scales apply to the
        # products: an int8 key's to its scores, an int8 value's to its softmax weights (fp8's per-tensor
        # scales: the key's is in `scale`, the value's multiplies the output).
        k = k.to(tl.float32) if DOT_FP32 else k.to(q.dtype)
        v = v.to(tl.float32) if DOT_FP32 else v.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [rows, TILE] fp32
        if KV_KIND == 1:
            k_rows = tl.load((k_cache_ptr + key_off + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=key_ok, other=0.0)
            scores = scores * k_rows[None, :]
        scores = tl.where(pos[None, :] < row_len[:, None], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        if KV_KIND == 1:
            v_rows = tl.load((v_cache_ptr + key_off + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=key_ok, other=0.0)
            p = p * v_rows[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / l[:, None]
    if KV_KIND == 2:
        out = out * v_scale
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass
class QueryBlocks:
    """The programs of one paged-attention launch, one per query block (int32 tensors on the device):
    up to ``block_q`` consecutive query tokens of one sequence."""

    seq: torch.Tensor  # row of the block tables
    first_token: torch.Tensor  # flat index (in q) of the block's first token
    first_len: torch.Tensor  # keys the first token attends to; token i of the block sees first_len + i
    count: torch.Tensor | None  # tokens in the block; None when block_q == 1
    block_q: int


def query_group_pad(group: int, block_q: int) -> int:
    """Rows per token in a program: the group padded to a power of two, and to MIN_DOT_ROWS when the block
    has one token (tl.dot needs that many rows)."""
    pad = triton.next_power_of_2(group)
    return max(pad, MIN_DOT_ROWS) if block_q * pad < MIN_DOT_ROWS else pad


def prefill_rows(dtype: torch.dtype) -> int:
    return PREFILL_ROWS if dtype.itemsize <= 2 else PREFILL_ROWS // 2


def prefill_block_q(group: int, rows: int) -> int:
    """Query tokens per prefill program so that a program has ``rows`` rows (at least one token)."""
    return max(1, rows // triton.next_power_of_2(group))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    blocks: QueryBlocks, scale: float, out: torch.Tensor, kv_kind: str = "auto",
                    kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """Writes into ``out`` the rows of the tokens that ``blocks`` cover.

    q, out: [tokens, heads, dim]; caches: [num_blocks, block_size, kv_heads, row width] in the ``kv_kind``
    format; block_tables: [seqs, max_blocks].
    """
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    num_programs = blocks.seq.shape[0]
    if num_programs == 0:
        return
    _paged_attention_kernel[(num_programs, kv_heads)](
        q, k_cache, v_cache, out, block_tables, blocks.seq, blocks.first_token,
        blocks.count if blocks.count is not None else blocks.seq, blocks.first_len,
        scale * kv_scales[0] if kv_kind == "fp8_e4m3" else scale, kv_scales[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        **attention_constexprs(q.dtype, heads // kv_heads, head_dim, block_size, blocks.block_q, kv_kind),
    )


def attention_constexprs(dtype: torch.dtype, group: int, head_dim: int, block_size: int,
                         block_q: int, kv_kind: str = "auto") -> dict[str, Any]:
    """The compile-time parameters of one attention launch (also what scripts/triton_resources.py compiles)."""
    return dict(
        GROUP=group, GROUP_PAD=query_group_pad(group, block_q), BLOCK_Q=block_q, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=TILE_KEYS, PRECISION="ieee" if dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bf16 operands wrongly (a 16x16 bf16 tl.dot is off by ~1e10 under
        # TRITON_INTERPRET=1, triton 3.9): there half-precision operands are upcast before the products.
        DOT_FP32=dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1",
        KV_KIND=KV_KINDS[kv_kind],
    )
