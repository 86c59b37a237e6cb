"""The streaming contract over real HTTP, read by a real SSE client (httpx-sse)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from precis.domain.models import Completion, Style
from precis.domain.prompts import summary_prompt
from precis.providers.local import LocalModel
from tests.support.waiting import wait_for

SAMPLE = (Path(__file__).resolve().parents[2] / "local" / "samples" / "lighthouses.txt").read_text()


class Received:
    """Events as a client saw them, each with its arrival time since the request was sent."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.status = 0
        self.headers: httpx.Headers = httpx.Headers()

    def of(self, name: str) -> list[dict[str, Any]]:
        return [data for _, event, data in self.events if event == name]

    def at(self, name: str) -> list[float]:
        return [t for t, event, _ in self.events if event == name]

    @property
    def names(self) -> list[str]:
        return [event for _, event, _ in self.events]

    @property
    def text(self) -> str:
        return "".join(d["text"] for d in self.of("token"))


def stream(
    client: httpx.Client,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    stop_after_tokens: int | None = None,
    into: Received | None = None,
    seen: dict[str, threading.Event] | None = None,
) -> Received:
    """POST /v1/summarize and read its SSE stream. `into` is filled as events arrive (for a reader
    on another thread); `seen[name]` is set when the first event of that name arrives."""
    received = into if into is not None else Received()
    started = time.monotonic()
    try:
        with connect_sse(client, "POST", "/v1/summarize", json=body, headers=dict(headers or {})) as source:
            received.status = source.response.status_code
            received.headers = source.response.headers
            for sse in source.iter_sse():
                received.events.append((time.monotonic() - started, sse.event, json.loads(sse.data)))
                if seen is not None and sse.event in seen:
                    seen[sse.event].set()
                if stop_after_tokens is not None and len(received.of("token")) == stop_after_tokens:
                    break  # leaving the block closes the connection mid-stream
    finally:
        if seen is not None and "closed" in seen:
            seen["closed"].set()
    return received


