"""The CLI's admin command against a KeysTable (moto standing in for a deployed stack)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from local.__main__ import main
from precis.adapters.dynamodb import KeyStore


def test_add_key_creates_a_working_key_stored_only_hashed(
    tables: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    table = tables["KeysTable"]
    assert main(["add-key", "--table", table.name, "--user", "carol", "--tier", "pro"]) == 0
    [api_key] = re.findall(r"pk_[A-Za-z0-9_-]{20,}", capsys.readouterr().out)
    principal = KeyStore(table).find(api_key)
    assert principal is not None and (principal.user_id, principal.tier) == ("carol", "pro")
    assert api_key not in str(table.scan()["Items"])
