"""The stages of the asynchronous path, one method per Lambda function of the state machine.

Every stage is safe to run twice (a Step Functions retry, an SQS redelivery): its outputs are
deterministic objects in S3, read back instead of recomputed, and every job transition is a
conditional write. Chunk text and summaries travel by reference (S3 keys derived from the job id and
the chunk index), never in the state machine's payload, which AWS caps at 256 KB.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import unquote_plus

import anyio

from precis.domain.admission import Admission
from precis.domain.breaker import CircuitBreaker
from precis.domain.catalog import Catalog, ModelSpec
from precis.domain.chunking import plan_chunks
from precis.domain.errors import (
    InputTooLargeError,
    InvalidDocumentError,
    InvalidInputError,
    PrecisError,
    TransientModelError,
)
from precis.domain.inference import MAP_OUTPUT_TOKENS, call_model, chunk_budget, reduce_to_prompt
from precis.domain.jobs import (
    Job,
    JobError,
    check_inbox_key,
    chunk_key,
    chunk_summary_key,
    draft_key,
    drop_owner,
    is_job_id,
    job_id_for_object,
    summary_keys,
)
from precis.domain.ledger import job_entry
from precis.domain.models import Document, FinishReason, Prompt, Style, Usage
from precis.domain.ports import CostLedger, JobTelemetry, ProviderResolver
from precis.domain.postprocess import postprocess
from precis.domain.prompts import chunk_prompt
from precis.observability import annotate, correlate, logger, pseudonym


class Documents(Protocol):
    def read_text(self, key: str, max_bytes: int) -> str: ...
    def read_chunk(self, key: str) -> str: ...
    def write_text(self, key: str, text: str, content_type: str = ...) -> None: ...
    def write_json(self, key: str, value: Any) -> None: ...
    def read_json(self, key: str) -> Any | None: ...


class Jobs(Protocol):
    def get(self, job_id: str) -> Job | None: ...
    def create(
        self,
        job_id: str,
        owner: str,
        document_key: str,
        model: str,
        style: Style,
        max_output_tokens: int,
        error: JobError | None = None,
    ) -> bool: ...
    def started(self, job_id: str, execution_arn: str) -> bool: ...
    def planned(self, job_id: str, chunks_total: int) -> None: ...
    def chunk_done(self, job_id: str, index: int) -> None: ...
    def checkpoint(self, job_id: str, text: str) -> None: ...
    def succeed(
        self,
        job_id: str,
        text: str,
        finish_reason: FinishReason,
        usage: Usage,
        cost_usd: Decimal,
        summary_key: str,
        markdown_key: str,
    ) -> bool: ...
    def fail(self, job_id: str, error: JobError, usage: Usage, cost_usd: Decimal) -> bool: ...


class Executions(Protocol):
    def start(self, name: str, payload: dict[str, Any]) -> str: ...
    def stop(self, execution_arn: str, cause: str) -> None: ...


class JobIntake:
    """What the starter function does with each ingest message: an S3 drop becomes a job (named by
    bucket, key and ETag), a queued API job gets its execution. Either way the execution is named
    by the job id, so a duplicate event or a redelivery starts nothing new."""

    def __init__(
        self,
        jobs: Jobs,
        executions: Executions,
        *,
        bucket: str,
        default_model: str,
        default_max_output_tokens: int,
        max_document_bytes: int,
        telemetry: JobTelemetry | None = None,
    ) -> None:
        self.jobs = jobs
        self.executions = executions
        self.telemetry = telemetry
        self.bucket = bucket
        self.default_model = default_model
        self.default_max_output_tokens = default_max_output_tokens
        self.max_document_bytes = max_document_bytes

    def handle(self, message: dict[str, Any], queued_at: float | None = None) -> None:
        """`queued_at`: when the message was sent (epoch seconds), for the job's queue wait."""
        if message.get("Event") == "s3:TestEvent":  # S3 sends one when the notification is set up
            return
        if isinstance(message.get("job_id"), str) and is_job_id(message["job_id"]):
            self._start(message["job_id"], queued_at)
            return
        records = message.get("Records")
        if not isinstance(records, list) or not records:
            raise InvalidInputError("not an S3 event nor a job message")
        for record in records:
            s3 = record.get("s3", {}) if isinstance(record, dict) else {}
            bucket, obj = s3.get("bucket", {}).get("name"), s3.get("object", {})
            if bucket != self.bucket or not isinstance(obj.get("key"), str):
                raise InvalidInputError(f"an S3 event for another bucket or without a key: {bucket!r}")
            self._drop(unquote_plus(obj["key"]), str(obj.get("eTag", "")), int(obj.get("size", 0)), queued_at)

    def _drop(self, key: str, etag: str, size: int, queued_at: float | None = None) -> None:
        job_id = job_id_for_object(self.bucket, key, etag)
        correlate(job_id)  # a drop's job id is known from here on: every later line carries it
        problem: JobError | None = None
        try:
            check_inbox_key(key)
            if size == 0:
                raise InvalidDocumentError("the document is empty")
            if size > self.max_document_bytes:
                raise InvalidDocumentError(f"the document has {size} bytes; the limit is {self.max_document_bytes}")
        except InvalidInputError as exc:
            # Nothing to summarize: the job exists only to say why, and no execution starts.
            problem = JobError(code=exc.code, message=exc.message)
        created = self.jobs.create(
            job_id,
            drop_owner(key),
            key[:1024],
            self.default_model,
            Style.PARAGRAPH,
            self.default_max_output_tokens,
            error=problem,
        )
        logger.info("document dropped", extra={"size_bytes": size, "new_job": created})
        if problem is not None and created:
            logger.warning("dropped document refused", extra={"error_code": problem.code})
        if problem is None or not created:
            self._start(job_id, queued_at)
        elif self.telemetry is not None and (refused := self.jobs.get(job_id)) is not None:
            self.telemetry.job_finished(refused, FinishReason.ERROR, Usage(), Decimal(0))

    def _start(self, job_id: str, queued_at: float | None = None) -> None:
        correlate(job_id)
        job = self.jobs.get(job_id)
        if job is None:
            raise InvalidInputError(f"no job {job_id!r} to start")
        correlate(job_id, user=pseudonym(job.owner))
        if job.finished:  # cancelled while queued, failed at intake, or done: nothing to start
            logger.info("job not started: it has ended", extra={"status": job.status})
            return
        arn = self.executions.start(job_id, {"job_id": job_id})
        if self.jobs.started(job_id, arn):
            logger.info("job started", extra={"model": job.model.partition("?")[0]})
            if self.telemetry is not None:  # queued when created (API jobs) or when S3 sent the event (drops)
                self.telemetry.job_started(job, min(job.created_at, queued_at or job.created_at))
        elif (current := self.jobs.get(job_id)) and current.status == "cancelled":
            self.executions.stop(arn, "the job was cancelled before it started")


