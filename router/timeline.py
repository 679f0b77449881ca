"""One request's timeline: stage marks and token times, kept for inspection and turned into spans.

Lifecycle: the HTTP/gRPC front end starts a Timeline (root span, child of an incoming
`traceparent`) and makes it current (a contextvar) -> tokenizer, planner and orchestrator mark
stages on `current()` and open client spans whose context travels to the workers -> every
delivered token appends one timestamp (a list append: the per-token cost) -> `finish()` turns
marks into child spans and token times into span events after the fact, and stores the
timeline in a bounded ring for `GET /debug/requests/{id}` and `pdrouter trace`.

TTFT stages are contiguous by construction: arrival -> parsed -> tokenized -> routed ->
first_token (from a worker) -> first_sent (written to the client), so they add up to TTFT.
"""

from __future__ import annotations

import contextvars
import statistics
import time
from collections import OrderedDict
from collections.abc import Mapping

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event as SdkEvent
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from workers.telemetry import extract_context, inject_metadata

_tracer = trace.get_tracer("pdrouter.router")
_current: contextvars.ContextVar[Timeline | None] = contextvars.ContextVar("pdrouter_timeline", default=None)

TTFT_STAGES = (  # (stage, from mark, to mark)
    ("receive", "arrival", "parsed"),
    ("tokenize", "parsed", "tokenized"),
    ("route", "tokenized", "routed"),
    ("prefill", "routed", "first_token"),
    ("delivery", "first_token", "first_sent"),
)


class Stage(msgspec.Struct, array_like=False):
    name: str
    start_ms: float
    end_ms: float


class TimelineView(msgspec.Struct, kw_only=True):
    """What /debug/requests/{id} returns (and `pdrouter trace` renders)."""

    request_id: str
    aliases: list[str]
    started_unix: float
    status: int
    mode: str
    route: str
    ttft_ms: float | None
    e2e_ms: float
    stages: list[Stage]
    worker: dict[str, float]
    tokens_ms: list[float]
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    itl_max_ms: float | None
    trace_id: str


