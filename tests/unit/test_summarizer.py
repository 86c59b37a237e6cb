"""The inline map-reduce and the streaming contract, with in-memory fakes of the journal."""

from __future__ import annotations

import itertools

import anyio
import pytest

from precis.domain.admission import Reservation
from precis.domain.cancellation import CancelWatch
from precis.domain.catalog import Catalog
from precis.domain.chunking import plan_chunks
from precis.domain.models import (
    Document,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    Limits,
    MetaEvent,
    ProgressEvent,
    StreamEvent,
    Style,
    TokenEvent,
    Usage,
)
from precis.domain.summarize import Outcome, Summarizer, SummaryTask
from precis.providers import ProviderFactory
from tests.unit.test_chunking import python_docs

pytestmark = pytest.mark.anyio


class MemoryJournal:
    def __init__(self) -> None:
        self.checkpoints: list[tuple[str, int]] = []
        self.final_inputs: dict[str, list[str]] = {}
        self.finished: list[Outcome] = []
        self.cancel_requested = False

    def checkpoint(self, request_id: str, text: str, output_tokens: int) -> None:
        self.checkpoints.append((text, output_tokens))

    def save_final_inputs(self, request_id: str, summaries: list[str]) -> None:
        self.final_inputs[request_id] = summaries

    def cancelled(self, request_ids: list[str]) -> set[str]:
        return set(request_ids) if self.cancel_requested else set()

    def finish(self, outcome: Outcome) -> None:
        self.finished.append(outcome)


class MemoryTelemetry:
    def __init__(self) -> None:
        self.recorded: list[Outcome] = []

    def record(self, outcome: Outcome) -> None:
        self.recorded.append(outcome)


def make_task(text: str, model: str = "local", chunk_tokens: int = 7_000, max_output_tokens: int = 200) -> SummaryTask:
    spec = Catalog.bundled().resolve(model)
    plan = plan_chunks(Document(text=text), chunk_tokens=chunk_tokens, overlap_tokens=50)
    return SummaryTask(
        request_id="req_" + "0" * 32,
        user_id="u1",
        tier="pro",
        model=spec,
        style=Style.PARAGRAPH,
        max_output_tokens=max_output_tokens,
        plan=plan,
        limits=Limits(max_input_tokens=200_000, max_output_tokens=1024),
        document_tokens=plan.total_tokens,
    )


DOC = " ".join(
    f"Paragraph {i} explains how lighthouse number {i} used lenses, lamps and clockwork to guide ships home."
    for i in range(12)
)


def summarizer_for(journal: MemoryJournal, telemetry: MemoryTelemetry, checkpoint_s: float = 0.05) -> Summarizer:
    cancels = CancelWatch(journal, interval_s=0.02)
    return Summarizer(
        ProviderFactory(), journal, telemetry, cancels, map_concurrency=3, checkpoint_interval_s=checkpoint_s
    )


async def run(task: SummaryTask, journal: MemoryJournal | None = None, checkpoint_s: float = 0.05):
    journal = journal or MemoryJournal()
    telemetry = MemoryTelemetry()
    summarizer = summarizer_for(journal, telemetry, checkpoint_s)
    events: list[StreamEvent] = []

    async def emit(event: StreamEvent) -> None:
        events.append(event)

    async with anyio.create_task_group() as tg:
        tg.start_soon(summarizer.cancels.run)
        outcome = await summarizer.run(task, emit)
        tg.cancel_scope.cancel()
    assert journal.finished == [outcome] and telemetry.recorded == [outcome]
    return events, outcome, journal


async def test_events_follow_the_contract_meta_tokens_done() -> None:
    events, outcome, _ = await run(make_task(DOC))
    assert isinstance(events[0], MetaEvent) and events[0].chunks == 1
    assert isinstance(events[-1], DoneEvent)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.index for t in tokens] == list(range(len(tokens)))
    done = events[-1]
    assert done.finish_reason is FinishReason.STOP and not done.partial
    assert done.usage.output_tokens == len(tokens)
    assert done.summary == "".join(t.text for t in tokens).strip()
    assert set(done.latency_ms) >= {"preprocess", "ttft", "infer", "postprocess", "total"}
    assert outcome.cost_usd == 0


async def test_long_document_is_mapped_then_reduced_with_progress_and_summed_usage() -> None:
    text = python_docs(30_000)
    task = make_task(text, chunk_tokens=3_000)
    events, outcome, _ = await run(task)
    chunks = len(task.plan.chunks)
    progress = [e for e in events if isinstance(e, ProgressEvent) and e.stage == "map"]
    assert [p.done for p in progress] == list(range(1, chunks + 1))
    assert all(p.total == chunks for p in progress)
    first_token = next(i for i, e in enumerate(events) if isinstance(e, TokenEvent))
    assert first_token > events.index(progress[-1]), "the final step streams after every chunk is mapped"
    assert outcome.usage.input_tokens > task.document_tokens, "every chunk was read, plus the combining call"
    assert outcome.summary.text


async def test_combining_recurses_when_chunk_summaries_do_not_fit_one_call() -> None:
    task = make_task(python_docs(30_000), chunk_tokens=600)
    events, outcome, _ = await run(task)
    assert any(isinstance(e, ProgressEvent) and e.stage == "reduce" for e in events)
    assert outcome.summary.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


