"""The local stack's asynchronous machinery, on the real local stack (moto in its own process).

template.yaml's resources are created as for `make serve`; next to them, a small template of test
fixtures (tests/integration/fixtures/local_cloud/) is created the same way, so that its functions,
queues, bucket and state machines exercise the dispatcher, the SQS poller and S3 notifications with
handlers whose behaviour the tests choose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from local.stack import REGION, ROOT, LocalStack, Template, create_resources, sqs_event_sources
from tests.support.waiting import wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "local_cloud"


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    saved = dict(os.environ)
    local = LocalStack(port=0, gateway=False).start()
    try:
        yield local
    finally:
        local.stop()
        os.environ.clear()
        os.environ.update(saved)  # the stack points this process's boto3 at its moto


@pytest.fixture(scope="module")
def fixtures(stack: LocalStack) -> Template:
    """The fixture template's resources, in the stack's moto, with its SQS mappings polled."""
    template = Template.read(FIXTURES / "template.yaml")
    create_resources(template, boto3.Session(region_name=REGION), prefix="fixture")
    lambda_ = boto3.client("lambda", region_name=REGION)
    for mapping in sqs_event_sources(template):
        lambda_.create_event_source_mapping(**mapping)
    return template


def run_execution(state_machine_arn: str, execution_input: dict[str, Any]) -> dict[str, Any]:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    arn = sfn.start_execution(stateMachineArn=state_machine_arn, input=json.dumps(execution_input))["executionArn"]
    return wait_for(
        lambda: (lambda d: d if d["status"] != "RUNNING" else None)(sfn.describe_execution(executionArn=arn))
    )


def failed_tasks(execution_arn: str) -> list[dict[str, Any]]:
    events = boto3.client("stepfunctions", region_name=REGION).get_execution_history(
        executionArn=execution_arn, maxResults=1000
    )["events"]
    return [e["taskFailedEventDetails"] for e in events if e["type"] == "TaskFailed"]


# Lambda tasks ------------------------------------------------------------------------------------


def test_retry_matches_the_handlers_exception_class_and_the_task_then_succeeds(fixtures: Template) -> None:
    keys = [f"retry-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    execution = run_execution(fixtures.attributes["RetryStateMachine"]["Arn"], {"items": keys, "fail_times": 2})

    assert execution["status"] == "SUCCEEDED", execution
    results = json.loads(execution["output"])["results"]
    assert [r["key"] for r in results] == keys  # the Map's ItemSelector gave each item its value
    assert [r["attempts"] for r in results] == [3, 3]  # failed twice, retried, succeeded
    assert {r["function_name"] for r in results} == {fixtures.physical["FlakyFunction"]}
    # The function's environment, with its !Ref resolved, reached the handler.
    assert {r["receipts_table"] for r in results} == {fixtures.physical["ReceiptsTable"]}
    failures = failed_tasks(execution["executionArn"])
    assert [f["error"] for f in failures] == ["TransientModelError"] * 4
    assert json.loads(failures[0]["cause"])["errorType"] == "TransientModelError"


def test_catch_matches_the_handlers_exception_class_without_retrying_it(fixtures: Template) -> None:
    execution = run_execution(fixtures.attributes["CatchStateMachine"]["Arn"], {"document": "report.txt"})

    assert execution["status"] == "SUCCEEDED", execution  # "Record The Failure", not "Caught By The Wrong Name"
    error = json.loads(execution["output"])["error"]
    assert error["Error"] == "InputTooLargeError"
    cause = json.loads(error["Cause"])
    assert cause["errorType"] == "InputTooLargeError"
    assert cause["errorMessage"] == "document report.txt is too large"
    assert len(failed_tasks(execution["executionArn"])) == 1  # its Retry names another class


def test_an_execution_stopped_during_a_map_ends_aborted(fixtures: Template) -> None:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    arn = sfn.start_execution(
        stateMachineArn=fixtures.attributes["SlowMapStateMachine"]["Arn"], input=json.dumps({"items": [1, 1, 1]})
    )["executionArn"]
    wait_for(lambda: "TaskStarted" in [e["type"] for e in sfn.get_execution_history(executionArn=arn)["events"]])

    sfn.stop_execution(executionArn=arn, error="Cancelled", cause="the user cancelled the job")

    # ABORTED once the running tasks return (a handler cannot be interrupted), never FAILED or Caught.
    assert wait_for(lambda: (s := sfn.describe_execution(executionArn=arn)["status"]) != "RUNNING" and s) == "ABORTED"
    assert "ExecutionAborted" in [e["type"] for e in sfn.get_execution_history(executionArn=arn)["events"]]


def test_direct_invoke_reports_a_handler_exception_as_an_unhandled_function_error(fixtures: Template) -> None:
    lambda_ = boto3.client("lambda", region_name=REGION)
    name = fixtures.physical["FlakyFunction"]
    event = {"key": f"direct-{uuid.uuid4().hex[:8]}", "fail_times": 1}

    first = lambda_.invoke(FunctionName=name, Payload=json.dumps(event))
    second = lambda_.invoke(FunctionName=name, Payload=json.dumps(event))

    assert first["FunctionError"] == "Unhandled"
    assert json.loads(first["Payload"].read())["errorType"] == "TransientModelError"
    assert "FunctionError" not in second
    answer = json.loads(second["Payload"].read())
    assert answer["attempts"] == 2  # the module stayed imported, like a warm Lambda
    assert 0 < answer["remaining_ms"] <= 10_000  # the template's Timeout


# SQS --------------------------------------------------------------------------------------------


def receipts(fixtures: Template, body: str) -> dict[str, Any]:
    table = boto3.resource("dynamodb", region_name=REGION).Table(fixtures.physical["ReceiptsTable"])
    item: dict[str, Any] = table.get_item(Key={"body": body}, ConsistentRead=True).get("Item", {})
    return item


def test_failed_messages_are_redelivered_until_the_dlq_and_the_others_deleted(fixtures: Template) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    queue_url = fixtures.attributes["WorkQueue"]["QueueUrl"]
    dlq_url = fixtures.attributes["WorkDeadLetterQueue"]["QueueUrl"]
    poison, good = f"poison-{uuid.uuid4().hex[:8]}", [f"good-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    sqs.send_message_batch(
        QueueUrl=queue_url, Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate([poison, *good])]
    )

    dead = wait_for(lambda: sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=1).get("Messages"), timeout=25)

    assert [m["Body"] for m in dead] == [poison]
    # Reported in batchItemFailures on each of its maxReceiveCount (5) receives, then moved by the redrive policy.
    assert [int(n) for n in receipts(fixtures, poison)["receive_counts"]] == [1, 2, 3, 4, 5]
    for body in good:  # succeeded once, deleted: never delivered again
        assert [int(n) for n in receipts(fixtures, body)["receive_counts"]] == [1]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_template_sqs_events_become_polled_event_source_mappings(stack: LocalStack) -> None:
    mappings = boto3.client("lambda", region_name=REGION).list_event_source_mappings(
        FunctionName=stack.template.physical["StarterFunction"]
    )["EventSourceMappings"]

    assert len(mappings) == 1
    [mapping] = mappings
    assert mapping["EventSourceArn"] == stack.template.attributes["IngestQueue"]["Arn"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["ScalingConfig"] == {
        "MaximumConcurrency": int(stack.template.parameters["IngestMaximumConcurrency"])
    }


# S3 and template.yaml -----------------------------------------------------------------------------


def test_an_object_put_under_inbox_notifies_the_queue_after_the_test_event(fixtures: Template) -> None:
    sqs, s3 = boto3.client("sqs", region_name=REGION), boto3.client("s3", region_name=REGION)
    queue_url, bucket = fixtures.attributes["DropsQueue"]["QueueUrl"], fixtures.physical["DropsBucket"]

    def next_body() -> dict[str, Any]:
        [message] = wait_for(lambda: sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages"))
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        body: dict[str, Any] = json.loads(message["Body"])
        return body

    assert next_body()["Event"] == "s3:TestEvent"  # sent when the notification was configured
    s3.put_object(Bucket=bucket, Key="outbox/ignored.txt", Body=b"not under inbox/")
    s3.put_object(Bucket=bucket, Key="inbox/a report+v2.txt", Body=b"text")

    [record] = next_body()["Records"]
    assert record["eventName"].startswith("ObjectCreated:")
    assert record["s3"]["bucket"]["name"] == bucket
    assert record["s3"]["object"]["key"] == "inbox/a+report%2Bv2.txt"  # URL-encoded, as S3 sends it
    assert "Messages" not in sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1)
    assert s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]["BlockPublicAcls"] is True


def test_template_state_machine_is_created_with_its_substitutions_resolved(stack: LocalStack) -> None:
    template = stack.template
    definition = boto3.client("stepfunctions", region_name=REGION).describe_state_machine(
        stateMachineArn=template.attributes["SummarizeStateMachine"]["Arn"]
    )["definition"]

    assert "${" not in definition
    substitutions = template.resolve(
        template.body["Resources"]["SummarizeStateMachine"]["Properties"]["DefinitionSubstitutions"]
    )
    function_arns = [v for v in substitutions.values() if str(v).startswith("arn:aws:lambda:")]
    assert function_arns and all(f'"{arn}"' in definition for arn in function_arns)
    queue = boto3.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=template.attributes["IngestQueue"]["QueueUrl"], AttributeNames=["RedrivePolicy"]
    )["Attributes"]
    assert (
        json.loads(queue["RedrivePolicy"])["deadLetterTargetArn"] == template.attributes["IngestDeadLetterQueue"]["Arn"]
    )


# python -m local invoke ----------------------------------------------------------------------------


def test_invoke_command_prints_the_payload_and_the_function_error() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'layers' / 'core'}{os.pathsep}{ROOT}"}
    for name in ("AWS_ENDPOINT_URL", "MOTO_PORT"):
        env.pop(name, None)  # its own local stack, not this module's
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local",
            "invoke",
            "--template",
            str(FIXTURES / "template.yaml"),
            "FlakyFunction",
            str(FIXTURES / "flaky-event.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["errorType"] == "TransientModelError"
    assert "FunctionError: Unhandled" in result.stderr
