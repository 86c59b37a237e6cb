"""The circuit breaker against moto: shared by instances, opened only by several users' transient
failures, one probe when half-open; and the summarizer falling back while a model is down."""

from __future__ import annotations

from typing import Any

import anyio
import boto3
import pytest

from precis.adapters.breakers import BreakerTable
from precis.domain.breaker import BreakerPolicy, CircuitBreaker
from precis.domain.cancellation import CancelWatch
from precis.domain.catalog import Catalog
from precis.domain.errors import CircuitOpenError
from precis.domain.models import FinishReason, StreamEvent
from precis.domain.retry import RetryPolicy
from precis.domain.summarize import Summarizer
from precis.providers import ProviderFactory
from tests.unit.test_summarizer import DOC, MemoryJournal, MemoryTelemetry, make_task

POLICY = BreakerPolicy(failures_to_open=3, users_to_open=2, window_s=30, open_s=10, refresh_s=1)
MODEL = "claude-3-haiku"


class Clock:
    def __init__(self) -> None:
        self.now = 1_795_700_000.0

    def __call__(self) -> float:
        return self.now


def instances(tables: dict[str, Any], clock: Clock, count: int = 2) -> list[CircuitBreaker]:
    """Breakers of separate gateway instances: each with its own cache, one shared table."""
    return [CircuitBreaker(BreakerTable(tables["QuotasTable"]), POLICY, clock) for _ in range(count)]


def open_it(breaker: CircuitBreaker) -> None:
    for user in ("alice", "bob", "alice"):
        breaker.failed(breaker.admit(MODEL), user)


def test_one_users_failures_never_open_it(tables: dict[str, Any]) -> None:
    clock = Clock()
    [breaker] = instances(tables, clock, 1)
    for _ in range(10):
        breaker.failed(breaker.admit(MODEL), "alice")
    assert not breaker.admit(MODEL).probe


def test_failures_of_several_users_open_it_for_every_instance(tables: dict[str, Any]) -> None:
    clock = Clock()
    first, second = instances(tables, clock)
    assert not second.admit(MODEL).probe  # the second instance read "closed" and trusts it for refresh_s
    open_it(first)
    with pytest.raises(CircuitOpenError) as refused:
        first.admit(MODEL)
    assert refused.value.retry_after_s == POLICY.open_s
    clock.now += POLICY.refresh_s
    with pytest.raises(CircuitOpenError):
        second.admit(MODEL)
    assert not first.admit("nova-lite").probe, "only the failing model's circuit is open"


def test_failures_of_an_old_window_do_not_count(tables: dict[str, Any]) -> None:
    clock = Clock()
    [breaker] = instances(tables, clock, 1)
    breaker.failed(breaker.admit(MODEL), "alice")
    breaker.failed(breaker.admit(MODEL), "bob")
    clock.now += POLICY.window_s
    breaker.failed(breaker.admit(MODEL), "carol")
    assert not breaker.admit(MODEL).probe


def test_half_open_lets_one_probe_through_and_its_success_closes_it(tables: dict[str, Any]) -> None:
    clock = Clock()
    first, second = instances(tables, clock)
    open_it(first)
    clock.now += POLICY.open_s
    probe = first.admit(MODEL)
    assert probe.probe
    with pytest.raises(CircuitOpenError):
        second.admit(MODEL)  # one probe at a time, across instances
    first.succeeded(probe)
    clock.now += POLICY.refresh_s
    assert not second.admit(MODEL).probe and not first.admit(MODEL).probe


def test_a_failed_probe_opens_it_again(tables: dict[str, Any]) -> None:
    clock = Clock()
    first, second = instances(tables, clock)
    open_it(first)
    clock.now += POLICY.open_s
    first.failed(first.admit(MODEL), "carol")
    clock.now += POLICY.open_s - 1
    for breaker in (first, second):
        with pytest.raises(CircuitOpenError):
            breaker.admit(MODEL)
    clock.now += 1
    assert second.admit(MODEL).probe


def test_it_fails_open_when_its_state_cannot_be_read(tables: dict[str, Any]) -> None:
    missing = boto3.resource("dynamodb", region_name="us-east-1").Table("no-such-table")
    breaker = CircuitBreaker(BreakerTable(missing), POLICY, Clock())
    permit = breaker.admit(MODEL)
    breaker.failed(permit, "alice")  # not counted, not raised
    assert not breaker.admit(MODEL).probe


# The summarizer with the breaker and a fallback ------------------------------------------------

DOWN = "local?fail_after=0"  # fails transiently before its first token, every time
SPARE = "local?token_ms=0"


async def summarize(tables: dict[str, Any], model: str, fallbacks: tuple[str, ...], user: str, breaker: CircuitBreaker):
    catalog = Catalog.bundled()
    journal = MemoryJournal()
    summarizer = Summarizer(
        ProviderFactory(),
        journal,
        MemoryTelemetry(),
        CancelWatch(journal, interval_s=0.02),
        breaker=breaker,
        retry_policy=RetryPolicy(base_delay_s=0.001, max_delay_s=0.01),
    )
    task = make_task(DOC, model=model).model_copy(
        update={"user_id": user, "fallbacks": tuple(catalog.resolve(name) for name in fallbacks)}
    )
    events: list[StreamEvent] = []

    async def emit(event: StreamEvent) -> None:
        events.append(event)

    return events, await summarizer.run(task, emit)


@pytest.mark.anyio
async def test_a_fallback_serves_while_the_model_asked_for_is_down(tables: dict[str, Any]) -> None:
    breaker = CircuitBreaker(BreakerTable(tables["QuotasTable"]), POLICY)
    spare_only = (await summarize(tables, SPARE, (), "dave", breaker))[1]
    events, outcome = await summarize(tables, DOWN, (SPARE,), "alice", breaker)
    done = events[-1]
    assert done.event == "done" and done.finish_reason is FinishReason.STOP and done.model == SPARE
    assert not any(e.event == "error" for e in events) and done.summary == spare_only.summary.text
    assert outcome.usage.input_tokens == 4 * spare_only.usage.input_tokens, "3 failed attempts are charged too"

    # Bob fails on it too: two users, so its circuit opens, and the next request goes straight to
    # the fallback without calling the model that is down.
    await summarize(tables, DOWN, (), "bob", breaker)
    with pytest.raises(CircuitOpenError):
        breaker.admit(DOWN)
    events, outcome = await summarize(tables, DOWN, (SPARE,), "carol", breaker)
    assert events[-1].event == "done" and events[-1].model == SPARE
    assert outcome.usage == spare_only.usage, "no call reached the model whose circuit is open"


@pytest.mark.anyio
async def test_without_a_fallback_an_open_circuit_fails_fast_with_error_then_done(tables: dict[str, Any]) -> None:
    breaker = CircuitBreaker(BreakerTable(tables["QuotasTable"]), POLICY)
    for user in ("alice", "bob"):
        await summarize(tables, DOWN, (), user, breaker)
    with anyio.fail_after(5):
        events, outcome = await summarize(tables, DOWN, (), "carol", breaker)
    error, done = events[-2:]
    assert error.event == "error" and error.code == "model_unavailable" and error.retryable
    assert done.event == "done" and done.finish_reason is FinishReason.ERROR
    assert outcome.usage.input_tokens == 0, "failing fast calls nothing and charges nothing"
