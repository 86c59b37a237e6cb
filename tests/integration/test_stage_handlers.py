"""Each function of the asynchronous path, loaded as Lambda loads it and run with its events/ sample,
against moto (in-process) with every resource of template.yaml."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from local.cloud import LambdaContext
from local.stack import Template, create_resources
from precis.adapters.breakers import BreakerTable
from precis.adapters.jobs import JobStore
from precis.domain.errors import CircuitOpenError
from precis.domain.models import Style
from precis.settings import Settings
from tests.support.functions import load_function

ROOT = Path(__file__).resolve().parents[2]
JOB = "job_" + "5" * 32
SAMPLE = (ROOT / "local" / "samples" / "lighthouses.txt").read_text()

Handler = Callable[[dict[str, Any], Any], Any]


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[Template]:
    """moto with the template's resources under the local stack's names (those in events/), and the
    union of the functions' environments, as the local stack gives them."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        template = Template.read()
        create_resources(template, boto3.Session(region_name="us-east-1"))
        for logical_id in template.resources("AWS::Serverless::Function"):
            for name, value in template.function_environment(logical_id).items():
                monkeypatch.setenv(name, value)
        yield template


def handler(function: str) -> Handler:
    loaded: Handler = load_function(function).handler
    return loaded


def context(function: str) -> LambdaContext:
    return LambdaContext(
        function_name=function,
        invoked_function_arn=f"arn:aws:lambda:us-east-1:123456789012:function:{function}",
        memory_limit_in_mb=1024,
        timeout_s=300,
    )


def event(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "events" / f"{name}.json").read_text())
    return loaded


def seed_job(template: Template, text: str, status_running: bool = True) -> JobStore:
    """The job the stage samples name, with its document, as the starter would leave it."""
    jobs = JobStore(boto3.resource("dynamodb").Table(template.physical["JobsTable"]))
    key = f"jobs/{JOB}/document.txt"
    boto3.client("s3").put_object(Bucket=template.physical["DocumentsBucket"], Key=key, Body=text.encode())
    jobs.create(JOB, "dev", key, "local", Style.BULLETS, 200)
    if status_running:
        jobs.started(JOB, f"arn:aws:states:us-east-1:123456789012:execution:summarize:{JOB}")
    return jobs


def test_stages_run_their_samples_in_order_and_store_the_summary(cloud: Template) -> None:
    jobs = seed_job(cloud, SAMPLE * 20)
    s3 = boto3.client("s3")
    bucket = cloud.physical["DocumentsBucket"]

    chunks = handler("preprocess")(event("preprocess-job"), context("preprocess"))["chunks"]
    assert chunks == list(range(len(chunks))) and len(chunks) >= 2
    summarize = handler("summarize_chunk")
    for index in chunks:
        assert summarize({**event("summarize_chunk-chunk"), "index": index}, context("chunk")) == {"index": index}
    handler("combine")(event("combine-job"), context("combine"))
    result = handler("postprocess")(event("postprocess-job"), context("postprocess"))

    job = jobs.get(JOB)
    assert job is not None and job.status == "succeeded" and job.chunks_done == len(chunks)
    assert result == {"summary_key": f"summaries/{JOB}.json"} and job.summary_key == result["summary_key"]
    stored = json.loads(s3.get_object(Bucket=bucket, Key=result["summary_key"])["Body"].read())
    assert stored["summary"] == job.text and job.text.startswith("- ")
    assert stored["usage"] == job.usage.model_dump() and job.usage.input_tokens > 0
    assert s3.get_object(Bucket=bucket, Key=f"summaries/{JOB}.md")["Body"].read().decode().startswith("# Summary")


