"""A KV pool on a device (a CUDA GPU), as the transports see it: the engine's own pool tensor,
viewed as `[num_blocks, block_bytes]` bytes.

Host-staged moves (the `staged` backend, and the tcp listener serving a device pool) copy block
chunks of at most STAGE_BYTES through pinned host buffers: device -> host on the sending side,
host -> device on the receiving side, on a side stream so the engine's stream is not blocked.
Each chunk in flight has its own buffer (taken from a small free list), so concurrent pulls and
reads never share one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from kvtransfer.layout import KvLayout
from kvtransfer.pool import Target

STAGE_BYTES = 64 << 20
_KEEP_BUFFERS = 4


class DevicePool:
    """The bytes of a pool tensor on a device; block i is `blocks[i]`."""

    def __init__(self, layout: KvLayout, tensor: torch.Tensor, stage_bytes: int = STAGE_BYTES) -> None:
        if not tensor.is_contiguous():
            raise ValueError("a transferable KV pool must be one contiguous tensor")
        self.layout = layout
        self.tensor = tensor
        self.block_bytes = layout.block_bytes
        self.blocks = tensor.view(-1).view(torch.uint8).view(-1, self.block_bytes)
        self.num_blocks = self.blocks.shape[0]
        self.nbytes = self.num_blocks * self.block_bytes
        self.device = str(tensor.device)
        self.cuda = tensor.device.type == "cuda"
        self.stream = torch.cuda.Stream(tensor.device) if self.cuda else None
        self.stage_blocks = max(1, stage_bytes // self.block_bytes)  # blocks per staged chunk
        self._free: list[torch.Tensor] = []

    def read_chunks(self, ids: Sequence[int]) -> Iterator[list[memoryview]]:
        for chunk in self._chunks(ids):
            with self._buffer(len(chunk)) as stage, self._on_stream():
                idx = torch.tensor(chunk, device=self.tensor.device)
                stage.copy_(self.blocks.index_select(0, idx))
                self._sync()
                yield [memoryview(stage.numpy()).cast("B")]

    def write_chunks(self, ids: Sequence[int]) -> Iterator[Target]:
        for chunk in self._chunks(ids):
            with self._buffer(len(chunk)) as stage:

                def commit(stage: torch.Tensor = stage, chunk: list[int] = chunk) -> None:
                    with self._on_stream():
                        idx = torch.tensor(chunk, device=self.tensor.device)
                        self.blocks.index_copy_(0, idx, stage.to(self.tensor.device, non_blocking=True))
                        self._sync()  # NOTE: before the staging buffer takes the next chunk

                yield memoryview(stage.numpy()).cast("B"), commit

    def _chunks(self, ids: Sequence[int]) -> Iterator[list[int]]:
        per = self.stage_blocks
        ids = list(ids)
        for i in range(0, len(ids), per):
            yield ids[i : i + per]

    @contextlib.contextmanager
    def _buffer(self, num_blocks: int) -> Iterator[torch.Tensor]:
        """A pinned host buffer of `num_blocks` blocks (plain host memory for a CPU tensor)."""
        per = self.stage_blocks
        buf = self._free.pop() if self._free else None
        if buf is None:
            buf = torch.empty((per, self.block_bytes), dtype=torch.uint8, pin_memory=self.cuda)
        try:
            yield buf[:num_blocks]
        finally:
            if len(self._free) < _KEEP_BUFFERS:
                self._free.append(buf)

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def close(self) -> None:
        self._free.clear()

    def __repr__(self) -> str:
        where = f"{self.num_blocks} x {self.block_bytes} B on {self.device}"
        return f"DevicePool({where}, {self.layout.describe()})"
