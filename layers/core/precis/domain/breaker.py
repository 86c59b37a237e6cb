"""A circuit breaker per model, its state shared by every instance (DynamoDB), so that a model that is
down is not called by a thousand Lambda instances each finding out for itself.

- Closed: calls go through. Transient upstream failures (throttling, 5xx, timeouts, dropped streams)
  are counted in fixed windows, with the users they happened to.
- Open: `failures_to_open` failures in one window, from at least `users_to_open` different users,
  open it for `open_s` seconds: calls fail fast with `CircuitOpenError` (and the summarizer moves on
  to the tier's fallback model). One user's failures alone never open it: a user whose documents
  make a model fail cannot shut that model for everyone else.
- Half-open: when `open_s` has passed, one instance wins a conditional write and sends one probe
  call; the others keep failing fast. The probe's success closes the breaker, its failure opens it
  again for another `open_s`.

An instance trusts the state it read for `refresh_s`, so a closed breaker costs one read per model
per instance per `refresh_s`, not one per call; only failures and probes write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from pydantic import Field

from precis.domain.errors import CircuitOpenError, TransientStorageError
from precis.domain.models import Frozen
from precis.observability import logger


class BreakerPolicy(Frozen):
    failures_to_open: int = Field(default=5, ge=1)
    users_to_open: int = Field(default=2, ge=1)
    window_s: float = Field(default=30.0, gt=0)
    open_s: float = Field(default=30.0, gt=0)
    refresh_s: float = Field(default=1.0, ge=0)


class BreakerState(Frozen):
    """`open_until` is 0 while closed; once set, the breaker is open until then and half-open after,
    until a probe closes it. `probe_until`: a probe is in flight until then."""

    open_until: float = 0.0
    probe_until: float = 0.0


class BreakerStore(Protocol):
    def read(self, model: str) -> BreakerState: ...

    def record_failure(self, model: str, user_id: str, now: float, policy: BreakerPolicy) -> BreakerState:
        """Count one failure in the current window; open the breaker (if closed) when the policy says
        so. Returns the state after."""
        ...

    def claim_probe(self, model: str, now: float, until: float) -> bool:
        """True for exactly one caller while the breaker is half-open and no probe is in flight."""
        ...

    def reopen(self, model: str, until: float) -> BreakerState: ...

    def close(self, model: str) -> None: ...


class Permit(Frozen):
    model: str
    probe: bool = False


class CircuitBreaker:
    def __init__(
        self, store: BreakerStore, policy: BreakerPolicy | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.policy = policy or BreakerPolicy()
        self.clock = clock
        self._seen: dict[str, tuple[float, BreakerState]] = {}

    def admit(self, model: str) -> Permit:
        """A permit to call `model` now, or `CircuitOpenError`. When the shared state cannot be read,
        the breaker fails open: it must never be the reason a healthy model is not called."""
        now = self.clock()
        try:
            state = self._state(model, now)
            if state.open_until == 0:
                return Permit(model=model)
            if state.open_until > now:
                raise self._open(model, state.open_until - now)
            if self.store.claim_probe(model, now, now + self.policy.open_s):
                return Permit(model=model, probe=True)
        except TransientStorageError:
            logger.warning("circuit breaker state unavailable; calling the model", extra={"model": model})
            return Permit(model=model)
        raise self._open(model, self.policy.refresh_s or 1.0)

    def failed(self, permit: Permit, user_id: str) -> None:
        """A call under `permit` failed transiently upstream."""
        now = self.clock()
        try:
            if permit.probe:
                state = self.store.reopen(permit.model, now + self.policy.open_s)
            else:
                state = self.store.record_failure(permit.model, user_id, now, self.policy)
        except TransientStorageError:
            logger.warning("circuit breaker state unavailable; failure not counted", extra={"model": permit.model})
            return
        self._seen[permit.model] = (now, state)

    def succeeded(self, permit: Permit) -> None:
        if not permit.probe:
            return
        try:
            self.store.close(permit.model)
        except TransientStorageError:
            logger.warning("circuit breaker state unavailable; not closed", extra={"model": permit.model})
            return
        self._seen[permit.model] = (self.clock(), BreakerState())

    def _state(self, model: str, now: float) -> BreakerState:
        seen = self._seen.get(model)
        if seen is not None and now - seen[0] < self.policy.refresh_s:
            return seen[1]
        state = self.store.read(model)
        self._seen[model] = (now, state)
        return state

    @staticmethod
    def _open(model: str, retry_after_s: float) -> CircuitOpenError:
        return CircuitOpenError(
            f"model {model!r} is failing for several users; calls to it are paused",
            retry_after_s=max(1.0, round(retry_after_s, 1)),
        )
