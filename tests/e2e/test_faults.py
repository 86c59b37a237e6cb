"""Fault injection over real HTTP: a scripted OpenAI-compatible upstream and the local model's failure
profile make the model throttle, fail, hang, stall and crash; a gateway process is killed mid-stream.

What must hold whatever the fault: no request outlives its deadline, every stream ends with `done`
(unless its own connection is cut), the upstream is called within the retry policy and budget, and
the text streamed so far stays readable at `GET /v1/requests/{id}`.

The faults are served by a gateway of this module's own (beside the session's stack, on the same local
cloud) with short timeouts, its own quotas table (so the circuit breaker state it writes touches no
other test) and tiers without fallback models (so every call of a request goes to the fake).
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from httpx_sse import connect_sse

from local.stack import LocalStack
from precis.domain.retry import RetryPolicy
from precis.domain.tokens import count_tokens
from tests.support.gateways import GatewayProcess, gateway_server
from tests.support.openai_server import ChatRequest, ChatScript, FakeOpenAI
from tests.support.servers import BackgroundServer
from tests.support.waiting import wait_for

SAMPLE = (Path(__file__).resolve().parents[2] / "local" / "samples" / "lighthouses.txt").read_text()
#: An openai-provider model of the catalog: its calls go to the fake upstream.
REMOTE = "gpt-4o-mini"

IDLE_TIMEOUT_S = 0.4
DEADLINE_S = 4.0
CHECKPOINT_S = 0.1
INTERRUPTED_AFTER_S = 1.0
POLICY = RetryPolicy()  # what the gateway retries with: its defaults

#: No read of a stream may wait longer than this: a hang fails the test instead of stalling it.
CLIENT_TIMEOUT = httpx.Timeout(5.0, read=DEADLINE_S + 5.0)


# What a client saw -------------------------------------------------------------------------------


@dataclass
class Received:
    """A stream as the client read it: each event with its arrival time since the request was sent,
    and how the connection ended (`broken`: cut before the response was complete)."""

    status: int = 0
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    broken: Exception | None = None
    elapsed: float = 0.0

    def of(self, name: str) -> list[dict[str, Any]]:
        return [data for _, event, data in self.events if event == name]

    @property
    def names(self) -> list[str]:
        return [event for _, event, _ in self.events]

    @property
    def text(self) -> str:
        return "".join(d["text"] for d in self.of("token"))

    @property
    def request_id(self) -> str:
        request_id: str = self.of("meta")[0]["request_id"]
        return request_id

    def ended_by_contract(self) -> dict[str, Any]:
        """Assert the streaming contract's shape (meta first, tokens, at most one error, then exactly
        one done, last); return the done event."""
        assert self.status == 200 and self.broken is None, (self.status, self.broken)
        names = self.names
        assert names[0] == "meta" and names[-1] == "done" and names.count("done") == 1, names
        assert names.count("error") <= 1 and ("error" not in names or names[-2] == "error"), names
        assert set(names[1:-1]) <= {"progress", "token", "error"}, names
        return self.of("done")[0]


def read_stream(client: httpx.Client, body: dict[str, Any], into: Received | None = None) -> Received:
    """POST /v1/summarize and read its SSE stream to the end (or until the connection breaks)."""
    got = into if into is not None else Received()
    started = time.monotonic()
    try:
        with connect_sse(client, "POST", "/v1/summarize", json=body) as source:
            got.status = source.response.status_code
            for sse in source.iter_sse():
                got.events.append((time.monotonic() - started, sse.event, json.loads(sse.data)))
    except httpx.TransportError as exc:  # the connection was cut: the only way a stream may lack `done`
        got.broken = exc
    got.elapsed = time.monotonic() - started
    return got


def calls_by_document(fake: FakeOpenAI) -> dict[str, list[ChatRequest]]:
    """The upstream calls, grouped by the request they were made for (its document)."""
    grouped: dict[str, list[ChatRequest]] = {}
    for call in list(fake.requests):
        grouped.setdefault(call.document, []).append(call)
    return grouped


def document(label: str) -> str:
    """A small document of its own, so that the upstream calls of each request can be told apart."""
    return f"Request {label} says this. " + SAMPLE[:1500]


# Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def fault_environment(stack: LocalStack, fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The settings of this module's gateways: the stack's, pointed at the fake, with short timeouts."""
    environment = stack.gateway_environment()
    tiers = json.loads(Path(environment["PRECIS_TIERS_FILE"]).read_text())
    for tier in tiers["tiers"].values():
        tier.pop("fallback_models", None)
    tiers_file = tmp_path_factory.mktemp("faults") / "tiers.json"
    tiers_file.write_text(json.dumps(tiers))
    dynamodb = boto3.client("dynamodb")
    quotas = dynamodb.describe_table(TableName=stack.template.physical["QuotasTable"])["Table"]
    own_quotas = f"{quotas['TableName']}-faults-{secrets.token_hex(4)}"
    dynamodb.create_table(
        TableName=own_quotas,
        KeySchema=quotas["KeySchema"],
        AttributeDefinitions=quotas["AttributeDefinitions"],
        BillingMode="PAY_PER_REQUEST",
    )
    return {
        **environment,
        "PRECIS_OPENAI_BASE_URL": fake.base_url,
        "PRECIS_MODEL_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
        "PRECIS_STREAM_DEADLINE_S": str(DEADLINE_S),
        "PRECIS_CHECKPOINT_INTERVAL_S": str(CHECKPOINT_S),
        "PRECIS_INTERRUPTED_AFTER_S": str(INTERRUPTED_AFTER_S),
        "PRECIS_TIERS_FILE": str(tiers_file),
        "PRECIS_QUOTAS_TABLE": own_quotas,
        # Each test is a new user and the storms here come from many: never let the breaker open.
        "PRECIS_BREAKER_USERS": "1000000",
    }


