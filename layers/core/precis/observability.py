"""The only Logger, Tracer and Metrics instances, and the telemetry of a finished request.

Logs: Powertools JSON lines. Correlation id = the request or job id: `correlate(id)` puts it on every
log line of the current task or thread (Powertools' thread-safe keys, a ContextVar, so concurrent
streams in one process, and the local stack's functions sharing one, never mix their ids). A user
appears only as `pseudonym(user_id)`; never an API key, a document's text or a summary.

Traces: `stage(name)` and `annotate(...)` mark the stages of the request being served; they cost one
ContextVar read when it is not traced. The gateway's traces are precis.api.tracing; the stage
functions use Powertools' Tracer (`tracer()`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.utilities.jmespath_utils import query as jmespath_query

from precis.domain.jobs import Job, is_job_id
from precis.domain.models import FinishReason, Usage

if TYPE_CHECKING:
    from aws_lambda_powertools import Tracer

    from precis.domain.summarize import Outcome

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "precis")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Precis")

logger = Logger(service=SERVICE)


# Logs ---------------------------------------------------------------------------------------------

_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def correlate(correlation_id: str | None, **keys: object) -> None:
    """Put `correlation_id` (the request or job id) and `keys` on every following log line of the
    current task or thread. None takes a key off."""
    logger.thread_safe_append_keys(correlation_id=correlation_id, **keys)


@contextlib.contextmanager
def correlated(correlation_id: str | None, **keys: object) -> Iterator[None]:
    """`correlate` for a block (one SQS record, one invocation): the keys the task or thread had
    before come back at its end, so nothing of one unit of work is logged with the next."""
    before = dict(logger.thread_safe_get_current_keys())
    correlate(correlation_id, **keys)
    try:
        yield
    finally:
        logger.thread_safe_clear_keys()
        logger.thread_safe_append_keys(**before)


def inject_lambda_context(correlation_id_path: str | None = None) -> Callable[[_Handler], _Handler]:
    """Powertools' `logger.inject_lambda_context` (cold start, function name, memory, ARN and request
    id on every line), with the correlation id (`correlation_id_path` in the event, JMESPath) and the
    invocation's own ids kept per thread. Powertools keeps them in one dict per process: right in
    Lambda, one invocation per sandbox, but the local stack runs every function in one process, many
    at once (a Map state's chunks, jobs side by side), and there they would take each other's ids."""

    def decorate(handler: _Handler) -> _Handler:
        @functools.wraps(handler)
        def invoke(event: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
            found = None
            if correlation_id_path is not None and isinstance(event, dict):
                found = jmespath_query(event, correlation_id_path)
            logger.thread_safe_clear_keys()  # nothing of an earlier invocation on this thread
            with correlated(
                found if isinstance(found, str) else None,
                function_name=getattr(context, "function_name", None),
                function_request_id=getattr(context, "aws_request_id", None),
            ):
                return handler(event, context, *args, **kwargs)

        return cast("_Handler", logger.inject_lambda_context(invoke))

    return decorate


_pseudonym_key = b""


def use_pseudonym_key(key: str) -> None:
    """The deployment's key for pseudonyms (Settings.pseudonym_key, set where services are wired).
    template.yaml gives every function the stack's id: the same in every function of a deployment,
    another in another deployment, and in no log line."""
    global _pseudonym_key
    _pseudonym_key = key.encode()


def pseudonym(user_id: str) -> str:
    """How a user appears in logs: `u_` and 16 hex digits of HMAC-SHA256(deployment key, user id).
    Stable (one user, one pseudonym, in every function and every line), not the user id, and not
    reversible without the key: a user id may be an email address, and a plain hash of one is
    reversed by hashing guesses."""
    return "u_" + hmac.new(_pseudonym_key, user_id.encode(), hashlib.sha256).hexdigest()[:16]


# Traces -------------------------------------------------------------------------------------------

Annotation = str | int | float | bool


class Trace(Protocol):
    """The trace of one request being served (precis.api.tracing.RequestTrace)."""

    def record(self, stage: str, started: float, ended: float, *, failed: bool = False) -> None:
        """A stage that ran from `started` to `ended` (time.monotonic())."""
        ...

    def annotate(self, annotations: dict[str, Annotation]) -> None: ...


#: The trace of the request the current task is serving; None when it is not traced.
current_trace: ContextVar[Trace | None] = ContextVar("precis_current_trace", default=None)


class _Stage:
    __slots__ = ("_name", "_started", "_trace")

    def __init__(self, trace: Trace, name: str) -> None:
        self._trace, self._name, self._started = trace, name, 0.0

    def __enter__(self) -> None:
        self._started = time.monotonic()

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._trace.record(self._name, self._started, time.monotonic(), failed=exc_type is not None)


class _Untraced:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


_UNTRACED = _Untraced()


def stage(name: str) -> AbstractContextManager[None]:
    """`with stage("auth"): ...`: a stage of the request being served, a subsegment of its trace.
    Untraced, it is one ContextVar read and a shared do-nothing context manager."""
    trace = current_trace.get()
    return _UNTRACED if trace is None else _Stage(trace, name)


def record_stage(name: str, started: float, ended: float | None = None) -> None:
    """A stage that ran from `started` until `ended` (time.monotonic(); by default now)."""
    trace = current_trace.get()
    if trace is not None:
        trace.record(name, started, time.monotonic() if ended is None else ended)


def annotate(**annotations: Annotation) -> None:
    """Searchable annotations of what is being traced: request_id, model, tier. Never a user id, a
    key or text. A stage function's go on its Tracer's current subsegment."""
    trace = current_trace.get()
    if trace is not None:
        trace.annotate(annotations)
    elif _stage_tracer is not None:
        with contextlib.suppress(Exception):  # a trace must never fail a job
            for key, value in annotations.items():
                _stage_tracer.put_annotation(key, cast("Any", value))  # int and float are numbers.Number


_stage_tracer: Tracer | None = None


@cache
def tracer() -> Tracer:
    """The Tracer, for handlers the Lambda runtime invokes directly (the job stages). Created on
    first use: importing the X-Ray SDK costs about 0.4 s, and the gateway has no use for it (behind
    the web adapter the app runs in a process of its own, outside the runtime's per-invocation trace
    context: see precis.api.tracing)."""
    global _stage_tracer
    from aws_lambda_powertools import Tracer

    _stage_tracer = Tracer(service=SERVICE)
    return _stage_tracer


class RequestTelemetry:
    """Implements the domain's `Telemetry` port: one log line per request, and its EMF records
    (`REQUEST`, and `REQUEST_STAGE` per stage) in one write.

    Each record is its own (see `emf_line`): the shared `Metrics` instance would mix the dimensions
    of concurrent streams in one process. Dimensions stay bounded (model, tier, stage, outcome):
    never the user id.
    """

    def record(self, outcome: Outcome) -> None:
        summary = outcome.summary
        logger.info(
            "request finished",
            extra={
                "correlation_id": outcome.request_id,
                "model": outcome.model,
                "tier": outcome.tier,
                "finish_reason": summary.finish_reason.value,
                "partial": summary.partial,
                "input_tokens": outcome.usage.input_tokens,
                "output_tokens": outcome.usage.output_tokens,
                "cost_usd": float(outcome.cost_usd),
                "latency_ms": outcome.latency_ms,
                "error_code": outcome.error.code if outcome.error else None,
                "client_disconnected": outcome.disconnected,
            },
        )
        if not is_metrics_disabled():
            publish(request_records(outcome))


# Metrics ------------------------------------------------------------------------------------------
#
# The metric set, designed once, as data: what is emitted, in which unit, under which dimension sets
# and from where. template.yaml's dashboard and alarms, README.md and the tests are checked against
# it. A CloudWatch metric is its namespace, name and full set of dimensions, and alarms cannot use
# SEARCH: so each record is emitted under every dimension set a reader needs (EMF allows several per
# record, Powertools' `add_dimensions`), a coarse one ([service]) for the alarms and totals and finer
# ones for the breakdowns. Every dimension is bounded; no user, key, request or job id is ever one
# (the ids go in as EMF properties, searchable in Logs Insights, never aggregated).


@dataclass(frozen=True)
class Metric:
    name: str
    unit: MetricUnit
    meaning: str


@dataclass(frozen=True)
class MetricRecord:
    """Metrics emitted together as one EMF record, each under every one of `dimension_sets`."""

    name: str
    emitted_by: str
    metrics: tuple[Metric, ...]
    dimension_sets: tuple[tuple[str, ...], ...]
    #: The only values a dimension of this record takes, where they are fixed in code (`model` is
    #: bounded by the catalog, `tier` by the tiers file, `service` is SERVICE).
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @functools.cached_property
    def dimension_names(self) -> tuple[str, ...]:
        """Every dimension the record has a value for: those of all its sets."""
        return tuple(dict.fromkeys(name for names in self.dimension_sets for name in names))


OUTCOMES = tuple(reason.value for reason in FinishReason)
#: The streaming path's stages, as `Outcome.latency_ms` names them ("ttft" is `TimeToFirstToken`).
REQUEST_STAGES = ("preprocess", "map", "reduce", "infer", "postprocess", "total")
#: The asynchronous path's stages: one Lambda function each (see `timed_stage`).
JOB_STAGES = ("split", "summarize_chunk", "combine", "postprocess", "record_failure")
#: Admission's limits (`RateLimitedError.limit`).
LIMITS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "max_concurrent_streams",
    "max_concurrent_jobs",
    "queue_backlog",
)

_COUNT, _MS = MetricUnit.Count, MetricUnit.Milliseconds
_TOKENS = (
    Metric("InputTokens", _COUNT, "input tokens billed, as the provider reported them"),
    Metric("OutputTokens", _COUNT, "output tokens billed, as the provider reported them"),
    # CloudWatch has no currency unit.
    Metric("CostUSD", MetricUnit.NoUnit, "cost in USD, from the reported usage and the price file"),
)
_ENDINGS = (
    Metric("Failures", _COUNT, "1 when it ended in an error or a timeout"),
    Metric("Cancels", _COUNT, "1 when it was cancelled (or its client went away)"),
    Metric("PartialResults", _COUNT, "1 when it ended with a partial summary"),
)

REQUEST = MetricRecord(
    "request",
    "the gateway (RequestTelemetry), once per streaming request, however it ended",
    (
        Metric("Requests", _COUNT, "1 per request"),
        *_ENDINGS,
        Metric("Retries", _COUNT, "model calls made again after a transient failure"),
        *_TOKENS,
        Metric("TimeToFirstToken", _MS, "from the start of the stream to its first token (when there was one)"),
    ),
    (("service",), ("service", "model"), ("service", "tier"), ("service", "model", "tier", "outcome")),
    {"outcome": OUTCOMES},
)
REQUEST_STAGE = MetricRecord(
    "request_stage",
    "the gateway (RequestTelemetry), once per stage a streaming request went through",
    (Metric("StageLatency", _MS, "time spent in the stage"),),
    (("service", "stage"), ("service", "stage", "model")),
    {"stage": REQUEST_STAGES},
)
JOB = MetricRecord(
    "job",
    "where a job ends, once: Postprocess And Store (succeeded), Record The Failure (failed), the gateway "
    "(DELETE /v1/jobs: cancelled), the starter (an S3 drop refused at intake: failed)",
    (
        Metric("Jobs", _COUNT, "1 per job"),
        *_ENDINGS,
        *_TOKENS,
        Metric("JobLatency", _MS, "from the job's creation to its end"),
    ),
    (("service",), ("service", "model"), ("service", "model", "outcome")),
    {"outcome": OUTCOMES},
)
JOB_STAGE = MetricRecord(
    "job_stage",
    "every invocation of a job stage's function (timed_stage), whether it succeeded or raised",
    (Metric("JobStageLatency", _MS, "the stage function's run time"),),
    (("service", "stage"),),
    {"stage": JOB_STAGES},
)
JOB_START = MetricRecord(
    "job_start",
    "the starter, when it starts a job's execution (once per job)",
    (Metric("QueueWait", _MS, "from the job's queueing (the earlier of its creation and its message) to its start"),),
    (("service",),),
)
THROTTLE = MetricRecord(
    "throttle",
    "the gateway, at every 429 of admission",
    (Metric("Throttles", _COUNT, "1 per request or job refused by a limit"),),
    (("service",), ("service", "limit")),
    {"limit": (*LIMITS, "other")},
)

#: Everything precis emits, in the `NAMESPACE`.
REGISTRY: tuple[MetricRecord, ...] = (REQUEST, REQUEST_STAGE, JOB, JOB_STAGE, JOB_START, THROTTLE)


def emitted_metrics() -> dict[str, set[frozenset[str]]]:
    """Each metric name and the dimension sets it is emitted under (what CloudWatch can be asked for)."""
    found: dict[str, set[frozenset[str]]] = {}
    for record in REGISTRY:
        for metric in record.metrics:
            found.setdefault(metric.name, set()).update(frozenset(names) for names in record.dimension_sets)
    return found


@cache
def _catalog_ids() -> frozenset[str]:
    from precis.domain.catalog import Catalog

    return frozenset(Catalog.bundled().models)


def model_dimension(name: str) -> str:
    """A model as a dimension: its catalog id, without the options a request may add to it
    (`local?ttft_ms=500`), so that the dimension stays bounded; anything else is `other`."""
    model_id = name.partition("?")[0]
    return model_id if model_id in _catalog_ids() else "other"


def emf_line(
    record: MetricRecord, dimensions: dict[str, str], values: dict[str, float], properties: dict[str, Any]
) -> str:
    """One EMF record (a JSON line) of `record`'s metrics (those in `values`), under each of its
    dimension sets. `properties` are searchable in the log line, never dimensions."""
    names = tuple(metric.name for metric in record.metrics if metric.name in values)
    head = _directive(record, names)
    body = {
        "service": SERVICE,
        **{name: dimensions[name] for name in record.dimension_names if name != "service"},
        **properties,
        **{name: [float(values[name])] for name in names},
    }
    return f"{head}{int(time.time() * 1000)}}},{json.dumps(body, separators=(',', ':'))[1:]}"


_DIRECTIVES: dict[tuple[str, tuple[str, ...]], str] = {}


def _directive(record: MetricRecord, names: tuple[str, ...]) -> str:
    """The start of the record's EMF line, up to its timestamp: the metric directive (namespace,
    dimension sets, metric names and units) as Powertools validates and serializes it, built once
    per record and set of metrics. Building it every time would cost about 100 µs a record."""
    key = (record.name, names)
    head = _DIRECTIVES.get(key)
    if head is None:
        metrics = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        first, *others = record.dimension_sets
        for name in first:
            metrics.add_dimension(name, name)
        for dimension_names in others:
            metrics.add_dimensions(**{name: name for name in dimension_names})
        for metric in record.metrics:
            if metric.name in names:
                metrics.add_metric(metric.name, metric.unit, 0)
        directive = metrics.serialize_metric_set()["_aws"]["CloudWatchMetrics"]
        head = '{"_aws":{"CloudWatchMetrics":' + json.dumps(directive, separators=(",", ":")) + ',"Timestamp":'
        _DIRECTIVES[key] = head
    return head


def publish(lines: list[str]) -> None:
    """Write EMF records to stdout, where CloudWatch Logs extracts them, in one write. Flushed:
    behind the web adapter stdout is a pipe, block-buffered, and a record would otherwise wait
    there for kilobytes of others."""
    if lines and not is_metrics_disabled():
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def request_records(outcome: Outcome) -> list[str]:
    """A finished streaming request's EMF records: the request's, then one per stage."""
    finish = outcome.summary.finish_reason.value
    model = model_dimension(outcome.model)
    values: dict[str, float] = {
        "Requests": 1,
        "Failures": int(finish in ("error", "timeout")),
        "Cancels": int(finish == "cancelled"),
        "PartialResults": int(outcome.summary.partial),
        "Retries": outcome.retries,
        "InputTokens": outcome.usage.input_tokens,
        "OutputTokens": outcome.usage.output_tokens,
        "CostUSD": float(outcome.cost_usd),
    }
    if "ttft" in outcome.latency_ms:
        values["TimeToFirstToken"] = outcome.latency_ms["ttft"]
    ids = {"request_id": outcome.request_id}
    records = [emf_line(REQUEST, {"model": model, "tier": outcome.tier, "outcome": finish}, values, ids)]
    for stage, ms in outcome.latency_ms.items():
        if stage in REQUEST_STAGES:
            records.append(emf_line(REQUEST_STAGE, {"stage": stage, "model": model}, {"StageLatency": ms}, ids))
    return records


class JobMetrics:
    """Implements the domain's `JobTelemetry` port: a job's queue wait when it starts, and its
    record when it ends (once: callers report only the transition they made)."""

    def job_started(self, job: Job, queued_at: float) -> None:
        wait_ms = max(time.time() - queued_at, 0.0) * 1000
        publish([emf_line(JOB_START, {}, {"QueueWait": round(wait_ms, 2)}, {"job_id": job.job_id})])

    def job_finished(
        self, job: Job, finish_reason: FinishReason, usage: Usage, cost_usd: Decimal, *, partial: bool = False
    ) -> None:
        finish = finish_reason.value
        values: dict[str, float] = {
            "Jobs": 1,
            "Failures": int(finish in ("error", "timeout")),
            "Cancels": int(finish == "cancelled"),
            "PartialResults": int(partial),
            "InputTokens": usage.input_tokens,
            "OutputTokens": usage.output_tokens,
            "CostUSD": float(cost_usd),
            "JobLatency": round(max(time.time() - job.created_at, 0.0) * 1000, 2),
        }
        dimensions = {"model": model_dimension(job.model), "outcome": finish}
        publish([emf_line(JOB, dimensions, values, {"job_id": job.job_id})])


def throttled(limit: str) -> None:
    """One 429 of admission, by the limit that refused it."""
    if not is_metrics_disabled():
        publish([emf_line(THROTTLE, {"limit": limit if limit in LIMITS else "other"}, {"Throttles": 1}, {})])


Handler = TypeVar("Handler", bound=Callable[..., Any])


def timed_stage(stage: str) -> Callable[[Handler], Handler]:
    """Decorate a job stage's handler: its run time as `JobStageLatency` (stage = `stage`), also
    when it raises (Step Functions then retries or catches it)."""
    if stage not in JOB_STAGES:
        raise ValueError(f"unknown job stage {stage!r}: add it to JOB_STAGES")

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def timed(event: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return handler(event, *args, **kwargs)
            finally:
                ms = round((time.perf_counter() - started) * 1000, 2)
                job_id = event.get("job_id") if isinstance(event, dict) else None
                ids = {"job_id": job_id} if isinstance(job_id, str) and is_job_id(job_id) else {}
                publish([emf_line(JOB_STAGE, {"stage": stage}, {"JobStageLatency": ms}, ids)])

        return cast("Handler", timed)

    return decorate
