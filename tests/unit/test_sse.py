from __future__ import annotations

import json

import pytest

from precis.api.sse import PING, buffered_body, frame, parse_event
from precis.domain.models import DoneEvent, ErrorEvent, FinishReason, Limits, MetaEvent, TokenEvent, Usage

META = MetaEvent(
    request_id="req_1",
    model="local",
    input_tokens=10,
    max_output_tokens=20,
    chunks=1,
    tier="free",
    limits=Limits(max_input_tokens=100, max_output_tokens=50),
)
DONE = DoneEvent(
    finish_reason=FinishReason.STOP,
    usage=Usage(input_tokens=10, output_tokens=2),
    cost_usd=0.0,
    latency_ms={"total": 1.0},
    partial=False,
    summary="Hi there",
)


def test_an_event_is_one_sse_message_with_single_line_json() -> None:
    raw = frame(TokenEvent(text="line one\nline two", index=3)).decode()
    assert raw.endswith("\n\n") and raw.count("\n\n") == 1
    name_line, data_line = raw.strip("\n").split("\n")
    assert name_line == "event: token"
    assert json.loads(data_line.removeprefix("data: ")) == {"text": "line one\nline two", "index": 3}


@pytest.mark.parametrize("event", [META, TokenEvent(text="é", index=0), DONE])
def test_frame_and_parse_are_inverse(event: object) -> None:
    name, data = frame(event).decode().strip("\n").split("\n")  # type: ignore[arg-type]
    assert parse_event(name.removeprefix("event: "), data.removeprefix("data: ")) == event


def test_ping_is_an_sse_comment() -> None:
    assert PING.startswith(b":") and PING.endswith(b"\n\n")


def test_json_mode_body_is_the_buffered_stream() -> None:
    status, body = buffered_body([META, TokenEvent(text="Hi", index=0), TokenEvent(text=" there", index=1), DONE])
    assert status == 200
    assert body["summary"] == "Hi there" and body["tokens_streamed"] == 2
    assert body["usage"] == {"input_tokens": 10, "output_tokens": 2}


def test_json_mode_failure_without_text_takes_the_errors_status() -> None:
    error = ErrorEvent(code="model_unavailable", message="down", retryable=True, partial=False)
    done = DONE.model_copy(update={"finish_reason": FinishReason.ERROR, "summary": ""})
    status, body = buffered_body([META, error, done])
    assert status == 503
    assert body["error"]["code"] == "model_unavailable"
