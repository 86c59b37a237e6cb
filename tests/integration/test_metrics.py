"""Metrics end to end: what the gateway and the job stages emit (their stdout parsed as CloudWatch
reads EMF), and what template.yaml's dashboard and alarms ask CloudWatch for. Both are checked
against one metric registry, precis.observability.REGISTRY: a dashboard line or an alarm on a metric,
or a dimension set, that nothing emits would stay empty (or never fire) without anyone noticing."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from local.stack import Template, create_resources, load_template
from precis import observability
from precis.adapters.dynamodb import KeyStore
from precis.adapters.quotas import QuotaStore
from precis.api.jobs import JobDesk
from precis.domain.tiers import Tiers
from precis.settings import Settings
from tests.integration.test_gateway_function import event as gateway_event
from tests.integration.test_gateway_function import load_gateway
from tests.integration.test_stage_handlers import JOB, SAMPLE, context, event, handler, seed_job
from tests.support.emf import Emitted, by_name, metrics

ROOT = Path(__file__).resolve().parents[2]
TEST_TIERS = ROOT / "tests" / "data" / "tiers.json"
USER = "user-5d1e-metrics-probe"
BOUNDED = {"service", "model", "tier", "stage", "outcome", "limit"}
PSEUDO = {"AWS::Region", "AWS::AccountId", "AWS::StackName", "AWS::Partition", "AWS::URLSuffix"}
#: The AWS metrics the dashboard and alarms may use, with the one dimension each is read by and the
#: resource type that dimension names.
AWS_METRICS = {
    ("AWS/Lambda", "Errors"): ("FunctionName", "AWS::Serverless::Function"),
    ("AWS/SQS", "ApproximateNumberOfMessagesVisible"): ("QueueName", "AWS::SQS::Queue"),
    ("AWS/SQS", "ApproximateAgeOfOldestMessage"): ("QueueName", "AWS::SQS::Queue"),
    ("AWS/States", "ExecutionsFailed"): ("StateMachineArn", "AWS::Serverless::StateMachine"),
    ("AWS/States", "ExecutionsTimedOut"): ("StateMachineArn", "AWS::Serverless::StateMachine"),
    ("AWS/States", "ExecutionsAborted"): ("StateMachineArn", "AWS::Serverless::StateMachine"),
    ("AWS/States", "ExecutionsSucceeded"): ("StateMachineArn", "AWS::Serverless::StateMachine"),
}


# template.yaml: the dashboard and the alarms ---------------------------------------------------


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def _of_type(template: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {lid: r["Properties"] for lid, r in template["Resources"].items() if r["Type"] == type_}


def dashboard_body(template: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's JSON as CloudFormation's !Sub leaves it: parameters at their defaults,
    `${Resource}` and `${Resource.Attr}` kept as their own names (to check what they point at)."""
    [props] = _of_type(template, "AWS::CloudWatch::Dashboard").values()
    text = props["DashboardBody"]["Fn::Sub"]
    assert isinstance(text, str)

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in template["Parameters"]:
            return str(template["Parameters"][name]["Default"])
        if name in PSEUDO:
            return "us-east-1"
        assert name.split(".", 1)[0] in template["Resources"], f"the dashboard refers to unknown {name}"
        return name

    body: dict[str, Any] = json.loads(re.sub(r"\$\{([^}!]+)\}", substitute, text))
    return body


def dashboard_metrics(body: dict[str, Any]) -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
    """(namespace, name, dimensions, options) of every metric line of every widget."""
    found = []
    for widget in body["widgets"]:
        if widget["type"] != "metric":
            continue
        ids = set()
        for row in widget["properties"]["metrics"]:
            options = row[-1] if isinstance(row[-1], dict) else {}
            if "expression" in options:
                assert len(row) == 1
                continue
            plain = [item for item in row if not isinstance(item, dict)]
            assert "..." not in plain and "." not in plain, "spell each metric out: it is checked here"
            namespace, name, *pairs = plain
            assert len(pairs) % 2 == 0, row
            found.append((namespace, name, dict(zip(pairs[::2], pairs[1::2], strict=True)), options))
            ids.add(options.get("id"))
        for row in widget["properties"]["metrics"]:
            if "expression" in row[-1]:
                used = set(re.findall(r"\b([a-z][a-zA-Z0-9_]*)\b", row[-1]["expression"])) - {"FILL"}
                assert used <= ids, f"the expression uses metrics the widget does not define: {used - ids}"
    return found


