"""The AWS event-stream wire format (`application/vnd.amazon.eventstream`) and a fake Bedrock
ConverseStream endpoint that speaks it, for testing the Bedrock provider with the real boto3 client.

A message is: prelude (total length u32, headers length u32, CRC32 of those 8 bytes), headers,
payload, and a CRC32 of everything before it. Every integer is big-endian. A header is its name
length (u8), name, value type (u8; 7 is a string) and the value (u16 length, then UTF-8 bytes).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from tests.support.servers import BackgroundServer, Receive, Scope, Send, StreamRecorder, read_body, send_response

_STRING = 7


def _header(name: str, value: str) -> bytes:
    name_bytes, value_bytes = name.encode(), value.encode()
    return struct.pack(">B", len(name_bytes)) + name_bytes + struct.pack(">BH", _STRING, len(value_bytes)) + value_bytes


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message with string headers."""
    header_bytes = b"".join(_header(name, value) for name, value in headers.items())
    total_length = 12 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack(">II", total_length, len(header_bytes))
    prelude = prelude + struct.pack(">I", zlib.crc32(prelude))
    message = prelude + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, body: dict[str, Any]) -> bytes:
    """An event such as `contentBlockDelta`, with its JSON body."""
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_message(headers, json.dumps(body).encode())


def exception_frame(exception_type: str, message: str) -> bytes:
    """A modelled exception sent inside the stream, such as `throttlingException`."""
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return encode_message(headers, json.dumps({"message": message}).encode())


@dataclass(frozen=True)
class ConverseScript:
    """What the fake Bedrock answers to one ConverseStream call.

    By default a successful stream: messageStart, one contentBlockDelta per delta, contentBlockStop,
    messageStop and metadata with the given usage. `response_delay_s` delays the response (a model
    queueing the call), `frame_delay_s` each frame. `error_status` answers with an HTTP error before
    any streaming; `exception_after` sends an exception frame after that many deltas and stops.
    """

    deltas: Sequence[str] = ("The", " report", " finds", " growth", ".")
    stop_reason: str = "end_turn"
    input_tokens: int = 42
    output_tokens: int = 5
    frame_delay_s: float = 0.0
    response_delay_s: float = 0.0
    error_status: int | None = None
    error_type: str = "ThrottlingException"
    error_message: str = "Too many requests, please wait before trying again."
    exception_after: int | None = None
    exception_type: str = "throttlingException"
    exception_message: str = "Too many tokens, please wait before trying again."

    def frames(self) -> list[bytes]:
        # Bedrock pads events with a random-length "p" field; the client must ignore unknown fields.
        frames = [event_frame("messageStart", {"role": "assistant", "p": "abcd"})]
        deltas = self.deltas if self.exception_after is None else self.deltas[: self.exception_after]
        frames += [
            event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}, "p": "ab"})
            for text in deltas
        ]
        if self.exception_after is not None:
            return [*frames, exception_frame(self.exception_type, self.exception_message)]
        usage = {
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "totalTokens": self.input_tokens + self.output_tokens,
        }
        return [
            *frames,
            event_frame("contentBlockStop", {"contentBlockIndex": 0}),
            event_frame("messageStop", {"stopReason": self.stop_reason}),
            event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": 321}}),
        ]


@dataclass
class ConverseRequest:
    """One ConverseStream call as the fake received it."""

    model_id: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class FakeBedrock(BackgroundServer):
    """A Bedrock Runtime endpoint serving `POST /model/{modelId}/converse-stream` from a script.

    It records the requests it got and, in `stream`, how many frames it actually sent and whether
    the client hung up before the end, so a test can prove that closing the stream stopped the
    upstream. Each test makes one call, so one recorder serves the whole fake.
    """

    def __init__(self, script: ConverseScript | None = None) -> None:
        super().__init__(self._app)
        self.script = script or ConverseScript()
        self.requests: list[ConverseRequest] = []
        self.stream = StreamRecorder()

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]  # uvicorn gives it percent-decoded: model ids contain ':'
        prefix, suffix = "/model/", "/converse-stream"
        if scope["method"] != "POST" or not (path.startswith(prefix) and path.endswith(suffix)):
            await send_response(
                send, 404, b'{"message": "not found"}', [(b"x-amzn-errortype", b"UnknownOperationException")]
            )
            return
        body = json.loads(await read_body(receive))
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        self.requests.append(ConverseRequest(path[len(prefix) : -len(suffix)], body, headers))
        script = self.script
        await anyio.sleep(script.response_delay_s)
        if script.error_status is not None:
            error_headers = [
                (b"content-type", b"application/json"),
                (
                    b"x-amzn-errortype",
                    f"{script.error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/".encode(),
                ),
            ]
            await send_response(
                send, script.error_status, json.dumps({"message": script.error_message}).encode(), error_headers
            )
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/vnd.amazon.eventstream"), (b"x-amzn-requestid", b"fake-1")],
            }
        )
        await self.stream.stream(receive, send, script.frames(), script.frame_delay_s)
