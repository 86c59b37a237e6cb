"""The gateway function's module as Lambda loads it, run with a function URL event through mangum
(the buffered path; the streaming path is uvicorn behind the web adapter, covered by tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from precis.adapters.dynamodb import KeyStore
from tests.support.functions import load_function

ROOT = Path(__file__).resolve().parents[2]


def load_gateway(monkeypatch: pytest.MonkeyPatch, tables: dict[str, Any]) -> ModuleType:
    monkeypatch.setenv("PRECIS_KEYS_TABLE", tables["KeysTable"].name)
    monkeypatch.setenv("PRECIS_REQUESTS_TABLE", tables["RequestsTable"].name)
    monkeypatch.setenv("PRECIS_QUOTAS_TABLE", tables["QuotasTable"].name)
    monkeypatch.setenv("PRECIS_LEDGER_TABLE", tables["LedgerTable"].name)
    return load_function("gateway")


def event(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "events" / f"gateway-{name}.json").read_text())
    return loaded


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_function_url_event_is_summarized_through_mangum(
    monkeypatch: pytest.MonkeyPatch, tables: dict[str, Any]
) -> None:
    gateway = load_gateway(monkeypatch, tables)
    KeyStore(tables["KeysTable"]).add("pk_test_events_key", user_id="events", tier="free")
    response = gateway.handler(event("function-url-summarize"), None)
    assert response["statusCode"] == 200, response["body"]
    body = json.loads(response["body"])
    assert body["finish_reason"] == "stop" and body["summary"].startswith("- ")
    assert body["usage"]["output_tokens"] <= 120
    [item] = [i for i in tables["RequestsTable"].scan()["Items"] if i["pk"].startswith("request#")]
    assert item["status"] == "completed" and item["user_id"] == "events"
    [charged] = [i for i in tables["LedgerTable"].scan()["Items"] if i["sk"].startswith("entry#")]
    assert charged["id"] == item["request_id"] and charged["output_tokens"] == body["usage"]["output_tokens"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_function_url_event_without_a_known_key_is_401(monkeypatch: pytest.MonkeyPatch, tables: dict[str, Any]) -> None:
    gateway = load_gateway(monkeypatch, tables)
    response = gateway.handler(event("function-url-summarize"), None)
    assert response["statusCode"] == 401
    assert json.loads(response["body"])["error"]["code"] == "unauthenticated"
    assert tables["RequestsTable"].scan(Select="COUNT")["Count"] == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_healthz_event(monkeypatch: pytest.MonkeyPatch, tables: dict[str, Any]) -> None:
    gateway = load_gateway(monkeypatch, tables)
    response = gateway.handler(event("function-url-healthz"), None)
    assert response["statusCode"] == 200 and json.loads(response["body"])["status"] == "ok"
