"""Tracing overhead: router throughput at 32 concurrent streams, tracing off vs on, same run.

    python -m bench.tracing_overhead [--quick]

Two identical stacks (`pdrouter serve --engine mock --both 2`, workers with no modelled delay,
so the router is the bottleneck), one with tracing off and one exporting every span and a
span event per token over OTLP/gRPC to an in-process receiver (spans are received and
counted, as a collector would). Each runs the same closed loop: 32 concurrent streaming
chat requests of 64 tokens, for a fixed number of rounds; rounds alternate between the
stacks so machine noise hits both. Reports tokens/s and requests/s of each and the ratio.
Goal: tracing on costs at most 10% of throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import openai
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.common import headline, save, table
from tests.procs import Stack, free_port

CONCURRENCY = 32
TOKENS = 64


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.events = 0
        self.lock = threading.Lock()

    def Export(self, request, context):
        n = e = 0
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                n += len(ss.spans)
                e += sum(len(s.events) for s in ss.spans)
        with self.lock:
            self.spans += n
            self.events += e
        return trace_service_pb2.ExportTraceServiceResponse()


async def one_round(base: str, requests: int) -> tuple[int, float]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(CONCURRENCY)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with sem:
            stream = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=TOKENS,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, per_round = (3, 96) if args.quick else (6, 192)
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    on_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    totals = {"off": [0, 0.0, 0], "on": [0, 0.0, 0]}
    with tempfile.TemporaryDirectory() as tmp:
        stacks = {
            "off": Stack(Path(tmp), "--both", "2", env={"OTEL_TRACES_EXPORTER": "none"}),
            "on": Stack(Path(tmp), "--both", "2", env=on_env),
        }
        try:
            for stack in stacks.values():  # warm-up
                asyncio.run(one_round(stack.base_url, CONCURRENCY))
            for r in range(rounds):
                for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    tokens, seconds = asyncio.run(one_round(stacks[name].base_url, per_round))
                    totals[name][0] += tokens
                    totals[name][1] += seconds
                    totals[name][2] += per_round
        finally:
            for stack in stacks.values():
                stack.stop()
    server.stop(0)
    rows = []
    for name, (tokens, seconds, requests) in totals.items():
        rows.append([name, requests, tokens, tokens / seconds, requests / seconds])
    ratio = rows[1][3] / rows[0][3]
    print(f"{CONCURRENCY} concurrent streams x {TOKENS} tokens, mock workers, no delay, {rounds} rounds each")
    print(table(["tracing", "requests", "tokens", "tokens/s", "requests/s"], rows))
    print(f"spans received: {receiver.spans}, token events: {receiver.events}")
    figures = {
        "tokens_per_s_tracing_off": round(rows[0][3], 1),
        "tokens_per_s_tracing_on": round(rows[1][3], 1),
        "throughput_ratio_on_vs_off": round(ratio, 3),
        "overhead_pct": round((1 - ratio) * 100, 1),
        "spans_received": receiver.spans,
    }
    path = save("tracing_overhead", {"quick": args.quick, "rows": rows, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
