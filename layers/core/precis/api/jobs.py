"""The asynchronous path's HTTP side: submit, read, watch (SSE) and cancel jobs.

Jobs belong to their owner: anybody else's job id is a 404, exactly like an unknown one.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import anyio.to_thread
from fastapi import FastAPI, Header, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.responses import JSONResponse, Response

from precis.api.sse import EventStreamResponse
from precis.domain.catalog import Catalog
from precis.domain.errors import InvalidInputError, NotFoundError, RateLimitedError
from precis.domain.inference import chunk_budget, job_token_estimate
from precis.domain.jobs import Job, check_inbox_key, document_key_for_job, drop_owner, is_job_id, new_job_id
from precis.domain.ledger import job_entry
from precis.domain.models import (
    DoneEvent,
    ErrorEvent,
    FinishReason,
    Limits,
    MetaEvent,
    ProgressEvent,
    Style,
    TokenEvent,
    Usage,
)
from precis.domain.pipeline import job_usage
from precis.domain.tokens import count_tokens
from precis.observability import JobMetrics, annotate, correlate, logger, pseudonym, stage
from precis.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from precis.adapters.jobs import JobStore
    from precis.adapters.ledger import LedgerStore
    from precis.adapters.quotas import QuotaStore
    from precis.adapters.s3 import DocumentStore
    from precis.adapters.stepfunctions import Executions
    from precis.api.app import Services
    from precis.domain.catalog import ModelSpec
    from precis.domain.tiers import Tier


class JobRequest(BaseModel):
    """Body of `POST /v1/jobs`: the document inline (`text`) or already in the bucket (`s3_uri`)."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = Field(default=None, min_length=1)
    s3_uri: StrictStr | None = Field(default=None, max_length=1100, description="s3://<documents bucket>/inbox/...")
    style: Style = Style.PARAGRAPH
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    model: StrictStr | None = Field(default=None, max_length=256)


