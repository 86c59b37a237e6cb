"""The gateway: `POST /v1/summarize` and the request endpoints, in one FastAPI app.

`create_app(services)` wires nothing itself: services (stores, providers, summarizer) are built by
`precis.wiring` in Lambda and by the local stack on a laptop, then passed in.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

import anyio.to_thread
from fastapi import FastAPI, Header, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.responses import JSONResponse, Response

from precis.adapters.dynamodb import KeyStore, Principal, RequestRecord, RequestStore, document_sha256
from precis.adapters.ledger import LedgerStore
from precis.adapters.quotas import QuotaStore
from precis.api import errors
from precis.api import jobs as jobs_api
from precis.api import usage as usage_api
from precis.api.jobs import JobDesk, accepted
from precis.api.sse import EventStreamResponse
from precis.domain.catalog import Catalog, ModelSpec
from precis.domain.chunking import plan_chunks
from precis.domain.errors import InputTooLargeError, InvalidInputError, NotFoundError, UnauthenticatedError
from precis.domain.inference import MAP_OUTPUT_TOKENS, chunk_budget
from precis.domain.models import (
    ChunkPlan,
    Document,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    Limits,
    MetaEvent,
    StreamEvent,
    Style,
    TokenEvent,
)
from precis.domain.prompts import scaffold_tokens
from precis.domain.resume import Resumption, reserved_tokens
from precis.domain.summarize import Summarizer, SummaryTask
from precis.domain.tiers import Tiers
from precis.domain.tokens import encoding
from precis.observability import SERVICE, annotate, correlate, logger, pseudonym, stage
from precis.providers import ProviderFactory
from precis.settings import Settings

Body = TypeVar("Body", bound=BaseModel)
_REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
_API_VERSION = "2026-11-27"


class SummarizeRequest(BaseModel):
    """Body of `POST /v1/summarize`."""

    model_config = ConfigDict(extra="forbid")

    text: Annotated[StrictStr, Field(min_length=1, description="The document to summarize (UTF-8).")]
    style: Style = Style.PARAGRAPH
    max_output_tokens: StrictInt | None = Field(default=None, ge=1, description="Defaults to the service's default.")
    model: StrictStr | None = Field(default=None, max_length=256, description="Catalog id, e.g. `local?ttft_ms=500`.")
    resume_from: StrictStr | None = Field(
        default=None,
        max_length=64,
        description="Continue this partial request (`req_...`) with the same `text`; only the new tokens are charged.",
    )


@dataclass
class Services:
    settings: Settings
    keys: KeyStore
    requests: RequestStore
    quotas: QuotaStore
    providers: ProviderFactory
    summarizer: Summarizer
    catalog: Catalog = field(default_factory=Catalog.bundled)
    tiers: Tiers = field(default_factory=Tiers.load)
    #: The cost ledger that `GET /v1/usage` reads (the request store writes it).
    ledger: LedgerStore | None = None
    streams_in_flight: int = 0
    _key_cache: dict[str, tuple[float, Principal]] = field(default_factory=dict)

    def resolve_model(
        self, name: str | None, max_output_tokens: int | None, principal: Principal
    ) -> tuple[ModelSpec, int, Limits]:
        """The model a request asks for (or the default), its output budget, and the caller's limits
        (its tier's, capped by the deployment's and the model's), checked."""
        spec = self.catalog.resolve(name or self.settings.default_model)
        self.providers.validate(spec)
        limits = self.tiers.named(principal.tier).limits(self.settings.max_input_tokens, spec.info.max_output_tokens)
        limit = limits.max_output_tokens
        max_output = max_output_tokens or min(self.settings.default_max_output_tokens, limit)
        if max_output > limit:
            raise InvalidInputError(
                f"max_output_tokens: at most {limit} for model {spec.info.id!r} in the {principal.tier} tier"
            )
        return spec, max_output, limits

    def fallbacks(
        self, tier: str, spec: ModelSpec, plan: ChunkPlan, style: Style, max_output: int
    ) -> tuple[ModelSpec, ...]:
        """The tier's fallback models that can stand in for `spec` on this request: of the same
        provider, with the room for its largest call and its output budget."""
        largest = plan.chunk_tokens if len(plan.chunks) > 1 else plan.total_tokens
        needed = largest + scaffold_tokens(style, max_output) + max(max_output, MAP_OUTPUT_TOKENS)
        chain = []
        for name in self.tiers.named(tier).fallback_models:
            fallback = self.catalog.resolve(name)
            info = fallback.info
            if (
                fallback.name != spec.name
                and info.provider == spec.info.provider
                and info.context_window >= needed
                and info.max_output_tokens >= max_output
            ):
                chain.append(fallback)
        return tuple(chain)

    async def authenticate(self, authorization: str | None) -> Principal:
        with stage("auth"):
            return await self._authenticate(authorization)

    async def _authenticate(self, authorization: str | None) -> Principal:
        scheme, _, api_key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not api_key.strip():
            raise UnauthenticatedError("missing API key: send `Authorization: Bearer <key>`")
        api_key = api_key.strip()
        cached = self._key_cache.get(api_key)
        if cached is not None and time.monotonic() - cached[0] < self.settings.key_cache_s:
            return cached[1]
        principal = await anyio.to_thread.run_sync(self.keys.find, api_key)
        if principal is None:
            raise UnauthenticatedError("unknown or revoked API key")
        self._key_cache[api_key] = (time.monotonic(), principal)
        return principal


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON, checked in the order a client can fix it: type, size, encoding, syntax."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise _UnsupportedMediaType(f"send the body as application/json, not {content_type or 'nothing'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InputTooLargeError(f"the body is larger than {max_bytes} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise InputTooLargeError(f"the body is larger than {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRequest("invalid_encoding", f"the body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadRequest("invalid_json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except RecursionError as exc:
        raise _BadRequest("invalid_json", "the body's JSON is nested too deeply") from exc
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise _BadRequest("invalid_json", f"the body is not valid JSON: {exc}") from exc


class _BadRequest(InvalidInputError):
    status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _UnsupportedMediaType(InvalidInputError):
    code = "unsupported_media_type"
    status = 415


def validate_body(raw: Any, model: type[Body]) -> Body:
    if not isinstance(raw, dict):
        raise InvalidInputError("the body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidInputError(problems) from exc


def _wants_json(accept: str | None) -> bool:
    accept = (accept or "").lower()
    return "application/json" in accept and "text/event-stream" not in accept


def _replay_events(record: RequestRecord, tier: str, limits: Limits) -> list[StreamEvent]:
    """A finished request, told again as a stream: the stored text in one token, then done."""
    events: list[StreamEvent] = [
        MetaEvent(
            request_id=record.request_id,
            model=record.model,
            input_tokens=record.usage.input_tokens,
            max_output_tokens=limits.max_output_tokens,
            chunks=0,
            tier=tier,
            limits=limits,
            replayed=True,
            resumed_from=record.resumed_from,
        )
    ]
    if record.text:
        events.append(TokenEvent(text=record.text, index=0))
    if record.error is not None:
        events.append(ErrorEvent(**record.error.model_dump(), partial=record.partial))
    events.append(
        DoneEvent(
            finish_reason=record.finish_reason or FinishReason.ERROR,
            usage=record.usage,
            cost_usd=record.cost_usd,
            latency_ms=record.latency_ms,
            partial=record.partial,
            summary=record.text,
            model=record.model,
        )
    )
    return events


def create_app(services: Services) -> FastAPI:
    settings = services.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Load the tokenizer before the first request, not during it: under the Lambda Web Adapter
        # this runs in the init phase, before the readiness check passes.
        await anyio.to_thread.run_sync(encoding)
        async with anyio.create_task_group() as tg:
            tg.start_soon(services.summarizer.cancels.run)
            yield
            tg.cancel_scope.cancel()

    app = FastAPI(
        lifespan=lifespan,
        title="precis",
        version=_API_VERSION,
        description="Streaming summarization. See README.md for the streaming contract.",
    )
    errors.install(app)
    if settings.tracing:
        from precis.api.tracing import TracingMiddleware  # the X-Ray SDK, only when traced

        app.add_middleware(TracingMiddleware, name=f"{SERVICE}-gateway")
    app.state.services = services
    desk = JobDesk(settings)

    async def parse_body(request: Request, model: type[Body]) -> Body:
        return validate_body(await read_json(request, settings.max_body_bytes), model)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": _API_VERSION, "streams_in_flight": services.streams_in_flight}

    @app.post(
        "/v1/summarize",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SummarizeRequest.model_json_schema()}},
            }
        },
        response_model=None,
    )
    async def summarize(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        accept: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
        lambda_context: Annotated[str | None, Header(alias="x-amzn-lambda-context")] = None,
    ) -> Response:
        principal = await services.authenticate(authorization)
        raw = await read_json(request, settings.max_body_bytes)
        body = validate_body(raw, SummarizeRequest)
        if not body.text.strip():
            raise InvalidInputError("text: the document is empty")
        fingerprint_of_text = document_sha256(body.text)
        resumed: RequestRecord | None = None
        if body.resume_from is not None:
            resumed = await anyio.to_thread.run_sync(
                services.requests.resumable, _known(body.resume_from), principal.user_id, fingerprint_of_text
            )
            body = _resuming(body, resumed)
        spec, max_output, limits = services.resolve_model(body.model, body.max_output_tokens, principal)
        info = spec.info
        mode: Literal["sse", "json"] = "json" if _wants_json(accept) else "sse"

        request_id = f"req_{secrets.token_hex(16)}"
        # Every log line of the request carries its id and its user's pseudonym (never the user id).
        correlate(request_id, user=pseudonym(principal.user_id))
        annotate(request_id=request_id, model=info.id, tier=principal.tier)
        if idempotency_key is not None:
            fingerprint = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
            existing = await anyio.to_thread.run_sync(
                services.requests.claim_idempotency_key, principal.user_id, idempotency_key, fingerprint, request_id
            )
            if existing is not None:
                handed_off = await anyio.to_thread.run_sync(desk.jobs.get, _job_id_for(existing))
                if handed_off is not None and handed_off.owner == principal.user_id:
                    return accepted(handed_off, handed_off=True)
                record = await anyio.to_thread.run_sync(services.requests.replayable, existing, principal.user_id)
                replay = _replay_events(record, principal.tier, limits)

                async def replay_stored(emit: Any) -> None:
                    for event in replay:
                        await emit(event)

                return EventStreamResponse(
                    replay_stored,
                    mode=mode,
                    ping_interval_s=settings.ping_interval_s,
                    headers={"x-request-id": record.request_id, "idempotent-replayed": "true"},
                )

        try:
            with stage("preprocess"):
                task = await _prepare(services, principal, body, spec, max_output, limits, request_id)
            if resumed is not None:
                resume = Resumption(request_id=resumed.request_id, text=resumed.text, final_inputs=resumed.final_inputs)
                task = task.model_copy(update={"resume": resume})
            elif task.document_tokens > settings.async_threshold_tokens:
                # Minutes of map-reduce do not belong in one streaming Lambda: hand over to the job
                # path (its id derived from the request's, so an Idempotency-Key retry finds it).
                job = await anyio.to_thread.run_sync(
                    partial(desk.submit, job_id=_job_id_for(request_id)),
                    principal.user_id,
                    services.tiers.named(principal.tier),
                    body.text,
                    None,
                    spec,
                    body.style,
                    max_output,
                )
                logger.info("request handed over to a job", extra={"job_id": job.job_id})
                return accepted(job, handed_off=True)
            # Admitted and recorded in one transaction: over a limit, nothing is written.
            creation = services.requests.creation(
                request_id,
                principal.user_id,
                info.id,
                body.style.value,
                task.document_tokens,
                document_sha256=fingerprint_of_text,
                max_output_tokens=max_output,
                resumed_from=body.resume_from,
                final_inputs=None if task.resume is None else task.resume.final_inputs,
            )
            with stage("admission"):
                reservation = await anyio.to_thread.run_sync(
                    partial(services.quotas.reserve, record=creation),
                    principal.user_id,
                    services.tiers.named(principal.tier),
                    reserved_tokens(task.plan, task.style, task.max_output_tokens, task.resume),
                    "streams",
                )
            task = task.model_copy(
                update={"reservation": reservation, "timeout_s": _time_left(settings, lambda_context)}
            )
        except BaseException:
            if idempotency_key is not None:
                await anyio.to_thread.run_sync(
                    services.requests.release_idempotency_key, principal.user_id, idempotency_key
                )
            raise

        async def run(emit: Any) -> None:
            correlate(request_id)
            services.streams_in_flight += 1
            try:
                await services.summarizer.run(task, emit)
            finally:
                services.streams_in_flight -= 1

        return EventStreamResponse(
            run, mode=mode, ping_interval_s=settings.ping_interval_s, headers={"x-request-id": request_id}
        )

    jobs_api.install(app, services, desk, parse_body)
    usage_api.install(app, services)

    @app.get("/v1/requests/{request_id}")
    async def get_request(request_id: str, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        principal = await services.authenticate(authorization)
        record = await anyio.to_thread.run_sync(services.requests.get, _known(request_id), principal.user_id)
        return record.model_dump(mode="json")

    @app.post("/v1/requests/{request_id}/cancel")
    async def cancel_request(request_id: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        principal = await services.authenticate(authorization)
        record = await anyio.to_thread.run_sync(services.requests.request_cancel, _known(request_id), principal.user_id)
        correlate(request_id, user=pseudonym(principal.user_id))
        logger.info("cancel requested", extra={"correlation_id": request_id, "status": record.status})
        if record.status == "in_progress":
            return JSONResponse({"request_id": request_id, "status": "cancelling"}, status_code=202)
        return JSONResponse({"request_id": request_id, "status": record.status}, status_code=200)

    return app


def _time_left(settings: Settings, lambda_context: str | None) -> float:
    """Seconds this stream may run: the configured limit, and under the Lambda Web Adapter no later
    than the invocation's deadline (its `x-amzn-lambda-context` header) less a margin for `done`."""
    limit = settings.stream_deadline_s
    try:
        deadline_ms = float(json.loads(lambda_context or "{}").get("deadline_ms", 0))
    except (ValueError, AttributeError):
        deadline_ms = 0
    if deadline_ms:
        limit = min(limit, deadline_ms / 1000 - time.time() - settings.deadline_margin_s)
    return max(limit, 0.0)


def _resuming(body: SummarizeRequest, record: RequestRecord) -> SummarizeRequest:
    """A resume runs with the style and output budget of the request it continues (its summary so
    far was written for them), and unless it names another, with the model that served it."""
    style, max_output = Style(record.style), record.max_output_tokens
    if "style" in body.model_fields_set and body.style is not style:
        raise InvalidInputError(f"style: the request being resumed is {style.value!r}; leave it out or send the same")
    if body.max_output_tokens is not None and body.max_output_tokens != max_output:
        raise InvalidInputError(
            f"max_output_tokens: the request being resumed has {max_output}; leave it out or send the same"
        )
    model = body.model or record.model
    return body.model_copy(update={"style": style, "max_output_tokens": max_output, "model": model})


def _job_id_for(request_id: str) -> str:
    return "job_" + request_id.removeprefix("req_")


def _known(request_id: str) -> str:
    """A request id of the right shape; anything else is as unknown as a missing one (404)."""
    if not _REQUEST_ID.match(request_id):
        raise NotFoundError(f"no request {request_id[:64]!r}")
    return request_id


async def _prepare(
    services: Services,
    principal: Principal,
    body: SummarizeRequest,
    spec: ModelSpec,
    max_output: int,
    limits: Limits,
    request_id: str,
) -> SummaryTask:
    """Preprocess: count and chunk the document against the model's budget (off the event loop:
    a 200k-token document takes a few hundred milliseconds to tokenize)."""
    started = time.monotonic()
    chunk_tokens, overlap = chunk_budget(spec.info, body.style, max_output, limits.context_tokens)
    plan = await anyio.to_thread.run_sync(plan_chunks, Document(text=body.text), chunk_tokens, overlap)
    if plan.total_tokens > limits.max_input_tokens:
        raise InputTooLargeError(f"the document has {plan.total_tokens} tokens; the limit is {limits.max_input_tokens}")
    return SummaryTask(
        request_id=request_id,
        user_id=principal.user_id,
        tier=principal.tier,
        model=spec,
        style=body.style,
        max_output_tokens=max_output,
        plan=plan,
        limits=limits,
        document_tokens=plan.total_tokens,
        preprocess_ms=(time.monotonic() - started) * 1000,
        fallbacks=services.fallbacks(principal.tier, spec, plan, body.style, max_output),
    )