async def test_model_failure_mid_stream_keeps_the_tokens_and_ends_with_error_then_done() -> None:
    events, outcome, _ = await run(make_task(DOC, model="local?fail_after=4"))
    kinds = [e.event for e in events]
    assert kinds == ["meta", "token", "token", "token", "token", "error", "done"]
    error, done = events[-2], events[-1]
    assert isinstance(error, ErrorEvent) and error.partial and error.retryable
    assert isinstance(done, DoneEvent) and done.partial and done.finish_reason is FinishReason.ERROR
    assert done.usage.output_tokens == 4
    assert outcome.error is not None and outcome.error.code == "model_unavailable"


async def test_a_failing_chunk_fails_the_request_before_any_token() -> None:
    task = make_task(python_docs(10_000), model="local?fail_after=0&fail=permanent", chunk_tokens=3_000)
    events, outcome, _ = await run(task)
    assert [e.event for e in events][-2:] == ["error", "done"]
    assert not any(isinstance(e, TokenEvent) for e in events)
    assert outcome.summary.finish_reason is FinishReason.ERROR and not outcome.summary.partial


async def test_cancel_flag_stops_the_model_and_ends_cancelled() -> None:
    journal = MemoryJournal()
    task = make_task(DOC, model="local?token_ms=20")

    async def cancel_soon() -> None:
        await anyio.sleep(0.15)
        journal.cancel_requested = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_soon)
        events, outcome, _ = await run(task, journal)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert 0 < len(tokens) < 30
    assert outcome.summary.finish_reason is FinishReason.CANCELLED and outcome.summary.partial
    assert outcome.usage.output_tokens == len(tokens)
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason is FinishReason.CANCELLED


async def test_text_so_far_is_checkpointed_while_streaming() -> None:
    _, outcome, journal = await run(make_task(DOC, model="local?token_ms=10"), checkpoint_s=0.05)
    texts = [text for text, _ in journal.checkpoints]
    assert len(texts) >= 3
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(texts)), "each checkpoint extends the last"
    assert outcome.summary.text.startswith(texts[-1].strip()[:20])


async def test_consumer_going_away_still_records_the_outcome() -> None:
    journal = MemoryJournal()
    summarizer = summarizer_for(journal, MemoryTelemetry(), checkpoint_s=1)
    received: list[StreamEvent] = []

    async def emit(event: StreamEvent) -> None:
        received.append(event)

    with anyio.move_on_after(0.2):
        await summarizer.run(make_task(DOC, model="local?token_ms=20"), emit)
    assert received[-1].event == "token", "no done: the client is gone"
    [outcome] = journal.finished
    assert outcome.disconnected and outcome.summary.finish_reason is FinishReason.CANCELLED
    assert outcome.usage.output_tokens == sum(isinstance(e, TokenEvent) for e in received)


async def test_stream_past_its_deadline_ends_with_done_timeout_and_keeps_its_tokens() -> None:
    task = make_task(DOC, model="local?token_ms=20").model_copy(update={"timeout_s": 0.3})
    events, outcome, _ = await run(task)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason is FinishReason.TIMEOUT and done.partial
    assert 0 < len(tokens) < 30 and outcome.usage.output_tokens == len(tokens)


async def test_consumer_gone_before_meta_still_records_and_settles() -> None:
    journal = MemoryJournal()
    settled: list[Usage] = []

    class MemoryAdmission:
        def reserve(self, *args: object, **kwargs: object) -> Reservation:
            raise AssertionError("not used here")

        def settle(self, reservation: Reservation, usage: Usage) -> None:
            settled.append(usage)

    summarizer = Summarizer(
        ProviderFactory(), journal, MemoryTelemetry(), CancelWatch(journal), admission=MemoryAdmission()
    )
    reservation = Reservation(user_id="u1", tokens=500, minute="m", day="d", slot="streams", lease="1:x")
    task = make_task(DOC).model_copy(update={"reservation": reservation})

    async def gone(event: StreamEvent) -> None:
        raise anyio.get_cancelled_exc_class()

    with pytest.raises(anyio.get_cancelled_exc_class()):
        await summarizer.run(task, gone)
    [outcome] = journal.finished
    assert outcome.disconnected and outcome.summary.finish_reason is FinishReason.CANCELLED
    assert settled == [Usage()], "nothing was used, so everything reserved is refunded"


async def test_a_call_failing_before_any_token_is_retried_and_every_attempt_is_charged() -> None:
    events, outcome, _ = await run(make_task(DOC + " Retry me.", model="local?fail_first=2"))
    assert events[-1].event == "done" and not any(e.event == "error" for e in events)
    assert outcome.summary.finish_reason is FinishReason.STOP
    single = (await run(make_task(DOC + " Retry me.")))[1].usage
    assert outcome.usage.input_tokens == 3 * single.input_tokens, "two failed attempts and the good one"
    assert outcome.retries == 2
    assert outcome.usage.output_tokens == single.output_tokens


async def test_a_call_failing_after_tokens_is_not_retried() -> None:
    events, outcome, _ = await run(make_task(DOC, model="local?fail_after=3"))
    assert [e.event for e in events].count("token") == 3 and events[-2].event == "error"
    assert outcome.summary.finish_reason is FinishReason.ERROR
