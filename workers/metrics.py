"""A worker's Prometheus metrics (`pdrouter worker --metrics-port N`): read at scrape time.

Everything is already counted by the engine, the block manager and the KV agent; a custom
collector turns those numbers into samples when Prometheus asks, so serving pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.engine.engine import Engine
from workers.kv_agent import KvAgent


class WorkerCollector(Collector):
    def __init__(self, worker_id: str, engine: Engine, kv: KvAgent | None) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.kv = kv

    def collect(self) -> Iterator:
        e, w = self.engine, [self.worker_id]
        load = e.load()
        bm = e.block_manager

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"pdrouter_worker_{name}", doc, labels=["worker"])
            g.add_metric(w, value)
            return g

        def labelled(name: str, doc: str, label: str, values) -> CounterMetricFamily:
            c = CounterMetricFamily(f"pdrouter_worker_{name}", doc, labels=["worker", label])
            for key, value in sorted(values.items()):
                c.add_metric([self.worker_id, key], value)
            return c

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"pdrouter_worker_{name}", doc, labels=["worker"])
            c.add_metric(w, value)
            return c

        yield gauge("requests_running", "Sequences in the running batch", load.num_running)
        yield gauge("requests_waiting", "Sequences waiting for blocks or budget", load.num_waiting)
        yield gauge("queued_prefill_tokens", "Prompt tokens still to compute", load.queued_prefill_tokens)
        yield gauge("kv_blocks_used", "KV blocks referenced by live sequences", load.kv_blocks_used)
        yield gauge("kv_blocks_total", "KV pool size in blocks", load.kv_blocks_total)
        yield gauge("kv_blocks_cached", "Blocks in the prefix cache", len(bm.cached))
        yield counter("prefix_hit_tokens", "Prompt tokens served from the prefix cache", bm.num_prefix_hits)
        yield counter("generated_tokens", "Tokens generated", e.num_generated_tokens)
        yield counter("engine_steps", "Engine steps run", e.num_steps)
        if self.kv is not None:
            s = self.kv.snapshot()
            yield counter("kv_pulls", "KV handles pulled (decode side)", s.pulls)
            yield counter(
                "kv_pull_failures", "KV pulls that failed and were recomputed locally", s.pull_failures
            )
            yield counter("kv_bytes_pulled", "KV bytes pulled", s.bytes_pulled)
            yield counter("kv_handles_published", "KV handles published (prefill side)", s.handles_published)
            yield counter("kv_handles_expired", "KV handles unpinned by their TTL", s.handles_expired)
            yield gauge("kv_handles_pinned", "KV handles pinned now", s.handles_pinned)
            yield gauge("kv_blocks_pinned", "KV blocks pinned now", s.blocks_pinned)
            yield labelled(
                "kv_pulls_by_backend", "KV pulls by the backend that moved the blocks", "backend",
                s.pulls_by_backend,
            )  # fmt: skip
            yield labelled(
                "kv_pull_failures_by_reason",
                "Failed KV pulls by reason class",
                "reason",
                s.failures_by_reason,
            )


def serve_metrics(host: str, port: int, collectors: list[WorkerCollector]) -> None:
    """Start the /metrics HTTP endpoint (a daemon thread) for this process's workers."""
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    start_http_server(port, addr=host, registry=registry)
