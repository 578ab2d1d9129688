"""BlockPool / KVCacheManager bookkeeping: ref counts, hash chains, verification, LRU, extra keys."""

from __future__ import annotations

from pagoda.api.params import SamplingParams
from pagoda.engine.core.kv_cache import BlockPool, KVCacheManager, block_hash
from pagoda.engine.core.request import Request


def _req(tokens: list[int], rid: str = "r", salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(), frozenset(), cache_salt=salt)


def _fill(kv: KVCacheManager, req: Request) -> None:
    """Admit, 'compute' the whole prompt, publish its full blocks."""
    cached = kv.find_cached_prefix(req)
    remaining = len(req.token_ids) - len(cached) * kv.block_size
    assert kv.allocate(req, remaining, cached)
    req.num_computed_tokens = len(req.token_ids)
    kv.publish_full_blocks(req)


def test_allocate_and_free_restore_all_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    req = _req(list(range(10)))
    _fill(kv, req)
    assert len(req.block_ids) == 3 and kv.pool.num_free_blocks == 5
    kv.free(req)
    assert kv.pool.num_free_blocks == 8 and req.block_ids == []


def test_prefix_hit_shares_blocks_and_leaves_one_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = _req(list(range(12)), "a")
    _fill(kv, a)
    b = _req(list(range(12)), "b")  # identical prompt: the last block must still be computed
    hit = kv.find_cached_prefix(b)
    assert hit == a.block_ids[:2]
    c = _req(list(range(13)), "c")
    assert kv.find_cached_prefix(c) == a.block_ids[:3]
    assert kv.allocate(c, 1, kv.find_cached_prefix(c))
    assert [kv.pool.blocks[i].ref_cnt for i in a.block_ids] == [2, 2, 2]
    kv.free(a)
    kv.free(c)
    assert kv.pool.num_free_blocks == 16


def test_hash_collision_is_rejected_by_token_check() -> None:
    pool = BlockPool(num_blocks=4, enable_prefix_caching=True)
    [bid] = pool.allocate(1)
    key = block_hash(None, [1, 2, 3, 4], b"")
    pool.publish(bid, key, (9, 9, 9, 9))  # a forged entry: same key, other tokens
    assert pool.lookup(key, (1, 2, 3, 4)) is None
    assert pool.lookup(key, (9, 9, 9, 9)) == bid


def test_cache_salt_isolates_tenants() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    _fill(kv, _req(list(range(9)), "a", salt="tenant-a"))
    assert kv.find_cached_prefix(_req(list(range(9)), "b", salt="tenant-b")) == []
    assert len(kv.find_cached_prefix(_req(list(range(9)), "c", salt="tenant-a"))) == 2


def test_freed_cached_blocks_are_revived_then_evicted_lru_tail_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = _req([1, 2, 3, 4, 5, 6, 7], "a")  # 3 full blocks + 1 partial
    _fill(kv, a)
    blocks = list(a.block_ids)
    first_three = blocks[:3]
    kv.free(a)
    assert kv.pool.num_free_blocks == 4
    # Revival: an identical prefix finds all three full blocks although they are free.
    b = _req([1, 2, 3, 4, 5, 6, 9], "b")
    assert kv.find_cached_prefix(b) == first_three
    # Eviction order: freed tail-first, so allocating one block evicts the tail of the prefix.
    [taken] = kv.pool.allocate(1)
    assert taken == blocks[3]
    [taken2] = kv.pool.allocate(1)
    assert taken2 == first_three[2]
    assert kv.find_cached_prefix(_req([1, 2, 3, 4, 5, 6, 9], "c")) == first_three[:2]


def test_prefix_caching_off_never_hits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    _fill(kv, _req(list(range(9)), "a"))
    assert kv.find_cached_prefix(_req(list(range(9)), "b")) == []
