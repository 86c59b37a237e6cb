"""Logs and traces on the local stack: what the gateway and the functions write, read back.

The functions run in the local cloud's process: their output is kept by the stack
(`stack.function_logs`); the gateway runs in this one, its lines are captured from its Logger.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from httpx_sse import connect_sse

from local.stack import LocalStack
from precis.domain.jobs import job_id_for_object
from precis.observability import pseudonym
from tests.support.gateways import gateway_server
from tests.support.logs import captured_logs, json_lines
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
LONG = (ROOT / "tests" / "data" / "python-language-reference.txt").read_text()
SAMPLE = (ROOT / "local" / "samples" / "lighthouses.txt").read_text()

#: What must never reach a log line: a sentence of the document and an address in it.
SENTENCE = "The quartermaster hid the brass astrolabe beneath the ninth floorboard of the old lighthouse."
EMAIL = "marguerite.vasquez-holloway@example.org"
DOCUMENT = f"{SAMPLE}\n\n{SENTENCE} Letters for her go to {EMAIL}, she said.\n\n{SAMPLE}"

STAGE_FUNCTIONS = ("StarterFunction", "PreprocessFunction", "SummarizeChunkFunction", "CombineFunction")


def finished(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return job if job.get("status") in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(done, timeout)
    return result


def drop(stack: LocalStack, folder: str, text: str) -> str:
    """Put a document under inbox/<folder>/; return the id of the job it becomes."""
    bucket = stack.template.physical["DocumentsBucket"]
    key = f"inbox/{folder}/{secrets.token_hex(6)}.txt"
    etag = boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=text.encode())["ETag"]
    return job_id_for_object(bucket, key, etag)


def function_lines(stack: LocalStack, since: int, until_message: str, job_ids: list[str]) -> list[dict[str, Any]]:
    """The functions' log lines since `since`, once each job has written `until_message` (the
    local cloud's output reaches us through a pipe, a little after the job's record says it ended)."""

    def complete() -> list[dict[str, Any]] | None:
        lines = json_lines(stack.function_logs[since:])
        ended = {line.get("correlation_id") for line in lines if line["message"] == until_message}
        return lines if ended >= set(job_ids) else None

    found: list[dict[str, Any]] = wait_for(complete, 10)
    return found


def test_one_correlation_id_in_every_log_line_of_a_job_across_all_its_stages(
    stack: LocalStack, client: httpx.Client
) -> None:
    since = len(stack.function_logs)
    with captured_logs() as gateway:
        submitted = client.post("/v1/jobs", json={"text": LONG[:60_000]})
    assert submitted.status_code == 202
    api_job = submitted.json()["job_id"]
    dropped_job = drop(stack, "dev", LONG[60_000:110_000])  # an S3 drop: its id is derived by the starter
    for job_id in (api_job, dropped_job):
        assert finished(client, job_id)["status"] == "succeeded"
    lines = function_lines(stack, since, "summary stored", [api_job, dropped_job])

    [submitted_line] = [line for line in json_lines(gateway.lines) if line["message"] == "job submitted"]
    assert submitted_line["correlation_id"] == api_job and submitted_line["user"] == pseudonym("dev")

    functions = {stack.template.physical[name]: name for name in (*STAGE_FUNCTIONS, "PostprocessFunction")}
    for job_id in (api_job, dropped_job):
        mine = [line for line in lines if line.get("correlation_id") == job_id]
        # Every stage logged, each under the job's id: starter, split, every chunk, combine, postprocess.
        assert {functions.get(line["function_name"]) for line in mine} >= {*STAGE_FUNCTIONS, "PostprocessFunction"}
        messages = [line["message"] for line in mine]
        assert {"job started", "document split", "summaries combined", "summary stored"} <= set(messages)
        chunks = finished(client, job_id)["chunks_total"]
        assert chunks >= 2 and messages.count("chunk summarized") >= chunks
        # The user is a pseudonym, the same the gateway logged, never the user id.
        assert {line["user"] for line in mine if "user" in line} == {pseudonym("dev")}
        # No line of the job's invocations (of its SQS record, for the starter's batches) is without
        # its id or under another's.
        units: dict[tuple[str, str | None], list[dict[str, Any]]] = defaultdict(list)
        for line in lines:
            units[(line.get("function_request_id", ""), line.get("message_id"))].append(line)
        for unit in {(line["function_request_id"], line.get("message_id")) for line in mine}:
            assert {line.get("correlation_id") for line in units[unit]} == {job_id}, units[unit]
        # And any line that names the job is correlated to it.
        for line in lines:
            if job_id in json.dumps(line):
                assert line.get("correlation_id") == job_id, line


def test_no_log_line_contains_a_documents_text_an_api_key_or_an_email_address(
    stack: LocalStack, client: httpx.Client
) -> None:
    user_email = f"carol.{secrets.token_hex(3)}@example.net"  # a user id that is an email address
    api_key = f"pk_leak_{secrets.token_urlsafe(18)}"
    wrong_key = f"pk_wrong_{secrets.token_urlsafe(18)}"
    stack.add_key(api_key, user_id=user_email, tier="enterprise")
    since = len(stack.function_logs)
    summaries: list[str] = []
    with (
        captured_logs() as gateway,
        httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {api_key}"}, timeout=30) as http,
    ):
        # Streams: one that succeeds (SSE), one whose model fails mid-stream (JSON), one cancelled.
        with connect_sse(http, "POST", "/v1/summarize", json={"text": DOCUMENT, "style": "bullets"}) as source:
            done = [json.loads(sse.data) for sse in source.iter_sse() if sse.event == "done"]
        summaries.append(done[0]["summary"])
        failed = http.post(
            "/v1/summarize",
            json={"text": DOCUMENT, "model": "local?fail_after=5&fail=permanent"},
            headers={"accept": "application/json"},
        )
        assert failed.json()["finish_reason"] == "error" and failed.json()["summary"]
        slow = {"text": DOCUMENT, "model": "local?token_ms=50"}
        with connect_sse(http, "POST", "/v1/summarize", json=slow) as source:
            request_id, cancelled, finish = source.response.headers["x-request-id"], False, None
            for sse in source.iter_sse():
                if sse.event == "token" and not cancelled:
                    cancelled = http.post(f"/v1/requests/{request_id}/cancel").status_code == 202
                finish = json.loads(sse.data)["finish_reason"] if sse.event == "done" else finish
        assert cancelled and finish == "cancelled"
        # Refusals: a wrong key, a body that is not valid.
        assert httpx.post(
            f"{stack.url}/v1/summarize", json={"text": DOCUMENT}, headers={"authorization": f"Bearer {wrong_key}"}
        ).is_error
        assert http.post("/v1/summarize", json={"text": DOCUMENT, "style": EMAIL}).status_code == 422
        # Jobs: one that succeeds, one whose model fails, one dropped into the user's inbox folder.
        ok = http.post("/v1/jobs", json={"text": DOCUMENT}).json()["job_id"]
        poisoned = http.post(
            "/v1/jobs", json={"text": DOCUMENT, "model": "local?fail_if=quartermaster&fail=permanent"}
        ).json()["job_id"]
        dropped = drop(stack, user_email, DOCUMENT)
        jobs = {job_id: finished(http, job_id) for job_id in (ok, poisoned, dropped)}
    assert [job["status"] for job in jobs.values()] == ["succeeded", "failed", "succeeded"]
    summaries += [jobs[ok]["text"], jobs[dropped]["text"]]
    function_lines(stack, since, "summary stored", [ok, dropped])
    function_lines(stack, since, "job failed", [poisoned])  # Record The Failure's line, under the job's id

    lines = gateway.lines + stack.function_logs[since:]
    logged = json_lines(lines)
    messages = {line["message"] for line in logged}
    assert {"request finished", "job submitted", "job started", "chunk summarized", "job failed"} <= messages
    assert {line["level"] for line in logged} >= {"INFO"}
    assert SENTENCE in DOCUMENT and all(summaries)
    needles = {
        "the document's text": "brass astrolabe",
        "a sentence of a summary": min(summaries, key=len)[:60],
        "the email address in the document": EMAIL,
        "the user id (an email address)": user_email,
        "the API key": api_key,
        "a refused API key": wrong_key,
    }
    for what, needle in needles.items():
        leaks = [line for line in lines if needle in line]
        assert not leaks, f"{what} is logged: {leaks[:3]}"
    assert any(line.get("user") == pseudonym(user_email) for line in logged)


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A UDP socket in the X-Ray daemon's place (AWS_XRAY_DAEMON_ADDRESS, as Lambda sets it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    monkeypatch.setenv("AWS_XRAY_DAEMON_ADDRESS", f"127.0.0.1:{sock.getsockname()[1]}")
    try:
        yield sock
    finally:
        sock.close()


def test_traced_request_sends_a_segment_with_a_subsegment_per_stage(stack: LocalStack, daemon: socket.socket) -> None:
    api_key = f"pk_traced_{secrets.token_urlsafe(18)}"
    stack.add_key(api_key, user_id="traced@example.com", tier="small-context")  # 1,500 tokens a call: map-reduce
    root, parent = f"1-{int(time.time()):08x}-{secrets.token_hex(12)}", secrets.token_hex(8)
    with (
        gateway_server({**stack.gateway_environment(), "PRECIS_TRACING": "true"}) as gateway,
        httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {api_key}"}, timeout=30) as http,
    ):
        untraced = http.post(
            "/v1/summarize",
            json={"text": SAMPLE},
            headers={"x-amzn-trace-id": f"Root={root};Parent={parent};Sampled=0", "accept": "application/json"},
        )
        assert untraced.status_code == 200
        started = time.time()
        response = http.post(
            "/v1/summarize",
            json={"text": SAMPLE * 2},
            headers={"x-amzn-trace-id": f"Root={root};Parent={parent};Sampled=1", "accept": "application/json"},
        )
        assert response.status_code == 200 and response.json()["chunks"] >= 2
        datagram, _ = daemon.recvfrom(65_535)
        daemon.settimeout(0.5)
        with pytest.raises(TimeoutError):  # one request traced, one datagram: Sampled=0 sent nothing
            daemon.recvfrom(65_535)

    header, document = datagram.decode().split("\n", 1)
    assert json.loads(header) == {"format": "json", "version": 1}  # the daemon's protocol
    segment = json.loads(document)
    assert segment["name"] == "precis-gateway"
    assert segment["trace_id"] == root and segment["parent_id"] == parent  # under the Lambda invocation
    assert segment["http"]["request"] == {"method": "POST", "url": "/v1/summarize"}
    assert segment["http"]["response"]["status"] == 200
    annotations = {"request_id": response.headers["x-request-id"], "model": "local", "tier": "small-context"}
    assert segment["annotations"] == annotations
    subsegments = segment["subsegments"]
    assert [s["name"] for s in subsegments] == [
        "auth",
        "preprocess",
        "admission",
        "map",
        "reduce",
        "model_ttft",
        "streaming",
        "postprocess",
        "storage",
    ]
    assert started <= segment["start_time"] <= segment["end_time"] <= time.time()
    for subsegment in subsegments:
        assert subsegment["annotations"] == annotations, subsegment["name"]
        assert subsegment["trace_id"] == root and subsegment["parent_id"] == segment["id"]
        assert segment["start_time"] <= subsegment["start_time"] <= subsegment["end_time"] <= segment["end_time"]
        assert "error" not in subsegment and "fault" not in subsegment
    ttft, streaming = (next(s for s in subsegments if s["name"] == n) for n in ("model_ttft", "streaming"))
    assert ttft["end_time"] == pytest.approx(streaming["start_time"])  # the first token ends one, starts the other
    for secret in ("traced@example.com", api_key, SAMPLE[:40], response.json()["summary"][:40]):
        assert secret not in datagram.decode()
