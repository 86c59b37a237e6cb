"""Ports: what the domain needs from the outside world. Adapters implement them; wiring happens in
the app factory or the handler, never here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from precis.domain.models import ModelEvent, Prompt

if TYPE_CHECKING:
    from precis.domain.catalog import ModelSpec
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
