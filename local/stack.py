"""The local stack: the whole service on 127.0.0.1 with no AWS account and no Docker.

moto runs in server mode in a process of its own (local/cloud.py); the resources are created from
template.yaml (read from it, never listed twice); the gateway is served by uvicorn with the
environment template.yaml gives the gateway function, its `!Ref`s resolved to the local resource
names. The code reaches moto through the same boto3 adapters as in AWS, pointed at it by
AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import uvicorn
import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
STACK_NAME = "precis-local"
REGION = "us-east-1"


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
    physical: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path = TEMPLATE, overrides: Mapping[str, str] | None = None) -> Template:
        body = load_template(path)
        parameters = {name: str(spec.get("Default", "")) for name, spec in body.get("Parameters", {}).items()}
        parameters.update(overrides or {})
        return cls(body=body, parameters=parameters)

    def resources(self, type_: str) -> dict[str, dict[str, Any]]:
        return {lid: r for lid, r in self.body["Resources"].items() if r["Type"] == type_}

    def resolve(self, value: Any) -> Any:
        """Resolve the intrinsics the local stack needs: Ref, Sub with ${Name}, and pseudo params."""
        if isinstance(value, dict) and len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Fn::Sub":
                text, extra = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
                for name in [*extra, *self.parameters, *self.physical, "AWS::Region", "AWS::AccountId"]:
                    replacement = self.resolve(extra[name]) if name in extra else self._ref(name)
                    text = text.replace("${" + name + "}", str(replacement))
                return text
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def _ref(self, name: str) -> str:
        pseudo = {
            "AWS::Region": REGION,
            "AWS::AccountId": "123456789012",
            "AWS::StackName": STACK_NAME,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        if name in pseudo:
            return pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.physical:
            return self.physical[name]
        raise KeyError(f"template.yaml refers to {name!r}, which the local stack does not know")

    def function_environment(self, logical_id: str) -> dict[str, str]:
        """The environment Lambda would give the function: Globals, then the function's own."""
        globals_env = self.body.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
        own = self.body["Resources"][logical_id]["Properties"].get("Environment", {}).get("Variables", {})
        return {k: str(self.resolve(v)) for k, v in {**globals_env, **own}.items()}


# Resources --------------------------------------------------------------------------------------


def _create_table(session: boto3.Session, name: str, props: dict[str, Any]) -> None:
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
    client.create_table(**args)
    ttl = props.get("TimeToLiveSpecification")
    if ttl:
        client.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)


#: How each resource type of template.yaml becomes a local resource.
CREATORS: dict[str, Callable[[boto3.Session, str, dict[str, Any]], None]] = {
    "AWS::DynamoDB::Table": _create_table,
}


def create_resources(template: Template, session: boto3.Session, prefix: str = STACK_NAME) -> None:
    """Create every resource of `template` the local stack knows, named `<prefix>-<LogicalId>`."""
    for logical_id, resource in template.body["Resources"].items():
        creator = CREATORS.get(resource["Type"])
        if creator is None:
            continue
        name = f"{prefix}-{logical_id}"
        template.physical[logical_id] = name
        creator(session, name, template.resolve(resource.get("Properties", {})))


# The stack ---------------------------------------------------------------------------------------


@dataclass
class LocalStack:
    """moto + the template's resources + the gateway, all on 127.0.0.1."""

    port: int = 8080
    api_key: str = ""
    template: Template = field(default_factory=Template.read)
    overrides: dict[str, str] = field(default_factory=dict)
    moto_endpoint: str = ""
    url: str = ""
    _stops: list[Callable[[], None]] = field(default_factory=list)

    def start(self) -> LocalStack:
        self._start_moto()
        self._create_resources()
        self.api_key = self.api_key or f"pk_dev_{secrets.token_urlsafe(18)}"
        self._register_dev_key()
        self._serve_gateway()
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
            text=True,
        )
        assert cloud.stdout is not None and cloud.stdin is not None
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

        self._stops.append(stop)
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

    def gateway_environment(self) -> dict[str, str]:
        """The gateway function's environment from template.yaml, then the caller's PRECIS_* overrides."""
        env = self.template.function_environment("GatewayFunction")
        env.update({k: v for k, v in os.environ.items() if k.startswith("PRECIS_")})
        env.update(self.overrides)
        return env

    def _register_dev_key(self) -> None:
        from precis.adapters.dynamodb import KeyStore

        table = boto3.resource("dynamodb", region_name=REGION).Table(self.template.physical["KeysTable"])
        KeyStore(table).add(self.api_key, user_id="dev", tier="pro")

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


@contextmanager
def running(**kwargs: Any) -> Iterator[LocalStack]:
    stack = LocalStack(**kwargs)
    try:
        yield stack.start()
    finally:
        stack.stop()
