"""Typed models shared by every stage: documents, chunk plans, budgets, usage, stream events, summaries."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Style(StrEnum):
    TLDR = "tldr"
    BULLETS = "bullets"
    PARAGRAPH = "paragraph"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    TIMEOUT = "timeout"


# Documents and chunking -------------------------------------------------------------------------


class Document(Frozen):
    text: str


class Chunk(Frozen):
    """A slice `text == document.text[start:end]`; consecutive chunks overlap by whole sentences."""

    index: int
    start: int
    end: int
    tokens: int
    text: str


class ChunkPlan(Frozen):
    chunks: tuple[Chunk, ...]
    total_tokens: int
    chunk_tokens: int
    overlap_tokens: int


class TokenBudget(Frozen):
    """How a model's context window is spent on one call: instructions, document, answer."""

    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    prompt_overhead: int = Field(ge=0)

    @property
    def document_tokens(self) -> int:
        """Tokens left for the document itself in one call."""
        return self.context_window - self.max_output_tokens - self.prompt_overhead


# Model calls ------------------------------------------------------------------------------------


class Usage(Frozen):
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


class Price(Frozen):
    """USD per million tokens."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal

    def cost(self, usage: Usage) -> Decimal:
        million = Decimal(1_000_000)
        return (usage.input_tokens * self.input_per_mtok + usage.output_tokens * self.output_per_mtok) / million


class Prompt(Frozen):
    """Instructions and document kept apart: providers render them into their own message format,
    the document always as delimited data (see precis.domain.prompts)."""

    system: str
    instruction: str
    document: str
    style: Style
    #: A continuation: the summary the answer must continue (the model's own earlier output, cut
    #: short), delimited like the document and without padding, so that where it stops is exact.
    summary_so_far: str = ""

    def user_message(self) -> str:
        message = f"{self.instruction}\n\n<document>\n{self.document}\n</document>"
        if self.summary_so_far:
            message += f"\n\n<summary_so_far>{self.summary_so_far}</summary_so_far>"
        return message


class Delta(Frozen):
    """A piece of generated text, usually one token. `tokens` is how many tokens it is, when the
    provider knows: it makes the usage of a call cut short exact instead of estimated."""

    text: str
    tokens: int | None = None


class Completion(Frozen):
    """The last item of every model stream: what the provider says it used and why it stopped."""

    usage: Usage
    finish_reason: Literal[FinishReason.STOP, FinishReason.LENGTH]


ModelEvent = Delta | Completion


# Stream events (the SSE contract in DESIGN.md) ---------------------------------------------------


class Limits(Frozen):
    """A caller's limits as its tier sets them (precis/data/tiers.json), capped by the deployment's."""

    max_input_tokens: int
    max_output_tokens: int
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent_streams: int | None = None
    max_concurrent_jobs: int | None = None
    #: The most prompt one model call sends for this caller; longer documents are chunked.
    context_tokens: int | None = None


class MetaEvent(Frozen):
    event: Literal["meta"] = "meta"
    request_id: str
    model: str
    input_tokens: int
    max_output_tokens: int
    chunks: int
    tier: str
    queue_position: int = 0
    limits: Limits
    replayed: bool = False
    #: The request this one continues (`resume_from`); its text is not streamed again.
    resumed_from: str | None = None


class ProgressEvent(Frozen):
    event: Literal["progress"] = "progress"
    stage: Literal["map", "reduce"]
    done: int
    total: int


class TokenEvent(Frozen):
    event: Literal["token"] = "token"
    text: str
    index: int


class ErrorEvent(Frozen):
    event: Literal["error"] = "error"
    code: str
    message: str
    retryable: bool
    partial: bool


class DoneEvent(Frozen):
    event: Literal["done"] = "done"
    finish_reason: FinishReason
    usage: Usage
    cost_usd: float
    latency_ms: dict[str, float]
    partial: bool
    summary: str
    #: The model that produced the answer: a fallback when the one asked for was unavailable.
    model: str | None = None


StreamEvent = Annotated[MetaEvent | ProgressEvent | TokenEvent | ErrorEvent | DoneEvent, Field(discriminator="event")]


# Results ----------------------------------------------------------------------------------------


class Summary(Frozen):
    text: str
    style: Style
    finish_reason: FinishReason

    @property
    def partial(self) -> bool:
        """Cut short before the model finished, with some text to show for it."""
        return bool(self.text) and self.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH)
