"""The local stack: the whole service on 127.0.0.1 with no AWS account and no Docker.

moto runs in server mode in a process of its own (local/cloud.py); the resources are created from
template.yaml (read from it, never listed twice); the gateway is served by uvicorn with the
environment template.yaml gives the gateway function, its `!Ref`s resolved to the local resource
names. The code reaches moto through the same boto3 adapters as in AWS, pointed at it by
AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from pathlib import Path
from typing import IO, Any

import boto3
import uvicorn
import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
STACK_NAME = "precis-local"
REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
#: The environment variable that tells local/cloud.py where a function's code is (its CodeUri).
CODE_URI_VARIABLE = "PRECIS_LOCAL_CODE_URI"
PSEUDO_PARAMETERS = {
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT_ID,
    "AWS::StackName": STACK_NAME,
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackId": f"arn:aws:cloudformation:{REGION}:{ACCOUNT_ID}:stack/{STACK_NAME}/local",
}
#: Settings the local stack gives the functions and the gateway unless told otherwise: no X-Ray
#: daemon runs here, so tracing is opted into (PRECIS_TRACING=true and AWS_XRAY_DAEMON_ADDRESS).
LOCAL_DEFAULTS = {"PRECIS_TRACING": "false"}


# template.yaml -------------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags: `!Ref X` -> {"Ref": X}, `!Sub s` -> {"Fn::Sub": s}."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = suffix if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    template: dict[str, Any] = yaml.load(path.read_text(), Loader=_CfnLoader)
    return template


@dataclass
class Template:
    """template.yaml, resolved for the local stack: parameters at their defaults (or overrides),
    `!Ref` to a resource -> the local physical name."""

    body: dict[str, Any]
    parameters: dict[str, str]
    #: Logical id -> the local resource's name (`<prefix>-<LogicalId>`; lower case for buckets).
    physical: dict[str, str] = field(default_factory=dict)
    #: Logical id -> what `!Ref` (key "Ref") and `!GetAtt X.<key>` give, once the resource exists.
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    #: CodeUri and DefinitionUri are relative to the template's directory.
    directory: Path = ROOT

    @classmethod
    def read(cls, path: Path = TEMPLATE, overrides: Mapping[str, str] | None = None) -> Template:
        body = load_template(path)
        parameters = {name: str(spec.get("Default", "")) for name, spec in body.get("Parameters", {}).items()}
        parameters.update(overrides or {})
        return cls(body=body, parameters=parameters, directory=path.resolve().parent)

    def resources(self, type_: str) -> dict[str, dict[str, Any]]:
        return {lid: r for lid, r in self.body["Resources"].items() if r["Type"] == type_}

    def resolve(self, value: Any) -> Any:
        """Resolve the intrinsics the local stack needs: Ref, GetAtt, Sub with ${Name} and ${Name.Attr},
        Join, and pseudo params."""
        if isinstance(value, dict) and len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Fn::GetAtt":
                logical_id, attribute = arg if isinstance(arg, list) else str(arg).split(".", 1)
                return self._get_att(logical_id, attribute)
            if key == "Fn::Join":
                separator, items = arg
                return str(separator).join(str(self.resolve(item)) for item in items)
            if key == "Fn::Sub":
                text, extra = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
                for name in [*extra, *self.parameters, *self.physical, *PSEUDO_PARAMETERS]:
                    if "${" + name + "}" in text:
                        replacement = self.resolve(extra[name]) if name in extra else self._ref(name)
                        text = text.replace("${" + name + "}", str(replacement))
                for logical_id, attributes in self.attributes.items():
                    for attribute, attribute_value in attributes.items():
                        text = text.replace("${" + f"{logical_id}.{attribute}" + "}", attribute_value)
                return text
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def _ref(self, name: str) -> str:
        if name in PSEUDO_PARAMETERS:
            return PSEUDO_PARAMETERS[name]
        if name in self.parameters:
            return self.parameters[name]
        if "Ref" in self.attributes.get(name, {}):
            return self.attributes[name]["Ref"]  # what CloudFormation's Ref gives: a queue's URL, an ARN, ...
        if name in self.physical:
            return self.physical[name]
        raise KeyError(f"template.yaml refers to {name!r}, which the local stack does not know")

    def _get_att(self, logical_id: str, attribute: str) -> str:
        try:
            return self.attributes[logical_id][attribute]
        except KeyError:
            raise KeyError(
                f"template.yaml refers to {logical_id}.{attribute}, which the local stack does not know"
            ) from None

    def function_environment(self, logical_id: str) -> dict[str, str]:
        """The environment Lambda would give the function: Globals, then the function's own."""
        globals_env = self.body.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
        own = self.body["Resources"][logical_id]["Properties"].get("Environment", {}).get("Variables", {})
        return {k: str(self.resolve(v)) for k, v in {**globals_env, **own}.items()}


