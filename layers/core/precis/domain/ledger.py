"""The cost ledger: what each streaming request and each job cost, and what a user's usage adds up to.

One `LedgerEntry` per request and per job, written once when it ends, however it ends (completed,
failed, cancelled, cut off, timed out): the usage its model calls reported (every attempt's, as
charged), its cost at the price list's prices, its latency per stage, finish reason and retries.
Beside the entries, per user and per day, `DayTotals` kept by atomic counters. An entry is dated by
when its request or job started (UTC), and counted in that day's totals, so the two always agree.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, PlainSerializer

from precis.domain.errors import InvalidInputError
from precis.domain.models import FinishReason, Frozen, Usage

if TYPE_CHECKING:
    from precis.domain.catalog import Catalog
    from precis.domain.jobs import Job
    from precis.domain.summarize import Outcome

#: USD, exact: a decimal string in JSON ("0.0000441"), never a float and never "4.41E-5".
Usd = Annotated[Decimal, PlainSerializer(lambda amount: format(amount, "f"), return_type=str, when_used="json")]

EntryKind = Literal["request", "job"]

#: The longest period `GET /v1/usage` reports at once, in days.
MAX_PERIOD_DAYS = 31
#: Requests and jobs `GET /v1/usage` lists by cost at most.
MAX_TOP = 100
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class LedgerEntry(Frozen):
    """What one request or job cost."""

    id: str
    kind: EntryKind
    user_id: str = Field(exclude=True)
    #: The catalog id whose prices it was charged at (the model that answered), and the name it was
    #: asked by, with its options.
    model: str
    model_name: str
    tier: str | None = None
    usage: Usage
    cost_usd: Usd
    latency_ms: dict[str, float] = Field(default_factory=dict)
    finish_reason: FinishReason
    partial: bool = False
    retries: int = 0
    error_code: str | None = None
    #: When it started, seconds since the epoch.
    started_at: float

    @property
    def day(self) -> date:
        return datetime.fromtimestamp(self.started_at, UTC).date()


def request_entry(outcome: Outcome) -> LedgerEntry:
    """The ledger entry of a finished streaming request."""
    return LedgerEntry(
        id=outcome.request_id,
        kind="request",
        user_id=outcome.user_id,
        model=outcome.model,
        model_name=outcome.model_name,
        tier=outcome.tier,
        usage=outcome.usage,
        cost_usd=outcome.cost_usd,
        latency_ms=outcome.latency_ms,
        finish_reason=outcome.summary.finish_reason,
        partial=outcome.summary.partial,
        retries=outcome.retries,
        error_code=None if outcome.error is None else outcome.error.code,
        # The outcome's own start time: the same outcome always makes the same entry (and key).
        started_at=outcome.started_at or _started(outcome.latency_ms),
    )


def job_entry(job: Job, usage: Usage, catalog: Catalog) -> LedgerEntry:
    """The ledger entry of an ended job (succeeded, failed or cancelled), charged for `usage`: what
    its stages' model calls used. Its stages' own timings are not kept; its latency is the job's
    whole time, from submission to its end."""
    spec = catalog.resolve(job.model)
    if job.status == "succeeded":
        finish = job.finish_reason or FinishReason.STOP
    else:
        finish = FinishReason.CANCELLED if job.status == "cancelled" else FinishReason.ERROR
    return LedgerEntry(
        id=job.job_id,
        kind="job",
        user_id=job.owner,
        model=spec.info.id,
        model_name=spec.name,
        usage=usage,
        cost_usd=spec.info.price.cost(usage),
        latency_ms={"total": round(max(job.updated_at - job.created_at, 0.0) * 1000, 2)},
        finish_reason=finish,
        partial=job.status != "succeeded" and bool(job.text),
        error_code=None if job.error is None else job.error.code,
        started_at=job.created_at,
    )


def _started(latency_ms: dict[str, float]) -> float:
    return time.time() - latency_ms.get("total", 0.0) / 1000


class Totals(Frozen):
    """Requests and jobs, their tokens and their cost, and how many ended each way."""

    requests: int = 0
    jobs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Usd = Decimal(0)
    finish_reasons: dict[str, int] = Field(default_factory=dict)

    def __add__(self, other: Totals) -> Totals:
        reasons = dict(self.finish_reasons)
        for reason, count in other.finish_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
        return Totals(
            requests=self.requests + other.requests,
            jobs=self.jobs + other.jobs,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
            finish_reasons=reasons,
        )

    @classmethod
    def of(cls, entry: LedgerEntry) -> Totals:
        """What one entry adds to its day's totals."""
        return cls(
            requests=int(entry.kind == "request"),
            jobs=int(entry.kind == "job"),
            input_tokens=entry.usage.input_tokens,
            output_tokens=entry.usage.output_tokens,
            cost_usd=entry.cost_usd,
            finish_reasons={entry.finish_reason.value: 1},
        )


class DayTotals(Totals):
    day: date


class UsageReport(Frozen):
    """`GET /v1/usage`: the caller's totals over a period of days (UTC), each day's, and its most
    expensive requests and jobs of the period."""

    first: date = Field(serialization_alias="from")
    last: date = Field(serialization_alias="to")
    totals: Totals
    days: list[DayTotals]
    most_expensive: list[LedgerEntry]


def summed(days: Iterable[Totals]) -> Totals:
    total = Totals()
    for day in days:
        total += Totals.model_validate(day.model_dump(exclude={"day"}))
    return total


def top_by_cost(entries: Iterable[LedgerEntry], count: int) -> list[LedgerEntry]:
    """The `count` most expensive entries, the most expensive first (then the most recent)."""
    return sorted(entries, key=lambda e: (e.cost_usd, e.started_at), reverse=True)[:count]


def usage_period(first: str | None, last: str | None, today: date) -> tuple[date, date]:
    """The days `GET /v1/usage?from=&to=` asks for: YYYY-MM-DD each, both included, today by default
    (`from` alone runs to today, `to` alone is that one day), at most `MAX_PERIOD_DAYS` long."""
    start = _day("from", first) if first is not None else None
    end = _day("to", last) if last is not None else None
    if start is None:
        start = end = end or today
    elif end is None:
        end = max(start, today)
    if end < start:
        raise InvalidInputError(f"to: {end.isoformat()} is before from: {start.isoformat()}")
    if end - start >= timedelta(days=MAX_PERIOD_DAYS):
        raise InvalidInputError(f"from, to: at most {MAX_PERIOD_DAYS} days at once")
    return start, end


def _day(name: str, value: str) -> date:
    try:
        if not _DAY.match(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD)") from None
