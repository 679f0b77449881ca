"""Which worker holds which KV block: the router's view of every worker's prefix cache.

Exact mode (`KvIndex`) is fed only by worker events: a snapshot replaces a worker's entries,
`stored` adds, `removed` deletes, `cleared` empties. Approximate mode (`ApproxKvIndex`) serves
engines that emit no events: the router records where it sent each prompt, with a TTL and a
per-worker cap. Both answer `overlaps(block_hashes)`: how many LEADING blocks of a request
each worker holds.

Layout: every worker gets a small integer slot; the index maps a sequence hash to an int
bitmask of the slots holding it, so a lookup walks the request's hashes once, intersecting
masks, and only touches individual workers at the block where they drop out.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from pdrouter_proto import worker_pb2 as pb


class OverlapIndex(Protocol):
    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]: ...


class _SlotIndex:
    """Hash -> bitmask of worker slots, and the slot bookkeeping both modes share."""

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}
        self._slot_of: dict[str, int] = {}
        self._names: list[str | None] = []
        self._free_slots: list[int] = []

    @property
    def num_blocks(self) -> int:
        """Distinct hashes indexed (0 once every worker is gone)."""
        return len(self._holders)

    @property
    def worker_ids(self) -> list[str]:
        return list(self._slot_of)

    def _slot(self, worker_id: str) -> int:
        slot = self._slot_of.get(worker_id)
        if slot is None:
            # NOTE: reuse the lowest free slot so masks stay as short as the live worker count
            slot = heapq.heappop(self._free_slots) if self._free_slots else len(self._names)
            if slot == len(self._names):
                self._names.append(worker_id)
                self._new_slot()
            else:
                self._names[slot] = worker_id
            self._slot_of[worker_id] = slot
        return slot

    def _release_slot(self, worker_id: str) -> int | None:
        slot = self._slot_of.pop(worker_id, None)
        if slot is not None:
            self._names[slot] = None
            heapq.heappush(self._free_slots, slot)
        return slot

    def _new_slot(self) -> None:
        """Subclasses grow their per-slot containers here."""

    def _add(self, bit: int, hashes: Iterable[int]) -> None:
        holders = self._holders
        get = holders.get
        for h in hashes:
            holders[h] = get(h, 0) | bit

    def _discard(self, bit: int, hashes: Iterable[int]) -> None:
        holders = self._holders
        keep = ~bit
        for h in hashes:
            mask = holders.get(h, 0) & keep
            if mask:
                holders[h] = mask
            else:
                holders.pop(h, None)

    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Leading blocks of `block_hashes` each worker holds; workers with none are absent.

        A worker drops out at its first miss (a hole in the middle of a prefix makes the later
        blocks useless to it); the walk stops as soon as no worker remains.
        """
        out: dict[str, int] = {}
        if not block_hashes:
            return out
        get = self._holders.get
        alive = get(block_hashes[0], 0)
        if not alive:
            return out
        depth = 1
        for h in block_hashes[1:]:
            held = alive & get(h, 0)
            if held != alive:
                self._emit(alive ^ held, depth, out)
                if not held:
                    return out
                alive = held
            depth += 1
        self._emit(alive, depth, out)
        return out

    def _emit(self, mask: int, depth: int, out: dict[str, int]) -> None:
        names = self._names
        while mask:
            low = mask & -mask
            out[names[low.bit_length() - 1]] = depth  # type: ignore[index]
            mask ^= low


