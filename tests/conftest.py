"""Shared fixtures. Tests never reach AWS: boto3 gets dummy credentials and, where it talks to AWS
at all, an endpoint on 127.0.0.1 (moto)."""

from __future__ import annotations

import os

import pytest

os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    POWERTOOLS_TRACE_DISABLED="true",
)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
