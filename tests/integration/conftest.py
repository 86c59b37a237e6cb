"""Integration tests: adapters and handlers against moto, with tables built from template.yaml."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from local.stack import Template, create_resources


@pytest.fixture
def tables(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto in-process with the resources of template.yaml; the template's tables by logical id."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # a local stack of the e2e tests may have set it
    with mock_aws():
        template = Template.read()
        session = boto3.Session(region_name="us-east-1")
        create_resources(template, session, prefix="test")
        yield {
            logical_id: session.resource("dynamodb").Table(name)
            for logical_id, name in template.physical.items()
            if template.body["Resources"][logical_id]["Type"] == "AWS::DynamoDB::Table"
        }
