"""The C++ paged decode kernel agrees with the pure-torch gather path (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.attention.base import AttentionMetadata
from pagoda.model.attention.torch_backend import TorchAttentionBackend


def _metadata(seq_lens: list[int], query_lens: list[int], block_size: int, num_blocks: int) -> AttentionMetadata:
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(num_blocks - 1, generator=gen).tolist()  # the last block is the spare
    tables, slots = [], []
    for s_len, q_len in zip(seq_lens, query_lens):
        nb = -(-s_len // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(s_len - q_len, s_len)]
    width = max(len(t) for t in tables)
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    return AttentionMetadata(torch.tensor(slots), query_lens, seq_lens, table_tensor, block_size,
                             pad_slot=(num_blocks - 1) * block_size)


@pytest.mark.parametrize("dim", [32, 64])  # 64 has a specialized bf16 path, 32 takes the portable one
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_matches_torch_path(dtype: torch.dtype, tol: float, dim: int) -> None:
    kernel = TorchAttentionBackend(use_cpu_kernel=True)
    if kernel.kernels is None:
        pytest.fail("the C++ CPU attention kernel did not build (needs a C++ compiler and ninja)")
    reference = TorchAttentionBackend(use_cpu_kernel=False)
    block_size, num_blocks, heads, kv_heads = 4, 64, 6, 2
    seq_lens = [1, 5, 9, 17, 30, 12]
    query_lens = [1, 1, 1, 4, 1, 12]  # decode rows, a prefill chunk with context, a fresh prefill
    torch.manual_seed(0)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim).to(dtype)
    cache[:, -1] = 0.0  # the spare block padded gathers read
    used = set(_metadata(seq_lens, query_lens, block_size, num_blocks).block_tables.flatten().tolist())
    for block in set(range(num_blocks - 1)) - used:
        cache[:, block] = float("nan")  # stale garbage in unused blocks must never leak into outputs
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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_rowwise_linear_matches_torch_and_ignores_batch_size(dtype: torch.dtype, tol: float) -> None:
    from pagoda.model.cpu_kernels import load_cpu_kernels

    ops = load_cpu_kernels()
    assert ops is not None, "the C++ CPU kernels did not build"
    torch.manual_seed(0)
    x = torch.randn(37, 576).to(dtype)
    w = torch.randn(960, 576).to(dtype)
    b = torch.randn(960).to(dtype)
    full = ops.linear_rowwise(x, w, b)
    torch.testing.assert_close(full.float(), torch.nn.functional.linear(x, w, b).float(), atol=tol * 30, rtol=tol)
    for rows in (1, 2, 3, 5, 16):  # any subset of rows gives bit-identical results
        assert torch.equal(ops.linear_rowwise(x[:rows], w, b), full[:rows])
    odd = torch.randn(3, 40).to(dtype)  # k not a multiple of the vector width: the portable path
    w_odd = torch.randn(8, 40).to(dtype)
    torch.testing.assert_close(ops.linear_rowwise(odd, w_odd, None).float(),
                               torch.nn.functional.linear(odd, w_odd).float(), atol=tol * 30, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_matches_torch(dtype: torch.dtype) -> None:
    from pagoda.model.cpu_kernels import load_cpu_kernels

    ops = load_cpu_kernels()
    assert ops is not None, "the C++ CPU kernels did not build"
    torch.manual_seed(0)
    x = torch.randn(7, 49157).to(dtype)  # a length that leaves a scalar tail
    x[3, 100] = x[3, 4000] = 50.0  # a tie: the lowest index wins
    x[5, -1] = 60.0  # the maximum in the tail
    x[6, :5] = torch.tensor([1.0, 3.0, 3.0, -1.0, 0.0]).to(dtype)
    x[6, 5:] = -100.0
    assert ops.argmax_rows(x).tolist() == x.float().argmax(dim=-1).tolist()
