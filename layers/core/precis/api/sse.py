"""The streaming response: a producer (the summarizer) and the client connection, joined by a bounded
channel in one task group.

- SSE: each event is framed as `event: <name>\\ndata: <json>\\n\\n` the moment it is produced; after
  `ping_interval_s` of silence an SSE comment `: ping` keeps proxies from closing the connection.
- JSON: the same events are buffered and sent as one body once `done` arrives.
- The client going away (an `http.disconnect`, or a failed write to the response, which is how the
  Lambda Web Adapter reports it) cancels the producer at once; the producer's own cleanup records
  what was used.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from pydantic import TypeAdapter
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from precis.domain.models import DoneEvent, ErrorEvent, MetaEvent, StreamEvent, TokenEvent

Producer = Callable[[Callable[[StreamEvent], Awaitable[None]]], Awaitable[Any]]

_EVENT: TypeAdapter[StreamEvent] = TypeAdapter(StreamEvent)
PING = b": ping\n\n"


def frame(event: StreamEvent) -> bytes:
    """One SSE message. The JSON is on a single line, so `data:` needs no continuation lines."""
    payload = event.model_dump_json(exclude={"event"})
    return f"event: {event.event}\ndata: {payload}\n\n".encode()


def parse_event(name: str, data: str) -> StreamEvent:
    """The inverse of `frame`, for clients and tests."""
    return _EVENT.validate_python({**json.loads(data), "event": name})


def buffered_body(events: list[StreamEvent]) -> tuple[int, dict[str, Any]]:
    """The JSON-mode body of a finished stream, and its status: 200 unless the model failed
    before producing anything, then the error's own status."""
    meta = next(e for e in events if isinstance(e, MetaEvent))
    done = next(e for e in events if isinstance(e, DoneEvent))
    error = next((e for e in events if isinstance(e, ErrorEvent)), None)
    body: dict[str, Any] = {
        "request_id": meta.request_id,
        "model": done.model or meta.model,  # who served it: a fallback when the model asked for was down
        "tier": meta.tier,
        "chunks": meta.chunks,
        "replayed": meta.replayed,
        "resumed_from": meta.resumed_from,
        "summary": done.summary,
        "finish_reason": done.finish_reason,
        "partial": done.partial,
        "usage": done.usage.model_dump(),
        "cost_usd": done.cost_usd,
        "latency_ms": done.latency_ms,
        "tokens_streamed": sum(1 for e in events if isinstance(e, TokenEvent)),
    }
    status = 200
    if error is not None:
        body["error"] = {"code": error.code, "message": error.message, "retryable": error.retryable}
        if not done.summary:
            status = 503 if error.retryable else 502
    return status, body


class EventStreamResponse(Response):
    def __init__(
        self,
        producer: Producer,
        *,
        mode: Literal["sse", "json"],
        ping_interval_s: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        # Like StreamingResponse, no body and so no Content-Length: the length is not known yet.
        self.producer = producer
        self.mode = mode
        self.ping_interval_s = ping_interval_s
        self.extra_headers = headers or {}
        self.status_code = 200
        self.background = None
        self.media_type = "text/event-stream" if mode == "sse" else "application/json"
        self.init_headers(self.extra_headers)
        if mode == "sse":
            # Disable buffering in proxies (nginx) and caches: every event must leave at once.
            self.headers["cache-control"] = "no-cache"
            self.headers["x-accel-buffering"] = "no"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer_side, client_side = anyio.create_memory_object_stream[StreamEvent](max_buffer_size=256)
        try:
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    async with producer_side:
                        await self.producer(producer_side.send)

                async def watch_for_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(produce)
                tg.start_soon(watch_for_disconnect)
                async with client_side:
                    if self.mode == "sse":
                        await self._stream(client_side, send)
                    else:
                        await self._buffer(client_side, send)
                tg.cancel_scope.cancel()
        except* (OSError, anyio.BrokenResourceError):
            # The client is gone (a failed write): the producer was cancelled and recorded its usage.
            pass

    async def _stream(self, events: MemoryObjectReceiveStream[StreamEvent], send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        while True:
            event: StreamEvent | None = None
            with anyio.move_on_after(self.ping_interval_s):
                try:
                    event = await events.receive()
                except anyio.EndOfStream:
                    break
            body = PING if event is None else frame(event)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _buffer(self, events: MemoryObjectReceiveStream[StreamEvent], send: Send) -> None:
        status, body = buffered_body([event async for event in events])
        response = JSONResponse(body, status_code=status, headers=self.extra_headers)
        await response({"type": "http"}, _never, send)


async def _never() -> Any:  # a plain Response never calls receive
    await anyio.sleep_forever()
