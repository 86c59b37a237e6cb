"""X-Ray traces of the gateway: one segment per request, its stages as subsegments.

Behind the Lambda Web Adapter the app runs in a process of its own (uvicorn, run.sh), outside the
Lambda runtime's per-invocation trace context. The X-Ray SDK's Lambda mode, and so Powertools'
Tracer, would look for the trace in `_X_AMZN_TRACE_ID`, which the adapter cannot set for another
process; it sends the invocation's trace header as the request's `x-amzn-trace-id` instead
(aws-lambda-web-adapter#312). So each request's segment is built from that header: its trace id
(Root), the Lambda function's segment as its parent (Parent), the sampling decision (Sampled=0:
nothing is recorded or sent; no header: a new trace). It is named `<service>-gateway` and carries
the http method, path and status.

While the request runs, its stages (`precis.observability.stage`: auth, admission, preprocess, map,
reduce, model_ttft, streaming, postprocess, storage) are only timestamps in a list. At its end they
become X-Ray SDK entities, annotated with request_id, model and tier (never a user id or text), sent
as one document to the daemon at AWS_XRAY_DAEMON_ADDRESS over UDP, just before the last body message
of the response: once Lambda has the whole response it may freeze the sandbox before anything after
it runs.

Installed only when PRECIS_TRACING is true (template.yaml sets it; the local stack does not): this
module and the SDK (~0.4 s of import) then load at startup, in Lambda's init phase. Otherwise there
is no middleware and `stage()` costs one ContextVar read.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aws_xray_sdk.core.emitters.udp_emitter import UDPEmitter
from aws_xray_sdk.core.models.segment import Segment
from aws_xray_sdk.core.models.subsegment import Subsegment
from aws_xray_sdk.core.models.trace_header import TraceHeader
from aws_xray_sdk.core.models.traceid import TraceId

from precis.observability import Annotation, current_trace, logger

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

#: Paths never traced: the web adapter's readiness check is not an invocation.
UNTRACED_PATHS = frozenset({"/healthz"})


class RequestTrace:
    """One request's trace while it runs: its stages as (name, start, end, failed), monotonic."""

    def __init__(self, trace_id: str | None, parent_id: str | None, method: str, path: str) -> None:
        self.trace_id = trace_id or TraceId().to_id()
        self.parent_id = parent_id
        self.method = method
        self.path = path
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.stages: list[tuple[str, float, float, bool]] = []
        self.annotations: dict[str, Annotation] = {}

    def record(self, stage: str, started: float, ended: float, *, failed: bool = False) -> None:
        self.stages.append((stage, started, ended, failed))  # list.append: safe from worker threads

    def annotate(self, annotations: dict[str, Annotation]) -> None:
        self.annotations.update(annotations)

    def segment(self, name: str, status: int) -> Segment:
        """The finished trace as X-Ray SDK entities: the segment with a subsegment per stage, each
        annotated like the segment (X-Ray filters by annotations of either)."""

        def wall(monotonic: float) -> float:
            return self.started_wall + (monotonic - self.started)

        segment = Segment(name, traceid=self.trace_id, parent_id=self.parent_id)
        segment.start_time = self.started_wall
        segment.put_http_meta("method", self.method)
        segment.put_http_meta("url", self.path)  # the path only: no host, no query string
        for key, value in self.annotations.items():
            segment.put_annotation(key, value)
        for stage, started, ended, failed in sorted(self.stages, key=lambda s: s[1]):
            subsegment = Subsegment(stage, "local", segment)
            subsegment.start_time = wall(started)
            for key, value in self.annotations.items():
                subsegment.put_annotation(key, value)
            if failed:
                subsegment.add_error_flag()
            segment.add_subsegment(subsegment)
            subsegment.close(wall(ended))
        segment.put_http_meta("status", status)
        segment.close(time.time())
        return segment


class TracingMiddleware:
    """ASGI middleware: an X-Ray segment per request (see the module's docstring)."""

    def __init__(self, app: ASGIApp, *, name: str, emitter: UDPEmitter | None = None) -> None:
        self.app = app
        self.name = name
        # AWS_XRAY_DAEMON_ADDRESS (Lambda sets it), else 127.0.0.1:2000. Sending is one non-blocking
        # sendto on a UDP socket: nothing waits for the daemon, and a missing daemon fails nothing.
        self.emitter = emitter or UDPEmitter()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        header = TraceHeader.from_header_str(_header(scope, b"x-amzn-trace-id"))
        if header.sampled == 0:
            await self.app(scope, receive, send)
            return
        trace = RequestTrace(header.root, header.parent, scope["method"], scope["path"])
        status, sent = 500, False

        async def send_traced(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not sent:
                sent = True
                self._emit(trace, status)  # before the response's end: see the module's docstring
            await send(message)

        token = current_trace.set(trace)
        # The trace id on the request's log lines, to go from a line to its trace (Powertools'
        # own `xray_trace_id` reads _X_AMZN_TRACE_ID, which the web adapter cannot set for us).
        logger.thread_safe_append_keys(trace_id=trace.trace_id)
        try:
            await self.app(scope, receive, send_traced)
        finally:
            current_trace.reset(token)
            if not sent:  # the app failed before answering, or the client went away mid-stream
                self._emit(trace, status)

    def _emit(self, trace: RequestTrace, status: int) -> None:
        try:
            self.emitter.send_entity(trace.segment(self.name, status))
        except Exception:  # a trace must never fail a request
            logger.warning("trace not sent", exc_info=True)


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