class Timeline:
    __slots__ = ("aliases", "attrs", "marks", "mode", "request_id", "root", "route", "status", "t0", "tokens",
                 "wall0_ns", "worker")  # fmt: skip

    def __init__(self, request_id: str, parent: Context | None, name: str = "request") -> None:
        self.request_id = request_id
        self.aliases: list[str] = []
        self.t0 = time.perf_counter()
        self.wall0_ns = time.time_ns()
        self.marks: dict[str, float] = {"arrival": self.t0}
        self.tokens: list[float] = []
        self.worker: dict[str, float] = {}
        self.attrs: dict[str, object] = {}
        self.mode = ""
        self.route = ""
        self.status = 0
        self.root: Span = _tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, start_time=self.wall0_ns,
            attributes={"pdrouter.request_id": request_id},
        )  # fmt: skip

    # -- recording (hot path: plain appends and dict stores) --------------------------------

    def mark(self, name: str, at: float | None = None) -> None:
        if name not in self.marks:
            self.marks[name] = time.perf_counter() if at is None else at

    def token(self, at: float, count: int = 1) -> None:
        self.tokens.extend([at] * count)
        if "first_token" not in self.marks:
            self.marks["first_token"] = at

    def client_span(self, name: str, attributes: Mapping[str, object]) -> tuple[Span, tuple]:
        """A span for a call to a worker, and the gRPC metadata that makes it the worker's parent."""
        span = _tracer.start_span(
            name, context=trace.set_span_in_context(self.root), kind=SpanKind.CLIENT, attributes=attributes
        )
        return span, inject_metadata(trace.set_span_in_context(span))

    # -- reading ----------------------------------------------------------------------------

    def _ns(self, t: float) -> int:
        return self.wall0_ns + int((t - self.t0) * 1e9)

    def _ms(self, t: float) -> float:
        return (t - self.t0) * 1e3

    def ttft_ms(self) -> float | None:
        end = self.marks.get("first_sent")
        return None if end is None else self._ms(end)

    def stages(self) -> list[Stage]:
        out = []
        for name, a, b in TTFT_STAGES:
            if a in self.marks and b in self.marks:
                out.append(Stage(name, self._ms(self.marks[a]), self._ms(self.marks[b])))
        if "first_sent" in self.marks and "done" in self.marks:
            out.append(Stage("decode", self._ms(self.marks["first_sent"]), self._ms(self.marks["done"])))
        return out

    def gaps_ms(self) -> list[float]:
        t = self.tokens
        return [(t[i] - t[i - 1]) * 1e3 for i in range(1, len(t))]

    def view(self) -> TimelineView:
        gaps = sorted(self.gaps_ms())
        end = self.marks.get("done", time.perf_counter())
        ctx = self.root.get_span_context()
        return TimelineView(
            request_id=self.request_id,
            aliases=self.aliases,
            started_unix=self.wall0_ns / 1e9,
            status=self.status,
            mode=self.mode,
            route=self.route,
            ttft_ms=self.ttft_ms(),
            e2e_ms=self._ms(end),
            stages=self.stages(),
            worker=self.worker,
            tokens_ms=[round(self._ms(t), 3) for t in self.tokens],
            itl_p50_ms=statistics.median(gaps) if gaps else None,
            itl_p95_ms=gaps[min(len(gaps) - 1, int(len(gaps) * 0.95))] if gaps else None,
            itl_max_ms=gaps[-1] if gaps else None,
            trace_id=f"{ctx.trace_id:032x}" if ctx.is_valid else "",
        )

    # -- the end ----------------------------------------------------------------------------

    def finish(self, status: int, every_nth_token: int = 1) -> None:
        """Close the trace: stage spans and token events from what was recorded.

        Token events are built in one pass and appended under one lock (the SDK's add_event
        re-validates attributes per call: ~5 us a token, most of this method's cost).
        """
        self.status = status
        self.mark("done")
        root = self.root
        if root.is_recording():
            parent = trace.set_span_in_context(root)
            marks = self.marks
            for name, a, b in TTFT_STAGES[1:3]:  # tokenize, route
                if a in marks and b in marks:
                    span = _tracer.start_span(name, context=parent, start_time=self._ns(marks[a]))
                    span.end(end_time=self._ns(marks[b]))
            self._token_events(root, every_nth_token)
            summary: dict[str, object] = {
                "pdrouter.mode": self.mode, "pdrouter.route": self.route, "http.response.status_code": status,
                "gen_ai.usage.output_tokens": len(self.tokens), **self.attrs,
            }  # fmt: skip
            ttft = self.ttft_ms()
            if ttft is not None:
                summary["pdrouter.ttft_ms"] = ttft
            gaps = sorted(self.gaps_ms())
            if gaps:
                summary["pdrouter.itl_p50_ms"] = gaps[len(gaps) // 2]
                summary["pdrouter.itl_p95_ms"] = gaps[min(len(gaps) - 1, int(len(gaps) * 0.95))]
                summary["pdrouter.itl_max_ms"] = gaps[-1]
            root.set_attributes(summary)  # type: ignore[arg-type]
            if status >= 500:
                root.set_status(Status(StatusCode.ERROR))
        root.end(end_time=self._ns(self.marks["done"]))

    def _token_events(self, root: Span, every_nth: int) -> None:
        tokens = self.tokens
        if not tokens:
            return
        wall0, t0 = self.wall0_ns, self.t0
        last = len(tokens) - 1
        events = []
        prev = tokens[0]
        for i, t in enumerate(tokens):
            if i % every_nth == 0 or i == last:
                attrs = {"index": i, "gap_ms": (t - prev) * 1e3}
                events.append(SdkEvent("token", attrs, wall0 + int((t - t0) * 1e9)))
            prev = t
        add = getattr(root, "_add_event", None)
        if add is None:  # NOTE: not the SDK span: the public, slower path
            for e in events:
                root.add_event(e.name, e.attributes, e.timestamp)
            return
        for e in events:
            add(e)

    def _ns_ms(self, ms: float) -> int:
        return self.wall0_ns + int(ms * 1e6)


def current() -> Timeline | None:
    return _current.get()


def start(request_id: str, headers: Mapping[str, str], name: str = "request") -> Timeline:
    """A new timeline, current for this task, its root span a child of the caller's traceparent."""
    tl = Timeline(request_id, extract_context(headers) if "traceparent" in headers else None, name)
    _current.set(tl)
    return tl


class TimelineRing:
    """The most recent finished timelines, by request id (and the response id as an alias)."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Timeline] = OrderedDict()
        self._aliases: dict[str, str] = {}

    def add(self, tl: Timeline) -> None:
        self._items[tl.request_id] = tl
        for alias in tl.aliases:
            self._aliases[alias] = tl.request_id
        while len(self._items) > self.capacity:
            _, old = self._items.popitem(last=False)
            for alias in old.aliases:
                self._aliases.pop(alias, None)

    def get(self, request_id: str) -> Timeline | None:
        return self._items.get(self._aliases.get(request_id, request_id))

    def slowest(self, n: int, by: str = "ttft") -> list[Timeline]:
        def key(tl: Timeline) -> float:
            value = tl.ttft_ms() if by == "ttft" else tl.view().e2e_ms
            return -1.0 if value is None else value

        return sorted(self._items.values(), key=key, reverse=True)[:n]