class JobPipeline:
    def __init__(
        self,
        jobs: Jobs,
        documents: Documents,
        providers: ProviderResolver,
        *,
        max_input_tokens: int,
        max_document_bytes: int,
        checkpoint_interval_s: float = 1.0,
        catalog: Catalog | None = None,
        admission: Admission | None = None,
        model_idle_timeout_s: float | None = None,
        breaker: CircuitBreaker | None = None,
        telemetry: JobTelemetry | None = None,
        ledger: CostLedger | None = None,
    ) -> None:
        self.admission = admission
        self.telemetry = telemetry
        self.ledger = ledger
        self.breaker = breaker
        self.model_idle_timeout_s = model_idle_timeout_s
        self.jobs = jobs
        self.documents = documents
        self.providers = providers
        self.max_input_tokens = max_input_tokens
        self.max_document_bytes = max_document_bytes
        self.checkpoint_interval_s = checkpoint_interval_s
        self.catalog = catalog or Catalog.bundled()

    async def _call(
        self,
        job: Job,
        spec: ModelSpec,
        prompt: Prompt,
        max_output_tokens: int,
        used: list[Usage],
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> tuple[str, FinishReason]:
        """One model call of a job's stage, through the model's circuit breaker: while it is open the
        stage fails fast with `CircuitOpenError`, which the state machine retries later."""
        permit = None if self.breaker is None else self.breaker.admit(spec.name)
        try:
            result = await call_model(
                self.providers.build(spec),
                prompt,
                max_output_tokens,
                on_usage=used.append,
                on_text=on_text,
                idle_timeout_s=self.model_idle_timeout_s,
            )
        except TransientModelError:
            if self.breaker is not None and permit is not None:
                self.breaker.failed(permit, job.owner)
            raise
        if self.breaker is not None and permit is not None:
            self.breaker.succeeded(permit)
        return result

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise InvalidDocumentError(f"no job {job_id!r}")
        annotate(request_id=job_id, model=job.model.partition("?")[0])
        return job

    # Split Into Chunks ------------------------------------------------------------------------

    def split(self, job_id: str) -> list[int]:
        """Load the document, cut it into chunks (each stored in S3) and return their indexes."""
        job = self._job(job_id)
        text = self.documents.read_text(job.document_key, self.max_document_bytes)
        chunk_tokens, overlap = chunk_budget(
            self.catalog.resolve(job.model).info, job.style, job.max_output_tokens, job.context_tokens
        )
        plan = plan_chunks(Document(text=text), chunk_tokens, overlap)
        if plan.total_tokens > self.max_input_tokens:
            raise InputTooLargeError(
                f"the document has {plan.total_tokens} tokens; the limit is {self.max_input_tokens}"
            )
        for chunk in plan.chunks:
            self.documents.write_text(chunk_key(job_id, chunk.index), chunk.text)
        self.jobs.planned(job_id, len(plan.chunks))
        return [chunk.index for chunk in plan.chunks]

    # Summarize Each Chunk ---------------------------------------------------------------------

    def summarize_chunk(self, job_id: str, index: int) -> dict[str, Any]:
        """One chunk's summary, stored as work/<job>/summaries/<index>.json with its usage. A chunk
        already summarized is not sent to the model again (and so not charged again)."""
        key = chunk_summary_key(job_id, index)
        stored = self.documents.read_json(key)
        if stored is None:
            job = self._job(job_id)
            spec = self.catalog.resolve(job.model)
            prompt = chunk_prompt(
                self.documents.read_chunk(chunk_key(job_id, index)),
                index,
                job.chunks_total,
                min(MAP_OUTPUT_TOKENS, spec.info.max_output_tokens),
            )
            used: list[Usage] = []

            async def summarize() -> str:
                text, _ = await self._call(job, spec, prompt, MAP_OUTPUT_TOKENS, used)
                return text

            try:
                text = anyio.run(summarize)
            finally:
                self._charge(job_id, f"chunk-{index:05d}", used)  # a failed call is charged too
            self.documents.write_json(key, {"index": index, "text": text})
        self.jobs.chunk_done(job_id, index)
        return {"index": index}

    # Combine The Summaries --------------------------------------------------------------------

    def combine(self, job_id: str) -> None:
        """Combine the chunk summaries (in rounds while they do not fit one call), streaming the final
        summary's text into the job record as it is generated, for `GET /v1/jobs/{id}/events`."""
        if self.documents.read_json(draft_key(job_id)) is not None:
            return
        job = self._job(job_id)
        spec = self.catalog.resolve(job.model)
        summaries = [self._chunk_summary(job_id, i)["text"] for i in range(job.chunks_total)]
        room, _ = chunk_budget(spec.info, job.style, job.max_output_tokens, job.context_tokens)
        used: list[Usage] = []

        async def combine() -> tuple[str, FinishReason]:
            async def summarize(prompt: Prompt, max_tokens: int) -> str:
                text, _ = await self._call(job, spec, prompt, max_tokens, used)
                return text

            final = await reduce_to_prompt(summaries, job.style, job.max_output_tokens, room, summarize)
            parts: list[str] = []
            last_checkpoint = time.monotonic()

            async def stream(text: str) -> None:
                nonlocal last_checkpoint
                parts.append(text)
                if time.monotonic() - last_checkpoint >= self.checkpoint_interval_s:
                    last_checkpoint = time.monotonic()
                    await anyio.to_thread.run_sync(self.jobs.checkpoint, job_id, "".join(parts))

            return await self._call(job, spec, final, job.max_output_tokens, used, on_text=stream)

        try:
            text, finish = anyio.run(combine)
        finally:
            self._charge(job_id, "combine", used)
        self.jobs.checkpoint(job_id, text)
        self.documents.write_json(draft_key(job_id), {"text": text, "finish_reason": finish.value})

    # Postprocess And Store --------------------------------------------------------------------

    def finish(self, job_id: str) -> str:
        """Postprocess the draft, store the summary as JSON and Markdown under summaries/, and mark
        the job succeeded and charged, once."""
        job = self._job(job_id)
        draft = self.documents.read_json(draft_key(job_id))
        if draft is None:
            raise InvalidDocumentError(f"job {job_id} has no draft to postprocess")
        finish = FinishReason(draft["finish_reason"])
        summary = postprocess(draft["text"], job.style, finish)
        usage = self.usage(job)
        cost = self.catalog.resolve(job.model).info.price.cost(usage)
        json_key, markdown_key = summary_keys(job_id, job.document_key)
        self.documents.write_json(
            json_key,
            {
                "job_id": job_id,
                "document": job.document_key,
                "model": job.model,
                "style": job.style.value,
                "summary": summary.text,
                "finish_reason": finish.value,
                "chunks": job.chunks_total,
                "usage": usage.model_dump(),
                "cost_usd": float(cost),
            },
        )
        self.documents.write_text(
            markdown_key,
            f"# Summary of {job.document_key}\n\n{summary.text}\n",
            content_type="text/markdown; charset=utf-8",
        )
        if self.jobs.succeed(job_id, summary.text, finish, usage, cost, json_key, markdown_key):
            self._settle(job, usage)
            if self.telemetry is not None:
                self.telemetry.job_finished(job, finish, usage, cost)
        self._record_cost(job_id, usage)
        return json_key

    # Record The Failure -----------------------------------------------------------------------

    def record_failure(self, job_id: str, error: dict[str, Any]) -> None:
        """The job failed: a structured error from the Step Functions error (its Error is the
        exception's class name), charged for what it used; chunk summaries stay in S3."""
        job = self._job(job_id)
        name = str(error.get("Error", "States.Runtime"))
        cause = str(error.get("Cause", ""))
        try:
            message = str(json.loads(cause).get("errorMessage", cause))
        except (ValueError, AttributeError):
            message = cause
        known = _ERRORS.get(name)
        failure = JobError(
            code=known.code if known else "stage_failed",
            message=f"{name}: {message}"[:1000],
            retryable=known.retryable if known else False,
        )
        usage = self.usage(job)
        cost = self.catalog.resolve(job.model).info.price.cost(usage)
        if self.jobs.fail(job_id, failure, usage, cost):
            self._settle(job, usage)
            if self.telemetry is not None:
                self.telemetry.job_finished(job, FinishReason.ERROR, usage, cost, partial=bool(job.text))
        self._record_cost(job_id, usage)

    def _record_cost(self, job_id: str, usage: Usage) -> None:
        """The ended job's entry in its owner's cost ledger, once, however the transition before it
        went: a stage run again after a crash between the two writes it then, and a stage run again
        after it was written (or a cancel that wrote it first) changes nothing."""
        if self.ledger is None:
            return
        job = self._job(job_id)
        if job.finished:
            self.ledger.record(job_entry(job, usage, self.catalog))

    def _settle(self, job: Job, usage: Usage) -> None:
        """The job's end, reached once (the transition that got here was conditional): its owner's
        budgets count what it used instead of what it reserved."""
        if self.admission is not None and job.reservation is not None:
            self.admission.settle(job.reservation, usage)

    # Accounting -------------------------------------------------------------------------------

    def usage(self, job: Job) -> Usage:
        return job_usage(job, self.documents)

    def _charge(self, job_id: str, call: str, used: list[Usage]) -> None:
        """Add what a stage's model calls used to its tally in S3 (attempts of a stage run one after
        another, so read-add-write cannot lose an update)."""
        if not used:
            return
        key = _usage_key(job_id, call)
        before = self.documents.read_json(key)
        total = sum(used, Usage.model_validate(before) if before else Usage())
        self.documents.write_json(key, total.model_dump())

    def _chunk_summary(self, job_id: str, index: int) -> dict[str, Any]:
        stored = self.documents.read_json(chunk_summary_key(job_id, index))
        if stored is None:
            raise InvalidDocumentError(f"chunk {index} of job {job_id} has no summary")
        result: dict[str, Any] = stored
        return result


def job_usage(job: Job, documents: Documents) -> Usage:
    """Everything a job's model calls used, from what its stages stored: each counted once."""
    total = Usage()
    calls = [f"chunk-{index:05d}" for index in range(job.chunks_total)] + ["combine"]
    for call in calls:
        stored = documents.read_json(_usage_key(job.job_id, call))
        if stored is not None:
            total += Usage.model_validate(stored)
    return total


def _usage_key(job_id: str, call: str) -> str:
    return f"work/{job_id}/usage/{call}.json"


def _subclasses(cls: type[PrecisError]) -> Iterator[type[PrecisError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


#: precis's errors by class name: what Step Functions reports as a failed task's Error.
_ERRORS: dict[str, type[PrecisError]] = {cls.__name__: cls for cls in _subclasses(PrecisError)}
