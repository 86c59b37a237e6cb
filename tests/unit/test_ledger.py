"""The cost ledger's domain: entries of requests and jobs, day totals, and the period `GET /v1/usage` reads."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from precis.domain.catalog import Catalog
from precis.domain.errors import InvalidInputError
from precis.domain.jobs import Job, JobError
from precis.domain.ledger import Totals, job_entry, request_entry, usage_period
from precis.domain.models import FinishReason, Style, Summary, Usage
from precis.domain.summarize import Outcome

TODAY = date(2026, 11, 27)
MINI = Catalog.bundled().resolve("gpt-4o-mini").info.price


@pytest.mark.parametrize(
    ("first", "last", "period"),
    [
        (None, None, (TODAY, TODAY)),
        ("2026-11-01", None, (date(2026, 11, 1), TODAY)),
        (None, "2026-11-03", (date(2026, 11, 3), date(2026, 11, 3))),
        ("2026-11-01", "2026-12-01", (date(2026, 11, 1), date(2026, 12, 1))),
        ("2026-12-24", None, (date(2026, 12, 24), date(2026, 12, 24))),
    ],
)
def test_usage_period_defaults_to_today_and_includes_both_days(
    first: str | None, last: str | None, period: tuple[date, date]
) -> None:
    assert usage_period(first, last, TODAY) == period


@pytest.mark.parametrize(
    ("first", "last", "complaint"),
    [
        ("2026-11-31", None, "from: '2026-11-31' is not a date"),
        ("2026-1-5", None, "from: '2026-1-5' is not a date"),
        (None, "27/11/2026", "to: '27/11/2026' is not a date"),
        ("2026-11-02", "2026-11-01", "is before"),
        ("2026-10-01", "2026-11-01", "at most 31 days"),
    ],
)
def test_usage_period_refuses_bad_or_unbounded_dates(first: str | None, last: str | None, complaint: str) -> None:
    with pytest.raises(InvalidInputError, match=complaint):
        usage_period(first, last, TODAY)


def test_a_requests_entry_carries_its_outcome_and_is_dated_by_its_start() -> None:
    started = datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC).timestamp()
    usage = Usage(input_tokens=900, output_tokens=40)
    outcome = Outcome(
        request_id="req_1",
        user_id="alice",
        model="gpt-4o-mini",
        model_name="gpt-4o-mini?x=1",
        tier="pro",
        summary=Summary(text="Half", style=Style.TLDR, finish_reason=FinishReason.CANCELLED),
        usage=usage,
        cost_usd=MINI.cost(usage),
        latency_ms={"ttft": 10.0, "total": 2500.0},
        disconnected=True,
        retries=1,
        started_at=started,
    )
    entry = request_entry(outcome)
    assert entry == request_entry(outcome), "the same outcome makes the same entry (and ledger key)"
    assert (entry.kind, entry.user_id, entry.model, entry.model_name, entry.tier) == (
        "request", "alice", "gpt-4o-mini", "gpt-4o-mini?x=1", "pro",
    )  # fmt: skip
    assert (entry.usage, entry.cost_usd, entry.retries) == (usage, Decimal("0.000159"), 1)
    assert (entry.finish_reason, entry.partial) == (FinishReason.CANCELLED, True)
    assert entry.day == date(2026, 11, 26), "a request that ends after midnight counts on the day it started"


@pytest.mark.parametrize(
    ("status", "finish", "partial"),
    [
        ("succeeded", FinishReason.LENGTH, False),
        ("failed", FinishReason.ERROR, True),
        ("cancelled", FinishReason.CANCELLED, True),
    ],
)
def test_a_jobs_entry_is_charged_at_its_models_price_however_it_ended(
    status: str, finish: FinishReason, partial: bool
) -> None:
    job = Job(
        job_id="job_" + "1" * 32, owner="bob", status=status, document_key="jobs/x/document.txt",  # type: ignore[arg-type]
        model="gpt-4o-mini?fast=1", style=Style.PARAGRAPH, max_output_tokens=100, text="Some text",
        finish_reason=FinishReason.LENGTH if status == "succeeded" else None,
        error=JobError(code="model_error", message="m") if status == "failed" else None,
        created_at=1_000.0, updated_at=1_012.5,
    )  # fmt: skip
    usage = Usage(input_tokens=10_000, output_tokens=700)
    entry = job_entry(job, usage, Catalog.bundled())
    assert (entry.kind, entry.user_id, entry.model, entry.model_name) == ("job", "bob", "gpt-4o-mini", job.model)
    assert (entry.finish_reason, entry.partial, entry.usage) == (finish, partial, usage)
    assert entry.cost_usd == Decimal("0.00192") and entry.latency_ms == {"total": 12_500.0}
    assert entry.started_at == 1_000.0 and entry.error_code == ("model_error" if status == "failed" else None)


def test_totals_add_up_counts_tokens_cost_and_finish_reasons() -> None:
    one = Totals(requests=1, input_tokens=5, output_tokens=1, cost_usd=Decimal("6E-7"), finish_reasons={"stop": 1})
    two = Totals(jobs=1, input_tokens=7, cost_usd=Decimal("0.0000012"), finish_reasons={"stop": 1, "error": 1})
    assert one + two == Totals(
        requests=1, jobs=1, input_tokens=12, output_tokens=1, cost_usd=Decimal("0.0000018"),
        finish_reasons={"stop": 2, "error": 1},
    )  # fmt: skip
    assert (one + two).model_dump(mode="json")["cost_usd"] == "0.0000018"
