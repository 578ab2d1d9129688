"""The triton backend's kernels under TRITON_INTERPRET=1 (CPU, tiny sizes) against the torch backend."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. on import below

import pytest
import torch

pytest.importorskip("triton")

from pagoda.model.attention import get_backend  # noqa: E402
from pagoda.model.attention.kv_format import KVCacheFormat  # noqa: E402
from pagoda.model.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagoda.model.attention.triton_backend import TritonAttentionBackend, query_blocks  # noqa: E402
from tests.model.test_attention_backends import _metadata  # noqa: E402


@pytest.mark.parametrize("heads, kv_heads, dtype, block_size, prefill_rows", [
    (4, 2, torch.float32, 16, 16), (6, 6, torch.float32, 16, 16), (9, 3, torch.float32, 16, 16),
    (4, 2, torch.bfloat16, 16, 16),
    (4, 2, torch.float32, 5, 16),  # a block size that is no power of two: each key tile spans several blocks
    (4, 2, torch.float32, 16, 64),  # the default: one block per prefill here
])
def test_mixed_prefill_and_decode_match_torch(heads: int, kv_heads: int, dtype: torch.dtype, block_size: int,
                                              prefill_rows: int) -> None:
    fmt = KVCacheFormat.of("auto", dtype)
    triton_backend = TritonAttentionBackend(fmt, heads // kv_heads, prefill_rows)
    reference = TorchAttentionBackend(fmt, use_cpu_kernel=False)
    num_blocks, dim = 256 // block_size, 16
    # A fresh prefill and a chunk after earlier context, each longer than one query block at 16 rows (so
    # blocks end mid-prompt and the last one is partial), decode rows, a one-token prompt.
    seq_lens = [20, 37, 50, 16, 1]
    query_lens = [20, 11, 1, 1, 1]
    torch.manual_seed(0)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim).to(dtype)
    cache[:, -1] = 0.0
    used = set(_metadata(seq_lens, query_lens, block_size, num_blocks).block_tables.flatten().tolist())
    for block in set(range(num_blocks - 1)) - used:
        cache[:, block] = float("nan")  # unused blocks must never be read
    tokens = sum(query_lens)
    q, k, v = (torch.randn(tokens, n, dim).to(dtype) for n in (heads, kv_heads, kv_heads))
    outs, caches = [], []
    for backend in (triton_backend, reference):
        meta = _metadata(seq_lens, query_lens, block_size, num_blocks)
        backend.prepare(meta)
        kv = cache.clone()
        outs.append(backend.forward(q, k, v, kv, meta, dim**-0.5))
        caches.append(kv)
    # bf16: the kernel rounds the softmax weights to bf16 before the product with V (as flash attention does).
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0], outs[1], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(caches[0], caches[1], equal_nan=True)  # the same slots written, nothing else


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_a_quantized_cache_is_written_and_read_as_the_torch_backend_does(kind: str) -> None:
    """The same codes in the same slots (int8 rows end in their fp32 scale), and the same attention."""
    heads, kv_heads, block_size, dim, dtype = 4, 2, 16, 16, torch.bfloat16  # float32 is refused (spills)
    fmt = KVCacheFormat.of(kind, dtype)
    num_blocks = 256 // block_size
    seq_lens, query_lens = [20, 37, 50, 16, 1], [20, 11, 1, 1, 1]
    torch.manual_seed(0)
    cache = fmt.encode(torch.randn(2, num_blocks, block_size, kv_heads, dim), 2.0)
    tokens = sum(query_lens)
    q, k, v = (torch.randn(tokens, n, dim) * 3 for n in (heads, kv_heads, kv_heads))
    if kind == "fp8_e4m3":
        # Values fp8 holds exactly (times the scales): Triton 3.9's interpreter rounds a value that rounds up
        # into the next power of two down into the lower one (-7.9 -> -4, where a GPU and torch give -8).
        k, v = k.to(torch.float8_e4m3fn).float() * 2.0, v.to(torch.float8_e4m3fn).float() * 0.5
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    outs, caches = [], []
    for backend in (TritonAttentionBackend(fmt, heads // kv_heads, 16), TorchAttentionBackend(fmt, use_cpu_kernel=False)):
        meta = _metadata(seq_lens, query_lens, block_size, num_blocks)
        backend.prepare(meta)
        kv = cache.clone()
        outs.append(backend.forward(q, k, v, kv, meta, dim**-0.5, (2.0, 0.5)))
        caches.append(kv)
    # bf16 products (see the test above); the values here are 3x larger, and int8's row scales ride on the
    # softmax weights before their rounding to bf16.
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=0.03 * outs[1].abs().max().item(), rtol=0.03)
    assert torch.equal(caches[0].view(torch.int8), caches[1].view(torch.int8))
    with pytest.raises(ValueError, match="needs a 16-bit model dtype"):
        TritonAttentionBackend(KVCacheFormat.of(kind, torch.float32))


def test_query_blocks_cover_every_token_once() -> None:
    query_lens, seq_lens = [1, 20, 1, 11, 9], [7, 20, 1, 37, 9]
    decode, prefill = query_blocks(query_lens, seq_lens, 8)
    assert decode.tolist() == [[0, 2], [0, 21], [7, 1], [1, 1]]  # sequence, first token, keys seen, count
    assert prefill.tolist() == [
        [1, 1, 1, 3, 3, 4, 4],
        [1, 9, 17, 22, 30, 33, 41],
        [1, 9, 17, 27, 35, 1, 9],
        [8, 8, 4, 8, 3, 8, 1],
    ]
    covered = sorted([*decode[1].tolist()] + [t for first, n in zip(prefill[1], prefill[3]) for t in range(first, first + n)])
    assert covered == list(range(sum(query_lens)))


def test_backend_choice() -> None:
    fmt = KVCacheFormat.of("auto", torch.float32)
    assert get_backend("auto", "cpu", fmt).name == "torch"
    assert get_backend("triton", "cpu", fmt).name == "triton"  # TRITON_INTERPRET=1 here
    with pytest.raises(ValueError, match="batch_invariant"):
        get_backend("triton", "cpu", fmt, batch_invariant=True)
    with pytest.raises(ValueError, match="one of"):
        get_backend("flash", "cpu", fmt)
    backend = get_backend("triton", "cpu", fmt)
    meta = _metadata([8], [8], 8, 4)
    backend.prepare(meta)
    with pytest.raises(ValueError, match="head_dim >= 16"):
        backend.forward(torch.zeros(8, 2, 24), torch.zeros(8, 2, 24), torch.zeros(8, 2, 24),
                        torch.zeros(2, 4, 8, 2, 24), meta, 0.25)


@pytest.mark.slow
def test_greedy_output_matches_torch_backend() -> None:
    from pagoda import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=4)
    prompts = ["The capital of France is"]  # interpreted kernels are slow: one short prompt
    outputs = [LLM(attention_backend=name, dtype="float32", kv_cache_gib=0.05, max_model_len=512).generate(prompts, params)
               for name in ("triton", "torch")]
    assert outputs[0][0].outputs[0].token_ids == outputs[1][0].outputs[0].token_ids
