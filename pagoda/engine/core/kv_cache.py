"""Paged KV-cache bookkeeping: a pool of fixed-size blocks with ref counts and a prefix cache.

A full block's key is a SHA-256 chained over the previous block's key, the
request's cache salt (its tenant; an adapter id joins it with multi-LoRA) and the block's token ids. A hit
is also checked against the token ids stored with the block. Free blocks sit in
an LRU queue; a cached free block keeps its KV until it is reused, so a later
request can revive it. Requests free their blocks tail-first, which puts a
prompt's last blocks in front of its first ones for eviction.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from pagoda.engine.core.request import Request


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None


def block_hash(parent: bytes | None, token_ids: tuple[int, ...] | list[int], extra: bytes) -> bytes:
    h = hashlib.sha256(parent or b"root")
    h.update(extra)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return h.digest()


def extra_key(request: Request) -> bytes:
    return (request.cache_salt or "").encode()


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached content
                del self.cached[block.block_hash]
                block.block_hash = block.token_ids = None
            block.ref_cnt = 1
            ids.append(block_id)
        return ids

    def lookup(self, key: bytes, token_ids: tuple[int, ...]) -> int | None:
        block_id = self.cached.get(key)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return None
        return block_id

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (reviving them from the free queue)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free_queue[block_id]
            block.ref_cnt += 1

    def publish(self, block_id: int, key: bytes, token_ids: tuple[int, ...]) -> None:
        """Make a full, written block findable; a duplicate of an existing entry stays private."""
        block = self.blocks[block_id]
        if not self.enable_prefix_caching or block.block_hash is not None or key in self.cached:
            return
        block.block_hash, block.token_ids = key, token_ids
        self.cached[key] = block_id

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each, in the given order (callers pass tail-first)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"KV block {block_id} freed twice")
            if block.ref_cnt == 0:
                self.free_queue[block_id] = None


class KVCacheManager:
    """Per-request block tables on top of a BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens found cached

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes_up_to(self, request: Request, num_full_blocks: int) -> list[bytes]:
        hashes = request.block_hashes
        extra = extra_key(request)
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, request.token_ids[i * bs : (i + 1) * bs], extra))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks for the longest prefix of the request's tokens, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        num_tokens = len(request.token_ids)
        max_blocks = (num_tokens - 1) // self.block_size
        hashes = self._hashes_up_to(request, max_blocks)
        hit: list[int] = []
        bs = self.block_size
        for i in range(max_blocks):
            block_id = self.pool.lookup(hashes[i], tuple(request.token_ids[i * bs : (i + 1) * bs]))
            if block_id is None:
                break
            hit.append(block_id)
        self.prefix_queries += num_tokens
        self.prefix_hits += len(hit) * bs
        return hit

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Reserve blocks so the request can hold ``num_computed + cached + num_new`` tokens."""
        if not cached_blocks and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size:
            return True  # the common decode step: room left in the last block
        cached_blocks = list(cached_blocks)
        total_tokens = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        new_needed = self.blocks_needed(total_tokens) - len(request.block_ids) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_cnt == 0)
        if new_needed + revived > self.pool.num_free_blocks:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            request.block_ids.extend(cached_blocks)
            request.num_computed_tokens += len(cached_blocks) * self.block_size
        if new_needed > 0:
            request.block_ids.extend(self.pool.allocate(new_needed))
        return True

    def publish_full_blocks(self, request: Request) -> None:
        """After a step: make the request's newly filled (written) blocks findable."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        if num_full == request.num_published_blocks:
            return  # no block filled up in this step
        hashes = self._hashes_up_to(request, num_full)
        bs = self.block_size
        for i in range(request.num_published_blocks, num_full):
            block = self.pool.blocks[request.block_ids[i]]
            if block.block_hash is None:
                self.pool.publish(block.block_id, hashes[i], tuple(request.token_ids[i * bs : (i + 1) * bs]))
        request.num_published_blocks = num_full

    def free(self, request: Request) -> None:
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_published_blocks = 0
