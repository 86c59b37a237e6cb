"""Ports: what the domain needs from the outside world. Adapters implement them; wiring happens in
the app factory or the handler, never here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from precis.domain.models import ModelEvent, Prompt

if TYPE_CHECKING:
    from decimal import Decimal

    from precis.domain.catalog import ModelSpec
    from precis.domain.jobs import Job
    from precis.domain.ledger import LedgerEntry
    from precis.domain.models import FinishReason, Usage
    from precis.domain.summarize import Outcome


class ModelProvider(Protocol):
    """One model behind one interface.

    `stream` yields `Delta`s and ends with exactly one `Completion` carrying the usage the provider
    reports (what is billed). It raises `TransientModelError` or `PermanentModelError` on failure,
    with the usage consumed so far when the provider tells it. Closing the iterator (`aclose`) stops
    the upstream call at once.
    """

    def stream(self, prompt: Prompt, *, max_output_tokens: int) -> AsyncIterator[ModelEvent]: ...


class ProviderResolver(Protocol):
    def build(self, spec: ModelSpec) -> ModelProvider: ...


class RequestJournal(Protocol):
    """Where a streaming request's progress and outcome are kept, readable from any instance."""

    def checkpoint(self, request_id: str, text: str, output_tokens: int) -> None:
        """Persist the text so far of a running request."""
        ...

    def save_final_inputs(self, request_id: str, summaries: list[str]) -> None:
        """Keep the inputs of a running request's final call (the chunk summaries its combining
        prompt is built from), so that a resume goes straight to that call."""
        ...

    def finish(self, outcome: Outcome) -> None:
        """Record the final outcome (text, usage, cost, finish reason) exactly once."""
        ...


class Telemetry(Protocol):
    def record(self, outcome: Outcome) -> None:
        """Logs and metrics for one finished request."""
        ...


class JobTelemetry(Protocol):
    """Metrics of the asynchronous path. Each is reported once per job: by the caller whose
    conditional transition started or ended it."""

    def job_started(self, job: Job, queued_at: float) -> None:
        """The job's execution started; it was queued at `queued_at` (epoch seconds)."""
        ...

    def job_finished(
        self, job: Job, finish_reason: FinishReason, usage: Usage, cost_usd: Decimal, *, partial: bool = False
    ) -> None:
        """The job ended (succeeded, failed or cancelled) having used `usage`, charged `cost_usd`."""
        ...


class CostLedger(Protocol):
    """Where what each request and job cost is kept, with its owner's totals per day."""

    def record(self, entry: LedgerEntry) -> bool:
        """Record an ended request's or job's entry and count it in its owner's day totals, exactly
        once: False (and nothing changed) when it was recorded already."""
        ...
