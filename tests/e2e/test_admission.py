"""Tier limits over real HTTP: admission holds under concurrency, refusals are 429s that say which
limit and when to retry, and the counters settle to what was really used."""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import boto3
import httpx

from local.stack import LocalStack
from precis.adapters.quotas import QuotaStore
from tests.support.waiting import wait_for

DOCUMENT = "The council voted to turn the old depot into a library. Work starts next spring, funded by a grant."


def user_in(stack: LocalStack, tier: str) -> tuple[str, httpx.Client]:
    user = f"{tier}-{secrets.token_hex(4)}"
    key = f"pk_{user}"
    stack.add_key(key, user_id=user, tier=tier)
    return user, httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {key}"}, timeout=30)


def quotas(stack: LocalStack) -> QuotaStore:
    return QuotaStore(boto3.resource("dynamodb").Table(stack.template.physical["QuotasTable"]))


def steady_minute() -> datetime:
    """Start a burst early in a minute, so that all of it lands in one rate window."""
    now = datetime.now(UTC)
    if now.second > 40:
        time.sleep(61 - now.second)
        now = datetime.now(UTC)
    return now


def test_fifty_concurrent_requests_against_a_budget_of_ten_admit_exactly_ten(stack: LocalStack) -> None:
    user, client = user_in(stack, "ten-a-minute")
    records = boto3.resource("dynamodb").Table(stack.template.physical["RequestsTable"])
    before = records.scan(Select="COUNT")["Count"]
    now = steady_minute()
    body = {"text": DOCUMENT, "max_output_tokens": 50}
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(
            pool.map(
                lambda _: client.post("/v1/summarize", json=body, headers={"accept": "application/json"}), range(50)
            )
        )
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) == 10 and len(refused) == 40, [r.status_code for r in responses]
    assert records.scan(Select="COUNT")["Count"] == before + 10, "a refused request leaves no record"
    for response in refused:
        error = response.json()["error"]
        assert error["code"] == "rate_limited" and error["limit"] == "requests_per_minute" and error["retryable"]
        assert 1 <= int(response.headers["retry-after"]) <= 60
    used = sum(r.json()["usage"]["input_tokens"] + r.json()["usage"]["output_tokens"] for r in admitted)
    counters = quotas(stack).usage(user, now.strftime("%Y%m%d%H%M"), now.strftime("%Y%m%d"))
    assert counters["requests_this_minute"] == 10
    assert counters["tokens_this_minute"] == used, "reservations settled to the true usage"
    assert counters["tokens_today"] == used and counters["streams_in_flight"] == 0


def test_concurrent_streams_over_the_tier_are_refused_and_a_finished_one_frees_its_slot(stack: LocalStack) -> None:
    _, client = user_in(stack, "two-at-once")
    slow = {"text": DOCUMENT, "model": "local?ttft_ms=1500"}
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = [pool.submit(client.post, "/v1/summarize", json=slow) for _ in range(2)]
        time.sleep(0.5)
        third = client.post("/v1/summarize", json={"text": DOCUMENT})
        assert [f.result().status_code for f in first] == [200, 200]
    assert third.status_code == 429 and third.json()["error"]["limit"] == "max_concurrent_streams"
    assert third.headers["retry-after"] == "1"
    assert client.post("/v1/summarize", json={"text": DOCUMENT}).status_code == 200, "the slots were freed"


def test_daily_token_budget_refuses_with_the_time_until_tomorrow(stack: LocalStack) -> None:
    _, client = user_in(stack, "small-day")
    statuses: list[int] = []
    for _ in range(20):  # each reserves about 250 tokens and uses about 150 of a 1,000-token day
        response = client.post("/v1/summarize", json={"text": DOCUMENT, "max_output_tokens": 100})
        statuses.append(response.status_code)
        if response.status_code == 429:
            error: dict[str, Any] = response.json()["error"]
            assert error["limit"] == "tokens_per_day"
            assert 1 <= int(response.headers["retry-after"]) <= 86_401
            break
    assert statuses[0] == 200 and statuses[-1] == 429


def test_meta_shows_the_callers_tier_limits(stack: LocalStack) -> None:
    _, client = user_in(stack, "two-at-once")
    with client.stream("POST", "/v1/summarize", json={"text": DOCUMENT}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    meta = json.loads(lines[0].removeprefix("data: "))
    assert meta["tier"] == "two-at-once"
    assert meta["limits"]["max_concurrent_streams"] == 2 and meta["limits"]["requests_per_minute"] == 1000


def test_output_budget_above_the_tier_is_refused(stack: LocalStack) -> None:
    _, client = user_in(stack, "ten-a-minute")
    response = client.post("/v1/summarize", json={"text": DOCUMENT, "max_output_tokens": 4097, "model": "nova-lite"})
    assert response.status_code == 422 and "ten-a-minute tier" in response.json()["error"]["message"]


def test_jobs_are_admitted_against_the_same_budgets_and_settled_when_they_end(stack: LocalStack) -> None:
    user, client = user_in(stack, "two-at-once")  # one job at a time
    first = client.post("/v1/jobs", json={"text": DOCUMENT * 40, "model": "local?ttft_ms=1500"})
    assert first.status_code == 202
    second = client.post("/v1/jobs", json={"text": DOCUMENT})
    assert second.status_code == 429 and second.json()["error"]["limit"] == "max_concurrent_jobs"
    job_id = first.json()["job_id"]
    job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] == "succeeded" and j, timeout=60)
    now = datetime.now(UTC)
    counters = quotas(stack).usage(user, now.strftime("%Y%m%d%H%M"), now.strftime("%Y%m%d"))
    assert counters["jobs_in_flight"] == 0
    assert counters["tokens_today"] == job["usage"]["input_tokens"] + job["usage"]["output_tokens"]
    assert client.post("/v1/jobs", json={"text": DOCUMENT}).status_code == 202, "the slot was freed"


def test_a_cancelled_job_frees_its_slot(stack: LocalStack) -> None:
    user, client = user_in(stack, "two-at-once")
    job_id = client.post("/v1/jobs", json={"text": DOCUMENT * 40, "model": "local?ttft_ms=5000"}).json()["job_id"]
    assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    now = datetime.now(UTC)
    assert quotas(stack).usage(user, now.strftime("%Y%m%d%H%M"), now.strftime("%Y%m%d"))["jobs_in_flight"] == 0
    assert client.post("/v1/jobs", json={"text": DOCUMENT}).status_code == 202


def test_a_tiers_context_allocation_bounds_every_call_of_streams_and_jobs(stack: LocalStack) -> None:
    document = " ".join(f"Sentence {i} tells how the depot became a library over many seasons." for i in range(300))
    _, roomy = user_in(stack, "pro")  # context_tokens 32,000: the local model's 8,192 window decides
    _, tight = user_in(stack, "small-context")  # context_tokens 1,500
    json_mode = {"accept": "application/json"}
    wide = roomy.post("/v1/summarize", json={"text": document}, headers=json_mode).json()
    narrow = tight.post("/v1/summarize", json={"text": document}, headers=json_mode).json()
    assert wide["chunks"] == 1 and narrow["chunks"] >= 3, (wide["chunks"], narrow["chunks"])
    assert narrow["finish_reason"] == "stop" and narrow["summary"]

    job = tight.post("/v1/jobs", json={"text": document}).json()
    done = wait_for(lambda: (j := tight.get(f"/v1/jobs/{job['job_id']}").json())["status"] == "succeeded" and j, 60)
    assert done["chunks_total"] == narrow["chunks"], "a job is chunked by the same allocation"
