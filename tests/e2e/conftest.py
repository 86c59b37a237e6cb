"""The local stack, started once for the e2e tests on free ports, read over real HTTP."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from local.stack import LocalStack

#: Small limits so that "too large" is cheap to send; fast checkpoints and pings so tests are quick.
OVERRIDES = {
    "PRECIS_TIERS_FILE": str(Path(__file__).resolve().parents[1] / "data" / "tiers.json"),
    "PRECIS_MAX_BODY_BYTES": "600000",
    "PRECIS_MAX_INPUT_TOKENS": "100000",
    "PRECIS_ASYNC_THRESHOLD_TOKENS": "20000",
    "PRECIS_MAX_DOCUMENT_BYTES": "500000",
    "PRECIS_MAX_QUEUE_BACKLOG": "5",
    "PRECIS_CHECKPOINT_INTERVAL_S": "0.1",
    "PRECIS_PING_INTERVAL_S": "0.3",
    "PRECIS_BREAKER_FAILURES": "3",
    "PRECIS_BREAKER_OPEN_S": "1.5",
}


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    # The functions' output is kept (stack.function_logs) for the tests that read their logs.
    with LocalStack(port=0, overrides=OVERRIDES, function_logs=[]) as running:
        yield running


@pytest.fixture(scope="session")
def other_user(stack: LocalStack) -> str:
    key = f"pk_other_{secrets.token_hex(8)}"
    stack.add_key(key, user_id="someone-else", tier="free")
    return key


@pytest.fixture
def client(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=stack.url,
        headers={"authorization": f"Bearer {stack.api_key}"},
        timeout=httpx.Timeout(10.0, read=30.0),
    ) as http:
        yield http


@pytest.fixture
def requests_table(stack: LocalStack) -> Any:
    return boto3.resource("dynamodb").Table(stack.template.physical["RequestsTable"])
