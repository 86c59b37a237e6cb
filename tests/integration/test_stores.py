"""The DynamoDB adapters against moto: API keys, request records, the cancel flag, idempotency keys."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from precis.adapters.dynamodb import KeyStore, RequestStore, hash_key
from precis.domain.errors import ConflictError, InvalidInputError, NotFoundError
from precis.domain.models import FinishReason, Style, Summary, Usage
from precis.domain.summarize import ErrorInfo, Outcome

REQUEST = "req_" + "a" * 32


def outcome(finish: FinishReason, text: str = "Done.", error: ErrorInfo | None = None) -> Outcome:
    return Outcome(
        request_id=REQUEST,
        user_id="alice",
        model="local",
        model_name="local",
        tier="free",
        summary=Summary(text=text, style=Style.TLDR, finish_reason=finish),
        usage=Usage(input_tokens=120, output_tokens=9),
        cost_usd=Decimal("0.000123"),
        latency_ms={"ttft": 12.5, "total": 40.0},
        error=error,
    )


def test_keys_are_stored_hashed_and_resolve_to_user_and_tier(tables: dict[str, Any]) -> None:
    keys = KeyStore(tables["KeysTable"])
    keys.add("pk_secret", user_id="alice", tier="pro")
    item = tables["KeysTable"].scan()["Items"][0]
    assert item["key_hash"] == hash_key("pk_secret") and "pk_secret" not in str(item)
    principal = keys.find("pk_secret")
    assert principal is not None and (principal.user_id, principal.tier) == ("alice", "pro")
    assert keys.find("pk_wrong") is None


def test_revoked_key_no_longer_resolves(tables: dict[str, Any]) -> None:
    keys = KeyStore(tables["KeysTable"])
    keys.add("pk_old", user_id="alice")
    tables["KeysTable"].update_item(
        Key={"key_hash": hash_key("pk_old")},
        UpdateExpression="SET revoked = :y",
        ExpressionAttributeValues={":y": True},
    )
    assert keys.find("pk_old") is None


def test_request_record_goes_from_in_progress_to_its_outcome(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    assert store.get(REQUEST, "alice").status == "in_progress"
    store.checkpoint(REQUEST, "Half", 3)
    assert store.get(REQUEST, "alice").text == "Half"
    store.finish(outcome(FinishReason.STOP))
    record = store.get(REQUEST, "alice")
    assert (record.status, record.text, record.finish_reason) == ("completed", "Done.", FinishReason.STOP)
    assert record.usage == Usage(input_tokens=120, output_tokens=9)
    assert record.cost_usd == pytest.approx(0.000123) and record.latency_ms == {"ttft": 12.5, "total": 40.0}
    assert tables["RequestsTable"].get_item(Key={"pk": f"request#{REQUEST}"})["Item"]["expires_at"] > 0


def test_failed_request_keeps_its_structured_error(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    store.finish(
        outcome(FinishReason.ERROR, "Partial", ErrorInfo(code="model_unavailable", message="x", retryable=True))
    )
    record = store.get(REQUEST, "alice")
    assert record.status == "failed" and record.partial and record.error is not None
    assert record.error.code == "model_unavailable"


def test_another_users_request_is_not_found(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    with pytest.raises(NotFoundError):
        store.get(REQUEST, "mallory")
    with pytest.raises(NotFoundError):
        store.request_cancel(REQUEST, "mallory")
    assert store.cancelled([REQUEST]) == set(), "mallory's attempt set no cancel flag"


def test_cancel_flag_is_seen_by_the_batched_poll(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    others = [f"req_{i:032x}" for i in range(150)]  # more than one BatchGetItem holds
    for request_id in [REQUEST, *others]:
        store.create(request_id, "alice", "local", "tldr", input_tokens=100)
    assert store.request_cancel(REQUEST, "alice").status == "in_progress"
    assert store.request_cancel(others[-1], "alice").status == "in_progress"
    assert store.cancelled([*others, REQUEST, "req_" + "f" * 32]) == {REQUEST, others[-1]}
    store.finish(outcome(FinishReason.CANCELLED, "Half"))
    assert store.request_cancel(REQUEST, "alice").status == "cancelled", "cancelling twice changes nothing"


def test_checkpoint_never_creates_a_record_nor_overwrites_a_finished_one(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    store.checkpoint(REQUEST, "ghost", 1)
    assert tables["RequestsTable"].scan(Select="COUNT")["Count"] == 0
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    store.finish(outcome(FinishReason.STOP, "Final."))
    store.checkpoint(REQUEST, "late checkpoint", 2)
    assert store.get(REQUEST, "alice").text == "Final."


def test_idempotency_key_binds_one_request_and_replays_it_when_finished(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    assert store.claim_idempotency_key("alice", "k1", "body-hash", REQUEST) is None
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    assert store.claim_idempotency_key("alice", "k1", "body-hash", "req_" + "b" * 32) == REQUEST
    with pytest.raises(ConflictError):
        store.replayable(REQUEST, "alice")
    store.finish(outcome(FinishReason.STOP))
    assert store.replayable(REQUEST, "alice").text == "Done."


def test_idempotency_keys_are_per_user_and_per_body(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    assert store.claim_idempotency_key("alice", "k1", "body-hash", REQUEST) is None
    assert store.claim_idempotency_key("bob", "k1", "body-hash", "req_" + "b" * 32) is None
    with pytest.raises(InvalidInputError):
        store.claim_idempotency_key("alice", "k1", "another-body", "req_" + "c" * 32)


def test_released_idempotency_key_can_be_claimed_again(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    store.claim_idempotency_key("alice", "k1", "body-hash", REQUEST)
    store.release_idempotency_key("alice", "k1")
    assert store.claim_idempotency_key("alice", "k1", "body-hash", "req_" + "b" * 32) is None
