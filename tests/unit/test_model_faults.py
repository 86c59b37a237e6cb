"""A model that goes quiet: the idle timeout of one model call, and the heartbeats that keep a live
stream's record fresh while the model is slow."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import anyio.to_thread
import pytest

from precis.domain.cancellation import CancelWatch
from precis.domain.catalog import Catalog, ModelSpec
from precis.domain.chunking import plan_chunks
from precis.domain.errors import TransientModelError
from precis.domain.inference import call_model
from precis.domain.jobs import Job, chunk_summary_key
from precis.domain.models import (
    Completion,
    Delta,
    Document,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    Limits,
    ModelEvent,
    Prompt,
    StreamEvent,
    Style,
    TokenEvent,
    Usage,
)
from precis.domain.pipeline import Documents, JobPipeline, Jobs
from precis.domain.retry import RetryPolicy
from precis.domain.summarize import Outcome, Summarizer, SummaryTask

pytestmark = pytest.mark.anyio

PROMPT = Prompt(
    system="You write faithful summaries.",
    instruction="Summarize the document in one sentence.",
    document="Revenue grew by twelve percent. Costs fell.",
    style=Style.TLDR,
)


class Scripted:
    """A model provider that waits `gaps[i]` seconds before its i-th event, then (after the deltas)
    reports its usage; `closed` says whether the stream was closed (its generator finalized)."""

    def __init__(self, gaps: list[float], texts: list[str] | None = None) -> None:
        self.gaps = gaps
        self.texts = texts or [f"t{i} " for i in range(len(gaps))]
        self.closed = False

    async def stream(self, prompt: Prompt, *, max_output_tokens: int) -> AsyncIterator[ModelEvent]:
        try:
            for gap, text in zip(self.gaps, self.texts, strict=True):
                await anyio.sleep(gap)
                yield Delta(text=text, tokens=1)
            yield Completion(
                usage=Usage(input_tokens=10, output_tokens=len(self.texts)), finish_reason=FinishReason.STOP
            )
        finally:
            self.closed = True


async def test_a_model_that_never_answers_fails_transiently_after_the_idle_timeout() -> None:
    model, used = Scripted([3600.0]), list[Usage]()
    started = time.monotonic()
    with pytest.raises(TransientModelError, match=r"sent nothing for 0.2 s"):
        await call_model(model, PROMPT, 64, on_usage=used.append, idle_timeout_s=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert model.closed, "the hung call was closed, not left running"
    assert len(used) == 1 and used[0].output_tokens == 0 and used[0].input_tokens > 0, "the prompt is charged"


async def test_a_model_that_stalls_mid_stream_fails_with_the_text_so_far_counted() -> None:
    model, used, received = Scripted([0.0, 0.0, 3600.0]), list[Usage](), list[str]()

    async def on_text(text: str) -> None:
        received.append(text)

    with pytest.raises(TransientModelError):
        await call_model(model, PROMPT, 64, on_usage=used.append, on_text=on_text, idle_timeout_s=0.2)
    assert received == ["t0 ", "t1 "] and used[0].output_tokens == 2 and model.closed


async def test_the_idle_timeout_restarts_with_every_event_so_a_slow_model_finishes() -> None:
    model, used = Scripted([0.15] * 6), list[Usage]()
    started = time.monotonic()
    text, finish = await call_model(model, PROMPT, 64, on_usage=used.append, idle_timeout_s=0.3)
    assert time.monotonic() - started > 0.3 * 2, "longer in all than the idle timeout"
    assert (
        text == "t0 t1 t2 t3 t4 t5 "
        and finish is FinishReason.STOP
        and used == [Usage(input_tokens=10, output_tokens=6)]
    )


async def test_a_slow_client_is_not_taken_for_an_idle_model() -> None:
    """Only the wait for the model is timed: the time `on_text` takes (writing to a slow client) is not."""
    model, used = Scripted([0.0, 0.0, 0.0]), list[Usage]()

    async def slow_client(_: str) -> None:
        await anyio.sleep(0.3)

    text, _ = await call_model(model, PROMPT, 64, on_usage=used.append, on_text=slow_client, idle_timeout_s=0.2)
    assert text == "t0 t1 t2 "


async def test_without_an_idle_timeout_a_slow_first_token_is_waited_for() -> None:
    text, _ = await call_model(Scripted([0.3]), PROMPT, 64, on_usage=lambda _: None)
    assert text == "t0 "


# The summarizer: a hung model is retried, then the stream ends; a slow one keeps its record fresh ----


class Journal:
    def __init__(self) -> None:
        self.checkpoints: list[tuple[float, str]] = []
        self.finished: list[Outcome] = []

    def checkpoint(self, request_id: str, text: str, output_tokens: int) -> None:
        self.checkpoints.append((time.monotonic(), text))

    def save_final_inputs(self, request_id: str, summaries: list[str]) -> None:
        pass

    def cancelled(self, request_ids: list[str]) -> set[str]:
        return set()

    def finish(self, outcome: Outcome) -> None:
        self.finished.append(outcome)


class Telemetry:
    def record(self, outcome: Outcome) -> None:
        pass


class Models:
    """Resolves every model to one scripted provider per call; counts the calls (attempts)."""

    def __init__(self, gaps: list[float]) -> None:
        self.gaps = gaps
        self.calls = 0

    def build(self, spec: ModelSpec) -> Models:
        return self

    def stream(self, prompt: Prompt, *, max_output_tokens: int) -> AsyncIterator[ModelEvent]:
        self.calls += 1
        return Scripted(self.gaps).stream(prompt, max_output_tokens=max_output_tokens)


def task() -> SummaryTask:
    text = "The lamp was lit at dusk every day. The keeper wound the clockwork at night. Ships came home."
    plan = plan_chunks(Document(text=text), chunk_tokens=7_000, overlap_tokens=50)
    return SummaryTask(
        request_id="req_" + "1" * 32,
        user_id="u1",
        tier="pro",
        model=Catalog.bundled().resolve("local"),
        style=Style.PARAGRAPH,
        max_output_tokens=64,
        plan=plan,
        limits=Limits(max_input_tokens=200_000, max_output_tokens=1024),
        document_tokens=plan.total_tokens,
    )


async def summarize(
    models: Models, journal: Journal, *, idle_timeout_s: float | None = None, heartbeat_s: float | None = None
) -> list[StreamEvent]:
    summarizer = Summarizer(
        models,
        journal,
        Telemetry(),
        CancelWatch(journal),
        retry_policy=RetryPolicy(base_delay_s=0.01),
        checkpoint_interval_s=0.02,
        heartbeat_interval_s=heartbeat_s,
        model_idle_timeout_s=idle_timeout_s,
    )
    events: list[StreamEvent] = []

    async def emit(event: StreamEvent) -> None:
        events.append(event)

    with anyio.fail_after(10):
        await summarizer.run(task(), emit)
    return events


async def test_a_hung_model_is_retried_then_the_stream_ends_with_error_and_done() -> None:
    models, journal = Models([3600.0]), Journal()
    started = time.monotonic()
    events = await summarize(models, journal, idle_timeout_s=0.1)
    assert time.monotonic() - started < 1.0
    assert models.calls == RetryPolicy().max_attempts
    error, done = events[-2], events[-1]
    assert isinstance(error, ErrorEvent) and error.code == "model_unavailable" and error.retryable
    assert isinstance(done, DoneEvent) and done.finish_reason is FinishReason.ERROR and not done.partial
    assert journal.finished[0].summary.finish_reason is FinishReason.ERROR


async def test_heartbeats_rewrite_the_record_while_the_model_is_silent() -> None:
    journal = Journal()
    started = time.monotonic()
    events = await summarize(Models([0.6, 0.0]), journal, heartbeat_s=0.1)
    first_token = next(i for i, e in enumerate(events) if isinstance(e, TokenEvent))
    assert first_token == 1
    silent = [at - started for at, text in journal.checkpoints if not text]
    assert len(silent) >= 4, silent
    assert all(later - earlier < 0.2 for earlier, later in zip([0.0, *silent], silent, strict=False))


async def test_without_heartbeats_a_silent_stream_writes_nothing_until_its_text() -> None:
    journal = Journal()
    await summarize(Models([0.3, 0.0]), journal)
    assert all(text for _, text in journal.checkpoints), "checkpoints only when the text changed"


# The job pipeline: a hung model fails the stage with the error its state machine retries -------------


class OneJob:
    def __init__(self, job: Job) -> None:
        self.job = job

    def get(self, job_id: str) -> Job:
        return self.job


class Objects:
    def __init__(self) -> None:
        self.json: dict[str, Any] = {}

    def read_chunk(self, key: str) -> str:
        return "The lamp was lit at dusk every day. The keeper wound the clockwork at night."

    def read_json(self, key: str) -> Any | None:
        return self.json.get(key)

    def write_json(self, key: str, value: Any) -> None:
        self.json[key] = value


async def test_a_hung_model_fails_a_job_stage_with_a_transient_error_and_is_charged() -> None:
    job = Job(
        job_id="job_" + "2" * 32,
        owner="u1",
        status="running",
        document_key="inbox/u1/doc.txt",
        model="local",
        style=Style.PARAGRAPH,
        max_output_tokens=64,
        chunks_total=2,
        created_at=0,
        updated_at=0,
    )
    models, objects = Models([3600.0]), Objects()
    pipeline = JobPipeline(
        cast(Jobs, OneJob(job)),
        cast(Documents, objects),
        models,
        max_input_tokens=100_000,
        max_document_bytes=1_000_000,
        model_idle_timeout_s=0.1,
    )
    started = time.monotonic()
    with pytest.raises(TransientModelError, match="sent nothing"):
        await anyio.to_thread.run_sync(pipeline.summarize_chunk, job.job_id, 0)
    assert time.monotonic() - started < 2 and models.calls == 1, "one attempt: the state machine retries"
    assert objects.read_json(chunk_summary_key(job.job_id, 0)) is None
    charged = [usage for key, usage in objects.json.items() if "/usage/" in key]
    assert len(charged) == 1 and charged[0]["input_tokens"] > 0, "the failed call is charged"
