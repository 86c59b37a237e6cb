"""DynamoDB adapters: API keys, request records (with the cancel flag and checkpoints) and idempotency keys.

RequestsTable is keyed by `pk` and holds two kinds of item:
- `request#<id>`: one streaming request: owner, status, text so far, usage, cost, timings, and what
  a resume (`resume_from`) needs: the document's SHA-256, the output budget, the final call's inputs;
- `idempotency#<user>#<sha256(key)>`: which request an Idempotency-Key started, and a fingerprint of
  the body it came with.
Both expire through the table's TTL attribute `expires_at`.
"""

from __future__ import annotations

import hashlib
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import ClientError
from pydantic import Field

from precis.adapters.ledger import LedgerStore, transact
from precis.domain.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    NotResumableError,
    TransientStorageError,
)
from precis.domain.ledger import request_entry
from precis.domain.models import FinishReason, Frozen, Usage
from precis.observability import logger

if TYPE_CHECKING:
    from precis.domain.summarize import Outcome

#: `interrupted` is never stored: it is how a reader sees an `in_progress` record gone stale (see
#: `RequestStore.interrupted_after_s`).
RequestStatus = Literal["in_progress", "completed", "cancelled", "failed", "interrupted"]

_STATUS: dict[FinishReason, RequestStatus] = {
    FinishReason.STOP: "completed",
    FinishReason.LENGTH: "completed",
    FinishReason.CANCELLED: "cancelled",
    FinishReason.ERROR: "failed",
    FinishReason.TIMEOUT: "failed",
}


def hash_key(api_key: str) -> str:
    """API keys are stored only as their SHA-256: a leaked table leaks no usable key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def document_sha256(text: str) -> str:
    """What a request record keeps of its document: enough to tell that a resume sends the same one."""
    return hashlib.sha256(text.encode()).hexdigest()


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def from_dynamodb(value: Any) -> Any:
    """DynamoDB numbers come back as Decimal: integers become int, the rest float."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: from_dynamodb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_dynamodb(v) for v in value]
    return value


class Principal(Frozen):
    """Who is calling: resolved from an API key."""

    user_id: str
    tier: str


class KeyStore:
    def __init__(self, table: Any) -> None:
        self.table = table

    def find(self, api_key: str) -> Principal | None:
        item = self.table.get_item(Key={"key_hash": hash_key(api_key)}).get("Item")
        if item is None or item.get("revoked"):
            return None
        return Principal(user_id=item["user_id"], tier=item["tier"])

    def add(self, api_key: str, user_id: str, tier: str = "free") -> None:
        self.table.put_item(
            Item={"key_hash": hash_key(api_key), "user_id": user_id, "tier": tier, "created_at": int(time.time())}
        )


class RequestError(Frozen):
    code: str
    message: str
    retryable: bool


class RequestRecord(Frozen):
    """A streaming request as `GET /v1/requests/{id}` shows it."""

    request_id: str
    user_id: str = Field(exclude=True)
    status: RequestStatus
    model: str
    style: str
    text: str = ""
    usage: Usage = Usage()
    cost_usd: float = 0.0
    finish_reason: FinishReason | None = None
    partial: bool = False
    error: RequestError | None = None
    latency_ms: dict[str, float] = Field(default_factory=dict)
    created_at: float
    updated_at: float
    max_output_tokens: int | None = None
    #: The request this one continued (`resume_from`).
    resumed_from: str | None = None
    #: For a resume: the document's SHA-256, and the final call's inputs once the map step is done.
    document_sha256: str | None = Field(default=None, exclude=True)
    final_inputs: tuple[str, ...] | None = Field(default=None, exclude=True)


