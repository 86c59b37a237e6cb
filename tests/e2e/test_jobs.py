"""The asynchronous path on the local stack: S3 drops and POST /v1/jobs, through SQS, the starter and
the real state machine on moto's interpreter, with the handlers of functions/ dispatched in-process."""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from httpx_sse import connect_sse

from local.stack import LocalStack
from precis.domain.jobs import chunk_key, chunk_summary_key, job_id_for_object
from precis.domain.prompts import chunk_prompt, prompt_tokens
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
LONG = (ROOT / "tests" / "data" / "python-language-reference.txt").read_text()
SAMPLE = (ROOT / "local" / "samples" / "lighthouses.txt").read_text()


@pytest.fixture(scope="module")
def aws(stack: LocalStack) -> dict[str, Any]:
    return {
        "s3": boto3.client("s3"),
        "sqs": boto3.client("sqs"),
        "sfn": boto3.client("stepfunctions"),
        "bucket": stack.template.physical["DocumentsBucket"],
        "state_machine": stack.template.attributes["SummarizeStateMachine"]["Ref"],
        "queue": stack.template.attributes["IngestQueue"]["Ref"],
        "dlq": stack.template.attributes["IngestDeadLetterQueue"]["Ref"],
    }


def finished(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            return None
        job: dict[str, Any] = response.json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(done, timeout)
    return result


def drop(aws: dict[str, Any], text: str | bytes, name: str | None = None) -> tuple[str, str]:
    """Put a document in the dev user's inbox folder; return its key and job id."""
    key = f"inbox/dev/{name or secrets.token_hex(6)}.txt"
    body = text.encode() if isinstance(text, str) else text
    etag = aws["s3"].put_object(Bucket=aws["bucket"], Key=key, Body=body)["ETag"]
    return key, job_id_for_object(aws["bucket"], key, etag)


def history(aws: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    arn = f"{aws['state_machine'].replace(':stateMachine:', ':execution:')}:{job_id}"
    events: list[dict[str, Any]] = aws["sfn"].get_execution_history(executionArn=arn, maxResults=1000)["events"]
    return events


def executions_named(aws: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    listed = aws["sfn"].list_executions(stateMachineArn=aws["state_machine"], maxResults=1000)["executions"]
    return [e for e in listed if e["name"] == job_id]


def test_dropped_long_document_is_summarized_covering_every_chunk(client: httpx.Client, aws: dict[str, Any]) -> None:
    _key, job_id = drop(aws, LONG, "python-reference")
    job = finished(client, job_id)
    assert job["status"] == "succeeded", job
    chunks = job["chunks_total"]
    assert chunks >= 8 and job["chunks_done"] == chunks
    stored = json.loads(aws["s3"].get_object(Bucket=aws["bucket"], Key=job["summary_key"])["Body"].read())
    assert job["summary_key"] == "summaries/dev/python-reference.txt.json"
    assert stored["summary"] == job["text"] and stored["chunks"] == chunks
    markdown = aws["s3"].get_object(Bucket=aws["bucket"], Key="summaries/dev/python-reference.txt.md")["Body"].read()
    assert job["text"] in markdown.decode()
    for index in range(chunks):  # every chunk was summarized, and the combined summary read them all
        aws["s3"].head_object(Bucket=aws["bucket"], Key=chunk_summary_key(job_id, index))
    [execution] = executions_named(aws, job_id)
    assert execution["status"] == "SUCCEEDED"
    events = history(aws, job_id)
    assert Counter(e["type"] for e in events)["MapIterationSucceeded"] == chunks
    entered = [e["stateEnteredEventDetails"]["name"] for e in events if "stateEnteredEventDetails" in e]
    assert entered.count("Summarize One Chunk") == chunks
    assert entered[0] == "Split Into Chunks" and entered[-2:] == ["Combine The Summaries", "Postprocess And Store"]


def test_job_events_stream_progress_then_the_summary_then_done(client: httpx.Client) -> None:
    submitted = client.post("/v1/jobs", json={"text": LONG[:90_000], "style": "bullets"})
    assert submitted.status_code == 202 and submitted.headers["location"] == f"/v1/jobs/{submitted.json()['job_id']}"
    job_id = submitted.json()["job_id"]
    names, progress, tokens, done = [], [], [], {}
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            data = json.loads(sse.data)
            names.append(sse.event)
            progress += [data] if sse.event == "progress" else []
            tokens += [data["text"]] if sse.event == "token" else []
            done = data if sse.event == "done" else done
    assert names[0] == "meta" and names[-1] == "done" and names.count("done") == 1
    assert progress and progress[-1]["done"] == progress[-1]["total"] >= 2
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert names.index("token") > names.index("progress")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert done["finish_reason"] == "stop" and done["summary"] == job["text"] == "".join(tokens)
    assert done["usage"] == job["usage"] and job["usage"]["input_tokens"] > 0


def test_duplicate_s3_event_and_redelivery_start_one_execution_and_charge_once(
    client: httpx.Client, aws: dict[str, Any]
) -> None:
    key, job_id = drop(aws, SAMPLE * 12, "twice")
    job = finished(client, job_id)
    etag = aws["s3"].head_object(Bucket=aws["bucket"], Key=key)["ETag"]
    s3 = {
        "bucket": {"name": aws["bucket"]},
        "object": {"key": key.replace(" ", "+"), "size": len(SAMPLE * 12), "eTag": etag.strip('"')},
    }
    event = {"Records": [{"eventSource": "aws:s3", "s3": s3}]}
    for _ in range(2):  # the same S3 event again, as a duplicate notification or a redelivery would bring it
        aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody=json.dumps(event))
    time.sleep(3)
    assert len(executions_named(aws, job_id)) == 1
    assert client.get(f"/v1/jobs/{job_id}").json() == job, "nothing ran again, nothing was charged again"
    expected_input = sum(
        prompt_tokens(
            chunk_prompt(
                aws["s3"].get_object(Bucket=aws["bucket"], Key=chunk_key(job_id, i))["Body"].read().decode(),
                i,
                job["chunks_total"],
                384,
            )
        )
        for i in range(job["chunks_total"])
    )
    assert job["usage"]["input_tokens"] > expected_input, "the combining call counts too"
    assert job["usage"]["input_tokens"] < 2 * expected_input, "each chunk was charged once"


def test_chunk_failing_transiently_twice_is_retried_and_the_job_succeeds(
    client: httpx.Client, aws: dict[str, Any]
) -> None:
    submitted = client.post("/v1/jobs", json={"text": SAMPLE * 12, "model": "local?fail_first=2"})
    job_id = submitted.json()["job_id"]
    job = finished(client, job_id, timeout=90)
    assert job["status"] == "succeeded", job
    failures = [e for e in history(aws, job_id) if e["type"] == "TaskFailed"]
    assert failures and {e["taskFailedEventDetails"]["error"] for e in failures} == {"TransientModelError"}


def test_chunk_failing_permanently_fails_the_job_and_keeps_the_other_chunk_summaries(
    client: httpx.Client, aws: dict[str, Any]
) -> None:
    poisoned = LONG[:60_000] + "\n\nThis last section carries the POISON-PILL marker.\n"
    submitted = client.post("/v1/jobs", json={"text": poisoned, "model": "local?fail_if=POISON-PILL&fail=permanent"})
    job_id = submitted.json()["job_id"]
    job = finished(client, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_error" and job["error"]["retryable"] is False
    assert job["error"]["message"].startswith("PermanentModelError")
    kept = aws["s3"].list_objects_v2(Bucket=aws["bucket"], Prefix=f"work/{job_id}/summaries/").get("KeyCount", 0)
    assert 0 < kept < job["chunks_total"], "the chunks that succeeded keep their summaries"
    assert job["summary_key"] is None
    # The job reads failed as soon as Record The Failure wrote it; its execution fails once that
    # function has returned (after settling and charging the job), a moment later.
    wait_for(lambda: [e["status"] for e in executions_named(aws, job_id)] == ["FAILED"], timeout=10)


def test_cancel_stops_the_execution_and_the_events_end_cancelled(client: httpx.Client, aws: dict[str, Any]) -> None:
    submitted = client.post("/v1/jobs", json={"text": LONG[:60_000], "model": "local?ttft_ms=3000"})
    job_id = submitted.json()["job_id"]
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running")
    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        names = [(sse.event, json.loads(sse.data)) for sse in source.iter_sse()]
    assert names[-1][0] == "done" and names[-1][1]["finish_reason"] == "cancelled"
    wait_for(lambda: executions_named(aws, job_id)[0]["status"] == "ABORTED", timeout=10)
    time.sleep(1)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["summary_key"] is None, "a late stage cannot revive it"


def test_long_document_sent_to_summarize_is_handed_over_to_a_job(client: httpx.Client) -> None:
    response = client.post("/v1/summarize", json={"text": LONG[:120_000]}, headers={"idempotency-key": "handoff-1"})
    assert response.status_code == 202 and response.json()["handed_off"] is True
    again = client.post("/v1/summarize", json={"text": LONG[:120_000]}, headers={"idempotency-key": "handoff-1"})
    assert again.status_code == 202 and again.json()["job_id"] == response.json()["job_id"]
    assert finished(client, response.json()["job_id"])["status"] == "succeeded"


def test_new_jobs_get_429_with_the_expected_wait_while_the_queue_is_backed_up(
    client: httpx.Client, aws: dict[str, Any], stack: LocalStack
) -> None:
    lambda_ = boto3.client("lambda")
    starter = stack.template.physical["StarterFunction"]
    [mapping] = lambda_.list_event_source_mappings(FunctionName=starter)["EventSourceMappings"]
    jobs = boto3.resource("dynamodb").Table(stack.template.physical["JobsTable"])
    lambda_.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)  # the starter stops draining
    try:
        time.sleep(1.5)  # a receive already under way finishes
        for index in range(6):  # PRECIS_MAX_QUEUE_BACKLOG is 5 in these tests
            aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody=json.dumps({"job_id": f"job_{index:032x}"}))
        before = jobs.scan(Select="COUNT")["Count"]
        response = client.post("/v1/jobs", json={"text": SAMPLE})
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["limit"] == "queue_backlog" and "waiting" in error["message"]
        assert int(response.headers["retry-after"]) >= 6, "6 or more waiting, at the default 60 starts a minute"
        assert jobs.scan(Select="COUNT")["Count"] == before
    finally:
        aws["sqs"].purge_queue(QueueUrl=aws["queue"])
        lambda_.update_event_source_mapping(UUID=mapping["UUID"], Enabled=True)