@pytest.fixture(scope="module")
def gateway(fault_environment: dict[str, str]) -> Iterator[BackgroundServer]:
    with gateway_server(fault_environment) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_fake(fake: FakeOpenAI) -> None:
    fake.script = ChatScript()
    fake.requests.clear()


@pytest.fixture
def api_key(stack: LocalStack) -> str:
    """A user of its own for each test: retry budgets are per user and per instance."""
    key = f"pk_faults_{secrets.token_hex(8)}"
    stack.add_key(key, user_id=f"faults-{secrets.token_hex(4)}", tier="enterprise")
    return key


def http(url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {api_key}"}, timeout=CLIENT_TIMEOUT)


@pytest.fixture
def api(gateway: BackgroundServer, api_key: str) -> Iterator[httpx.Client]:
    with http(gateway.url, api_key) as client:
        yield client


def record_of(client: httpx.Client, request_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/requests/{request_id}")
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


# Throttling and 5xx: retried within the policy and the budget ------------------------------------


def test_429_storm_from_concurrent_requests_stays_within_the_retry_budget(api: httpx.Client, fake: FakeOpenAI) -> None:
    fake.script = ChatScript(error_status=429, retry_after="1")
    requests = 6
    with ThreadPoolExecutor(requests) as pool:
        bodies = [{"text": document(f"storm-{n}"), "model": REMOTE} for n in range(requests)]
        futures = [pool.submit(read_stream, api, body) for body in bodies]
        streams = [future.result(timeout=DEADLINE_S + 10) for future in futures]

    for got in streams:
        done = got.ended_by_contract()
        error = got.of("error")[0]
        assert error["code"] == "model_throttled" and error["retryable"] is True and error["partial"] is False
        assert done["finish_reason"] == "error" and done["partial"] is False
        assert got.elapsed < DEADLINE_S

    calls = calls_by_document(fake)
    assert len(calls) == requests, "every request called the model"
    assert all(len(attempts) <= POLICY.max_attempts for attempts in calls.values())
    # Without a budget: 6 x 3 = 18 calls. With it, retries are at most max(floor, 20 % of the calls).
    total = sum(len(attempts) for attempts in calls.values())
    allowed_retries = max(POLICY.budget_floor, int(POLICY.budget_ratio * requests * POLICY.max_attempts))
    assert requests < total <= requests + allowed_retries, total
    for attempts in calls.values():  # Retry-After: 1 was waited for before every retry
        gaps = [later.received_at - earlier.received_at for earlier, later in itertools.pairwise(attempts)]
        assert all(gap >= 0.95 for gap in gaps), gaps


def test_5xx_before_any_token_is_retried_and_the_stream_completes(api: httpx.Client, fake: FakeOpenAI) -> None:
    answers = [ChatScript(error_status=500, error_message="boom"), ChatScript(error_status=503, retry_after="0.5")]

    def script(_: ChatRequest, number: int) -> ChatScript:
        return answers[number] if number < len(answers) else ChatScript()

    fake.script = script
    got = read_stream(api, {"text": document("5xx-then-ok"), "model": REMOTE})
    done = got.ended_by_contract()
    assert "error" not in got.names and done["finish_reason"] == "stop"
    assert got.text == "The report finds growth."
    calls = fake.requests
    assert len(calls) == 3
    assert calls[2].received_at - calls[1].received_at >= 0.45, "the 503's Retry-After was waited for"
    # Every attempt is charged: the failed ones at their prompt's size (the fake reports 42 for the last).
    assert done["usage"]["input_tokens"] > 42 * 2 and done["usage"]["output_tokens"] == 5


def test_5xx_on_every_attempt_ends_with_error_and_done_after_max_attempts(api: httpx.Client, fake: FakeOpenAI) -> None:
    fake.script = ChatScript(error_status=503, error_message="upstream overloaded")
    got = read_stream(api, {"text": document("always-503"), "model": REMOTE})
    done = got.ended_by_contract()
    error = got.of("error")[0]
    assert error["code"] == "model_unavailable" and error["retryable"] is True and "503" in error["message"]
    assert done["finish_reason"] == "error" and done["partial"] is False and got.of("token") == []
    assert len(fake.requests) == POLICY.max_attempts
    record = record_of(api, got.request_id)
    assert record["status"] == "failed" and record["error"]["code"] == "model_unavailable"


# Hangs: the idle timeout and the deadline --------------------------------------------------------


def test_upstream_that_never_answers_is_given_up_after_the_idle_timeout(api: httpx.Client, fake: FakeOpenAI) -> None:
    fake.script = ChatScript(response_delay_s=60)  # accepts the call, never sends a byte
    got = read_stream(api, {"text": document("hang"), "model": REMOTE})
    done = got.ended_by_contract()
    error = got.of("error")[0]
    assert error["code"] == "model_unavailable" and error["retryable"] is True
    assert f"sent nothing for {IDLE_TIMEOUT_S:g} s" in error["message"]
    assert done["finish_reason"] == "error" and done["partial"] is False
    # Each attempt waited one idle timeout: retried, within the attempts, and long before the deadline.
    assert len(fake.requests) == POLICY.max_attempts
    assert POLICY.max_attempts * IDLE_TIMEOUT_S <= got.elapsed < DEADLINE_S - 0.5
    for call in fake.requests:
        assert call.disconnected.wait(2), "the gateway hung up on the hung upstream"


def test_upstream_stalling_mid_stream_gives_the_tokens_then_error_and_partial_done(
    api: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.script = ChatScript(deltas=("One", " two", " three", " four", "."), stall_after=3)
    got = read_stream(api, {"text": document("stall"), "model": REMOTE})
    done = got.ended_by_contract()
    assert got.names == ["meta", "token", "token", "token", "error", "done"]
    error = got.of("error")[0]
    assert error["code"] == "model_unavailable" and error["retryable"] is True and error["partial"] is True
    assert done["finish_reason"] == "error" and done["partial"] is True and done["summary"] == "One two three"
    assert len(fake.requests) == 1, "tokens had reached the client: no second, different draft"
    assert got.elapsed < 2 * IDLE_TIMEOUT_S + 1.0
    assert fake.requests[0].disconnected.wait(2)
    record = record_of(api, got.request_id)
    assert (record["status"], record["text"], record["partial"]) == ("failed", "One two three", True)


def test_slow_but_alive_model_runs_until_the_stream_deadline_then_done_timeout(
    api: httpx.Client, fake: FakeOpenAI
) -> None:
    # An event every 0.15 s: never idle for IDLE_TIMEOUT_S, but 200 of them take 30 s.
    fake.script = ChatScript(deltas=tuple(f" w{n}" for n in range(200)), chunk_delay_s=0.15)
    got = read_stream(api, {"text": document("slow"), "model": REMOTE})
    done = got.ended_by_contract()
    assert "error" not in got.names
    assert done["finish_reason"] == "timeout" and done["partial"] is True
    assert DEADLINE_S - 0.5 <= got.elapsed < DEADLINE_S + 2, got.elapsed
    assert len(got.of("token")) >= 15, "the idle timeout did not cut a model that kept talking"
    # Cut before the upstream reported its usage: what reached the client, counted with cl100k_base.
    assert done["usage"]["output_tokens"] == count_tokens(got.text)
    assert fake.requests[0].disconnected.wait(2), "the deadline stopped the upstream call"


# A model crashing after N tokens -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "code", "retryable"),
    [
        ("transient", "model_unavailable", True),
        ("throttle", "model_throttled", True),
        ("permanent", "model_error", False),
    ],
)
def test_local_model_crashing_after_n_tokens_gives_them_then_its_error_and_partial_done(
    api: httpx.Client, fail: str, code: str, retryable: bool
) -> None:
    got = read_stream(api, {"text": SAMPLE, "model": f"local?token_ms=5&fail_after=6&fail={fail}"})
    done = got.ended_by_contract()
    assert got.names == ["meta"] + ["token"] * 6 + ["error", "done"]
    error = got.of("error")[0]
    assert (error["code"], error["retryable"], error["partial"]) == (code, retryable, True)
    assert done["finish_reason"] == "error" and done["partial"] is True
    assert done["usage"]["output_tokens"] == 6
    record = record_of(api, got.request_id)
    assert record["status"] == "failed" and record["partial"] is True and record["error"]["code"] == code
    assert record["text"].split() == got.text.split() and record["text"]


def test_upstream_dropping_the_connection_after_n_tokens_gives_them_then_error_and_partial_done(
    api: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.script = ChatScript(deltas=("Alpha", " beta", " gamma", " delta", "."), drop_after=2)
    got = read_stream(api, {"text": document("drop"), "model": REMOTE})
    done = got.ended_by_contract()
    assert got.names == ["meta", "token", "token", "error", "done"]
    error = got.of("error")[0]
    assert error["code"] == "model_unavailable" and error["retryable"] is True and error["partial"] is True
    assert "unreachable" in error["message"]
    assert done["finish_reason"] == "error" and done["partial"] is True
    assert len(fake.requests) == 1
    record = record_of(api, got.request_id)
    assert (record["status"], record["text"], record["partial"]) == ("failed", "Alpha beta", True)


# The gateway itself crashing mid-stream ----------------------------------------------------------


def test_gateway_killed_mid_stream_leaves_its_text_so_far_readable_then_reads_as_interrupted(
    stack: LocalStack, gateway: BackgroundServer, fault_environment: dict[str, str], api_key: str
) -> None:
    token_s, checkpoint_s = 0.1, 0.25
    environment = {**fault_environment, "PRECIS_CHECKPOINT_INTERVAL_S": str(checkpoint_s)}
    environment["PRECIS_STREAM_DEADLINE_S"] = "60"
    got = Received()
    with GatewayProcess(environment) as doomed, http(doomed.url, api_key) as client:
        body = {"text": SAMPLE, "model": f"local?token_ms={token_s * 1000:g}"}
        reader = threading.Thread(target=read_stream, args=(client, body, got), daemon=True)
        reader.start()
        wait_for(lambda: len(got.of("token")) >= 12, timeout=10, interval=0.01)
        doomed.kill()
        reader.join(timeout=5)
        assert not reader.is_alive()
    assert got.broken is not None and "done" not in got.names, "the connection was cut, not ended"
    received = len(got.of("token"))

    # Any instance shows what the dead one saved: a prefix of what the client got, at most one
    # checkpoint interval behind it (and the latency of its writes: 0.3 s of tokens allowed for it).
    with http(stack.url, api_key) as main:
        record = record_of(main, got.request_id)
    assert record["status"] == "in_progress"
    assert record["text"] and got.text.startswith(record["text"])
    behind = received - record["usage"]["output_tokens"]
    assert 0 <= behind <= math.ceil(checkpoint_s / token_s) + 3, (received, record["usage"])

    # Nobody will finish it: once its record is stale, it reads as interrupted, text and all.
    with http(gateway.url, api_key) as other:

        def interrupted_record() -> dict[str, Any] | None:
            found = record_of(other, got.request_id)
            return found if found["status"] == "interrupted" else None

        interrupted = wait_for(interrupted_record, timeout=INTERRUPTED_AFTER_S + 3)
        assert interrupted["text"] == record["text"] and interrupted["partial"] is True
        assert interrupted["error"]["code"] == "interrupted" and interrupted["error"]["retryable"] is True
        cancel = other.post(f"/v1/requests/{got.request_id}/cancel")
        assert cancel.status_code == 200 and cancel.json()["status"] == "interrupted", "nothing left to cancel"


def test_a_live_stream_silent_for_longer_than_the_staleness_period_is_never_read_as_interrupted(
    api: httpx.Client,
) -> None:
    """A map step streams no text for seconds; the stream's heartbeats keep its record fresh, so that
    reading it all along finds it in progress, never interrupted."""
    long_document = " ".join([SAMPLE] * 10)  # two chunks for the local model, summarized before any token
    got = Received()
    body = {"text": long_document, "model": "local?token_ms=30"}
    reader = threading.Thread(target=read_stream, args=(api, body, got), daemon=True)
    reader.start()
    wait_for(lambda: got.of("meta"), timeout=5, interval=0.01)
    assert got.of("meta")[0]["chunks"] >= 2
    seen: list[tuple[float, str, bool]] = []  # (when, status, whether the client had any text yet)
    while reader.is_alive() and "done" not in got.names:
        had_text = bool(got.of("token"))
        seen.append((time.monotonic(), record_of(api, got.request_id)["status"], had_text))
        time.sleep(0.2)
    reader.join(timeout=10)
    got.ended_by_contract()
    assert "interrupted" not in {status for _, status, _ in seen}, seen
    silent = [at for at, status, had_text in seen if not had_text and status == "in_progress"]
    assert silent[-1] - silent[0] > 1.5 * INTERRUPTED_AFTER_S, ("silent for too short a time to tell", seen)