class JobDesk:
    """The gateway's clients for the asynchronous path, created on first use (most requests never
    need them, and each boto3 client adds to cold start)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.telemetry = JobMetrics()

    @cached_property
    def jobs(self) -> JobStore:
        from precis.adapters.jobs import JobStore
        from precis.wiring import dynamodb_resource

        return JobStore(dynamodb_resource().Table(self.settings.jobs_table))

    @cached_property
    def documents(self) -> DocumentStore:
        import boto3

        from precis.adapters.s3 import DocumentStore

        return DocumentStore(boto3.client("s3"), self.settings.documents_bucket)

    @cached_property
    def executions(self) -> Executions:
        import boto3

        from precis.adapters.stepfunctions import Executions

        return Executions(boto3.client("stepfunctions"), self.settings.state_machine_arn)

    @cached_property
    def queue(self) -> Any:
        import boto3

        return boto3.client("sqs")

    @cached_property
    def quotas(self) -> QuotaStore:
        from precis.adapters.quotas import QuotaStore
        from precis.wiring import dynamodb_resource

        return QuotaStore(dynamodb_resource().Table(self.settings.quotas_table))

    @cached_property
    def ledger(self) -> LedgerStore:
        from precis.adapters.ledger import LedgerStore
        from precis.wiring import dynamodb_resource

        settings = self.settings
        return LedgerStore(dynamodb_resource().Table(settings.ledger_table), ttl_days=settings.ledger_ttl_days)

    def submit(
        self,
        owner: str,
        tier: Tier,
        text: str | None,
        document_key: str | None,
        spec: ModelSpec,
        style: Style,
        max_output_tokens: int,
        *,
        job_id: str | None = None,
    ) -> Job:
        """Admit the job against its owner's tier (a job slot and its worst-case tokens, settled
        when the job ends), store the document (when inline), record the job and queue it; on any
        failure undo what was done, so a rejected job leaves nothing behind."""
        self._refuse_when_backed_up()
        job_id = job_id or new_job_id()
        key = document_key or document_key_for_job(job_id)
        if text is not None:
            document_tokens = count_tokens(text)
        else:
            head = self.documents.head(key)
            document_tokens = (head[0] if head else 0) // 3  # a few bytes a token: an upper estimate
        chunk_tokens, _ = chunk_budget(spec.info, style, max_output_tokens, tier.context_tokens)
        estimate = job_token_estimate(document_tokens, chunk_tokens, style, max_output_tokens)
        with stage("admission"):
            reservation = self.quotas.reserve(owner, tier, estimate, "jobs")
        written: list[Callable[[], None]] = [lambda: self.quotas.settle(reservation, Usage())]
        try:
            with stage("storage"):
                if text is not None:
                    self.documents.write_text(key, text)
                    written.append(lambda: self.documents.delete(key))
                self.jobs.create(
                    job_id,
                    owner,
                    key,
                    spec.name,
                    style,
                    max_output_tokens,
                    reservation=reservation,
                    context_tokens=tier.context_tokens,
                )
                written.append(lambda: self.jobs.delete(job_id))
                # The job id in the body is what the starter acts on; as the `correlation_id`
                # attribute it is what the starter logs by from the record's first line.
                self.queue.send_message(
                    QueueUrl=self.settings.ingest_queue_url,
                    MessageBody=json.dumps({"job_id": job_id}),
                    MessageAttributes={"correlation_id": {"DataType": "String", "StringValue": job_id}},
                )
        except BaseException:
            for undo in reversed(written):
                undo()
            raise
        job = self.jobs.get(job_id)
        assert job is not None
        return job

    def _refuse_when_backed_up(self) -> None:
        """Beyond a bound, a new job would only wait: say so, with the expected wait, instead of
        letting the queue grow without limit."""
        attributes = self.queue.get_queue_attributes(
            QueueUrl=self.settings.ingest_queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        # Waiting, plus being retried (in flight, not yet deleted): both are ahead of a new job.
        waiting = sum(int(attributes.get(name, 0)) for name in attributes if name.startswith("ApproximateNumber"))
        if waiting >= self.settings.max_queue_backlog:
            wait_s = math.ceil(waiting / self.settings.queue_drain_per_minute * 60)
            raise RateLimitedError(
                f"{waiting} jobs are waiting to start; expect about {wait_s} s",
                limit="queue_backlog",
                retry_after_s=wait_s,
            )

    def cancel(self, job_id: str, owner: str) -> Job:
        job, cancelled_now = self.jobs.cancel(job_id, owner)
        if cancelled_now:
            if job.execution_arn:
                self.executions.stop(job.execution_arn, "cancelled by its owner")
            usage = job_usage(job, self.documents)
            if job.reservation is not None:  # charged for what it used until now
                self.quotas.settle(job.reservation, usage)
            cost = Catalog.bundled().resolve(job.model).info.price.cost(usage)
            self.telemetry.job_finished(job, FinishReason.CANCELLED, usage, cost, partial=bool(job.text))
            self.ledger.record(job_entry(job, usage, Catalog.bundled()))
        elif job.status == "cancelled":  # cancelled before: its ledger entry, if a crash kept it from being written
            self.ledger.record(job_entry(job, job_usage(job, self.documents), Catalog.bundled()))
        return job


def job_view(job: Job) -> dict[str, Any]:
    view = job.model_dump(mode="json")
    view["urls"] = {"self": f"/v1/jobs/{job.job_id}", "events": f"/v1/jobs/{job.job_id}/events"}
    return view


def accepted(job: Job, **extra: Any) -> JSONResponse:
    return JSONResponse({**job_view(job), **extra}, status_code=202, headers={"location": f"/v1/jobs/{job.job_id}"})


_FINISH = {"succeeded": None, "failed": FinishReason.ERROR, "cancelled": FinishReason.CANCELLED}


async def watch(job_id: str, owner: str, desk: JobDesk, tier: str, limits: Limits, poll_s: float, emit: Any) -> None:
    """The job told as the streaming contract: meta, progress per chunk, the final summary's text as
    it is generated (token events), error if it failed, done."""
    job = await anyio.to_thread.run_sync(desk.jobs.get_owned, job_id, owner)
    await emit(
        MetaEvent(
            request_id=job.job_id,
            model=job.model,
            input_tokens=0,
            max_output_tokens=job.max_output_tokens,
            chunks=job.chunks_total,
            tier=tier,
            limits=limits,
        )
    )
    progress, sent, index = 0, "", 0
    while True:
        if job.chunks_total and job.chunks_done > progress:
            progress = job.chunks_done
            await emit(ProgressEvent(stage="map", done=progress, total=job.chunks_total))
        if job.text.startswith(sent) and len(job.text) > len(sent):
            await emit(TokenEvent(text=job.text[len(sent) :], index=index))
            sent, index = job.text, index + 1
        if job.finished:
            break
        await anyio.sleep(poll_s)
        job = await anyio.to_thread.run_sync(desk.jobs.get_owned, job_id, owner)
    if job.error is not None:
        await emit(ErrorEvent(**job.error.model_dump(), partial=bool(job.text)))
    finish = _FINISH[job.status] or job.finish_reason or FinishReason.STOP
    await emit(
        DoneEvent(
            finish_reason=finish,
            usage=job.usage,
            cost_usd=job.cost_usd,
            latency_ms={"total": round((job.updated_at - job.created_at) * 1000, 1)},
            partial=job.status != "succeeded" and bool(job.text),
            summary=job.text,
        )
    )


def install(app: FastAPI, services: Services, desk: JobDesk, parse: Callable[..., Awaitable[Any]]) -> None:
    settings = services.settings

    def own(job_id: str) -> str:
        if not is_job_id(job_id):
            raise NotFoundError(f"no job {job_id[:64]!r}")
        return job_id

    @app.post("/v1/jobs", status_code=202, response_model=None)
    async def submit_job(request: Request, authorization: Annotated[str | None, Header()] = None) -> Response:
        principal = await services.authenticate(authorization)
        body: JobRequest = await parse(request, JobRequest)
        if (body.text is None) == (body.s3_uri is None):
            raise InvalidInputError("send exactly one of `text` and `s3_uri`")
        if body.text is not None and not body.text.strip():
            raise InvalidInputError("text: the document is empty")
        key = None
        if body.s3_uri is not None:
            bucket, _, key = body.s3_uri.removeprefix("s3://").partition("/")
            if not body.s3_uri.startswith("s3://") or bucket != settings.documents_bucket:
                raise InvalidInputError(f"s3_uri must name an object in s3://{settings.documents_bucket}/inbox/")
            check_inbox_key(key)
            # Only the caller's own folder, inbox/<user id>/: anybody else's document is as absent
            # as a missing one (the same answer, so that it does not confirm the object exists).
            mine = drop_owner(key) == principal.user_id
            if not mine or await anyio.to_thread.run_sync(desk.documents.head, key) is None:
                raise InvalidInputError(f"no object at {body.s3_uri[:200]}")
        spec, max_output, _ = services.resolve_model(body.model, body.max_output_tokens, principal)
        job = await anyio.to_thread.run_sync(
            desk.submit,
            principal.user_id,
            services.tiers.named(principal.tier),
            body.text,
            key,
            spec,
            body.style,
            max_output,
        )
        correlate(job.job_id, user=pseudonym(principal.user_id))
        annotate(request_id=job.job_id, model=spec.info.id, tier=principal.tier)
        logger.info("job submitted", extra={"correlation_id": job.job_id})
        return accepted(job)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        principal = await services.authenticate(authorization)
        return job_view(await anyio.to_thread.run_sync(desk.jobs.get_owned, own(job_id), principal.user_id))

    @app.get("/v1/jobs/{job_id}/events", response_model=None)
    async def job_events(
        job_id: str,
        authorization: Annotated[str | None, Header()] = None,
        accept: Annotated[str | None, Header()] = None,
    ) -> Response:
        principal = await services.authenticate(authorization)
        await anyio.to_thread.run_sync(desk.jobs.get_owned, own(job_id), principal.user_id)  # 404 before any stream
        limits = services.tiers.named(principal.tier).limits(
            settings.max_input_tokens, settings.default_max_output_tokens
        )

        async def produce(emit: Any) -> None:
            await watch(job_id, principal.user_id, desk, principal.tier, limits, settings.job_poll_s, emit)

        mode: Literal["sse", "json"] = "json" if "application/json" in (accept or "") else "sse"
        return EventStreamResponse(produce, mode=mode, ping_interval_s=settings.ping_interval_s)

    @app.delete("/v1/jobs/{job_id}", status_code=202)
    async def cancel_job(job_id: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        principal = await services.authenticate(authorization)
        job = await anyio.to_thread.run_sync(desk.cancel, own(job_id), principal.user_id)
        correlate(job.job_id, user=pseudonym(principal.user_id))
        logger.info("job cancel requested", extra={"status": job.status})
        return JSONResponse(job_view(job), status_code=202 if job.status == "cancelled" else 200)
