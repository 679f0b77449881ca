"""Prometheus metrics of the router (served at GET /metrics). Names are listed in docs/observability.md."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdrouter_requests", "Requests by endpoint, HTTP status and route mode",
                                ["endpoint", "status", "mode"], registry=r)  # fmt: skip
        self.migrations = Counter(
            "pdrouter_migrations", "Decode streams resumed on another worker after theirs broke", registry=r
        )
        self.in_flight = Gauge("pdrouter_requests_in_flight", "Requests being served", registry=r)
        self.queued = Gauge("pdrouter_requests_queued", "Requests waiting for --max-in-flight", registry=r)
        self.ttft = Histogram(
            "pdrouter_ttft_seconds", "Time to first token", ["mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram("pdrouter_itl_seconds", "Inter-token latency", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(
            "pdrouter_e2e_seconds", "Request latency", ["mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.input_tokens = Counter("pdrouter_input_tokens", "Prompt tokens", registry=r)
        self.output_tokens = Counter("pdrouter_output_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            "pdrouter_cached_tokens", "Prompt tokens served from a prefix cache", registry=r
        )
        self.decisions = Counter(
            "pdrouter_routing_decisions", "Routing decisions by mode", ["mode"], registry=r
        )
        self.decision_time = Histogram("pdrouter_routing_decision_seconds", "Time to choose workers",
                                       buckets=DECISION_BUCKETS, registry=r)  # fmt: skip
        self.worker_healthy = Gauge("pdrouter_worker_healthy", "1 when the worker's event stream is up",
                                    ["worker", "role"], registry=r)  # fmt: skip
        self.worker_blocks_used = Gauge(
            "pdrouter_worker_kv_blocks_used", "KV blocks in use", ["worker"], registry=r
        )
        self.worker_blocks_total = Gauge(
            "pdrouter_worker_kv_blocks_total", "KV pool size", ["worker"], registry=r
        )
        self.worker_ejections = Gauge(
            "pdrouter_worker_ejections", "Circuit-breaker ejections of the worker", ["worker"], registry=r
        )
        self.worker_waiting = Gauge(
            "pdrouter_worker_queue_depth", "Requests waiting on the worker", ["worker"], registry=r
        )
        # NOTE: the worker's own KV transfer totals, as of its last load report
        self.worker_kv = {
            field: Gauge(f"pdrouter_worker_kv_{field}", help_text, ["worker"], registry=r)
            for field, help_text in (
                ("pulls", "KV handles pulled (decode side)"),
                ("pull_failures", "KV pulls that failed and fell back to local recompute"),
                ("blocks_pulled", "KV blocks pulled (decode side)"),
                ("handles_pinned", "KV handles pinned now (prefill side)"),
                ("blocks_pinned", "KV blocks pinned now (prefill side)"),
                ("handles_expired", "KV handles unpinned by their TTL instead of a release"),
            )
        }

        self.worker_kv_by = {
            field: Gauge(f"pdrouter_worker_kv_{field}", help_text, ["worker", label], registry=r)
            for field, label, help_text in (
                ("pulls_by_backend", "backend", "KV pulls by the backend that moved the blocks"),
                ("failures_by_reason", "reason", "Failed KV pulls by reason class (decode side)"),
            )
        }

    def observe_workers(self, workers) -> None:
        """Refreshed at scrape time from the pool's latest load reports; a worker that left the
        pool (discovery removed it) leaves every per-worker series too."""
        for gauge in (
            self.worker_healthy, self.worker_blocks_used, self.worker_blocks_total, self.worker_waiting,
            self.worker_ejections, *self.worker_kv.values(), *self.worker_kv_by.values(),
        ):  # fmt: skip
            gauge.clear()
        for w in workers:
            self.worker_healthy.labels(w.worker_id, w.role).set(1 if w.healthy else 0)
            self.worker_blocks_used.labels(w.worker_id).set(w.load.kv_blocks_used)
            self.worker_blocks_total.labels(w.worker_id).set(w.load.kv_blocks_total)
            self.worker_waiting.labels(w.worker_id).set(w.load.num_waiting)
            self.worker_ejections.labels(w.worker_id).set(w.ejections)
            for field, gauge in self.worker_kv.items():
                gauge.labels(w.worker_id).set(getattr(w.load.kv_transfer, field))
            for field, gauge in self.worker_kv_by.items():
                for key, value in getattr(w.load.kv_transfer, field).items():
                    gauge.labels(w.worker_id, key).set(value)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