def alarm_metrics(template: dict[str, Any]) -> dict[str, list[tuple[str, str, dict[str, Any], dict[str, Any]]]]:
    """Per alarm: (namespace, name, dimensions, the statistic and period) of each metric it reads."""
    found: dict[str, list[tuple[str, str, dict[str, Any], dict[str, Any]]]] = {}
    for logical_id, props in _of_type(template, "AWS::CloudWatch::Alarm").items():
        read = []
        if "MetricName" in props:
            dims = {d["Name"]: d["Value"] for d in props.get("Dimensions", [])}
            stat = {k: props[k] for k in ("Statistic", "ExtendedStatistic", "Period") if k in props}
            read.append((props["Namespace"], props["MetricName"], dims, stat))
        for query in props.get("Metrics", []):
            if "MetricStat" in query:
                metric = query["MetricStat"]["Metric"]
                dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
                stat = {"Statistic": query["MetricStat"]["Stat"], "Period": query["MetricStat"]["Period"]}
                read.append((metric["Namespace"], metric["MetricName"], dims, stat))
        assert read, logical_id
        found[logical_id] = read
    return found


def _target(value: Any) -> str:
    """The resource a dimension value points at: `${X}`/`${X.Attr}` as substituted, Ref, or GetAtt."""
    if isinstance(value, dict):
        ref = value.get("Ref") or value.get("Fn::GetAtt", [None])[0]
        return str(ref)
    return str(value).split(".", 1)[0]


def assert_emitted(template: dict[str, Any], namespace: str, name: str, dimensions: dict[str, Any]) -> None:
    """The metric, under exactly this dimension set, is one precis emits, or one of AWS's about one
    of this stack's resources."""
    if namespace.startswith("AWS/"):
        assert (namespace, name) in AWS_METRICS, (namespace, name)
        dimension, type_ = AWS_METRICS[namespace, name]
        assert set(dimensions) == {dimension}, (name, dimensions)
        target = _target(dimensions[dimension])
        assert template["Resources"][target]["Type"] == type_, (name, target)
        return
    service = template["Globals"]["Function"]["Environment"]["Variables"]
    assert namespace == service["POWERTOOLS_METRICS_NAMESPACE"] == observability.NAMESPACE
    emitted = observability.emitted_metrics()
    assert name in emitted, f"nothing emits {name}"
    assert frozenset(dimensions) in emitted[name], f"{name} is never emitted with exactly {sorted(dimensions)}"
    assert dimensions["service"] == service["POWERTOOLS_SERVICE_NAME"] == observability.SERVICE
    for dimension, value in dimensions.items():
        allowed = {
            v
            for record in observability.REGISTRY
            if name in {m.name for m in record.metrics} and dimension in record.values
            for v in record.values[dimension]
        }
        assert not allowed or value in allowed, f"{name} is never emitted with {dimension}={value!r}"


def test_every_dashboard_metric_is_emitted_with_exactly_that_dimension_set(template: dict[str, Any]) -> None:
    lines = dashboard_metrics(dashboard_body(template))
    assert len(lines) > 30
    for namespace, name, dimensions, _ in lines:
        assert_emitted(template, namespace, name, dimensions)


def test_every_alarm_reads_metrics_that_are_emitted(template: dict[str, Any]) -> None:
    for alarm, read in alarm_metrics(template).items():
        for namespace, name, dimensions, _ in read:
            assert isinstance(dimensions.get("service", ""), str), alarm
            assert_emitted(template, namespace, name, dimensions)


