"""The metric set (precis.observability.REGISTRY) and the EMF records a streamed request emits: a real
`Summarizer` run with `RequestTelemetry`, its stdout parsed as CloudWatch would read it."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import pytest
from aws_lambda_powertools.metrics import EphemeralMetrics

from precis import observability
from precis.adapters.quotas import QuotaStore
from precis.domain.cancellation import CancelWatch
from precis.domain.catalog import Catalog, ModelSpec
from precis.domain.models import FinishReason, StreamEvent, Style, Summary, Usage
from precis.domain.ports import ModelProvider
from precis.domain.retry import RetryPolicy
from precis.domain.summarize import Outcome, Summarizer, SummaryTask
from precis.domain.tiers import Tiers
from precis.observability import (
    JOB_STAGES,
    LIMITS,
    OUTCOMES,
    REGISTRY,
    REQUEST,
    REQUEST_STAGE,
    REQUEST_STAGES,
    RequestTelemetry,
    emf_line,
    request_records,
)
from precis.providers import ProviderFactory
from precis.providers.local import LocalModel
from tests.support.emf import Emitted, by_name, metrics
from tests.unit.test_chunking import python_docs
from tests.unit.test_summarizer import DOC, MemoryJournal, make_task

pytestmark = pytest.mark.anyio

#: Dimensions that stay bounded whatever the traffic; anything else (a user, key, request or job
#: id) would make a metric per value.
BOUNDED = {"service", "model", "tier", "stage", "outcome", "limit"}
USER = "user-7f3a9c-metrics-probe"


class PricedLocal:
    """Serves any catalog model with the local summarizer, so that a run is real (tokens streamed,
    usage reported) and priced at that model's price."""

    def __init__(self) -> None:
        self.local = ProviderFactory()

    def build(self, spec: ModelSpec) -> ModelProvider:
        if spec.info.provider == "local":
            return self.local.build(spec)
        return LocalModel.from_options({})


async def summarize(task: SummaryTask, journal: MemoryJournal | None = None, **options: Any) -> Outcome:
    journal = journal or MemoryJournal()
    summarizer = Summarizer(
        PricedLocal(),
        journal,
        RequestTelemetry(),
        CancelWatch(journal, interval_s=0.02),
        map_concurrency=3,
        checkpoint_interval_s=0.05,
        retry_policy=RetryPolicy(base_delay_s=0.01),
        **options,
    )

    async def emit(event: StreamEvent) -> None:
        pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(summarizer.cancels.run)
        with anyio.fail_after(10):
            outcome = await summarizer.run(task, emit)
        tg.cancel_scope.cancel()
    return outcome


def as_user(task: SummaryTask, tier: str = "pro") -> SummaryTask:
    return task.model_copy(update={"user_id": USER, "tier": tier})


def split(emitted: list[Emitted]) -> tuple[dict[str, Emitted], dict[str, Emitted]]:
    """The request record's metrics by name, and the stage records' by stage."""
    request = [m for m in emitted if m.name != "StageLatency"]
    stages = {m.dimensions["stage"]: m for m in emitted if m.name == "StageLatency"}
    assert len(stages) == len([m for m in emitted if m.name == "StageLatency"]), "one record per stage"
    return by_name(request), stages


def assert_matches_registry(emitted: list[Emitted]) -> None:
    """Each metric of a stream as the registry declares it: namespace, unit, and exactly its record's
    dimension sets."""
    for metric in emitted:
        record = REQUEST_STAGE if metric.name == "StageLatency" else REQUEST
        [declared] = [m for m in record.metrics if m.name == metric.name]
        assert metric.namespace == "Precis"
        assert metric.unit == declared.unit.value
        assert [tuple(d) for d in metric.dimension_sets] == list(record.dimension_sets)
        assert metric.dimensions["service"] == "precis"
        for name, allowed in record.values.items():
            assert metric.dimensions[name] in allowed, (metric.name, name, metric.dimensions[name])


def assert_never_the_user(stdout: str) -> None:
    emitted = metrics(stdout)
    assert emitted, "expected EMF records"
    for metric in emitted:
        assert set(metric.dimensions) <= BOUNDED
        assert USER not in json.dumps(metric.record), "the user id must not reach a metric record at all"


