"""QuotaStore against moto: what a reservation counts, what settling refunds, which limit refuses."""

from __future__ import annotations

from typing import Any

import pytest

from precis.adapters.quotas import LEASE_S, QuotaStore
from precis.domain.errors import InputTooLargeError, RateLimitedError
from precis.domain.models import Usage
from precis.domain.tiers import Tier

NOW = 1_795_700_000.0  # 2026-11-26 09:33:20 UTC
TIER = Tier(
    name="test",
    requests_per_minute=3,
    tokens_per_minute=1_000,
    tokens_per_day=1_500,
    max_input_tokens=10_000,
    max_output_tokens=500,
    max_concurrent_streams=2,
    max_concurrent_jobs=1,
    context_tokens=2_000,
)


def store(tables: dict[str, Any]) -> QuotaStore:
    return QuotaStore(tables["QuotasTable"])


def test_a_reservation_counts_its_worst_case_and_settling_refunds_the_rest(tables: dict[str, Any]) -> None:
    quotas = store(tables)
    held = quotas.reserve("alice", TIER, 400, "streams", now=NOW)
    assert quotas.usage("alice", held.minute, held.day) == {
        "requests_this_minute": 1,
        "tokens_this_minute": 400,
        "tokens_today": 400,
        "streams_in_flight": 1,
        "jobs_in_flight": 0,
    }
    quotas.settle(held, Usage(input_tokens=120, output_tokens=30))
    counters = quotas.usage("alice", held.minute, held.day)
    assert counters["tokens_this_minute"] == 150 and counters["tokens_today"] == 150
    assert counters["streams_in_flight"] == 0


@pytest.mark.parametrize(
    ("reserve", "limit", "retry_after"),
    [
        ([10, 10, 10, 10], "requests_per_minute", 40),  # the fourth request in a minute of three
        ([600, 600], "tokens_per_minute", 40),
    ],
)
def test_the_refusal_names_the_limit_and_when_it_frees(
    tables: dict[str, Any], reserve: list[int], limit: str, retry_after: int
) -> None:
    quotas = store(tables)
    for tokens in reserve[:-1]:
        quotas.settle(quotas.reserve("bob", TIER, tokens, "streams", now=NOW), Usage(input_tokens=tokens))
    with pytest.raises(RateLimitedError) as refused:
        quotas.reserve("bob", TIER, reserve[-1], "streams", now=NOW)
    assert refused.value.limit == limit and refused.value.retry_after_s == retry_after


def test_the_daily_budget_refuses_until_midnight_utc(tables: dict[str, Any]) -> None:
    quotas = store(tables)
    for minute in range(3):  # spread over minutes so only the day fills up
        quotas.settle(quotas.reserve("carol", TIER, 500, "streams", now=NOW + 60 * minute), Usage(input_tokens=500))
    with pytest.raises(RateLimitedError) as refused:
        quotas.reserve("carol", TIER, 10, "streams", now=NOW + 300)
    assert refused.value.limit == "tokens_per_day"
    assert refused.value.retry_after_s == 86_400 - (int(NOW + 300) % 86_400) + 1


def test_a_slot_is_held_until_settled_and_a_crashed_holders_lease_expires(tables: dict[str, Any]) -> None:
    quotas = store(tables)
    quotas.reserve("dave", TIER, 10, "jobs", now=NOW)
    with pytest.raises(RateLimitedError) as refused:
        quotas.reserve("dave", TIER, 10, "jobs", now=NOW + 1)
    assert refused.value.limit == "max_concurrent_jobs" and refused.value.retry_after_s == 1
    later = quotas.reserve("dave", TIER, 10, "jobs", now=NOW + LEASE_S + 1)  # the first holder never settled
    assert quotas.usage("dave", later.minute, later.day)["jobs_in_flight"] == 1


def test_a_request_larger_than_the_whole_budget_is_too_large_not_rate_limited(tables: dict[str, Any]) -> None:
    with pytest.raises(InputTooLargeError):
        store(tables).reserve("erin", TIER, 1_001, "streams", now=NOW)
    assert tables["QuotasTable"].scan(Select="COUNT")["Count"] == 0


def test_a_spent_minute_is_refused_without_a_write_until_the_minute_or_the_limit_changes(
    tables: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    quotas = store(tables)
    for _ in range(TIER.requests_per_minute):
        quotas.settle(quotas.reserve("fay", TIER, 10, "streams", now=NOW), Usage(input_tokens=10))
    writes: list[dict[str, Any]] = []
    transact = quotas.client.transact_write_items
    monkeypatch.setattr(quotas.client, "transact_write_items", lambda **kw: writes.append(kw) or transact(**kw))
    refusals = []
    for second in range(3):  # the first refusal asks the table; the others know the answer
        with pytest.raises(RateLimitedError) as refused:
            quotas.reserve("fay", TIER, 10, "streams", now=NOW + second)
        refusals.append((refused.value.limit, refused.value.retry_after_s))
    assert refusals == [("requests_per_minute", 40), ("requests_per_minute", 39), ("requests_per_minute", 38)]
    assert len(writes) == 1
    raised = quotas.reserve("fay", TIER.model_copy(update={"requests_per_minute": 4}), 10, "streams", now=NOW + 3)
    quotas.reserve("fay", TIER, 10, "streams", now=NOW + 60)  # the next minute
    assert len(writes) == 3
    assert quotas.usage("fay", raised.minute, raised.day)["requests_this_minute"] == 4
