"""A fake OpenAI-compatible `/v1/chat/completions` endpoint that streams real `chat.completion.chunk`
server-sent events, for testing the OpenAI provider with the real httpx client over real HTTP.

It also misbehaves on demand, for fault injection: HTTP errors with `Retry-After`, a hang before
answering, a stall mid-stream, a connection dropped after some tokens; the script can differ per call.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from tests.support.servers import BackgroundServer, Receive, Scope, Send, StreamRecorder, read_body, send_response

#: The longest the fake hangs or stalls, so that no fault outlives a test that forgot it.
_MAX_HANG_S = 60.0


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


@dataclass(frozen=True)
class ChatScript:
    """What the fake answers to one streaming chat completion.

    By default a successful stream as OpenAI sends it: a role chunk, one chunk per delta, a chunk
    with the finish reason, then (when the request asks for it with `stream_options.include_usage`
    and `send_usage` is set) a chunk with no choices and the usage, then `[DONE]`. `error_status`
    answers with an HTTP error before any streaming; `error_after` sends an error object after that
    many deltas and ends the stream.

    Faults: `response_delay_s` waits that long (or until the client leaves) before answering at all:
    a hang when it is longer than the client waits. `stall_after` sends the headers and that many
    deltas, then nothing more until the client leaves. `drop_after` sends that many deltas, then drops
    the connection without ending the response (a crashed upstream).
    """

    deltas: Sequence[str] = ("The", " report", " finds", " growth", ".")
    finish_reason: str = "stop"
    prompt_tokens: int = 42
    completion_tokens: int = 5
    send_usage: bool = True
    chunk_delay_s: float = 0.0
    error_status: int | None = None
    error_message: str = "Rate limit reached for requests"
    retry_after: str | None = None
    error_after: int | None = None
    response_delay_s: float = 0.0
    stall_after: int | None = None
    drop_after: int | None = None

    def events(self, model: str, include_usage: bool) -> list[bytes]:
        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
            body: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            # With include_usage, OpenAI sends `"usage": null` on every chunk but the last.
            if include_usage:
                body["usage"] = None
            return sse(json.dumps(body))

        events = [chunk({"role": "assistant", "content": ""})]
        deltas = self.deltas if self.error_after is None else self.deltas[: self.error_after]
        events += [chunk({"content": text}) for text in deltas]
        if self.error_after is not None:
            error = {
                "error": {"message": "The server had an error while processing your request.", "type": "server_error"}
            }
            return [*events, sse(json.dumps(error))]
        events.append(chunk({}, self.finish_reason))
        if include_usage and self.send_usage:
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            }
            last = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            events.append(sse(json.dumps(last)))
        return [*events, sse("[DONE]")]


@dataclass
class ChatRequest:
    """One chat completion request as the fake received it: when (`time.monotonic()`), and whether
    the client hung up before the answer was complete (`disconnected`, set by the server thread)."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    received_at: float = field(default_factory=time.monotonic)
    disconnected: threading.Event = field(default_factory=threading.Event)

    @property
    def document(self) -> str:
        """The user message: what tells the calls of one request from another's."""
        return str(self.body["messages"][-1]["content"])


#: A script, or what chooses one for each call (e.g. by its number in `FakeOpenAI.requests`).
Scripting = ChatScript | Callable[[ChatRequest, int], ChatScript]


class DroppedConnection(Exception):
    """Raised by the fake mid-response: uvicorn then closes the connection with the body unfinished."""


class FakeOpenAI(BackgroundServer):
    """An OpenAI-compatible server answering `POST /v1/chat/completions` from a script.

    It records the requests it got and, in `stream`, how many SSE events the last call actually sent
    and whether the client hung up before the end (each unit test makes one call). `script` may be
    replaced between tests, or be a function of the call. `base_url` is what `OpenAIConfig.base_url` takes.
    """

    def __init__(self, script: Scripting | None = None) -> None:
        super().__init__(self._app)
        self.script: Scripting = script or ChatScript()
        self.requests: list[ChatRequest] = []
        self.stream = StreamRecorder()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
            await send_response(send, 404, b'{"error": {"message": "not found"}}')
            return
        body = json.loads(await read_body(receive))
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        request = ChatRequest(body, headers)
        self.requests.append(request)
        script = self.script if isinstance(self.script, ChatScript) else self.script(request, len(self.requests) - 1)
        if script.response_delay_s and await _client_left_within(receive, script.response_delay_s):
            request.disconnected.set()
            return
        if script.error_status is not None:
            error = {"error": {"message": script.error_message, "type": "requests", "code": None}}
            error_headers = [(b"content-type", b"application/json")]
            if script.retry_after is not None:
                error_headers.append((b"retry-after", script.retry_after.encode()))
            await send_response(send, script.error_status, json.dumps(error).encode(), error_headers)
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        events = script.events(body["model"], include_usage)
        cut = script.drop_after if script.drop_after is not None else script.stall_after
        if cut is not None:
            for part in events[: 1 + cut]:  # the role chunk, then `cut` deltas
                await anyio.sleep(script.chunk_delay_s)
                await send({"type": "http.response.body", "body": part, "more_body": True})
            if script.drop_after is not None:
                raise DroppedConnection(f"the fake upstream crashed after {cut} deltas")
            if await _client_left_within(receive, _MAX_HANG_S):
                request.disconnected.set()
            return
        self.stream = recorder = StreamRecorder()
        await recorder.stream(receive, send, events, script.chunk_delay_s)
        if recorder.disconnected.is_set():
            request.disconnected.set()


async def _client_left_within(receive: Receive, seconds: float) -> bool:
    """Wait (the request body already read) until the client disconnects, at most `seconds`."""
    with anyio.move_on_after(seconds):
        while (await receive())["type"] != "http.disconnect":
            pass
        return True
    return False
