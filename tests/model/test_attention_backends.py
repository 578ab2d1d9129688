"""The C++ paged decode kernel agrees with the pure-torch gather path (fp32 and bf16, and over int8 and fp8
caches), and a quantized cache stays close to the unquantized one."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.attention.base import AttentionMetadata
from pagoda.model.attention.kv_format import KVCacheFormat
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


@pytest.mark.parametrize("dim", [32, 64])  # bf16 at 64 reads the cache as bf16, at 32 widens it
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_matches_torch_path(dtype: torch.dtype, tol: float, dim: int) -> None:
    fmt = KVCacheFormat.of("auto", dtype)
    kernel = TorchAttentionBackend(fmt, use_cpu_kernel=True)
    if kernel.kernels is None:
        pytest.fail("the C++ CPU attention kernel did not build (needs a C++ compiler and ninja)")
    reference = TorchAttentionBackend(fmt, use_cpu_kernel=False)
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


@pytest.mark.parametrize("kind", ["auto", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("dim, group", [(64, 3), (128, 2), (64, 1)])
def test_bf16_decode_over_several_key_chunks_matches_fp32_and_ignores_the_rows_beside(dim: int, group: int,
                                                                                      kind: str) -> None:
    """bf16 queries over a bf16 cache (scores from bf16 pairs, value rows interleaved in pairs, keys in chunks of
    32 merged per row), an fp8 or int8 one (decoded to bf16 a chunk's head at a time, then the same): six rows of
    one sequence (a token and its drafts, crossing a chunk bound; their scores from transposed keys), a longer
    sequence and a one-token one, against attention in fp32 on the numbers the cache holds; each row equals
    itself computed alone (scores key by key), bit for bit."""
    from pagoda.model.cpu_kernels import load_cpu_kernels

    ops = load_cpu_kernels()
    assert ops is not None, "the C++ CPU kernels did not build"
    fmt = KVCacheFormat.of(kind, torch.bfloat16)
    block_size, kv_heads = 16, 2
    heads = kv_heads * group
    gen = torch.Generator().manual_seed(3)
    cache = fmt.encode(torch.randn(2, 40, block_size, kv_heads, dim, generator=gen).to(torch.bfloat16))
    held = fmt.decode(cache).float()  # the numbers the kernel reads
    drafts = torch.tensor([[3, 9, 1, 30, 7]])  # 80 slots, blocks out of order
    tables = torch.cat([drafts.repeat(6, 1), torch.tensor([[11, 12, 13, 14, 15]]),
                        torch.tensor([[25, 0, 0, 0, 0]])]).long()
    lens = torch.tensor([60, 61, 62, 63, 64, 65, 77, 1])
    q = torch.randn(len(lens), heads, dim, generator=gen).to(torch.bfloat16)
    got = ops.paged_decode_attention(q, cache[0], cache[1], tables, lens, dim**-0.5)
    for r, length in enumerate(lens.tolist()):
        slots = [tables[r, t // block_size].item() * block_size + t % block_size for t in range(length)]
        keys, values = (held[i].reshape(-1, kv_heads, dim)[slots].repeat_interleave(group, 1) for i in (0, 1))
        weights = torch.softmax(torch.einsum("hd,thd->ht", q[r].float(), keys) * dim**-0.5, dim=-1)
        want = torch.einsum("ht,thd->hd", weights, values)
        torch.testing.assert_close(got[r].float(), want, atol=1e-2, rtol=1e-2)  # the output is bf16
        alone = ops.paged_decode_attention(q[r:r + 1], cache[0], cache[1], tables[r:r + 1], lens[r:r + 1], dim**-0.5)
        assert torch.equal(alone[0], got[r]), r


def test_many_key_chunks_merge_over_the_threads_as_each_row_alone() -> None:
    """Six rows of one sequence at ~600 tokens (19 key chunks each): their heads' chunks are merged over the
    threads (row_attention.h's merge_chunks), one row alone on the calling thread; the same numbers either way,
    and attention in fp32 on the numbers the cache holds."""
    from pagoda.model.cpu_kernels import load_cpu_kernels

    ops = load_cpu_kernels()
    assert ops is not None, "the C++ CPU kernels did not build"
    block_size, kv_heads, group, dim = 16, 3, 3, 64
    heads = kv_heads * group
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 40, block_size, kv_heads, dim, generator=gen).to(torch.bfloat16)
    order = torch.randperm(39, generator=gen)[:38]  # the sequence's blocks out of order
    lens = torch.arange(600, 606)
    tables = order.repeat(len(lens), 1).long()
    q = torch.randn(len(lens), heads, dim, generator=gen).to(torch.bfloat16)
    got = ops.paged_decode_attention(q, cache[0], cache[1], tables, lens, dim**-0.5)
    held = cache.float()
    for r, length in enumerate(lens.tolist()):
        slots = [tables[r, t // block_size].item() * block_size + t % block_size for t in range(length)]
        keys, values = (held[i].reshape(-1, kv_heads, dim)[slots].repeat_interleave(group, 1) for i in (0, 1))
        weights = torch.softmax(torch.einsum("hd,thd->ht", q[r].float(), keys) * dim**-0.5, dim=-1)
        torch.testing.assert_close(got[r].float(), torch.einsum("ht,thd->hd", weights, values), atol=1e-2, rtol=1e-2)
        alone = ops.paged_decode_attention(q[r:r + 1], cache[0], cache[1], tables[r:r + 1], lens[r:r + 1], dim**-0.5)
        assert torch.equal(alone[0], got[r]), r


def test_every_fp8_code_reads_as_its_value() -> None:
    """Each one-token sequence's output is its value row: every float8 e4m3 code (subnormals, both zeros, the
    largest normals; the two NaN codes aside) comes out of the bf16 decoding as the value it stands for."""
    from pagoda.model.cpu_kernels import load_cpu_kernels

    ops = load_cpu_kernels()
    assert ops is not None, "the C++ CPU kernels did not build"
    dim, block_size = 64, 16
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)] + [0, 0], dtype=torch.uint8)
    rows = len(codes) // dim
    cache = torch.zeros(2, rows, block_size, 1, dim, dtype=torch.uint8)
    cache[1, :, 0, 0] = codes.view(rows, dim)  # each sequence's one value row, in its own block
    cache = cache.view(torch.float8_e4m3fn)
    q = torch.randn(rows, 1, dim).to(torch.bfloat16)
    got = ops.paged_decode_attention(q, cache[0], cache[1], torch.arange(rows)[:, None], torch.ones(rows).long(),
                                     dim**-0.5)
    want = codes.view(torch.float8_e4m3fn).float().view(rows, 1, dim)
    assert torch.equal(got.float(), want)


SEQ_LENS, QUERY_LENS = [1, 5, 9, 17, 30, 12], [1, 1, 1, 4, 1, 12]


def _attend(fmt: KVCacheFormat, use_cpu_kernel: bool, q, k, v, kv_scales=(1.0, 1.0)):  # noqa: ANN001, ANN202
    """One mixed step (decode rows, a chunk after context, a fresh prefill) over an empty cache of ``fmt``."""
    block_size, num_blocks, dim = 4, 64, q.shape[-1]
    backend = TorchAttentionBackend(fmt, use_cpu_kernel=use_cpu_kernel)
    meta = _metadata(SEQ_LENS, QUERY_LENS, block_size, num_blocks)
    backend.prepare(meta)
    cache = torch.zeros(2, num_blocks, block_size, k.shape[1], fmt.row_width(dim), dtype=fmt.storage_dtype)
    # Context the step's queries attend to without writing it: the earlier tokens of every sequence.
    context_k = torch.randn(num_blocks * block_size, k.shape[1], dim, generator=torch.Generator().manual_seed(1))
    context_v = torch.randn(num_blocks * block_size, k.shape[1], dim, generator=torch.Generator().manual_seed(2))
    cache[0].view(-1, k.shape[1], cache.shape[-1]).copy_(fmt.encode(context_k.to(q.dtype), kv_scales[0]))
    cache[1].view(-1, k.shape[1], cache.shape[-1]).copy_(fmt.encode(context_v.to(q.dtype), kv_scales[1]))
    return backend.forward(q, k, v, cache, meta, q.shape[-1] ** -0.5, kv_scales).float()


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_cache_reads_the_same_in_the_kernel_and_in_torch_and_stays_close(kind: str,
                                                                                   dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = sum(QUERY_LENS), 6, 2, 64
    q = torch.randn(tokens, heads, dim).to(dtype)
    k, v = (torch.randn(tokens, kv_heads, dim).to(dtype) for _ in range(2))
    fmt = KVCacheFormat.of(kind, dtype)
    scales = (2.0, 0.5) if kind == "fp8_e4m3" else (1.0, 1.0)  # per-tensor scales reach both paths
    kernel, torch_path = (_attend(fmt, c, q, k, v, scales) for c in (True, False))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kernel, torch_path, atol=tol, rtol=tol)
    dense = _attend(KVCacheFormat.of("auto", dtype), False, q, k, v)
    error = (kernel - dense).abs().max().item()
    assert error < (0.05 if kind == "int8" else 0.15), error  # int8 rows: ~1/254 of each row's range


def test_int8_rows_hold_their_scale_and_round_trip() -> None:
    fmt = KVCacheFormat.of("int8", torch.bfloat16)
    x = torch.randn(5, 3, 64).to(torch.bfloat16)
    x[2, 1] = 0  # an all-zero row keeps scale 0 and decodes to zeros
    rows = fmt.encode(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 68)
    assert fmt.bytes_per_token(3, 64) * 2 < KVCacheFormat.of("auto", torch.bfloat16).bytes_per_token(3, 64) * 1.1
    back = fmt.decode(rows).float()
    step = x.float().abs().amax(dim=-1, keepdim=True) / 127
    assert ((back - x.float()).abs() <= step / 2 + 1e-2 * x.float().abs()).all()
    assert (back[2, 1] == 0).all()


def test_fp8_saturates_instead_of_overflowing() -> None:
    fmt = KVCacheFormat.of("fp8", torch.float32)
    assert fmt.kind == "fp8_e4m3" and fmt.storage_dtype == torch.float8_e4m3fn
    back = fmt.decode(fmt.encode(torch.tensor([1000.0, -1000.0, 1.0])))
    assert back.tolist() == [448.0, -448.0, 1.0]
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4' is not supported; supported: auto, int8, fp8"):
        KVCacheFormat.of("int4", torch.float32)


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