# The registry -----------------------------------------------------------------------------------


def test_every_dimension_is_bounded_and_every_set_names_the_service() -> None:
    for record in REGISTRY:
        assert record.dimension_sets, record.name
        for names in record.dimension_sets:
            assert names[0] == "service" and len(set(names)) == len(names), (record.name, names)
            assert set(names) <= BOUNDED, (record.name, names)
        assert set(record.values) <= set(record.dimension_names), record.name
    assert not {"user", "user_id", "owner", "key", "request_id", "job_id"} & {
        name for record in REGISTRY for name in record.dimension_names
    }


def test_a_metric_has_one_unit_and_one_meaning_wherever_it_is_emitted() -> None:
    seen: dict[str, Any] = {}
    for record in REGISTRY:
        names = [m.name for m in record.metrics]
        assert len(names) == len(set(names)), record.name
        for metric in record.metrics:
            assert seen.setdefault(metric.name, metric) == metric, metric.name
    assert len({record.name for record in REGISTRY}) == len(REGISTRY)


def test_bounded_values_are_those_the_code_produces() -> None:
    assert set(OUTCOMES) == {reason.value for reason in FinishReason}
    assert {"preprocess", "infer", "postprocess", "total"} <= set(REQUEST_STAGES)
    assert len(JOB_STAGES) == 5
    # Every limit admission can refuse by (the backlog's is the job desk's own).
    tier, moment = Tiers.load().named("free"), datetime.now(UTC)
    refused = {
        QuotaStore._rate_limited(limit, tier, slot, moment).limit
        for limit in ("max_concurrent", "tokens_per_day", "requests_per_minute", "tokens_per_minute")
        for slot in ("streams", "jobs")
    }
    assert refused | {"queue_backlog"} == set(LIMITS)


def test_emitted_metrics_lists_every_dimension_set_of_every_metric() -> None:
    emitted = observability.emitted_metrics()
    assert emitted["TimeToFirstToken"] == {frozenset(names) for names in REQUEST.dimension_sets}
    assert emitted["StageLatency"] == {frozenset({"service", "stage"}), frozenset({"service", "stage", "model"})}
    # Tokens and cost of streams and jobs add up under the sets both emit ([service], [service, model]).
    assert {frozenset({"service"}), frozenset({"service", "model"})} <= emitted["CostUSD"]
    assert frozenset({"service", "model", "outcome"}) in emitted["CostUSD"]  # jobs have no tier


def test_a_record_is_what_powertools_itself_serializes() -> None:
    """The directive is Powertools' (built once and kept); the rest of the line must match what
    Powertools would write for the same metrics."""
    dimensions = {"model": "local", "tier": "pro", "outcome": "stop"}
    values = {"Requests": 1, "InputTokens": 120, "CostUSD": 0.0125, "TimeToFirstToken": 35.5}
    ours = json.loads(emf_line(REQUEST, dimensions, values, {"request_id": "req_1"}))

    reference = EphemeralMetrics(namespace="Precis", service="precis")
    for name in REQUEST.dimension_sets[0]:
        reference.add_dimension(name, "precis")
    for names in REQUEST.dimension_sets[1:]:
        reference.add_dimensions(**{name: {**dimensions, "service": "precis"}[name] for name in names})
    for metric in REQUEST.metrics:
        if metric.name in values:
            reference.add_metric(metric.name, metric.unit, values[metric.name])
    reference.add_metadata("request_id", "req_1")
    theirs = reference.serialize_metric_set()

    assert abs(ours["_aws"].pop("Timestamp") - theirs["_aws"].pop("Timestamp")) < 5_000
    assert ours == json.loads(json.dumps(theirs))


def test_a_requests_records_cost_little(capsys: pytest.CaptureFixture[str]) -> None:
    """Measured once: one request's records (the request and five stages), written."""
    outcome = synthetic_outcome(FinishReason.STOP)
    observability.publish(request_records(outcome))  # the directives are built on first use
    started = time.perf_counter()
    for _ in range(200):
        observability.publish(request_records(outcome))
    per_request_us = (time.perf_counter() - started) / 200 * 1e6
    capsys.readouterr()
    assert per_request_us < 1_000, f"{per_request_us:.0f} µs a request"


