"""A KV pool's bytes: `[num_blocks, block_bytes]`, one contiguous mapping, optionally in POSIX
shared memory so a peer on the same host can copy blocks out of it without a socket.

Lifecycle: the owner `create`s (shared: a fresh unique name, mode 0600, registered with
Python's resource tracker so a crashed owner does not leak it) -> peers `attach` by name (not
registered: an attacher exiting must never unlink the owner's segment) -> everyone `close`s;
the owner's close also unlinks the name.

Engines view the same bytes as a tensor with `torch.frombuffer(pool.buffer, dtype=torch.uint8)`
(then `.view(dtype).view(shape)`); this module stays torch-free. Drop such views before
`close()`: while one is alive the mapping stays (it is freed with the last view).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import resource_tracker
from typing import Protocol

import numpy as np

from kvtransfer.layout import KvLayout

try:  # NOTE: the module SharedMemory itself uses; it lets attachers skip the resource tracker
    import _posixshmem
except ImportError:  # pragma: no cover - not a POSIX host
    _posixshmem = None

_TRACKER_TYPE = "shared_memory"

# A receive target and what to do once it is full (None: the bytes are already in place).
Target = tuple[memoryview, Callable[[], None] | None]


class Pool(Protocol):
    """What a transport needs of a pool, in host memory (KvPool) or on a device (DevicePool)."""

    layout: KvLayout
    num_blocks: int
    block_bytes: int
    device: str

    def read_chunks(self, ids: Sequence[int]) -> Iterator[list[memoryview]]:
        """Host views of blocks `ids`, in order; a chunk's views stay valid until the next one."""
        ...

    def write_chunks(self, ids: Sequence[int]) -> Iterator[Target]:
        """Host buffers to fill with blocks `ids`, in order; call the commit before the next."""
        ...


def _unique_name() -> str:
    return f"pdrouter-kv-{os.getpid()}-{secrets.token_hex(6)}"


def _open_shm(name: str, create: bool, nbytes: int) -> mmap.mmap:
    if _posixshmem is None:  # pragma: no cover
        raise OSError("shared-memory KV pools need a POSIX host")
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"shared memory {name!r} is {size} bytes; the layout needs {nbytes}")
        return mmap.mmap(fd, nbytes)
    except BaseException:
        if create:
            _posixshmem.shm_unlink("/" + name)
        raise
    finally:
        os.close(fd)


class KvPool:
    """Contiguous bytes of `num_blocks` KV blocks; block i is `buffer[i*block_bytes:(i+1)*block_bytes]`."""

    def __init__(
        self, layout: KvLayout, num_blocks: int, mapping: mmap.mmap, name: str | None, owner: bool
    ) -> None:
        self.layout = layout
        self.device = "cpu"
        self.num_blocks = num_blocks
        self.block_bytes = layout.block_bytes
        self.nbytes = num_blocks * self.block_bytes
        self.name = name  # shared-memory name (None: private memory)
        self.owner = owner
        self._mmap: mmap.mmap | None = mapping
        self.buffer = memoryview(mapping)  # writable, 1-D unsigned bytes: what torch.frombuffer takes
        self.array = np.frombuffer(mapping, dtype=np.uint8).reshape(num_blocks, self.block_bytes)

    @classmethod
    def create(cls, layout: KvLayout, num_blocks: int, shared: bool = False) -> KvPool:
        """A new zeroed pool; `shared=True` puts it in shared memory under a fresh unique name."""
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        nbytes = num_blocks * layout.block_bytes
        if not shared:
            return cls(layout, num_blocks, mmap.mmap(-1, nbytes), None, owner=True)
        name = _unique_name()
        mapping = _open_shm(name, True, nbytes)
        resource_tracker.register("/" + name, _TRACKER_TYPE)
        return cls(layout, num_blocks, mapping, name, owner=True)

    @classmethod
    def attach(cls, name: str, layout: KvLayout, num_blocks: int) -> KvPool:
        """Map a peer's shared pool by name; closing it never unlinks the peer's segment."""
        return cls(layout, num_blocks, _open_shm(name, False, num_blocks * layout.block_bytes), name, False)

    def block_view(self, block_id: int) -> memoryview:
        start = block_id * self.block_bytes
        return self.buffer[start : start + self.block_bytes]

    @property
    def address(self) -> int:
        """Where block 0 starts in this process (what NIXL registers)."""
        return self.array.ctypes.data

    def read_chunks(self, ids: Sequence[int]) -> Iterator[list[memoryview]]:
        bb, buf = self.block_bytes, self.buffer
        yield [buf[s * bb : (s + n) * bb] for s, _, n in runs(ids, ids)]

    def write_chunks(self, ids: Sequence[int]) -> Iterator[Target]:
        bb, buf = self.block_bytes, self.buffer
        for s, _, n in runs(ids, ids):
            yield buf[s * bb : (s + n) * bb], None

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap (and, for the owner of a shared pool, unlink the name); idempotent."""
        mapping, self._mmap = self._mmap, None
        if mapping is None:
            return
        if self.owner and self.name is not None:
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink("/" + self.name)
            resource_tracker.unregister("/" + self.name, _TRACKER_TYPE)
        self.array = np.empty((0, self.block_bytes), dtype=np.uint8)
        # NOTE: views handed out (block_view, torch tensors) keep the mapping alive until they die
        with contextlib.suppress(BufferError):
            self.buffer.release()
            mapping.close()

    def __enter__(self) -> KvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"shm {self.name}" if self.name else "private"
        return f"KvPool({self.num_blocks} x {self.block_bytes} B, {where}, {self.layout.describe()})"


def runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """`(src_start, dst_start, n)` for each stretch where both ids go up by one: one copy each.

    `runs(ids, ids)` merges one side only (what a sender or a receiver alone needs).
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source ids but {len(dst_ids)} destination ids")
    out: list[tuple[int, int, int]] = []
    if not src_ids:
        return out
    s0, d0, n = src_ids[0], dst_ids[0], 0
    for s, d in zip(src_ids, dst_ids):
        if s == s0 + n and d == d0 + n:
            n += 1
        else:
            out.append((s0, d0, n))
            s0, d0, n = s, d, 1
    out.append((s0, d0, n))
    return out