def test_the_dashboard_shows_what_an_operator_needs(template: dict[str, Any]) -> None:
    lines = dashboard_metrics(dashboard_body(template))

    def shown(name: str, **dimensions: str) -> list[dict[str, Any]]:
        return [opts for _, n, dims, opts in lines if n == name and dims.items() >= dimensions.items()]

    assert {o["stat"] for o in shown("TimeToFirstToken")} >= {"p50", "p99"}
    for stage in observability.REQUEST_STAGES:
        assert {o["stat"] for o in shown("StageLatency", stage=stage)} >= {"p50", "p99"}, stage
    for stage in observability.JOB_STAGES:
        assert shown("JobStageLatency", stage=stage), stage
    assert shown("QueueWait") and shown("InputTokens") and shown("OutputTokens")
    assert [o.get("period") for o in shown("CostUSD") if o["stat"] == "Sum"] == [3600], "cost per hour"
    for limit in observability.LIMITS:
        assert shown("Throttles", limit=limit), limit
    assert shown("Failures") and shown("Requests") and shown("Jobs")
    for function in _of_type(template, "AWS::Serverless::Function"):
        assert shown("Errors", FunctionName=function), function
    assert shown("ApproximateNumberOfMessagesVisible", QueueName="IngestDeadLetterQueue.QueueName"), "DLQ depth"
    assert shown("ExecutionsFailed", StateMachineArn="SummarizeStateMachine")
    [alarms] = [w for w in dashboard_body(template)["widgets"] if w["type"] == "alarm"]
    assert {a.split(".")[0] for a in alarms["properties"]["alarms"]} == set(
        _of_type(template, "AWS::CloudWatch::Alarm")
    )


def test_alarms_cover_errors_latency_dead_letters_executions_and_cost(template: dict[str, Any]) -> None:
    alarms = _of_type(template, "AWS::CloudWatch::Alarm")
    read = alarm_metrics(template)
    assert set(alarms) == {
        "ErrorRateAlarm",
        "TimeToFirstTokenAlarm",
        "DeadLetterAlarm",
        "FailedExecutionsAlarm",
        "CostPerHourAlarm",
    }

    [rate] = [q for q in alarms["ErrorRateAlarm"]["Metrics"] if q.get("ReturnData")]
    assert "failures" in rate["Expression"] and "requests" in rate["Expression"] and "jobs" in rate["Expression"]
    assert {name for _, name, _, _ in read["ErrorRateAlarm"]} == {"Failures", "Requests", "Jobs"}
    assert alarms["ErrorRateAlarm"]["Threshold"] == {"Ref": "ErrorRatePercent"}

    [(_, name, dims, stat)] = read["TimeToFirstTokenAlarm"]
    assert name == "TimeToFirstToken" and set(dims) == {"service"} and stat["ExtendedStatistic"] == "p99"
    assert alarms["TimeToFirstTokenAlarm"]["Threshold"] == {"Ref": "TtftBudgetMs"}

    [(_, name, dims, stat)] = read["DeadLetterAlarm"]
    assert dims["QueueName"] == {"Fn::GetAtt": ["IngestDeadLetterQueue", "QueueName"]}
    assert alarms["DeadLetterAlarm"]["Threshold"] == 0
    assert alarms["DeadLetterAlarm"]["ComparisonOperator"] == "GreaterThanThreshold", "any message at all"

    [(_, name, dims, stat)] = read["FailedExecutionsAlarm"]
    assert name == "ExecutionsFailed" and dims["StateMachineArn"] == {"Ref": "SummarizeStateMachine"}

    [(_, name, dims, stat)] = read["CostPerHourAlarm"]
    assert name == "CostUSD" and set(dims) == {"service"} and stat == {"Statistic": "Sum", "Period": 3600}
    assert alarms["CostPerHourAlarm"]["Threshold"] == {"Ref": "CostPerHourBudgetUsd"}

    for logical_id, props in alarms.items():
        assert props["TreatMissingData"] == "notBreaching", logical_id  # no traffic is no alarm
        assert props["AlarmActions"] == {
            "Fn::If": ["HasAlarmEmail", [{"Ref": "AlarmTopic"}], {"Ref": "AWS::NoValue"}]
        }, logical_id
    parameters = template["Parameters"]
    assert parameters["TtftBudgetMs"]["Type"] == parameters["CostPerHourBudgetUsd"]["Type"] == "Number"
    assert parameters["AlarmEmail"]["Default"] == ""
    assert template["Resources"]["AlarmTopic"]["Condition"] == "HasAlarmEmail"


