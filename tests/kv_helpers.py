"""Shared by the disaggregation tests: worker KV stats over gRPC and route-header parsing."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from pdrouter_proto import worker_pb2 as wpb
from pdrouter_proto import worker_pb2_grpc as wpb_grpc


def route_workers(header: str) -> dict[str, str]:
    """'mode=disaggregated;prefill=A;decode=B' -> {'mode': ..., 'prefill': A, 'decode': B}."""
    return dict(part.split("=", 1) for part in header.split(";"))


def worker_load(address: str) -> wpb.LoadReport:
    """The worker's load right now: the snapshot that opens its Subscribe stream."""
    with grpc.insecure_channel(address) as ch:
        stream = wpb_grpc.WorkerStub(ch).Subscribe(wpb.SubscribeRequest(subscriber_id="test"), timeout=10)
        try:
            event = next(stream)
        finally:
            stream.cancel()
    return event.snapshot.load


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `check` until true; the workers settle asynchronously (releases, unpins)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)  # poll interval
