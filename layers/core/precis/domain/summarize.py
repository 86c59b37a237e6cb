"""Summarize one request as a stream of events: the inline map-reduce behind `POST /v1/summarize`.

`Summarizer.run` emits the streaming contract of DESIGN.md in order (meta, progress*, token*,
error?, done), and always records an `Outcome`, also when the model fails, the user cancels or the
client goes away. Pings and framing are the transport's business, not this module's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

import anyio
import anyio.to_thread

from precis.domain.admission import Admission, Reservation
from precis.domain.breaker import CircuitBreaker
from precis.domain.cancellation import CancelWatch
from precis.domain.catalog import ModelSpec
from precis.domain.errors import CircuitOpenError, ModelError, TransientModelError
from precis.domain.inference import MAP_OUTPUT_TOKENS, call_model, reduce_summaries
from precis.domain.models import (
    ChunkPlan,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    Frozen,
    Limits,
    MetaEvent,
    ProgressEvent,
    Prompt,
    StreamEvent,
    Style,
    Summary,
    TokenEvent,
    Usage,
)
from precis.domain.ports import ProviderResolver, RequestJournal, Telemetry
from precis.domain.postprocess import postprocess
from precis.domain.prompts import chunk_prompt, combine_prompt
from precis.domain.resume import Resumption, continued, final_prompt
from precis.domain.retry import RetryBudget, RetryPolicy, with_retries
from precis.observability import logger, record_stage, stage

Emit = Callable[[StreamEvent], Awaitable[None]]


class SummaryTask(Frozen):
    """A request that passed validation and admission, ready to run."""

    request_id: str
    user_id: str
    tier: str
    model: ModelSpec
    style: Style
    max_output_tokens: int
    plan: ChunkPlan
    limits: Limits
    document_tokens: int
    preprocess_ms: float = 0.0
    reservation: Reservation | None = None
    #: The tier's fallback models that can take this request, in order (see `Summarizer._call`).
    fallbacks: tuple[ModelSpec, ...] = ()
    #: Seconds the stream may run before it must end with `done` (finish_reason timeout).
    timeout_s: float = 870.0
    #: Set when this request continues a partial one (`resume_from`, see precis.domain.resume).
    resume: Resumption | None = None


class ErrorInfo(Frozen):
    code: str
    message: str
    retryable: bool


class Outcome(Frozen):
    request_id: str
    user_id: str
    #: The catalog id of the model that served the request (a fallback when the one asked for was
    #: unavailable), and the name it was asked by, with its options.
    model: str
    model_name: str
    tier: str
    summary: Summary
    usage: Usage
    cost_usd: Decimal
    latency_ms: dict[str, float]
    error: ErrorInfo | None = None
    disconnected: bool = False
    #: Model calls made again after a transient failure (not counting fallbacks' first calls).
    retries: int = 0
    #: When the request started (preprocess included), seconds since the epoch: what its cost
    #: ledger entry is dated by.
    started_at: float = 0.0

    def done_event(self) -> DoneEvent:
        return DoneEvent(
            finish_reason=self.summary.finish_reason,
            usage=self.usage,
            cost_usd=float(self.cost_usd),
            latency_ms=self.latency_ms,
            partial=self.summary.partial,
            summary=self.summary.text,
            model=self.model_name,
        )


class _Draft:
    """What one request has produced and consumed so far, across all its model calls, and the model
    its calls go to (its `chain`'s first, until a fallback takes over)."""

    def __init__(self, chain: tuple[ModelSpec, ...]) -> None:
        self.parts: list[str] = []
        self.usage = Usage()
        self.cost = Decimal(0)  # each call's usage at the price of the model that served it
        self.in_flight_tokens = 0  # received from calls whose usage is not reported yet
        self.retries = 0
        self.chain = chain
        self.model_index = 0

    @property
    def model(self) -> ModelSpec:
        return self.chain[self.model_index]

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def output_tokens(self) -> int:
        return self.usage.output_tokens + self.in_flight_tokens


class Summarizer:
    def __init__(
        self,
        providers: ProviderResolver,
        journal: RequestJournal,
        telemetry: Telemetry,
        cancels: CancelWatch,
        *,
        admission: Admission | None = None,
        breaker: CircuitBreaker | None = None,
        retry_policy: RetryPolicy | None = None,
        map_concurrency: int = 4,
        checkpoint_interval_s: float = 1.0,
        heartbeat_interval_s: float | None = None,
        model_idle_timeout_s: float | None = None,
    ) -> None:
        self.providers = providers
        self.journal = journal
        self.telemetry = telemetry
        self.cancels = cancels
        self.admission = admission
        self.breaker = breaker
        self.retry_policy = retry_policy or RetryPolicy()
        # Per user: one user's failures never spend another user's retries.
        self._budgets: dict[str, RetryBudget] = {}
        self.map_concurrency = map_concurrency
        self.checkpoint_interval_s = checkpoint_interval_s
        #: The record is rewritten at least this often, also with no new text (a long map step, a
        #: slow model), so a request whose instance died can be told from one still running.
        self.heartbeat_interval_s = heartbeat_interval_s
        self.model_idle_timeout_s = model_idle_timeout_s

    async def run(self, task: SummaryTask, emit: Emit) -> Outcome:
        """Stream `task` through `emit`; return (and record) its outcome.

        Cancellation of the calling task (the client went away) still records the outcome, with the
        tokens actually used, before the cancellation propagates.
        """
        started = time.monotonic()
        draft = _Draft((task.model, *task.fallbacks))
        timings: dict[str, float] = {"preprocess": task.preprocess_ms}
        finish = FinishReason.STOP
        error: ModelError | None = None
        disconnected = True
        try:
            # Inside the try: a client gone before even `meta` still gets its record finished and
            # its reservation settled.
            await emit(
                MetaEvent(
                    request_id=task.request_id,
                    model=task.model.name,
                    input_tokens=task.document_tokens,
                    max_output_tokens=task.max_output_tokens,
                    chunks=len(task.plan.chunks),
                    tier=task.tier,
                    limits=task.limits,
                    resumed_from=None if task.resume is None else task.resume.request_id,
                )
            )
            with (
                anyio.move_on_after(task.timeout_s) as deadline,
                self.cancels.watch(task.request_id) as cancel_requested,
                anyio.CancelScope() as user_cancel,
            ):
                async with anyio.create_task_group() as tg:

                    async def generate() -> None:
                        nonlocal finish, error
                        try:
                            finish = await self._generate(task, draft, emit, timings, started)
                        except ModelError as exc:
                            error, finish = exc, FinishReason.ERROR
                        finally:
                            tg.cancel_scope.cancel()

                    tg.start_soon(_cancel_when, cancel_requested, user_cancel)
                    tg.start_soon(self._checkpoints, task.request_id, draft)
                    tg.start_soon(generate)
            if user_cancel.cancelled_caught:
                finish = FinishReason.CANCELLED
            elif deadline.cancelled_caught:
                finish = FinishReason.TIMEOUT
            disconnected = False
        finally:
            if disconnected:
                finish = FinishReason.CANCELLED
            with anyio.CancelScope(shield=True):
                outcome = self._outcome(task, draft, finish, error, timings, started, disconnected)
                stored = time.monotonic()
                await anyio.to_thread.run_sync(self.journal.finish, outcome)
                if self.admission is not None and task.reservation is not None:
                    await anyio.to_thread.run_sync(self.admission.settle, task.reservation, outcome.usage)
                record_stage("storage", stored)
                self.telemetry.record(outcome)
        if error is not None:
            await emit(
                ErrorEvent(
                    code=error.code,
                    message=error.message,
                    retryable=error.retryable,
                    partial=bool(draft.parts),
                )
            )
        await emit(outcome.done_event())
        return outcome

    async def _checkpoints(self, request_id: str, draft: _Draft) -> None:
        """Persist the text so far at a bounded rate, so any instance can show it (and a crash of
        this one loses at most one interval)."""
        saved, written = 0, time.monotonic()
        while True:
            await anyio.sleep(self.checkpoint_interval_s)
            beat = self.heartbeat_interval_s is not None and time.monotonic() - written >= self.heartbeat_interval_s
            if len(draft.parts) != saved or beat:
                saved = len(draft.parts)
                await anyio.to_thread.run_sync(self.journal.checkpoint, request_id, draft.text, draft.output_tokens)
                written = time.monotonic()

    async def _generate(
        self, task: SummaryTask, draft: _Draft, emit: Emit, timings: dict[str, float], started: float
    ) -> FinishReason:
        # A resume's record and `done.summary` are the whole summary, the text so far first (so it
        # can be resumed again); only the new text is streamed, its token indexes counted from 0.
        seeded = 0
        if task.resume is not None and task.resume.text:
            draft.parts.append(task.resume.text)
            seeded = 1
        final = final_prompt(task.plan, task.style, task.max_output_tokens, task.resume)
        if final is None:
            mark = time.monotonic()
            with stage("map"):
                partials = await self._map(task, draft, emit)
            timings["map"] = _ms(mark)
            mark = time.monotonic()
            with stage("reduce"):
                final = await self._reduce(task, draft, emit, partials)
            timings["reduce"] = _ms(mark)
        final, max_output_tokens = continued(final, task.max_output_tokens, task.resume)

        mark = time.monotonic()
        first_token: list[float] = []

        async def stream_token(text: str) -> None:
            if not first_token:
                first_token.append(time.monotonic())
                timings["ttft"] = _ms(started)
            draft.parts.append(text)
            await emit(TokenEvent(text=text, index=len(draft.parts) - 1 - seeded))

        try:
            _, finish = await self._call(task, final, max_output_tokens, draft, stream_token)
        finally:  # traced however the call ends: the wait for the first token, then the stream
            record_stage("model_ttft", mark, first_token[0] if first_token else None)
            if first_token:
                record_stage("streaming", first_token[0])
        timings["infer"] = _ms(mark)
        return finish

    async def _map(self, task: SummaryTask, draft: _Draft, emit: Emit) -> list[str]:
        chunks = task.plan.chunks
        summaries = [""] * len(chunks)
        failures: list[ModelError] = []
        limiter = anyio.CapacityLimiter(self.map_concurrency)
        done = 0
        max_tokens = min(MAP_OUTPUT_TOKENS, task.model.info.max_output_tokens)
        async with anyio.create_task_group() as tg:

            async def summarize_chunk(index: int) -> None:
                nonlocal done
                async with limiter:
                    prompt = chunk_prompt(chunks[index].text, index, len(chunks), max_tokens)
                    try:
                        summaries[index], _ = await self._call(task, prompt, max_tokens, draft)
                    except ModelError as exc:
                        failures.append(exc)
                        tg.cancel_scope.cancel()
                        return
                done += 1
                await emit(ProgressEvent(stage="map", done=done, total=len(chunks)))

            for index in range(len(chunks)):
                tg.start_soon(summarize_chunk, index)
        if failures:
            raise failures[0]
        return summaries

    async def _reduce(self, task: SummaryTask, draft: _Draft, emit: Emit, summaries: list[str]) -> Prompt:
        async def summarize(prompt: Prompt, max_tokens: int) -> str:
            text, _ = await self._call(task, prompt, max_tokens, draft)
            return text

        async def progress(done: int, total: int) -> None:
            await emit(ProgressEvent(stage="reduce", done=done, total=total))

        final_inputs = await reduce_summaries(summaries, task.plan.chunk_tokens, summarize, progress)
        try:
            # Kept before the final call, so that a resume of this request goes straight to it.
            # Best effort: without them a resume runs the map step again, and is charged for it.
            await anyio.to_thread.run_sync(self.journal.save_final_inputs, task.request_id, final_inputs)
        except Exception:
            logger.warning("final inputs not kept", extra={"correlation_id": task.request_id}, exc_info=True)
        return combine_prompt(final_inputs, task.style, task.max_output_tokens)

    async def _call(
        self,
        task: SummaryTask,
        prompt: Prompt,
        max_output_tokens: int,
        draft: _Draft,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> tuple[str, FinishReason]:
        """One model call to the request's model in use. When that model is unavailable before any
        text came back (its circuit is open, or it kept failing transiently past the retries), the
        next of the tier's fallback models takes over, for this call and the request's later ones."""
        received = 0

        async def relay(text: str) -> None:
            nonlocal received
            received += 1
            if on_text is not None:
                await on_text(text)

        while True:
            index = draft.model_index
            try:
                return await self._call_model(task, draft.chain[index], prompt, max_output_tokens, draft, relay)
            except TransientModelError as exc:
                if received or index + 1 >= len(draft.chain):
                    raise
                draft.model_index = max(draft.model_index, index + 1)
                logger.warning(
                    "model unavailable; falling back",
                    extra={"model": draft.chain[index].name, "fallback": draft.model.name, "error": exc.code},
                )

    async def _call_model(
        self,
        task: SummaryTask,
        spec: ModelSpec,
        prompt: Prompt,
        max_output_tokens: int,
        draft: _Draft,
        on_text: Callable[[str], Awaitable[None]],
    ) -> tuple[str, FinishReason]:
        """One call to `spec`, its usage added to the draft however it ends (every attempt's). An
        attempt that fails transiently before any text is retried, within the caller's own retry
        budget, unless the model's circuit is open."""
        provider = self.providers.build(spec)
        received = 0

        async def count(text: str) -> None:
            nonlocal received
            received += 1
            draft.in_flight_tokens += 1
            await on_text(text)

        def settle(usage: Usage) -> None:
            draft.in_flight_tokens -= received
            draft.usage += usage
            draft.cost += spec.info.price.cost(usage)

        attempts = 0

        async def attempt() -> tuple[str, FinishReason]:
            nonlocal received, attempts
            received = 0
            draft.retries += attempts > 0
            attempts += 1
            permit = None if self.breaker is None else await anyio.to_thread.run_sync(self.breaker.admit, spec.name)
            try:
                result = await call_model(
                    provider,
                    prompt,
                    max_output_tokens,
                    on_usage=settle,
                    on_text=count,
                    idle_timeout_s=self.model_idle_timeout_s,
                )
            except TransientModelError:
                if permit is not None and self.breaker is not None:
                    await anyio.to_thread.run_sync(self.breaker.failed, permit, task.user_id)
                raise
            if permit is not None and self.breaker is not None:
                await anyio.to_thread.run_sync(self.breaker.succeeded, permit)
            return result

        def retryable(exc: TransientModelError) -> bool:
            return received == 0 and not isinstance(exc, CircuitOpenError)

        budget = self._budgets.setdefault(task.user_id, RetryBudget(self.retry_policy))
        return await with_retries(attempt, self.retry_policy, budget, retryable=retryable)

    def _outcome(
        self,
        task: SummaryTask,
        draft: _Draft,
        finish: FinishReason,
        error: ModelError | None,
        timings: dict[str, float],
        started: float,
        disconnected: bool,
    ) -> Outcome:
        mark = time.monotonic()
        summary = postprocess(draft.text, task.style, finish)
        timings["postprocess"] = _ms(mark)
        record_stage("postprocess", mark)
        timings["total"] = _ms(started) + task.preprocess_ms
        return Outcome(
            request_id=task.request_id,
            user_id=task.user_id,
            model=draft.model.info.id,
            model_name=draft.model.name,
            tier=task.tier,
            summary=summary,
            usage=draft.usage,
            cost_usd=draft.cost,
            latency_ms={k: round(v, 2) for k, v in timings.items()},
            error=None
            if error is None
            else ErrorInfo(code=error.code, message=error.message, retryable=error.retryable),
            disconnected=disconnected,
            retries=draft.retries,
            started_at=time.time() - timings["total"] / 1000,
        )


async def _cancel_when(requested: anyio.Event, scope: anyio.CancelScope) -> None:
    await requested.wait()
    scope.cancel()


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1000