def synthetic_outcome(finish: FinishReason, **update: Any) -> Outcome:
    fields: dict[str, Any] = {
        "request_id": "req_" + "a" * 32,
        "user_id": USER,
        "model": "claude-3-haiku",
        "model_name": "claude-3-haiku",
        "tier": "pro",
        "summary": Summary(text="so far", style=Style.PARAGRAPH, finish_reason=finish),
        "usage": Usage(input_tokens=1000, output_tokens=40),
        "cost_usd": Decimal("0.00030"),
        "latency_ms": {"preprocess": 1.5, "ttft": 40.0, "infer": 90.25, "postprocess": 0.1, "total": 95.0},
    }
    return Outcome(**{**fields, **update})


@pytest.mark.parametrize(
    ("finish", "failures", "cancels"),
    [
        (FinishReason.STOP, 0, 0),
        (FinishReason.LENGTH, 0, 0),
        (FinishReason.ERROR, 1, 0),
        (FinishReason.TIMEOUT, 1, 0),
        (FinishReason.CANCELLED, 0, 1),
    ],
)
def test_how_a_request_ended_is_counted(finish: FinishReason, failures: int, cancels: int) -> None:
    outcome = synthetic_outcome(finish, retries=2)
    request, stages = split(metrics("\n".join(request_records(outcome))))
    assert request["Failures"].value == failures and request["Cancels"].value == cancels
    assert request["PartialResults"].value == int(outcome.summary.partial)
    assert request["Retries"].value == 2 and request["Requests"].value == 1
    assert request["CostUSD"].value == pytest.approx(0.0003) and request["Requests"].dimensions["outcome"] == finish
    assert {stage: m.value for stage, m in stages.items()} == {
        "preprocess": 1.5,
        "infer": 90.25,
        "postprocess": 0.1,
        "total": 95.0,
    }


def test_a_model_asked_for_with_options_or_unknown_is_a_bounded_dimension() -> None:
    assert observability.model_dimension("local?ttft_ms=500&token_ms=20") == "local"
    assert observability.model_dimension("claude-3-haiku") == "claude-3-haiku"
    assert observability.model_dimension("gpt-99?x=1") == "other"
    outcome = synthetic_outcome(FinishReason.STOP, model="local?ttft_ms=5")
    assert {m.dimensions["model"] for m in metrics("\n".join(request_records(outcome)))} == {"local"}


# A real streamed request ------------------------------------------------------------------------


async def test_a_streamed_requests_emf_matches_its_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    task = as_user(make_task(DOC, model="claude-3-haiku"))
    outcome = await summarize(task)
    stdout = capsys.readouterr().out
    emitted = metrics(stdout)
    assert_matches_registry(emitted)
    request, stages = split(emitted)
    assert outcome.summary.finish_reason is FinishReason.STOP and outcome.usage.output_tokens > 0
    assert request["Requests"].value == 1
    assert request["InputTokens"].value == outcome.usage.input_tokens
    assert request["OutputTokens"].value == outcome.usage.output_tokens
    assert outcome.cost_usd > 0 and request["CostUSD"].value == pytest.approx(float(outcome.cost_usd))
    assert request["TimeToFirstToken"].value == outcome.latency_ms["ttft"]
    assert (request["Failures"].value, request["Cancels"].value, request["PartialResults"].value) == (0, 0, 0)
    assert request["Retries"].value == 0
    assert request["Requests"].dimensions == {
        "service": "precis",
        "model": "claude-3-haiku",
        "tier": "pro",
        "outcome": "stop",
    }
    # Every stage the request timed is a registered stage, each in a record of its own.
    assert {stage: m.value for stage, m in stages.items()} == {
        stage: ms for stage, ms in outcome.latency_ms.items() if stage != "ttft"
    }
    assert {m.record["request_id"] for m in emitted} == {outcome.request_id}
    assert_never_the_user(stdout)


