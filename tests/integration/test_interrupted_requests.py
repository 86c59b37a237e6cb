"""A request whose instance died: its record, never finished, reads as `interrupted` once stale."""

from __future__ import annotations

import time
from typing import Any

from precis.adapters.dynamodb import RequestStore

REQUEST = "req_" + "c" * 32
STALE_AFTER_S = 0.3


def test_a_stale_in_progress_record_reads_as_interrupted_with_its_text(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"], interrupted_after_s=STALE_AFTER_S)
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    store.checkpoint(REQUEST, "The lamp was", 3)
    assert store.get(REQUEST, "alice").status == "in_progress"
    time.sleep(STALE_AFTER_S + 0.1)
    record = store.get(REQUEST, "alice")
    assert (record.status, record.text, record.partial) == ("interrupted", "The lamp was", True)
    assert record.error is not None and record.error.code == "interrupted" and record.error.retryable
    assert store.request_cancel(REQUEST, "alice").status == "interrupted", "nothing is left to cancel"
    stored = tables["RequestsTable"].get_item(Key={"pk": f"request#{REQUEST}"})["Item"]
    assert stored["status"] == "in_progress", "only the reading changes"

    store.checkpoint(REQUEST, "The lamp was lit", 4)  # a late write of a stream still alive wins
    assert store.get(REQUEST, "alice").status == "in_progress"


def test_a_finished_record_never_reads_as_interrupted(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"], interrupted_after_s=STALE_AFTER_S)
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    tables["RequestsTable"].update_item(
        Key={"pk": f"request#{REQUEST}"},
        UpdateExpression="SET #status = :done",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues={":done": "completed"},
    )
    time.sleep(STALE_AFTER_S + 0.1)
    assert store.get(REQUEST, "alice").status == "completed"


def test_without_a_staleness_limit_a_record_stays_in_progress(tables: dict[str, Any]) -> None:
    store = RequestStore(tables["RequestsTable"])
    store.create(REQUEST, "alice", "local", "tldr", input_tokens=100)
    time.sleep(0.1)
    assert store.get(REQUEST, "alice").status == "in_progress"
