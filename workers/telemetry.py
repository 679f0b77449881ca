"""OpenTelemetry set-up shared by router and workers: configured by the standard OTEL_* variables.

Tracing is on when an OTLP endpoint is named (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` is `otlp` / `console`; off
(the API's no-op tracer, near-zero cost) otherwise. `OTEL_EXPORTER_OTLP_PROTOCOL` picks gRPC
(default) or `http/protobuf`; `OTEL_TRACES_SAMPLER` / `_ARG` the sampling (the SDK reads them);
`OTEL_SERVICE_NAME` overrides the service name. W3C `traceparent` travels in HTTP headers and
gRPC metadata (the propagator is the SDK default: tracecontext + baggage).

Lives in workers/ because both sides import it and the router already depends on workers'
torch-free modules (model files); it imports neither torch nor the router.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

_configured = False


def tracing_enabled_by_env() -> bool:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter == "none":
        return False
    return bool(
        exporter in ("otlp", "console")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing(service_name: str) -> bool:
    """Install the SDK tracer provider when the environment asks for traces; idempotent."""
    global _configured
    if _configured or not tracing_enabled_by_env():
        return _configured
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    instance = f"{socket.gethostname()}:{os.getpid()}"
    # NOTE: the SDK keeps 128 events per span unless told otherwise, so a long answer would lose
    # its first tokens' events; keep every one unless OTEL_SPAN_EVENT_COUNT_LIMIT bounds them
    bounded = bool(os.environ.get("OTEL_SPAN_EVENT_COUNT_LIMIT"))
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.instance.id": instance}),
        span_limits=SpanLimits(max_events=None if bounded else SpanLimits.UNSET),
    )
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "console":
        exporter = ConsoleSpanExporter()
    elif os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def shutdown_tracing() -> None:
    """Flush spans still buffered (on a clean exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def extract_context(carrier: Mapping[str, str]) -> Context:
    """The caller's trace context from HTTP headers or gRPC metadata (keys lower-case)."""
    return propagate.extract(carrier)


def inject_metadata(context: Context | None = None) -> tuple[tuple[str, str], ...]:
    """The current (or given) trace context as gRPC metadata pairs (empty when not tracing)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return tuple(carrier.items())


def metadata_dict(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {k: v for k, v in (pairs or ()) if isinstance(v, str)}


def run_service(service_name: str, main: Coroutine[Any, Any, None]) -> None:
    """A process's entry: logging, tracing, then `main` on uvloop; spans flushed on the way out."""
    import logging

    import uvloop

    logging.basicConfig(
        level=os.environ.get("PDROUTER_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s"
    )
    setup_tracing(service_name)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(main)
    finally:
        shutdown_tracing()
