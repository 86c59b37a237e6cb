"""The one retry loop of the streaming path: exponential backoff with full jitter, the upstream's
Retry-After respected, and a retry budget so that an outage cannot become a retry storm.

Only a call that failed before producing any text is retried: once tokens have reached the client,
the honest answer is the error and a partial result, not a second, different draft. (The asynchronous
path retries in its state machine instead; the SDKs' own retries are off.)
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from pydantic import Field

from precis.domain.errors import TransientModelError
from precis.domain.models import Frozen

T = TypeVar("T")


class RetryPolicy(Frozen):
    max_attempts: int = Field(default=3, ge=1)
    base_delay_s: float = Field(default=0.2, gt=0)
    max_delay_s: float = Field(default=5.0, gt=0)
    #: Retries may be at most this share of the calls in the window...
    budget_ratio: float = Field(default=0.2, ge=0)
    budget_window_s: float = Field(default=60.0, gt=0)
    #: ...but a quiet instance may always make a few.
    budget_floor: int = Field(default=3, ge=0)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(max_delay, base * 2**attempt)]."""
        return rand() * min(self.max_delay_s, self.base_delay_s * 2**attempt)


class RetryBudget:
    """Calls and retries of the last window, in this process. When retries reach their share, a
    failure is returned as it is instead of being retried."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.calls: deque[float] = deque()
        self.retries: deque[float] = deque()

    def _trim(self) -> None:
        horizon = self.clock() - self.policy.budget_window_s
        for stamps in (self.calls, self.retries):
            while stamps and stamps[0] < horizon:
                stamps.popleft()

    def record_call(self) -> None:
        self.calls.append(self.clock())

    def try_spend(self) -> bool:
        self._trim()
        allowed = max(self.policy.budget_floor, int(self.policy.budget_ratio * len(self.calls)))
        if len(self.retries) >= allowed:
            return False
        self.retries.append(self.clock())
        return True


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    budget: RetryBudget,
    *,
    retryable: Callable[[TransientModelError], bool] = lambda _: True,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run `attempt`; on a `TransientModelError` that `retryable` accepts, wait and try again, while
    attempts and the budget last. The last error is raised as it is."""
    for number in range(policy.max_attempts):
        budget.record_call()
        try:
            return await attempt()
        except TransientModelError as exc:
            last = number == policy.max_attempts - 1
            if last or not retryable(exc) or not budget.try_spend():
                raise
            wait = max(policy.delay(number, rand), exc.retry_after_s or 0.0)
            await sleep(min(wait, policy.max_delay_s))
    raise AssertionError("unreachable")