def test_every_function_keeps_its_logs_for_the_retention_parameter(template: dict[str, Any]) -> None:
    groups = {
        props["LogGroupName"]["Fn::Sub"]: props["RetentionInDays"]
        for props in _of_type(template, "AWS::Logs::LogGroup").values()
    }
    for function in _of_type(template, "AWS::Serverless::Function"):
        assert groups.get(f"/aws/lambda/${{{function}}}") == {"Ref": "LogRetentionDays"}, function


# The gateway: a request and a throttle, through the function's own handler ---------------------


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch, tables: dict[str, Any]) -> Any:
    monkeypatch.setenv("PRECIS_TIERS_FILE", str(TEST_TIERS))
    for logical_id, table in tables.items():  # KeysTable -> PRECIS_KEYS_TABLE, as template.yaml names them
        monkeypatch.setenv(f"PRECIS_{logical_id.removesuffix('Table').upper()}_TABLE", table.name)
    return load_gateway(monkeypatch, tables)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_gateway_request_emits_its_usage_cost_and_latency(
    gateway: Any, tables: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    KeyStore(tables["KeysTable"]).add("pk_test_events_key", user_id=USER, tier="pro")
    capsys.readouterr()
    response = gateway.handler(gateway_event("function-url-summarize"), None)
    assert response["statusCode"] == 200, response["body"]
    done = json.loads(response["body"])
    emitted = metrics(capsys.readouterr().out)
    request = by_name([m for m in emitted if m.name != "StageLatency"])
    stages = {m.dimensions["stage"]: m.value for m in emitted if m.name == "StageLatency"}

    assert request["Requests"].dimensions == {
        "service": "precis",
        "model": "local",
        "tier": "pro",
        "outcome": done["finish_reason"],
    }
    assert request["InputTokens"].value == done["usage"]["input_tokens"]
    assert request["OutputTokens"].value == done["usage"]["output_tokens"] > 0
    assert request["CostUSD"].value == done["cost_usd"]
    assert request["TimeToFirstToken"].value == done["latency_ms"]["ttft"]
    assert stages == {stage: ms for stage, ms in done["latency_ms"].items() if stage != "ttft"}
    assert {m.record["request_id"] for m in emitted} == {response["headers"]["x-request-id"]}
    assert_bounded_and_anonymous(emitted, USER)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_429_of_admission_is_a_throttle_by_limit(
    gateway: Any, tables: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    KeyStore(tables["KeysTable"]).add("pk_test_events_key", user_id=USER, tier="small-day")
    QuotaStore(tables["QuotasTable"]).reserve(USER, Tiers.load(TEST_TIERS).named("small-day"), 1000, "jobs")
    capsys.readouterr()
    response = gateway.handler(gateway_event("function-url-summarize"), None)
    assert response["statusCode"] == 429, response["body"]
    assert json.loads(response["body"])["error"]["limit"] == "tokens_per_day"
    [throttle] = metrics(capsys.readouterr().out)
    assert (throttle.name, throttle.unit, throttle.value) == ("Throttles", "Count", 1)
    assert throttle.dimension_sets == ({"service": "precis"}, {"service": "precis", "limit": "tokens_per_day"})
    assert_bounded_and_anonymous([throttle], USER)


def assert_bounded_and_anonymous(emitted: list[Emitted], *people: str) -> None:
    assert emitted
    for metric in emitted:
        assert set(metric.dimensions) <= BOUNDED, metric.dimensions
        for person in people:
            assert person not in json.dumps(metric.record), f"{person} in {metric.name}'s record"


# The asynchronous path: the starter and the stages, as Lambda runs them -------------------------


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[Template]:
    """moto with the template's resources and the functions' environment (as test_stage_handlers)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        template = Template.read()
        create_resources(template, boto3.Session(region_name="us-east-1"))
        for logical_id in template.resources("AWS::Serverless::Function"):
            for name, value in template.function_environment(logical_id).items():
                monkeypatch.setenv(name, value)
        yield template


def test_a_jobs_queue_wait_stages_and_end_are_emitted_once(cloud: Template, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = seed_job(cloud, SAMPLE * 10, status_running=False)  # two chunks
    queued = jobs.get(JOB)
    assert queued is not None
    batch = event("starter-sqs-batch")
    [message] = [r for r in batch["Records"] if JOB in r["body"]]
    # Sent five seconds before the job was created: the queue wait starts at the earlier of the two.
    message["attributes"]["SentTimestamp"] = str(int((queued.created_at - 5) * 1000))
    starter = handler("starter")
    capsys.readouterr()
    assert starter({"Records": [message]}, context("starter")) == {"batchItemFailures": []}
    assert starter({"Records": [message]}, context("starter")) == {"batchItemFailures": []}  # a redelivery
    [wait] = metrics(capsys.readouterr().out)
    assert wait.name == "QueueWait" and wait.unit == "Milliseconds" and wait.record["job_id"] == JOB
    assert 5_000 <= wait.value < 5_000 + (time.time() - queued.created_at) * 1000 + 1

    chunks = handler("preprocess")(event("preprocess-job"), context("preprocess"))["chunks"]
    for index in chunks:
        handler("summarize_chunk")({**event("summarize_chunk-chunk"), "index": index}, context("chunk"))
    handler("combine")(event("combine-job"), context("combine"))
    postprocess = handler("postprocess")
    postprocess(event("postprocess-job"), context("postprocess"))
    postprocess(event("postprocess-job"), context("postprocess"))  # run twice: the job ends once
    emitted = metrics(capsys.readouterr().out)

    timed = [m.dimensions["stage"] for m in emitted if m.name == "JobStageLatency"]
    assert timed == ["split", *["summarize_chunk"] * len(chunks), "combine", "postprocess", "postprocess"]
    assert all(m.value > 0 and m.record["job_id"] == JOB for m in emitted if m.name == "JobStageLatency")
    ended = by_name([m for m in emitted if m.name != "JobStageLatency"])
    job = jobs.get(JOB)
    assert job is not None and job.status == "succeeded" and job.finish_reason is not None
    assert ended["Jobs"].value == 1 and ended["Jobs"].record["job_id"] == JOB
    assert ended["InputTokens"].value == job.usage.input_tokens > 0
    assert ended["OutputTokens"].value == job.usage.output_tokens > 0
    assert ended["CostUSD"].value == job.cost_usd
    assert (ended["Failures"].value, ended["Cancels"].value, ended["PartialResults"].value) == (0, 0, 0)
    assert 0 < ended["JobLatency"].value <= (time.time() - job.created_at) * 1000 + 1
    assert ended["Jobs"].dimension_sets == (
        {"service": "precis"},
        {"service": "precis", "model": "local"},
        {"service": "precis", "model": "local", "outcome": job.finish_reason.value},
    )
    assert_bounded_and_anonymous([wait, *emitted], job.owner)


def test_a_failed_job_is_counted_as_a_failure(cloud: Template, capsys: pytest.CaptureFixture[str]) -> None:
    seed_job(cloud, SAMPLE)
    capsys.readouterr()
    handler("record_failure")(event("record_failure-error"), context("record_failure"))
    emitted = metrics(capsys.readouterr().out)
    assert [m.dimensions["stage"] for m in emitted if m.name == "JobStageLatency"] == ["record_failure"]
    ended = by_name([m for m in emitted if m.name != "JobStageLatency"])
    assert (ended["Jobs"].value, ended["Failures"].value, ended["Cancels"].value) == (1, 1, 0)
    assert ended["Jobs"].dimensions["outcome"] == "error"


def test_a_cancelled_job_is_counted_as_a_cancel(cloud: Template, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = seed_job(cloud, SAMPLE, status_running=False)
    desk = JobDesk(Settings.from_env())
    capsys.readouterr()
    desk.cancel(JOB, "dev")
    desk.cancel(JOB, "dev")  # already cancelled: nothing more
    [ended] = [m for m in metrics(capsys.readouterr().out) if m.name == "Jobs"]
    assert ended.dimensions == {"service": "precis", "model": "local", "outcome": "cancelled"}
    assert ended.record["Cancels"] == [1.0] and ended.record["Failures"] == [0.0]
    job = jobs.get(JOB)
    assert job is not None and job.status == "cancelled"
