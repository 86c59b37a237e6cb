"""LedgerTable: the cost ledger (precis.domain.ledger), one partition per user (`pk = user#<id>`).

- `sk = entry#<started, ISO 8601 UTC>#<request or job id>`: one request's or job's entry (user,
  model, tokens, cost, latency per stage, finish reason, retries), so a user's entries of a period
  are one Query, in time order;
- `sk = day#<YYYY-MM-DD>`: the user's totals of that day (UTC), atomic counters (ADD): requests,
  jobs, input and output tokens, cost, and one `finish_<reason>` count per finish reason.

An entry and its day's counters are written in one TransactWriteItems whose Put is conditional on
the entry not existing: a stage that runs twice, or a retried call, finds it there and changes
nothing, so every request and job is counted exactly once. The sparse index `ByCost` (entries only:
`user_day = user#<id>#<YYYY-MM-DD>`, sorted by `cost_usd`) gives a day's most expensive entries
without reading the others. Items expire through `expires_at`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from precis.domain.errors import TransientStorageError
from precis.domain.ledger import DayTotals, LedgerEntry, UsageReport, summed, top_by_cost
from precis.domain.models import FinishReason, Usage

BY_COST_INDEX = "ByCost"
#: Concurrent transactions on one item (a user's day totals, when their requests end together) make
#: DynamoDB cancel all but one with `TransactionConflict`: they are tried again this many times.
_CONFLICT_ATTEMPTS = 6
_TRANSIENT = {"ProvisionedThroughputExceededException", "ThrottlingException", "InternalServerError"}
#: Why an item of a cancelled transaction failed, when trying again may succeed.
_RETRIED_REASONS = {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}


def _pk(user_id: str) -> str:
    return f"user#{user_id}"


def _entry_sk(entry: LedgerEntry) -> str:
    started = datetime.fromtimestamp(entry.started_at, UTC).isoformat(timespec="microseconds")
    return f"entry#{started.removesuffix('+00:00')}Z#{entry.id}"


def _number(amount: Decimal) -> Decimal:
    """`amount` written so that its text has a decimal point (6.0E-7, not 6E-7): the same number for
    DynamoDB, and one that moto (the local stack, the tests) can add up: it parses a number without
    a point as an int."""
    if amount == 0:
        return Decimal(0)
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)  # a cost is finite
    return amount.quantize(Decimal(1).scaleb(min(exponent, 0) - 1))


def cancellation_codes(exc: ClientError) -> list[str]:
    """The reason code of each item of a cancelled transaction ("None" for the items that were fine)."""
    if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
        return []
    return [str(reason.get("Code", "None")) for reason in exc.response.get("CancellationReasons") or []]


class LedgerStore:
    """The cost ledger in DynamoDB (implements `CostLedger`)."""

    def __init__(self, table: Any, ttl_days: int = 400) -> None:
        self.table = table
        self.ttl_s = ttl_days * 86_400

    # Writing ------------------------------------------------------------------------------------

    def writes(self, entry: LedgerEntry) -> list[dict[str, Any]]:
        """The transaction items that record `entry` and add it to its day's totals: the Put fails its
        condition when the entry is there already (then nothing of the transaction is written)."""
        usage = entry.usage
        expires_at = int(entry.started_at) + self.ttl_s
        item: dict[str, Any] = {
            "pk": _pk(entry.user_id),
            "sk": _entry_sk(entry),
            "user_day": f"{_pk(entry.user_id)}#{entry.day.isoformat()}",
            "id": entry.id,
            "kind": entry.kind,
            "user_id": entry.user_id,
            "model": entry.model,
            "model_name": entry.model_name,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cost_usd": _number(entry.cost_usd),
            "latency_ms": {stage: Decimal(str(ms)) for stage, ms in entry.latency_ms.items()},
            "finish_reason": entry.finish_reason.value,
            "partial": entry.partial,
            "retries": entry.retries,
            "started_at": Decimal(str(entry.started_at)),
            "expires_at": expires_at,
        }
        if entry.tier is not None:
            item["tier"] = entry.tier
        if entry.error_code is not None:
            item["error_code"] = entry.error_code
        return [
            {
                "Put": {
                    "TableName": self.table.name,
                    "Item": item,
                    "ConditionExpression": "attribute_not_exists(sk)",
                }
            },
            {
                "Update": {
                    "TableName": self.table.name,
                    "Key": {"pk": _pk(entry.user_id), "sk": f"day#{entry.day.isoformat()}"},
                    "UpdateExpression": (
                        "ADD #count :one, input_tokens :input, output_tokens :output, cost_usd :cost, #finish :one "
                        "SET expires_at = if_not_exists(expires_at, :expires)"
                    ),
                    "ExpressionAttributeNames": {
                        "#count": "jobs" if entry.kind == "job" else "requests",
                        "#finish": f"finish_{entry.finish_reason.value}",
                    },
                    "ExpressionAttributeValues": {
                        ":one": 1,
                        ":input": usage.input_tokens,
                        ":output": usage.output_tokens,
                        ":cost": _number(entry.cost_usd),
                        ":expires": expires_at,
                    },
                }
            },
        ]

    def record(self, entry: LedgerEntry) -> bool:
        """Record `entry` and count it in its day's totals, exactly once: False when it was already."""
        return transact(self.table.meta.client, self.writes(entry), already=0)

    # Reading ------------------------------------------------------------------------------------

    def days(self, user_id: str, first: date, last: date) -> list[DayTotals]:
        """The user's day totals from `first` to `last` (included), the days with any entry."""
        items = self._query(
            KeyConditionExpression=Key("pk").eq(_pk(user_id))
            & Key("sk").between(f"day#{first.isoformat()}", f"day#{last.isoformat()}")
        )
        return [_day_totals(item) for item in items]

    def entries(self, user_id: str, first: date, last: date) -> Iterator[LedgerEntry]:
        """The user's entries that started from `first` to `last` (included), oldest first."""
        items = self._query(
            KeyConditionExpression=Key("pk").eq(_pk(user_id))
            & Key("sk").between(f"entry#{first.isoformat()}", f"entry#{last.isoformat()}T~")
        )
        return (_entry(item) for item in items)

    def most_expensive(self, user_id: str, days: list[date], count: int) -> list[LedgerEntry]:
        """The user's `count` most expensive entries of `days`: at most `count` read per day."""
        if count <= 0:
            return []
        found: list[LedgerEntry] = []
        for day in days:
            response = self.table.query(
                IndexName=BY_COST_INDEX,
                KeyConditionExpression=Key("user_day").eq(f"{_pk(user_id)}#{day.isoformat()}"),
                ScanIndexForward=False,
                Limit=count,
            )
            found += (_entry(item) for item in response.get("Items", []))
        return top_by_cost(found, count)

    def usage(self, user_id: str, first: date, last: date, top: int = 10) -> UsageReport:
        """`GET /v1/usage`: the user's totals over the days, per day, and its `top` most expensive."""
        days = self.days(user_id, first, last)
        return UsageReport(
            first=first,
            last=last,
            totals=summed(days),
            days=days,
            most_expensive=self.most_expensive(user_id, [d.day for d in days if d.requests or d.jobs], top),
        )

    def all_entries(self) -> Iterator[LedgerEntry]:
        """Every entry of the table, every user's (a Scan: for the local stack's report, not for AWS)."""
        kwargs: dict[str, Any] = {"FilterExpression": Key("sk").begins_with("entry#")}
        while True:
            response = self.table.scan(**kwargs)
            yield from (_entry(item) for item in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def _query(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        kwargs["ConsistentRead"] = True  # a usage read right after a request ended counts it
        while True:
            response = self.table.query(**kwargs)
            yield from response.get("Items", [])
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]


def transact(client: Any, items: list[dict[str, Any]], *, already: int) -> bool:
    """Write `items` in one transaction; False (and nothing written) when item `already`'s condition
    failed: the ledger entry is there. A conflict with another transaction on the same item (two of a
    user's requests ending at once both add to the day's totals) is tried again, with jittered backoff."""
    for attempt in range(_CONFLICT_ATTEMPTS):
        try:
            client.transact_write_items(TransactItems=items)
            return True
        except ClientError as exc:
            codes = cancellation_codes(exc)
            if len(codes) > already and codes[already] == "ConditionalCheckFailed":
                return False
            error = exc.response.get("Error", {}).get("Code")
            if not _RETRIED_REASONS.intersection(codes) and error not in _TRANSIENT:
                raise
            if attempt + 1 == _CONFLICT_ATTEMPTS:
                raise TransientStorageError(f"the cost ledger could not be written: {error} {codes}") from exc
            time.sleep(random.uniform(0, 0.02 * 2**attempt))
    raise AssertionError("unreachable")


def _day_totals(item: dict[str, Any]) -> DayTotals:
    reasons = {
        name.removeprefix("finish_"): int(count)
        for name, count in item.items()
        if name.startswith("finish_") and name.removeprefix("finish_") in FinishReason
    }
    return DayTotals(
        day=date.fromisoformat(str(item["sk"]).removeprefix("day#")),
        requests=int(item.get("requests", 0)),
        jobs=int(item.get("jobs", 0)),
        input_tokens=int(item.get("input_tokens", 0)),
        output_tokens=int(item.get("output_tokens", 0)),
        cost_usd=Decimal(item.get("cost_usd", 0)).normalize(),
        finish_reasons=reasons,
    )


def _entry(item: dict[str, Any]) -> LedgerEntry:
    return LedgerEntry(
        id=item["id"],
        kind=item["kind"],
        user_id=item["user_id"],
        model=item["model"],
        model_name=item["model_name"],
        tier=item.get("tier"),
        usage=Usage(input_tokens=int(item["input_tokens"]), output_tokens=int(item["output_tokens"])),
        cost_usd=Decimal(item["cost_usd"]).normalize(),
        latency_ms={stage: float(ms) for stage, ms in item.get("latency_ms", {}).items()},
        finish_reason=item["finish_reason"],
        partial=bool(item.get("partial", False)),
        retries=int(item.get("retries", 0)),
        error_code=item.get("error_code"),
        started_at=float(item["started_at"]),
    )
