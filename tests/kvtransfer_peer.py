"""A prefill-side peer in its own process, for kvtransfer tests: owns a shared KvPool filled with
seeded random bytes, serves it over TCP on 127.0.0.1, and answers JSON-line commands on stdin
(publish, claim, release, pinned, quit) — claim and release stand in for a control channel.
Tokens cross the JSON boundary as hex text; inside this process they are raw bytes.

    python -m tests.kvtransfer_peer --blocks N --seed S --layout dtype,layers,kv_heads,head_dim,block_size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import numpy as np

from kvtransfer.errors import TransferRefused
from kvtransfer.handles import HandleRegistry
from kvtransfer.host import host_id
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from kvtransfer.tcp import TcpTransferServer


def parse_layout(text: str) -> KvLayout:
    dtype, *nums = text.split(",")
    layers, heads, head_dim, block_size = map(int, nums)
    return KvLayout(
        dtype=dtype, num_layers=layers, num_kv_heads=heads, head_dim=head_dim, block_size=block_size
    )


def pattern(num_blocks: int, block_bytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_blocks, block_bytes), dtype=np.uint8)


def answer(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", required=True)
    args = parser.parse_args()
    layout = parse_layout(args.layout)
    pool = KvPool.create(layout, args.blocks, shared=True)
    pool.array[:] = pattern(args.blocks, layout.block_bytes, args.seed)
    unpinned: list[str] = []
    registry = HandleRegistry(on_unpin=lambda h: unpinned.append(h.handle_id))
    server = TcpTransferServer(pool, registry, "127.0.0.1", 0)
    await server.start()
    answer(
        {"shm_name": pool.name, "endpoint": server.endpoint, "num_blocks": args.blocks, "host_id": host_id()}
    )
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        if cmd["op"] == "publish":
            h = registry.publish(cmd["handle_id"], cmd["ids"], 0, ttl_s=cmd.get("ttl", 30.0))
            answer({"handle_id": h.handle_id, "token": h.token.hex()})
        elif cmd["op"] == "claim":
            try:
                registry.claim(cmd["handle_id"], bytes.fromhex(cmd["token"]))
                answer({"ok": True})
            except TransferRefused as exc:
                answer({"ok": False, "reason": exc.reason})
        elif cmd["op"] == "release":
            token = cmd.get("token")
            answer({"released": registry.release(cmd["handle_id"], bytes.fromhex(token) if token else None)})
        elif cmd["op"] == "pinned":
            answer({"pinned": registry.num_pinned, "unpinned": unpinned})
        elif cmd["op"] == "quit":
            break
    await server.close()
    registry.close()
    pool.close()
    answer({"bye": True})


if __name__ == "__main__":
    asyncio.run(main())
