"""The C++ paged decode kernel agrees with the pure-torch gather path (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.attention.base import AttentionMetadata
from pagoda.model.attention.torch_backend import TorchAttentionBackend


def _metadata(seq_lens: list[int], query_lens: list[int], block_size: int, num_blocks: int) -> AttentionMetadata:
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for s_len, q_len in zip(seq_lens, query_lens):
        nb = -(-s_len // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(s_len - q_len, s_len)]
    width = max(len(t) for t in tables)
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    return AttentionMetadata(torch.tensor(slots), query_lens, seq_lens, table_tensor, block_size)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_matches_torch_path(dtype: torch.dtype, tol: float) -> None:
    kernel = TorchAttentionBackend(use_cpu_kernel=True)
    if kernel.kernels is None:
        pytest.fail("the C++ CPU attention kernel did not build (needs a C++ compiler and ninja)")
    reference = TorchAttentionBackend(use_cpu_kernel=False)
    block_size, num_blocks, heads, kv_heads, dim = 4, 64, 6, 2, 32
    seq_lens = [1, 5, 9, 17, 30, 12]
    query_lens = [1, 1, 1, 4, 1, 12]  # decode rows, a prefill chunk with context, a fresh prefill
    torch.manual_seed(0)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim).to(dtype)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, dim).to(dtype)
    k = torch.randn(tokens, kv_heads, dim).to(dtype)
    v = torch.randn(tokens, kv_heads, dim).to(dtype)
    outs = []
    for backend in (kernel, reference):
        meta = _metadata(seq_lens, query_lens, block_size, num_blocks)
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, cache.clone(), meta, dim**-0.5).float())
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)


def test_small_batch_linear_kernel_matches_onednn() -> None:
    from pagoda.model.layers import linear as linear_mod

    torch.manual_seed(0)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    w = torch.randn(960, 576, dtype=torch.bfloat16)
    b = torch.randn(960, dtype=torch.bfloat16)
    reference = torch.nn.functional.linear(x, w, b).float()
    linear_mod.enable_small_batch_kernel(True)
    try:
        if linear_mod._small_batch_kernel() is None:
            pytest.skip("this CPU has no AVX-512 BF16")
        got = linear_mod.linear(x, w, b).float()
    finally:
        linear_mod.enable_small_batch_kernel(False)
    torch.testing.assert_close(got, reference, atol=0.1, rtol=2e-2)
