"""Triton kernels for the paged KV cache: writing new K/V through the slot mapping, and paged attention for
mixed prefill + decode batches (variable lengths, block tables, grouped-query attention).

On a GPU they compile for the device; on a CPU they run only under ``TRITON_INTERPRET=1`` (how the tests
check them against the torch backend at tiny sizes). Importing this module needs ``triton``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# tl.dot wants every dimension >= 16: the query heads of one KV head are padded up to this.
MIN_DOT_ROWS = 16


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     HEAD_DIM: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d)
    tl.store(k_cache_ptr + slot * stride_cs + head * stride_ch + d, k)
    tl.store(v_cache_ptr + slot * stride_cs + head * stride_ch + d, v)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, dim]; caches: [num_blocks, block_size, kv_heads, dim]; slot = block * size + offset."""
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    _write_kv_kernel[(tokens, kv_heads)](
        k, v, k_flat, v_flat, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_flat.stride(0), k_flat.stride(1),
        HEAD_DIM=head_dim,
    )


@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, token_seq_ptr, token_len_ptr,
                            scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
                            stride_cb, stride_cs, stride_ch,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    # One program: one query token x one KV head, i.e. the GROUP query heads that share that KV head.
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(token_seq_ptr + token)
    length = tl.load(token_len_ptr + token)  # keys this token attends to: its own position and all before
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    # Operands stay in the model dtype (bf16: tensor-core products, fp32 accumulation); fp32 models multiply
    # in full fp32 (PRECISION "ieee"), not TF32, so that they match the torch backend.
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None],
                other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    s_idx = tl.arange(0, BLOCK_SIZE)
    for b in range(0, tl.cdiv(length, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_tb + b)
        pos = b * BLOCK_SIZE + s_idx
        valid = pos < length
        offsets = block * stride_cb + s_idx[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_SIZE] fp32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    token_seq: torch.Tensor, token_len: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; caches: [num_blocks, block_size, kv_heads, dim]; block_tables: [seqs, max_blocks];
    token_seq[t]: the sequence (row of block_tables) of query token t; token_len[t]: how many keys it sees."""
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    for name, size in (("head_dim", head_dim), ("block_size", block_size)):
        if size < MIN_DOT_ROWS or size & (size - 1):
            raise ValueError(f"the triton backend needs a power-of-two {name} >= {MIN_DOT_ROWS}, got {size}")
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    group = heads // kv_heads
    _paged_attention_kernel[(tokens, kv_heads)](
        q, k_cache, v_cache, out, block_tables, token_seq, token_len, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bf16 operands wrongly (a 16x16 bf16 tl.dot is off by ~1e10 under
        # TRITON_INTERPRET=1, triton 3.9): there half-precision operands are upcast before the products.
        DOT_FP32=q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1",
    )
    return out