class RequestStore:
    """Request records, the cancel flag and idempotency keys (implements `RequestJournal`)."""

    def __init__(
        self,
        table: Any,
        ttl_days: int = 7,
        interrupted_after_s: float | None = None,
        ledger: LedgerStore | None = None,
    ) -> None:
        self.table = table
        #: Where a finished request's cost is recorded: in the same transaction as its record's finish.
        self.ledger = ledger
        self.ttl_s = ttl_days * 86_400
        #: A record still `in_progress` that nobody wrote for this long is read as `interrupted`: a live
        #: stream rewrites it more often (Summarizer.heartbeat_interval_s), so the instance serving it is
        #: gone (a crash, a Lambda cut off) and nothing will finish it.
        self.interrupted_after_s = interrupted_after_s

    # Lifecycle --------------------------------------------------------------------------------

    def create(self, request_id: str, user_id: str, model: str, style: str, input_tokens: int) -> None:
        self.table.meta.client.put_item(**self.creation(request_id, user_id, model, style, input_tokens))

    def creation(
        self,
        request_id: str,
        user_id: str,
        model: str,
        style: str,
        input_tokens: int,
        *,
        document_sha256: str | None = None,
        max_output_tokens: int | None = None,
        resumed_from: str | None = None,
        final_inputs: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """The write that creates a request's record (a PutItem's arguments), so that admission can
        make it part of its own transaction: admitted and recorded, or neither. A resume's record
        starts with the final call's inputs of the request it continues (it may be resumed in turn)."""
        now = time.time()
        resume = {
            "document_sha256": document_sha256,
            "max_output_tokens": max_output_tokens,
            "resumed_from": resumed_from,
            "final_inputs": None if final_inputs is None else list(final_inputs),
        }
        return dict(
            TableName=self.table.name,
            Item={
                **{k: v for k, v in resume.items() if v is not None},
                "pk": f"request#{request_id}",
                "request_id": request_id,
                "user_id": user_id,
                "status": "in_progress",
                "model": model,
                "style": style,
                "text": "",
                "input_tokens": input_tokens,
                "output_tokens": 0,
                "created_at": Decimal(str(now)),
                "updated_at": Decimal(str(now)),
                "expires_at": int(now) + self.ttl_s,
            },
            ConditionExpression="attribute_not_exists(pk)",
        )

    def checkpoint(self, request_id: str, text: str, output_tokens: int) -> None:
        try:
            self.table.update_item(
                Key={"pk": f"request#{request_id}"},
                UpdateExpression="SET #text = :text, output_tokens = :tokens, updated_at = :now",
                ConditionExpression="attribute_exists(pk) AND #status = :running",
                ExpressionAttributeNames={"#text": "text", "#status": "status"},
                ExpressionAttributeValues={
                    ":text": text,
                    ":tokens": output_tokens,
                    ":now": Decimal(str(time.time())),
                    ":running": "in_progress",
                },
            )
        except ClientError as exc:
            if not _conditional_failed(exc):  # finished meanwhile: the final record wins
                raise

    def save_final_inputs(self, request_id: str, summaries: list[str]) -> None:
        try:
            self.table.update_item(
                Key={"pk": f"request#{request_id}"},
                UpdateExpression="SET final_inputs = :inputs",
                ConditionExpression="attribute_exists(pk) AND #status = :running",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={":inputs": summaries, ":running": "in_progress"},
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise

    def cancelled(self, request_ids: list[str]) -> set[str]:
        """Which of `request_ids` have a cancel requested (implements `CancelFlags`)."""
        found: set[str] = set()
        client = self.table.meta.client
        for start in range(0, len(request_ids), 100):  # BatchGetItem's limit
            keys: list[dict[str, Any]] = [{"pk": f"request#{rid}"} for rid in request_ids[start : start + 100]]
            while keys:
                response = client.batch_get_item(
                    RequestItems={
                        self.table.name: {
                            "Keys": keys,
                            "ProjectionExpression": "request_id, cancel_requested",
                            "ConsistentRead": True,
                        }
                    }
                )
                found.update(
                    item["request_id"]
                    for item in response["Responses"][self.table.name]
                    if item.get("cancel_requested")
                )
                keys = response.get("UnprocessedKeys", {}).get(self.table.name, {}).get("Keys", [])
        return found

    def finish(self, outcome: Outcome) -> None:
        summary = outcome.summary
        values: dict[str, Any] = {
            ":status": _STATUS[summary.finish_reason],
            ":text": summary.text,
            ":input": outcome.usage.input_tokens,
            ":output": outcome.usage.output_tokens,
            ":cost": outcome.cost_usd,
            ":finish": summary.finish_reason.value,
            ":partial": summary.partial,
            ":latency": {k: Decimal(str(v)) for k, v in outcome.latency_ms.items()},
            ":error": None if outcome.error is None else outcome.error.model_dump(),
            ":now": Decimal(str(time.time())),
            ":model": outcome.model,
        }
        update: dict[str, Any] = dict(
            Key={"pk": f"request#{outcome.request_id}"},
            UpdateExpression=(
                "SET #status = :status, #text = :text, input_tokens = :input, output_tokens = :output, "
                "model = :model, "
                "cost_usd = :cost, finish_reason = :finish, #partial = :partial, latency_ms = :latency, "
                "#error = :error, updated_at = :now"
            ),
            ExpressionAttributeNames={"#status": "status", "#text": "text", "#error": "error", "#partial": "partial"},
            ExpressionAttributeValues=values,
        )
        if self.ledger is None:
            self.table.update_item(**update)
            return
        # The cost ledger's entry and day totals in the same transaction: one round trip, and a
        # record never reads finished without its cost counted (nor the cost without the record).
        entry = request_entry(outcome)
        items = [{"Update": {"TableName": self.table.name, **update}}, *self.ledger.writes(entry)]
        try:
            if transact(self.table.meta.client, items, already=1):
                return
        except (ClientError, TransientStorageError):
            # The record is finished whatever the ledger does (the stream's `done` waits for it); the
            # entry that could not be written is logged, to be added from the logs.
            logger.exception(
                "cost ledger entry not written",
                extra={"correlation_id": outcome.request_id, "ledger_entry": entry.model_dump(mode="json")},
            )
        self.table.update_item(**update)  # or finished once before: its cost is counted already

    def request_cancel(self, request_id: str, user_id: str) -> RequestRecord:
        """Flag a running request for cancellation; its stream notices within one CancelWatch poll.
        Cancelling a finished request changes nothing and returns it as it is."""
        try:
            item = self.table.update_item(
                Key={"pk": f"request#{request_id}"},
                UpdateExpression="SET cancel_requested = :yes",
                ConditionExpression="attribute_exists(pk) AND user_id = :user AND #status = :running",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={":yes": True, ":user": user_id, ":running": "in_progress"},
                ReturnValues="ALL_NEW",
            )["Attributes"]
        except ClientError as exc:
            # TransactionConflict: it is finishing right now (its finish is a transaction, with its
            # cost ledger entry): there is nothing left to cancel.
            finishing = exc.response.get("Error", {}).get("Code") == "TransactionConflictException"
            if not _conditional_failed(exc) and not finishing:
                raise
            return self.get(request_id, user_id)
        return self._as_read(self._record(item))  # an interrupted request has no stream left to cancel

    def get(self, request_id: str, user_id: str) -> RequestRecord:
        """The request, if it exists and belongs to `user_id`; anything else is NotFound."""
        item = self.table.get_item(Key={"pk": f"request#{request_id}"}, ConsistentRead=True).get("Item")
        if item is None or item["user_id"] != user_id:
            raise NotFoundError(f"no request {request_id!r}")
        return self._as_read(self._record(item))

    def _as_read(self, record: RequestRecord) -> RequestRecord:
        """`record`, or when it is stale `interrupted` with its text so far (partial) and a retryable
        error. Only the reading changes, nothing is written: a live stream's next write still wins."""
        stale = self.interrupted_after_s is not None and time.time() - record.updated_at >= self.interrupted_after_s
        if record.status != "in_progress" or not stale:
            return record
        return record.model_copy(
            update={
                "status": "interrupted",
                "finish_reason": FinishReason.ERROR,
                "partial": bool(record.text),
                "error": RequestError(
                    code="interrupted",
                    message="the instance serving this request stopped before it finished; the text is what it saved",
                    retryable=True,
                ),
            }
        )

    @staticmethod
    def _record(item: dict[str, Any]) -> RequestRecord:
        item = from_dynamodb(item)
        return RequestRecord(
            request_id=item["request_id"],
            user_id=item["user_id"],
            status=item["status"],
            model=item["model"],
            style=item["style"],
            text=item.get("text", ""),
            usage=Usage(input_tokens=item.get("input_tokens", 0), output_tokens=item.get("output_tokens", 0)),
            cost_usd=item.get("cost_usd", 0.0),
            finish_reason=item.get("finish_reason"),
            partial=item.get("partial", False),
            error=item.get("error"),
            latency_ms=item.get("latency_ms", {}),
            created_at=item["created_at"],
            updated_at=item["updated_at"],
            max_output_tokens=item.get("max_output_tokens"),
            resumed_from=item.get("resumed_from"),
            document_sha256=item.get("document_sha256"),
            final_inputs=item.get("final_inputs"),
        )

    def resumable(self, request_id: str, user_id: str, document_sha256: str) -> RequestRecord:
        """The request `resume_from` names, if this document can continue it: the caller's own (else
        NotFound, as for an unknown id), created from the same text, and ended short of complete
        (failed, timed out, cancelled or interrupted)."""
        record = self.get(request_id, user_id)
        if record.document_sha256 is None or record.max_output_tokens is None:
            raise NotResumableError(f"request {request_id!r} was recorded before requests could be resumed")
        if record.document_sha256 != document_sha256:
            raise InvalidInputError(f"text: not the document of request {request_id!r}; send the same text to resume")
        if record.status == "in_progress":
            raise ConflictError(f"request {request_id!r} is still running; resume it once it has ended")
        if record.status == "completed":
            raise NotResumableError(
                f"request {request_id!r} is complete (finish_reason {record.finish_reason}): there is nothing to resume"
            )
        return record

    # Idempotency ------------------------------------------------------------------------------

    def claim_idempotency_key(self, user_id: str, key: str, fingerprint: str, request_id: str) -> str | None:
        """Bind `key` to `request_id`. Returns None when this call claimed it, or the request id it
        was already bound to. Reusing a key for a different body is an error, as in Stripe's API."""
        pk = self._idempotency_pk(user_id, key)
        try:
            self.table.put_item(
                Item={
                    "pk": pk,
                    "request_id": request_id,
                    "fingerprint": fingerprint,
                    "expires_at": int(time.time()) + self.ttl_s,
                },
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
        else:
            return None
        item = self.table.get_item(Key={"pk": pk}, ConsistentRead=True)["Item"]
        if item["fingerprint"] != fingerprint:
            raise InvalidInputError("this Idempotency-Key was already used with a different request body")
        existing: str = item["request_id"]
        return existing

    def release_idempotency_key(self, user_id: str, key: str) -> None:
        """Undo a claim whose request never started, so that a retry with the key can run."""
        self.table.delete_item(Key={"pk": self._idempotency_pk(user_id, key)})

    def replayable(self, request_id: str, user_id: str) -> RequestRecord:
        """The finished request an Idempotency-Key points to; still running is a conflict."""
        record = self.get(request_id, user_id)
        if record.status == "in_progress":
            raise ConflictError("a request with this Idempotency-Key is still running; retry when it is done")
        return record

    @staticmethod
    def _idempotency_pk(user_id: str, key: str) -> str:
        return f"idempotency#{user_id}#{hashlib.sha256(key.encode()).hexdigest()}"
