"""The KV pool layout both sides of a transfer must agree on, and its compatibility hash."""

from __future__ import annotations

import msgspec
import xxhash

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int8": 1, "float8_e4m3fn": 1}


class KvLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Pool shape `[num_blocks, num_layers, 2 (K,V), block_size, num_kv_heads, head_dim]`, block-major,
    so one block of all layers is one contiguous slab of `block_bytes`."""

    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @property
    def block_bytes(self) -> int:
        return (
            self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * ITEMSIZE[self.dtype]
        )

    def describe(self) -> str:
        return (
            f"dtype={self.dtype} layers={self.num_layers} kv_heads={self.num_kv_heads} "
            f"head_dim={self.head_dim} block_size={self.block_size}"
        )


def compat_hash(model: str, layout: KvLayout, version: str) -> str:
    """Two pools may exchange blocks only when this matches (checked before the first pull)."""
    key = f"{model}|{layout.describe()}|{version}".encode()
    return f"{xxhash.xxh3_64_intdigest(key):016x}"