async def test_a_long_documents_map_and_reduce_stages_are_timed(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = await summarize(as_user(make_task(python_docs(10_000), chunk_tokens=3_000)))
    _, stages = split(metrics(capsys.readouterr().out))
    assert {"map", "reduce"} <= set(outcome.latency_ms)
    assert {stage: m.value for stage, m in stages.items()} == {
        stage: ms for stage, ms in outcome.latency_ms.items() if stage != "ttft"
    }
    assert {m.dimensions["model"] for m in stages.values()} == {"local"}


async def test_a_model_failing_mid_stream_is_a_failure_with_a_partial_result(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcome = await summarize(as_user(make_task(DOC, model="local?fail_after=4&fail=permanent"), tier="free"))
    stdout = capsys.readouterr().out
    request, _ = split(metrics(stdout))
    assert outcome.summary.finish_reason is FinishReason.ERROR and outcome.summary.partial
    assert (request["Failures"].value, request["PartialResults"].value, request["Cancels"].value) == (1, 1, 0)
    assert request["OutputTokens"].value == outcome.usage.output_tokens == 4
    assert request["Requests"].dimensions == {"service": "precis", "model": "local", "tier": "free", "outcome": "error"}
    assert_never_the_user(stdout)


async def test_retries_are_counted(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = await summarize(as_user(make_task(DOC, model="local?fail_after=0&fail=transient")))
    request, _ = split(metrics(capsys.readouterr().out))
    assert outcome.retries == RetryPolicy().max_attempts - 1
    assert request["Retries"].value == outcome.retries and request["Failures"].value == 1
    assert "TimeToFirstToken" not in request, "no token, no time to first token"


async def test_a_cancelled_request_is_counted_as_a_cancel(capsys: pytest.CaptureFixture[str]) -> None:
    journal = MemoryJournal()

    async def cancel_soon() -> None:
        await anyio.sleep(0.15)
        journal.cancel_requested = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_soon)
        outcome = await summarize(as_user(make_task(DOC, model="local?token_ms=20")), journal)
    request, _ = split(metrics(capsys.readouterr().out))
    assert outcome.summary.finish_reason is FinishReason.CANCELLED
    assert (request["Cancels"].value, request["Failures"].value) == (1, 0)
    assert request["PartialResults"].value == int(outcome.summary.partial) == 1
    assert request["Cancels"].dimensions["outcome"] == "cancelled"


# Job stages and throttles -----------------------------------------------------------------------


def test_a_job_stage_is_timed_also_when_it_raises(capsys: pytest.CaptureFixture[str]) -> None:
    @observability.timed_stage("combine")
    def failing(event: dict[str, Any], context: Any) -> None:
        time.sleep(0.02)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing({"job_id": "job_" + "1" * 32}, None)
    [stage] = metrics(capsys.readouterr().out)
    assert stage.name == "JobStageLatency" and stage.unit == "Milliseconds" and stage.value >= 20
    assert stage.dimension_sets == ({"service": "precis", "stage": "combine"},)
    assert stage.record["job_id"] == "job_" + "1" * 32


def test_an_unknown_job_stage_is_refused_when_the_handler_is_defined() -> None:
    with pytest.raises(ValueError, match="unknown job stage"):
        observability.timed_stage("a stage nobody registered")


def test_a_throttle_names_its_limit_and_an_unknown_limit_stays_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    observability.throttled("tokens_per_day")
    observability.throttled("a limit added later")
    first, second = metrics(capsys.readouterr().out)
    assert (first.name, first.unit, first.value) == ("Throttles", "Count", 1)
    assert first.dimension_sets == ({"service": "precis"}, {"service": "precis", "limit": "tokens_per_day"})
    assert second.dimensions["limit"] == "other"


def test_nothing_is_written_when_metrics_are_disabled(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    observability.throttled("queue_backlog")
    assert capsys.readouterr().out == ""


def test_catalog_models_are_all_valid_dimensions() -> None:
    for model_id in Catalog.bundled().models:
        assert observability.model_dimension(model_id) == model_id
