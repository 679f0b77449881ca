"""KV block identity shared by router and engines (torch-free).

The scheme is NVIDIA Dynamo's: only full blocks are hashed; a block's local hash is
xxh3_64 of its token ids as little-endian uint32 with seed 1337 (an adapter name shifts
the seed); the sequence hash chains the previous sequence hash and the local hash, so a
worker holding seq[i] holds the whole prefix up to block i.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence

import xxhash

DEFAULT_BLOCK_SIZE = 16
BASE_SEED = 1337
_MASK64 = (1 << 64) - 1
_pack_pair = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest


def adapter_seed(adapter: str | None) -> int:
    """Seed for local hashes; a LoRA adapter name changes it so its blocks never collide."""
    if not adapter:
        return BASE_SEED
    return (BASE_SEED + _xxh3(adapter.encode())) & _MASK64


def _as_u32_le(tokens: Sequence[int]) -> bytes:
    buf = array("I", tokens)
    if buf.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte uint
        buf = array("L", tokens)
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big endian hosts
        buf.byteswap()
    return buf.tobytes()


def local_block_hashes(
    tokens: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, adapter: str | None = None
) -> list[int]:
    seed = adapter_seed(adapter)
    n_full = len(tokens) // block_size
    return [
        _xxh3(_as_u32_le(tokens[i * block_size : (i + 1) * block_size]), seed=seed) for i in range(n_full)
    ]


def chain_hash(parent: int | None, local: int) -> int:
    """Sequence hash of a block from its parent's sequence hash and its own local hash."""
    if parent is None:
        return local
    return _xxh3(_pack_pair(parent, local), seed=BASE_SEED)


def sequence_block_hashes(
    tokens: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    adapter: str | None = None,
    parent: int | None = None,
) -> list[int]:
    """Sequence hashes of every full block of `tokens` (continuing from `parent` if given)."""
    out: list[int] = []
    for local in local_block_hashes(tokens, block_size, adapter):
        parent = chain_hash(parent, local)
        out.append(parent)
    return out
