"""A fake OpenAI-compatible `/v1/chat/completions` endpoint that streams real `chat.completion.chunk`
server-sent events, for testing the OpenAI provider with the real httpx client over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.servers import BackgroundServer, Receive, Scope, Send, StreamRecorder, read_body, send_response


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
    """One chat completion request as the fake received it."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class FakeOpenAI(BackgroundServer):
    """An OpenAI-compatible server answering `POST /v1/chat/completions` from a script.

    It records the requests it got and, in `stream`, how many SSE events it actually sent and
    whether the client hung up before the end. Each test makes one call, so one recorder serves
    the whole fake. `base_url` is what `OpenAIConfig.base_url` takes.
    """

    def __init__(self, script: ChatScript | None = None) -> None:
        super().__init__(self._app)
        self.script = script or ChatScript()
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
        self.requests.append(ChatRequest(body, headers))
        script = self.script
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
        await self.stream.stream(receive, send, script.events(body["model"], include_usage), script.chunk_delay_s)