# Resources --------------------------------------------------------------------------------------

#: What a creator returns: `Ref` (what CloudFormation's Ref gives, when it is not the name) and the
#: attributes `!GetAtt` can ask for (Arn, QueueUrl, ...).
Attributes = dict[str, str]
Creator = Callable[[boto3.Session, str, dict[str, Any]], Attributes | None]

#: The role every local function and state machine is created with: moto checks that a function's
#: role exists, and nothing locally enforces what it allows.
LOCAL_ROLE = "precis-local-execution-role"


def _local_role_arn(session: boto3.Session) -> str:
    iam = session.client("iam")
    try:
        return iam.get_role(RoleName=LOCAL_ROLE)["Role"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": ["lambda.amazonaws.com", "states.amazonaws.com"]},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        return iam.create_role(RoleName=LOCAL_ROLE, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def _attribute_string(value: Any) -> str:
    """An SQS attribute or ASL substitution as text: YAML's true is "true", not "True"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _create_table(session: boto3.Session, name: str, props: dict[str, Any]) -> Attributes:
    client = session.client("dynamodb")
    args: dict[str, Any] = {
        "TableName": name,
        "AttributeDefinitions": props["AttributeDefinitions"],
        "KeySchema": props["KeySchema"],
        "BillingMode": props.get("BillingMode", "PROVISIONED"),
    }
    if "GlobalSecondaryIndexes" in props:
        args["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
    if "SSESpecification" in props:
        args["SSESpecification"] = {"Enabled": bool(props["SSESpecification"].get("SSEEnabled"))}
    table = client.create_table(**args)["TableDescription"]
    ttl = props.get("TimeToLiveSpecification")
    if ttl:
        client.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)
    return {"Arn": table["TableArn"]}


#: The queue properties that are SQS attributes of the same name.
_QUEUE_ATTRIBUTES = (
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "DelaySeconds",
    "FifoQueue",
    "FifoThroughputLimit",
    "KmsDataKeyReusePeriodSeconds",
    "KmsMasterKeyId",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "ReceiveMessageWaitTimeSeconds",
    "RedriveAllowPolicy",
    "RedrivePolicy",
    "SqsManagedSseEnabled",
    "VisibilityTimeout",
)


def _create_queue(session: boto3.Session, name: str, props: dict[str, Any]) -> Attributes:
    client: Any = session.client("sqs")  # the attributes come from the template, unchecked by the stubs
    attributes = {key: _attribute_string(props[key]) for key in _QUEUE_ATTRIBUTES if key in props}
    url = client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return {"Ref": url, "Arn": arn, "QueueUrl": url, "QueueName": name}


def _notification_configuration(props: dict[str, Any]) -> dict[str, Any]:
    """CloudFormation's NotificationConfiguration in the shape of S3's PutBucketNotificationConfiguration."""
    targets = (
        ("QueueConfigurations", "QueueConfigurations", "Queue", "QueueArn"),
        ("TopicConfigurations", "TopicConfigurations", "Topic", "TopicArn"),
        ("LambdaConfigurations", "LambdaFunctionConfigurations", "Function", "LambdaFunctionArn"),
    )
    configuration: dict[str, Any] = {}
    for cfn_key, api_key, cfn_target, api_target in targets:
        entries = []
        for entry in props.get(cfn_key, []):
            converted: dict[str, Any] = {api_target: entry[cfn_target], "Events": [entry["Event"]]}
            rules = entry.get("Filter", {}).get("S3Key", {}).get("Rules", [])
            if rules:
                # moto matches the rule names "prefix" and "suffix" exactly; CloudFormation takes either case.
                filter_rules = [{"Name": rule["Name"].lower(), "Value": rule["Value"]} for rule in rules]
                converted["Filter"] = {"Key": {"FilterRules": filter_rules}}
            entries.append(converted)
        if entries:
            configuration[api_key] = entries
    if props.get("EventBridgeConfiguration", {}).get("EventBridgeEnabled"):
        configuration["EventBridgeConfiguration"] = {}
    return configuration


def _create_bucket(session: boto3.Session, name: str, props: dict[str, Any]) -> Attributes:
    """The bucket with its encryption, public access block, versioning and notifications (moto sends
    them to SQS as S3 does, `s3:TestEvent` first). Lifecycle rules and ownership controls have no
    effect on moto and are left out."""
    client: Any = session.client("s3")  # the configurations come from the template, unchecked by the stubs
    client.create_bucket(Bucket=name)  # us-east-1 takes no LocationConstraint
    rules = props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration")
    if rules:
        # CloudFormation's ServerSideEncryptionByDefault is the API's ApplyServerSideEncryptionByDefault.
        api_rules = [
            {
                ("ApplyServerSideEncryptionByDefault" if k == "ServerSideEncryptionByDefault" else k): v
                for k, v in rule.items()
            }
            for rule in rules
        ]
        client.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": api_rules})
    if "PublicAccessBlockConfiguration" in props:
        client.put_public_access_block(
            Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"]
        )
    if "VersioningConfiguration" in props:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration=props["VersioningConfiguration"])
    if "NotificationConfiguration" in props:
        client.put_bucket_notification_configuration(
            Bucket=name, NotificationConfiguration=_notification_configuration(props["NotificationConfiguration"])
        )
    return {
        "Arn": f"arn:aws:s3:::{name}",
        "DomainName": f"{name}.s3.amazonaws.com",
        "RegionalDomainName": f"{name}.s3.{REGION}.amazonaws.com",
    }


def _placeholder_code() -> bytes:
    """The zip a local function is created with: moto wants code, the dispatcher never reads it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("README", f"local/cloud.py runs this function from ${CODE_URI_VARIABLE}.\n")
    return buffer.getvalue()


def _create_function(session: boto3.Session, name: str, props: dict[str, Any]) -> Attributes:
    """The function in moto's Lambda, so that state machines and boto3 can invoke it by name or ARN.
    local/cloud.py runs it from its CodeUri, named by the PRECIS_LOCAL_CODE_URI variable."""
    code_uri = props.get("CodeUri")
    if not isinstance(code_uri, str):
        raise ValueError(f"{name}: the local stack runs functions from a local CodeUri, not {code_uri!r}")
    variables = {k: str(v) for k, v in props.get("Environment", {}).get("Variables", {}).items()}
    variables[CODE_URI_VARIABLE] = code_uri
    args: dict[str, Any] = {
        "FunctionName": name,
        "Runtime": props.get("Runtime", "python3.13"),
        "Role": _local_role_arn(session),
        "Handler": props.get("Handler", "app.handler"),
        "Code": {"ZipFile": _placeholder_code()},
        "Timeout": int(props.get("Timeout", 3)),
        "MemorySize": int(props.get("MemorySize", 128)),
        "Environment": {"Variables": variables},
    }
    if props.get("Description"):
        args["Description"] = str(props["Description"])
    arn = session.client("lambda").create_function(**args)["FunctionArn"]
    return {"Arn": arn}


def _create_state_machine(session: boto3.Session, name: str, props: dict[str, Any]) -> Attributes:
    """The state machine from DefinitionUri (or Definition), its DefinitionSubstitutions applied as SAM
    applies them: `${Name}` replaced by the value's text, so that numbers land unquoted."""
    if "Definition" in props:
        definition = json.dumps(props["Definition"])
    elif isinstance(props.get("DefinitionUri"), str):
        definition = Path(props["DefinitionUri"]).read_text("utf-8")
    else:
        raise ValueError(f"{name}: the local stack reads a local DefinitionUri or an inline Definition")
    for key, value in props.get("DefinitionSubstitutions", {}).items():
        definition = definition.replace("${" + key + "}", _attribute_string(value))
    arn = session.client("stepfunctions").create_state_machine(
        name=name, definition=definition, roleArn=_local_role_arn(session), type=props.get("Type", "STANDARD")
    )["stateMachineArn"]
    return {"Ref": arn, "Arn": arn, "Name": name}


#: How each resource type of template.yaml becomes a local resource.
CREATORS: dict[str, Creator] = {
    "AWS::DynamoDB::Table": _create_table,
    "AWS::SQS::Queue": _create_queue,
    "AWS::S3::Bucket": _create_bucket,
    "AWS::Serverless::Function": _create_function,
    "AWS::Serverless::StateMachine": _create_state_machine,
}

#: The function properties a local function is made of (own, else from Globals). The others (Layers,
#: Policies, FunctionUrlConfig, ...) may refer to resources the local stack does not create.
_FUNCTION_PROPERTIES = ("CodeUri", "Handler", "Runtime", "Timeout", "MemorySize", "Description")
_STATE_MACHINE_PROPERTIES = ("Definition", "DefinitionUri", "DefinitionSubstitutions", "Type")


def creation_properties(template: Template, logical_id: str) -> dict[str, Any]:
    """The properties the resource's creator reads, not yet resolved; paths made absolute."""
    resource = template.body["Resources"][logical_id]
    props: dict[str, Any] = resource.get("Properties", {})
    if resource["Type"] == "AWS::Serverless::Function":
        defaults = template.body.get("Globals", {}).get("Function", {})
        chosen = {
            key: props.get(key, defaults.get(key)) for key in _FUNCTION_PROPERTIES if key in props or key in defaults
        }
        variables = {
            **defaults.get("Environment", {}).get("Variables", {}),
            **props.get("Environment", {}).get("Variables", {}),
        }
        chosen["Environment"] = {"Variables": variables}
        if isinstance(chosen.get("CodeUri"), str):
            chosen["CodeUri"] = str(template.directory / chosen["CodeUri"])
        return chosen
    if resource["Type"] == "AWS::Serverless::StateMachine":
        chosen = {key: props[key] for key in _STATE_MACHINE_PROPERTIES if key in props}
        if isinstance(chosen.get("DefinitionUri"), str):
            chosen["DefinitionUri"] = str(template.directory / chosen["DefinitionUri"])
        return chosen
    return props


def _references(value: Any) -> set[str]:
    """The logical ids (and parameters) that `value` refers to through Ref, GetAtt and Sub."""
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return {str(arg)}
            if key == "Fn::GetAtt":
                return {arg[0] if isinstance(arg, list) else str(arg).split(".", 1)[0]}
            if key == "Fn::Sub":
                text, extra = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
                names = {match.split(".", 1)[0] for match in re.findall(r"\$\{([^}!]+)\}", text)}
                return (names - set(extra)) | _references(extra)
        return set().union(*(_references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    return set()


def creation_order(template: Template) -> list[str]:
    """The logical ids the local stack creates, each after those it refers to (a bucket after the
    queue it notifies, a state machine after its functions, a function after what its environment names)."""
    resources = template.body["Resources"]
    local = [logical_id for logical_id, resource in resources.items() if resource["Type"] in CREATORS]
    graph: dict[str, set[str]] = {}
    for logical_id in local:
        depends_on = resources[logical_id].get("DependsOn", [])
        wanted = _references(creation_properties(template, logical_id)) | set(
            [depends_on] if isinstance(depends_on, str) else depends_on
        )
        graph[logical_id] = {other for other in wanted if other in local and other != logical_id}
    return list(TopologicalSorter(graph).static_order())


def physical_name(template: Template, logical_id: str, prefix: str = STACK_NAME) -> str:
    """`<prefix>-<LogicalId>`, within each service's naming rules."""
    resource = template.body["Resources"][logical_id]
    name = f"{prefix}-{logical_id}"
    if resource["Type"] == "AWS::S3::Bucket":
        return name.lower()  # bucket names are lower case
    if resource["Type"] == "AWS::SQS::Queue" and resource.get("Properties", {}).get("FifoQueue"):
        return f"{name}.fifo"
    return name


def create_resources(template: Template, session: boto3.Session, prefix: str = STACK_NAME) -> None:
    """Create every resource of `template` the local stack knows, named `<prefix>-<LogicalId>`, in
    dependency order; `template.physical` and `template.attributes` then describe them."""
    for logical_id in creation_order(template):
        resource = template.body["Resources"][logical_id]
        name = physical_name(template, logical_id, prefix)
        template.physical[logical_id] = name
        props = template.resolve(creation_properties(template, logical_id))
        attributes = CREATORS[resource["Type"]](session, name, props) or {}
        template.attributes[logical_id] = attributes


#: SAM's SQS event properties that are CreateEventSourceMapping parameters of the same name.
_SQS_EVENT_PROPERTIES = (
    "BatchSize",
    "Enabled",
    "FilterCriteria",
    "FunctionResponseTypes",
    "MaximumBatchingWindowInSeconds",
    "ScalingConfig",
)


def sqs_event_sources(template: Template) -> list[dict[str, Any]]:
    """The SQS event sources of the template's created functions, as CreateEventSourceMapping's
    parameters (what SAM turns an `Events: {Type: SQS}` entry into)."""
    mappings: list[dict[str, Any]] = []
    for logical_id, resource in template.resources("AWS::Serverless::Function").items():
        if logical_id not in template.physical:
            continue
        for event in resource["Properties"].get("Events", {}).values():
            if event.get("Type") != "SQS":
                continue
            props = template.resolve(event.get("Properties", {}))
            mapping = {key: props[key] for key in _SQS_EVENT_PROPERTIES if key in props}
            if "Enabled" in mapping:
                mapping["Enabled"] = str(mapping["Enabled"]).lower() != "false"
            if "MaximumConcurrency" in mapping.get("ScalingConfig", {}):
                mapping["ScalingConfig"] = {"MaximumConcurrency": int(mapping["ScalingConfig"]["MaximumConcurrency"])}
            for key in ("BatchSize", "MaximumBatchingWindowInSeconds"):
                if key in mapping:
                    mapping[key] = int(mapping[key])
            mappings.append(
                {"FunctionName": template.physical[logical_id], "EventSourceArn": props["Queue"], **mapping}
            )
    return mappings


# The stack ---------------------------------------------------------------------------------------


@dataclass
class LocalStack:
    """moto + the template's resources + the functions and their SQS pollers + the gateway, all on 127.0.0.1.

    The functions run in moto's process (local/cloud.py); `gateway=False` starts everything but the
    gateway (what `python -m local invoke` needs). Their output (Powertools JSON logs, EMF) goes to
    this process's standard error; given a list as `function_logs`, each line is also appended to it."""

    port: int = 8080
    api_key: str = ""
    template: Template = field(default_factory=Template.read)
    overrides: dict[str, str] = field(default_factory=dict)
    gateway: bool = True
    function_logs: list[str] | None = None
    moto_endpoint: str = ""
    url: str = ""
    _stops: list[Callable[[], None]] = field(default_factory=list)
    _cloud: subprocess.Popen[str] | None = field(default=None, repr=False)

    def start(self) -> LocalStack:
        try:
            self._start_moto()
            self._create_resources()
            self._start_functions()
            if self.gateway:
                self.api_key = self.api_key or f"pk_dev_{secrets.token_urlsafe(18)}"
                self._register_dev_key()
                self._serve_gateway()
        except BaseException:
            self.stop()  # no moto process left behind by a stack that failed to start
            raise
        return self

    def stop(self) -> None:
        while self._stops:
            self._stops.pop()()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _start_moto(self) -> None:
        cloud = subprocess.Popen(
            [sys.executable, "-m", "local.cloud"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if self.function_logs is None else subprocess.PIPE,
            text=True,
            errors="replace",
            # Out of the terminal's process group: Ctrl-C stops the stack, which then reads what it
            # needs from moto (`python -m local serve` saves the cost ledger) before it ends moto by
            # closing its stdin (it also ends when this process dies: its stdin closes).
            start_new_session=True,
        )
        assert cloud.stdout is not None and cloud.stdin is not None
        tee = None
        if self.function_logs is not None:
            tee = threading.Thread(target=_tee, args=(cloud.stderr, self.function_logs), name="cloud-logs", daemon=True)
            tee.start()
        ready = cloud.stdout.readline().split()
        if len(ready) != 2 or ready[0] != "READY":
            cloud.kill()
            raise RuntimeError("moto did not start (python -m local.cloud)")

        def stop() -> None:
            assert cloud.stdin is not None and cloud.stdout is not None
            cloud.stdin.close()
            try:
                cloud.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cloud.kill()
                cloud.wait()
            cloud.stdout.close()
            if tee is not None:
                tee.join(timeout=5)

        self._stops.append(stop)
        self._cloud = cloud
        port = int(ready[1])
        self.moto_endpoint = f"http://127.0.0.1:{port}"
        # Process-wide on purpose: every boto3 client in this process must reach moto, never AWS.
        os.environ.update(
            AWS_ENDPOINT_URL=self.moto_endpoint,
            MOTO_PORT=str(port),
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
        )
        os.environ.pop("AWS_PROFILE", None)

    def _create_resources(self) -> None:
        create_resources(self.template, boto3.Session(region_name=REGION))

    def function_overrides(self) -> dict[str, str]:
        """What the functions' environment gets on top of template.yaml's, as the gateway's does."""
        return {**LOCAL_DEFAULTS, **{k: v for k, v in os.environ.items() if k.startswith("PRECIS_")}, **self.overrides}

    def _start_functions(self) -> None:
        """Tell the cloud process that the functions exist (it applies their environment before any
        of them runs), then map the SQS event sources to them: local/cloud.py polls each mapping."""
        cloud = self._cloud
        assert cloud is not None and cloud.stdin is not None and cloud.stdout is not None
        cloud.stdin.write(f"START {json.dumps({'environment': self.function_overrides()})}\n")
        cloud.stdin.flush()
        if cloud.stdout.readline().strip() != "STARTED":
            raise RuntimeError("the local stack's functions did not start (python -m local.cloud)")
        lambda_ = boto3.client("lambda", region_name=REGION)
        for mapping in sqs_event_sources(self.template):
            lambda_.create_event_source_mapping(**mapping)

    def gateway_environment(self) -> dict[str, str]:
        """The gateway function's environment from template.yaml, then the caller's PRECIS_* overrides."""
        env = self.template.function_environment("GatewayFunction")
        env.update(LOCAL_DEFAULTS)
        env.update({k: v for k, v in os.environ.items() if k.startswith("PRECIS_")})
        env.update(self.overrides)
        return env

    def _register_dev_key(self) -> None:
        self.add_key(self.api_key, user_id="dev", tier="enterprise")

    def add_key(self, api_key: str, user_id: str, tier: str = "free") -> None:
        from precis.adapters.dynamodb import KeyStore

        table = boto3.resource("dynamodb", region_name=REGION).Table(self.template.physical["KeysTable"])
        KeyStore(table).add(api_key, user_id=user_id, tier=tier)

    def _serve_gateway(self) -> None:
        from precis.api.app import create_app
        from precis.settings import Settings
        from precis.wiring import build_services

        app = create_app(build_services(Settings.from_env(self.gateway_environment())))
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="gateway", daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the gateway could not start on 127.0.0.1:{self.port}")
            threading.Event().wait(0.01)

        def stop() -> None:
            server.should_exit = True
            thread.join(timeout=10)

        self._stops.append(stop)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"


def _tee(stream: IO[str], lines: list[str]) -> None:
    """Pass the cloud process's output on to this process's standard error, keeping each line."""
    for line in stream:
        lines.append(line.rstrip("\n"))
        with suppress(ValueError, OSError):  # stderr closed (a test runner's capture ended): keep reading
            sys.stderr.write(line)
    stream.close()


@contextmanager
def running(**kwargs: Any) -> Iterator[LocalStack]:
    stack = LocalStack(**kwargs)
    try:
        yield stack.start()
    finally:
        stack.stop()