def test_a_stage_run_twice_neither_calls_the_model_again_nor_charges_twice(cloud: Template) -> None:
    jobs = seed_job(cloud, SAMPLE * 20)
    chunks = handler("preprocess")(event("preprocess-job"), context("preprocess"))["chunks"]
    summarize = handler("summarize_chunk")
    for _ in range(2):  # a Step Functions retry, or a duplicate invocation
        for index in chunks:
            summarize({**event("summarize_chunk-chunk"), "index": index}, context("chunk"))
    combine, postprocess = handler("combine"), handler("postprocess")
    combine(event("combine-job"), context("combine"))
    postprocess(event("postprocess-job"), context("postprocess"))
    charged = jobs.get(JOB)
    combine(event("combine-job"), context("combine"))
    postprocess(event("postprocess-job"), context("postprocess"))
    again = jobs.get(JOB)
    assert charged is not None and again is not None
    assert (
        again.usage == charged.usage and again.cost_usd == charged.cost_usd and again.updated_at == charged.updated_at
    )
    idempotency = boto3.resource("dynamodb").Table(cloud.physical["IdempotencyTable"]).scan()["Items"]
    assert len(idempotency) == len(chunks), "one Powertools idempotency record per chunk"


def test_a_chunk_stage_fails_fast_while_the_models_circuit_is_open(cloud: Template) -> None:
    seed_job(cloud, SAMPLE * 20)
    chunks = handler("preprocess")(event("preprocess-job"), context("preprocess"))["chunks"]
    breakers = BreakerTable(boto3.resource("dynamodb").Table(cloud.physical["QuotasTable"]))
    policy = Settings.from_env().breaker_policy()
    for failure in range(policy.failures_to_open):  # the job's model failed for other users
        breakers.record_failure("local", f"user-{failure % 2}", time.time(), policy)
    with pytest.raises(CircuitOpenError):  # Step Functions retries it (statemachine/: CircuitOpenError)
        handler("summarize_chunk")({**event("summarize_chunk-chunk"), "index": chunks[0]}, context("chunk"))
    stored = boto3.client("s3").list_objects_v2(Bucket=cloud.physical["DocumentsBucket"], Prefix=f"work/{JOB}/")
    assert not [o["Key"] for o in stored.get("Contents", []) if "/summaries/" in o["Key"] or "/usage/" in o["Key"]]


def test_record_failure_sample_fails_the_job_with_a_structured_error(cloud: Template) -> None:
    jobs = seed_job(cloud, SAMPLE)
    handler("record_failure")(event("record_failure-error"), context("record_failure"))
    job = jobs.get(JOB)
    assert job is not None and job.status == "failed" and job.error is not None
    assert job.error.code == "model_error" and job.error.retryable is False
    assert job.error.message.startswith("PermanentModelError: local model failed")


def test_starter_sample_starts_one_execution_per_job_and_reports_no_failures(cloud: Template) -> None:
    jobs = seed_job(cloud, SAMPLE, status_running=False)
    response = handler("starter")(event("starter-sqs-batch"), context("starter"))
    assert response == {"batchItemFailures": []}
    machine = cloud.attributes["SummarizeStateMachine"]["Ref"]
    names = {e["name"] for e in boto3.client("stepfunctions").list_executions(stateMachineArn=machine)["executions"]}
    dropped = next(
        j for j in boto3.resource("dynamodb").Table(cloud.physical["JobsTable"]).scan()["Items"] if j["job_id"] != JOB
    )
    assert names == {JOB, dropped["job_id"]}
    assert dropped["document_key"] == "inbox/reports/q3 board notes.txt" and dropped["owner"] == "reports"
    seeded = jobs.get(JOB)
    assert seeded is not None and seeded.status == "running"


def test_starter_reports_only_the_bad_message_as_failed(cloud: Template) -> None:
    seed_job(cloud, SAMPLE, status_running=False)
    batch = event("starter-sqs-batch")
    batch["Records"][0]["body"] = "this is not JSON"
    response = handler("starter")(batch, context("starter"))
    assert response == {"batchItemFailures": [{"itemIdentifier": batch["Records"][0]["messageId"]}]}
