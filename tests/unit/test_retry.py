"""The retry loop: backoff with full jitter, Retry-After, the budget, and what is never retried."""

from __future__ import annotations

import pytest

from precis.domain.errors import ModelThrottledError, PermanentModelError, TransientModelError
from precis.domain.retry import RetryBudget, RetryPolicy, with_retries

pytestmark = pytest.mark.anyio


class Flaky:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


POLICY = RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=3.0)


async def test_transient_failures_are_retried_with_full_jitter_backoff() -> None:
    flaky, sleeps = Flaky([TransientModelError("5xx"), TransientModelError("5xx")]), Sleeps()
    result = await with_retries(flaky, POLICY, RetryBudget(POLICY), sleep=sleeps, rand=lambda: 1.0)
    assert result == "ok" and flaky.calls == 3
    assert sleeps.waits == [0.5, 1.0], "the ceiling doubles; jitter draws below it (here at its top)"
    assert [POLICY.delay(n, rand=lambda: 0.5) for n in range(5)] == [0.25, 0.5, 1.0, 1.5, 1.5], "capped at max"


async def test_upstream_retry_after_is_respected() -> None:
    throttled = ModelThrottledError("slow down", retry_after_s=2)
    sleeps = Sleeps()
    await with_retries(Flaky([throttled]), POLICY, RetryBudget(POLICY), sleep=sleeps, rand=lambda: 0.0)
    assert sleeps.waits == [2.0]


async def test_permanent_failures_and_the_last_attempt_are_not_retried() -> None:
    flaky = Flaky([PermanentModelError("bad request")])
    with pytest.raises(PermanentModelError):
        await with_retries(flaky, POLICY, RetryBudget(POLICY), sleep=Sleeps())
    assert flaky.calls == 1
    always = Flaky([TransientModelError("down")] * 10)
    with pytest.raises(TransientModelError):
        await with_retries(always, POLICY, RetryBudget(POLICY), sleep=Sleeps())
    assert always.calls == POLICY.max_attempts


async def test_the_budget_stops_a_retry_storm() -> None:
    policy = RetryPolicy(max_attempts=5, budget_ratio=0.1, budget_floor=2)
    budget = RetryBudget(policy, clock=lambda: 100.0)
    outage = Flaky([TransientModelError("down")] * 1000)
    for _ in range(20):  # twenty requests during an outage
        with pytest.raises(TransientModelError):
            await with_retries(outage, policy, budget, sleep=Sleeps())
    # Without a budget that would be 20 x 5 = 100 upstream calls; with it, a share of them are retries.
    assert outage.calls < 30
    assert len(budget.retries) <= max(policy.budget_floor, int(policy.budget_ratio * len(budget.calls)))


async def test_the_budget_recovers_when_its_window_has_passed() -> None:
    now = [0.0]
    policy = RetryPolicy(budget_ratio=0.0, budget_floor=1, budget_window_s=10)
    budget = RetryBudget(policy, clock=lambda: now[0])
    assert budget.try_spend() and not budget.try_spend()
    now[0] = 11.0
    assert budget.try_spend()


async def test_a_refusal_by_the_predicate_is_not_retried() -> None:
    flaky = Flaky([TransientModelError("after tokens")])
    with pytest.raises(TransientModelError):
        await with_retries(flaky, POLICY, RetryBudget(POLICY), retryable=lambda _: False, sleep=Sleeps())
    assert flaky.calls == 1