def start_stream(
    client: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[Received, dict[str, threading.Event]]:
    """Read a stream on a background thread; the events in `seen` say how far it got (a test waits
    for "closed" before it ends, so the client is not closed under the reader)."""
    got, seen = Received(), {name: threading.Event() for name in ("meta", "token", "done", "closed")}
    kwargs = {"headers": headers, "into": got, "seen": seen}
    threading.Thread(target=stream, args=(client, body), kwargs=kwargs, daemon=True).start()
    return got, seen


def test_meta_arrives_before_the_models_first_token(client: httpx.Client) -> None:
    got = stream(client, {"text": SAMPLE, "model": "local?ttft_ms=500&token_ms=5"})
    assert got.status == 200
    assert got.names[0] == "meta" and got.names[-1] == "done"
    meta_at, first_token_at = got.at("meta")[0], got.at("token")[0]
    assert first_token_at - meta_at >= 0.4, "meta did not wait for the model"
    meta = got.of("meta")[0]
    assert meta["request_id"] == got.headers["x-request-id"]
    assert meta["model"] == "local?ttft_ms=500&token_ms=5" and meta["chunks"] == 1 and meta["tier"] == "enterprise"


def test_tokens_arrive_incrementally_not_at_the_end(client: httpx.Client) -> None:
    got = stream(client, {"text": SAMPLE, "model": "local?token_ms=20"})
    arrivals = got.at("token")
    assert len(arrivals) > 20
    spread = arrivals[-1] - arrivals[0]
    assert spread >= 0.5 * 0.020 * (len(arrivals) - 1), "tokens were buffered instead of streamed"
    assert [d["index"] for d in got.of("token")] == list(range(len(arrivals)))


def test_done_usage_is_what_the_provider_reported(client: httpx.Client) -> None:
    got = stream(client, {"text": SAMPLE, "style": "bullets", "max_output_tokens": 300})
    done = got.of("done")[0]

    async def provider_usage() -> Completion:
        prompt = summary_prompt(SAMPLE, Style.BULLETS, 300)
        events = [e async for e in LocalModel.from_options({}).stream(prompt, max_output_tokens=300)]
        assert isinstance(events[-1], Completion)
        return events[-1]

    import anyio

    completion = anyio.run(provider_usage)
    assert done["usage"] == completion.usage.model_dump()
    assert done["finish_reason"] == "stop" and done["partial"] is False
    assert done["summary"].startswith("- ")
    assert set(done["latency_ms"]) >= {"preprocess", "ttft", "infer", "postprocess", "total"}


def test_model_failing_after_n_tokens_yields_them_then_error_and_partial_done(client: httpx.Client) -> None:
    got = stream(client, {"text": SAMPLE, "model": "local?fail_after=7"})
    assert got.names == ["meta"] + ["token"] * 7 + ["error", "done"]
    error, done = got.of("error")[0], got.of("done")[0]
    assert error["code"] == "model_unavailable" and error["retryable"] is True and error["partial"] is True
    assert done["finish_reason"] == "error" and done["partial"] is True
    assert done["usage"]["output_tokens"] == 7


def test_cancel_mid_stream_ends_cancelled_and_stops_the_provider(client: httpx.Client) -> None:
    got, seen = start_stream(client, {"text": SAMPLE, "model": "local?token_ms=30"})
    assert seen["token"].wait(10)
    request_id = got.of("meta")[0]["request_id"]
    time.sleep(0.2)
    cancelled = client.post(f"/v1/requests/{request_id}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelling"
    assert seen["done"].wait(10) and seen["closed"].wait(10)
    done = got.of("done")[0]
    assert got.names[-1] == "done" and done["finish_reason"] == "cancelled" and done["partial"] is True
    streamed = len(got.of("token"))
    assert 0 < streamed < 100
    wait_for(lambda: client.get("/healthz").json()["streams_in_flight"] == 0)
    record = client.get(f"/v1/requests/{request_id}").json()
    assert record["status"] == "cancelled" and record["usage"]["output_tokens"] == streamed
    time.sleep(0.3)
    assert client.get(f"/v1/requests/{request_id}").json() == record, "nothing more was produced"
    assert client.post(f"/v1/requests/{request_id}/cancel").json()["status"] == "cancelled"


def test_client_that_disconnects_stops_the_provider_and_the_usage_is_recorded(client: httpx.Client) -> None:
    got = stream(client, {"text": SAMPLE, "model": "local?token_ms=30"}, stop_after_tokens=3)
    request_id = got.of("meta")[0]["request_id"]
    record = wait_for(lambda: (r := client.get(f"/v1/requests/{request_id}").json())["status"] != "in_progress" and r)
    assert record["status"] == "cancelled"
    assert 3 <= record["usage"]["output_tokens"] < 20, "the model stopped soon after the client left"
    wait_for(lambda: client.get("/healthz").json()["streams_in_flight"] == 0)


def test_silence_is_filled_with_ping_comments(client: httpx.Client) -> None:
    with client.stream("POST", "/v1/summarize", json={"text": SAMPLE, "model": "local?ttft_ms=1000"}) as response:
        lines = [line for line in response.iter_lines()]
    first_token = lines.index("event: token")
    assert lines[:first_token].count(": ping") >= 2
    assert lines[1].startswith("data: ") and lines[0] == "event: meta"


def test_json_mode_returns_the_same_result_in_one_body(client: httpx.Client) -> None:
    response = client.post(
        "/v1/summarize", json={"text": SAMPLE, "style": "tldr"}, headers={"accept": "application/json"}
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["finish_reason"] == "stop" and body["summary"] and body["tokens_streamed"] > 0
    record = client.get(f"/v1/requests/{body['request_id']}").json()
    assert record["text"] == body["summary"] and record["usage"] == body["usage"]


def test_json_mode_model_failure_before_any_token_is_a_503_with_the_error(client: httpx.Client) -> None:
    response = client.post(
        "/v1/summarize", json={"text": SAMPLE, "model": "local?fail_after=0"}, headers={"accept": "application/json"}
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"


def test_idempotency_key_replays_the_stored_result_without_calling_the_model(
    client: httpx.Client, requests_table: Any
) -> None:
    body = {"text": SAMPLE, "style": "paragraph"}
    key = {"idempotency-key": "order-42"}
    first = stream(client, body, headers=key)
    items_after_first = requests_table.scan(Select="COUNT")["Count"]
    again = stream(client, body, headers=key)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.of("meta")[0]["replayed"] is True
    assert again.of("meta")[0]["request_id"] == first.of("meta")[0]["request_id"]
    assert again.of("done")[0]["summary"] == first.of("done")[0]["summary"]
    assert again.of("done")[0]["usage"] == first.of("done")[0]["usage"]
    assert requests_table.scan(Select="COUNT")["Count"] == items_after_first, "no second request, no model call"
    reused = client.post("/v1/summarize", json={"text": "Another document entirely."}, headers=key)
    assert reused.status_code == 422 and "Idempotency-Key" in reused.json()["error"]["message"]


def test_idempotency_key_of_a_running_request_is_a_conflict(client: httpx.Client) -> None:
    body = {"text": SAMPLE, "model": "local?ttft_ms=800"}
    got, seen = start_stream(client, body, headers={"idempotency-key": "slow-1"})
    assert seen["meta"].wait(10)
    clash = client.post("/v1/summarize", json=body, headers={"idempotency-key": "slow-1"})
    assert clash.status_code == 409 and clash.headers["retry-after"]
    assert clash.json()["error"]["retryable"] is True
    assert seen["closed"].wait(10) and got.names[-1] == "done"


def test_request_record_shows_the_text_so_far_while_streaming(client: httpx.Client) -> None:
    got, seen = start_stream(client, {"text": SAMPLE, "model": "local?token_ms=25"})
    assert seen["token"].wait(10)
    request_id = got.of("meta")[0]["request_id"]
    record = wait_for(lambda: (r := client.get(f"/v1/requests/{request_id}").json())["text"] and r)
    assert record["status"] == "in_progress"
    assert seen["closed"].wait(10)
    assert got.text.startswith(record["text"]) and len(record["text"]) < len(got.text)
    assert record["usage"]["output_tokens"] > 0


def test_stream_ends_with_done_timeout_before_the_lambda_deadline(client: httpx.Client) -> None:
    """Under the web adapter, x-amzn-lambda-context carries the invocation's deadline; the stream must
    close with `done` a margin (PRECIS_DEADLINE_MARGIN_S, 10 s) before it."""
    deadline_ms = (time.time() + 11.5) * 1000
    got = stream(
        client,
        {"text": SAMPLE, "model": "local?token_ms=30"},
        headers={"x-amzn-lambda-context": json.dumps({"deadline_ms": deadline_ms, "function_name": "gateway"})},
    )
    done = got.of("done")[0]
    assert got.names[-1] == "done" and done["finish_reason"] == "timeout" and done["partial"] is True
    assert got.at("done")[0] < 4, "it stopped at its deadline, not when the model finished"
    assert done["usage"]["output_tokens"] == len(got.of("token"))
