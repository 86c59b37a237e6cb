"""Admission: a request reserves its worst case (input tokens + max output) against the caller's tier
before the model is called, and settles to what it actually used afterwards (refunding the rest),
however it ended. The store makes each reservation one conditional, all-or-nothing write, so that
concurrent requests cannot race past a limit."""

from __future__ import annotations

from typing import Any, Literal, Protocol

from precis.domain.models import Frozen, Usage
from precis.domain.tiers import Tier

Slot = Literal["streams", "jobs"]


class Reservation(Frozen):
    """What one admitted request holds: its tokens in a minute's and a day's budget, and a slot."""

    user_id: str
    tokens: int
    minute: str
    day: str
    slot: Slot
    lease: str


class Admission(Protocol):
    def reserve(
        self,
        user_id: str,
        tier: Tier,
        tokens: int,
        slot: Slot,
        now: float | None = None,
        *,
        record: dict[str, Any] | None = None,
    ) -> Reservation:
        """Admit the request or raise `RateLimitedError` naming the limit it is over; `record`, a
        write to make in the same transaction."""
        ...

    def settle(self, reservation: Reservation, usage: Usage) -> None:
        """Count what was used instead of what was reserved, and free the slot."""
        ...
