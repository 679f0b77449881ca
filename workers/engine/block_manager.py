"""Fixed pool of KV blocks with ref counts and a prefix cache keyed by sequence hashes.

Lifecycle of a block: free (maybe still cached) -> allocated (ref > 0) -> full: hashed and
registered in the prefix cache (a `stored` event) -> freed (ref 0, back on the LRU free
queue, still matchable) -> reused for other tokens (lazy eviction: a `removed` event).
A cache hit is confirmed by comparing token ids, not by trusting the hash alone.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from kvtransfer.blocks import chain_hash, local_block_hashes
from workers.engine.sequence import Sequence


class KvEvent(msgspec.Struct, array_like=True, gc=False):
    kind: str  # "stored" | "removed" | "cleared"
    block_hashes: list[int]
    parent_hash: int | None = None


class Block:
    __slots__ = ("block_hash", "block_id", "next", "prev", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] = ()
        self.prev: Block | None = None
        self.next: Block | None = None


class FreeBlockQueue:
    """Intrusive doubly linked list: O(1) remove on a cache hit, O(1) pop of the LRU block."""

    def __init__(self, blocks: list[Block]) -> None:
        self.head = Block(-1)
        self.tail = Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self.tail.prev
        assert last is not None
        last.next, block.prev, block.next, self.tail.prev = block, last, self.tail, block
        self.num_free += 1

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev, block.next
        assert prev is not None and nxt is not None
        prev.next, nxt.prev = nxt, prev
        block.prev = block.next = None
        self.num_free -= 1

    def popleft(self) -> Block:
        block = self.head.next
        if block is None or block is self.tail:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block

    def __iter__(self):
        node = self.head.next
        while node is not None and node is not self.tail:
            yield node
            node = node.next


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        on_event: Callable[[KvEvent], None] | None = None,
        adapter: str | None = None,
    ) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[int, Block] = {}
        self.on_event = on_event
        self.adapter = adapter
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0  # tokens served from cache
        self.num_prefix_query_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - self.free_queue.num_free

    def _emit(self, event: KvEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # -- hashing ----------------------------------------------------------------------------

    def update_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        """Extend seq.block_hashes to cover every full block within the first `upto_tokens`."""
        bs = self.block_size
        have = len(seq.block_hashes)
        want = upto_tokens // bs
        if want <= have:
            return
        parent = seq.block_hashes[-1] if have else None
        for local in local_block_hashes(seq.token_ids[have * bs : want * bs], bs, self.adapter):
            parent = chain_hash(parent, local)
            seq.block_hashes.append(parent)

    # -- allocation -------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[Block]:
        """Cached blocks holding seq's leading full blocks (never the whole sequence: the last
        token must be computed to get logits)."""
        self.update_hashes(seq, seq.num_tokens)
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hits: list[Block] = []
        for i in range(max_blocks):
            block = self.cached.get(seq.block_hashes[i])
            if block is None or block.token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block)
        return hits

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.free_queue.num_free

    def allocate_prefix(self, seq: Sequence, hits: list[Block]) -> None:
        """Take the cached prefix blocks for a sequence that has no blocks yet."""
        for block in hits:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.num_prefix_queries += 1
        self.num_prefix_query_tokens += seq.num_tokens
        self.num_prefix_hits += seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_blocks: int) -> None:
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_count = 1
            seq.block_table.append(block.block_id)

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                self._emit(KvEvent("removed", [block.block_hash]))
            block.block_hash = None
            block.token_ids = ()

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full (their KV is computed) in the prefix cache."""
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        first = next(
            (i for i in range(num_full) if self.blocks[seq.block_table[i]].block_hash is None), num_full
        )
        if first >= num_full:
            return
        self.update_hashes(seq, num_full * bs)
        stored: list[int] = []
        for i in range(first, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue
            h = seq.block_hashes[i]
            block.block_hash = h
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            if h not in self.cached:
                self.cached[h] = block
                stored.append(h)
        if stored:
            parent = seq.block_hashes[first - 1] if first > 0 else None
            self._emit(KvEvent("stored", stored, parent))

    def free(self, seq: Sequence) -> None:
        """Release in reverse so a sequence's tail blocks are evicted before its head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue.append(block)
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def cached_hashes(self) -> list[int]:
        return list(self.cached)

    def clear_cache(self) -> None:
        """Forget the whole prefix cache (e.g. after weights change); blocks in use stay allocated."""
        for block in self.cached.values():
            block.block_hash = None
            block.token_ids = ()
        self.cached.clear()
        self._emit(KvEvent("cleared", []))