class KvIndex(_SlotIndex):
    """Exact index built from each worker's Subscribe stream; memory = what workers hold."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[set[int]] = []

    def _new_slot(self) -> None:
        self._held.append(set())

    @property
    def num_entries(self) -> int:
        """(worker, hash) pairs held; bounded by the workers' KV pools."""
        return sum(len(self._held[s]) for s in self._slot_of.values())

    def num_blocks_of(self, worker_id: str) -> int:
        slot = self._slot_of.get(worker_id)
        return 0 if slot is None else len(self._held[slot])

    def apply(self, worker_id: str, event: pb.WorkerEvent) -> None:
        """Fold one Subscribe event in; load reports and unknown kinds are ignored."""
        kind = event.WhichOneof("kind")
        if kind == "stored":
            self.store(worker_id, event.stored.block_hashes)
        elif kind == "removed":
            self.remove(worker_id, event.removed.block_hashes)
        elif kind == "snapshot":
            self.replace(worker_id, event.snapshot.block_hashes)
        elif kind == "cleared":
            self.clear(worker_id)

    def store(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        slot = self._slot(worker_id)
        hashes = list(block_hashes)
        self._held[slot].update(hashes)
        self._add(1 << slot, hashes)

    def remove(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        slot = self._slot_of.get(worker_id)
        if slot is None:
            return
        held = self._held[slot]
        gone = [h for h in block_hashes if h in held]
        held.difference_update(gone)
        self._discard(1 << slot, gone)

    def replace(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """A snapshot: the worker holds exactly these blocks now (e.g. after a restart)."""
        self.clear(worker_id)
        self.store(worker_id, block_hashes)

    def clear(self, worker_id: str) -> None:
        slot = self._slot_of.get(worker_id)
        if slot is not None:
            self._discard(1 << slot, self._held[slot])
            self._held[slot] = set()

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker entirely (gone, unhealthy, or about to resubscribe)."""
        self.clear(worker_id)
        self._release_slot(worker_id)


class ApproxKvIndex(_SlotIndex):
    """Index of the router's own routing decisions, for engines that emit no KV events.

    A recorded block is assumed cached on that worker for `ttl_s`; each worker keeps at most
    `max_blocks_per_worker`, evicting its least recently routed first. Expiry is lazy: due
    workers are pruned from a heap on each `record` / `overlaps`.
    """

    def __init__(self, ttl_s: float = 120.0, max_blocks_per_worker: int = 65_536) -> None:
        super().__init__()
        self.ttl_s = ttl_s
        self.max_blocks_per_worker = max_blocks_per_worker
        self._expiry: list[OrderedDict[int, float]] = []  # per slot, oldest first
        self._due: list[tuple[float, int]] = []  # (earliest expiry, slot), one entry per queued slot
        self._queued: set[int] = set()

    def _new_slot(self) -> None:
        self._expiry.append(OrderedDict())

    @property
    def num_entries(self) -> int:
        return sum(len(self._expiry[s]) for s in self._slot_of.values())

    def record(self, worker_id: str, block_hashes: Sequence[int], now: float | None = None) -> None:
        """The router sent these blocks to `worker_id`; assume it caches them until now + ttl."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        slot = self._slot(worker_id)
        bit = 1 << slot
        held = self._expiry[slot]
        expires = now + self.ttl_s
        # NOTE: tail first, so the prefix is the most recent and the cap evicts tails first
        move_to_end = held.move_to_end
        for h in reversed(block_hashes):
            held[h] = expires
            move_to_end(h)
        self._add(bit, block_hashes)
        while len(held) > self.max_blocks_per_worker:
            h, _ = held.popitem(last=False)
            self._discard(bit, (h,))
        if held and slot not in self._queued:
            self._queued.add(slot)
            heapq.heappush(self._due, (next(iter(held.values())), slot))

    def overlaps(self, block_hashes: Sequence[int], now: float | None = None) -> dict[str, int]:
        self._expire(time.monotonic() if now is None else now)
        return super().overlaps(block_hashes)

    def remove_worker(self, worker_id: str) -> None:
        slot = self._release_slot(worker_id)
        if slot is not None:
            self._discard(1 << slot, self._expiry[slot])
            self._expiry[slot] = OrderedDict()

    def _expire(self, now: float) -> None:
        due = self._due
        while due and due[0][0] <= now:
            _, slot = heapq.heappop(due)
            held = self._expiry[slot]
            gone = []
            while held:
                h, expires = held.popitem(last=False)
                if expires > now:
                    held[h] = expires
                    held.move_to_end(h, last=False)
                    break
                gone.append(h)
            self._discard(1 << slot, gone)
            if held:
                heapq.heappush(due, (next(iter(held.values())), slot))
            else:
                self._queued.discard(slot)


class PendingKvIndex:
    """The exact index plus what this router has just sent where.

    Events say what a worker holds once it has computed it; a burst of requests sharing a new
    prefix arrives before that, and would scatter over workers that all look empty. So each
    routed prompt is also recorded for the worker that will compute (or import) it, for
    `ttl_s` (the events take over long before); overlap = max(exact, pending) per worker.
    """

    def __init__(self, exact: KvIndex, ttl_s: float = 10.0) -> None:
        self.exact = exact
        self.pending = ApproxKvIndex(ttl_s=ttl_s)

    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        out = self.exact.overlaps(block_hashes)
        for worker_id, n in self.pending.overlaps(block_hashes).items():
            if n > out.get(worker_id, 0):
                out[worker_id] = n
        return out

    def record(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        if block_hashes:
            self.pending.record(worker_id, block_hashes)

    def remove_worker(self, worker_id: str) -> None:
        self.exact.remove_worker(worker_id)
        self.pending.remove_worker(worker_id)
