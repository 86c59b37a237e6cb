"""QuotasTable: per-user counters for the tier limits, and the leases of in-flight streams and jobs.

One admission is one TransactWriteItems of conditional updates, all or nothing:
- `rpm#<user>#<minute>`: requests this minute, condition `< requests_per_minute`;
- `tpm#<user>#<minute>`: tokens reserved this minute, condition `<= tokens_per_minute - tokens`;
- `tpd#<user>#<day>`: tokens reserved today, condition `<= tokens_per_day - tokens`;
- `streams#<user>` or `jobs#<user>`: a string set of leases, condition `size < max concurrent`.
When the transaction is cancelled, its CancellationReasons say which condition failed: that is the
limit the 429 names. A lease carries its own expiry, so a gateway that crashed mid-stream cannot hold
a slot forever: expired leases are swept when a slot is refused.

A refusal costs the store one write; a client that keeps sending past its request budget would make
it one write per request. Since a minute's request count never goes down, the store remembers whose
minute is spent and refuses the rest of that minute without a round trip.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from precis.domain.admission import Reservation, Slot
from precis.domain.errors import InputTooLargeError, RateLimitedError, TransientStorageError
from precis.domain.models import Usage
from precis.domain.tiers import Tier

#: A lease outlives the longest stream (Lambda's 15 minutes) and then frees itself.
LEASE_S = 900
#: Spent minutes remembered before the stale ones are dropped.
_SPENT_MINUTES_KEPT = 10_000
_LIMITS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")


class QuotaStore:
    def __init__(self, table: Any) -> None:
        self.table = table
        self.client = table.meta.client
        #: User -> (minute, the tier's requests_per_minute then) of a minute whose requests are spent.
        self._spent_minutes: dict[str, tuple[str, int]] = {}

    def reserve(
        self,
        user_id: str,
        tier: Tier,
        tokens: int,
        slot: Slot,
        now: float | None = None,
        *,
        record: dict[str, Any] | None = None,
    ) -> Reservation:
        """Admit and hold `tokens` and a slot. `record` (a PutItem's arguments) is written in the same
        transaction: the request is recorded exactly when it is admitted, in one round trip."""
        now = time.time() if now is None else now
        if tokens > min(tier.tokens_per_minute, tier.tokens_per_day):
            raise InputTooLargeError(
                f"this request may use {tokens} tokens; the {tier.name} tier allows {tier.tokens_per_minute} a minute"
            )
        moment = datetime.fromtimestamp(now, UTC)
        reservation = Reservation(
            user_id=user_id,
            tokens=tokens,
            minute=moment.strftime("%Y%m%d%H%M"),
            day=moment.strftime("%Y%m%d"),
            slot=slot,
            lease=f"{int(now) + LEASE_S}:{secrets.token_hex(6)}",
        )
        spent = (reservation.minute, tier.requests_per_minute)
        if self._spent_minutes.get(user_id) == spent:
            # The transaction would fail on the request count, which nothing lowers before the
            # minute ends (a changed tier's new limit is asked for again).
            raise self._rate_limited("requests_per_minute", tier, slot, moment)
        most = tier.max_concurrent_streams if slot == "streams" else tier.max_concurrent_jobs
        for attempt in range(2):
            try:
                items = self._reserve_items(reservation, tier, most, now) + ([{"Put": record}] if record else [])
                self.client.transact_write_items(TransactItems=items)
                return reservation
            except ClientError as exc:
                limit = self._refused_limit(exc)
                if limit == "max_concurrent" and attempt == 0 and self._sweep_expired(reservation, now):
                    continue  # a crashed holder's lease was freed: try once more
                if limit == "requests_per_minute":
                    self._remember_spent(user_id, spent)
                raise self._rate_limited(limit, tier, slot, moment) from exc
        raise AssertionError("unreachable")

    def settle(self, reservation: Reservation, usage: Usage) -> None:
        used = usage.input_tokens + usage.output_tokens
        refund = used - reservation.tokens
        self.client.transact_write_items(
            TransactItems=[
                self._add(f"tpm#{reservation.user_id}#{reservation.minute}", "tokens", refund),
                self._add(f"tpd#{reservation.user_id}#{reservation.day}", "tokens", refund),
                {
                    "Update": {
                        "TableName": self.table.name,
                        "Key": {"pk": f"{reservation.slot}#{reservation.user_id}"},
                        "UpdateExpression": "DELETE leases :lease",
                        "ExpressionAttributeValues": {":lease": {reservation.lease}},
                    }
                },
            ]
        )

    def usage(self, user_id: str, minute: str, day: str) -> dict[str, int]:
        """The counters as they stand (for tests and reports)."""
        keys = {
            "requests_this_minute": (f"rpm#{user_id}#{minute}", "requests"),
            "tokens_this_minute": (f"tpm#{user_id}#{minute}", "tokens"),
            "tokens_today": (f"tpd#{user_id}#{day}", "tokens"),
        }
        found: dict[str, int] = {}
        for name, (pk, attribute) in keys.items():
            item = self.table.get_item(Key={"pk": pk}, ConsistentRead=True).get("Item") or {}
            found[name] = int(item.get(attribute, 0))
        for slot in ("streams", "jobs"):
            item = self.table.get_item(Key={"pk": f"{slot}#{user_id}"}, ConsistentRead=True).get("Item") or {}
            found[f"{slot}_in_flight"] = len(item.get("leases", ()))
        return found

    # ------------------------------------------------------------------------------------------

    def _remember_spent(self, user_id: str, spent: tuple[str, int]) -> None:
        if len(self._spent_minutes) >= _SPENT_MINUTES_KEPT:
            minute = spent[0]
            self._spent_minutes = {u: s for u, s in self._spent_minutes.items() if s[0] >= minute}
        self._spent_minutes[user_id] = spent

    def _reserve_items(self, r: Reservation, tier: Tier, most: int, now: float) -> list[dict[str, Any]]:
        hour, two_days = int(now) + 3_600, int(now) + 2 * 86_400
        user = r.user_id
        return [
            self._bounded(f"rpm#{user}#{r.minute}", "requests", 1, tier.requests_per_minute - 1, hour),
            self._bounded(f"tpm#{user}#{r.minute}", "tokens", r.tokens, tier.tokens_per_minute - r.tokens, hour),
            self._bounded(f"tpd#{user}#{r.day}", "tokens", r.tokens, tier.tokens_per_day - r.tokens, two_days),
            {
                "Update": {
                    "TableName": self.table.name,
                    "Key": {"pk": f"{r.slot}#{r.user_id}"},
                    "UpdateExpression": "ADD leases :lease",
                    "ConditionExpression": "attribute_not_exists(leases) OR size(leases) < :most",
                    "ExpressionAttributeValues": {":lease": {r.lease}, ":most": most},
                }
            },
        ]

    def _bounded(self, pk: str, attribute: str, amount: int, at_most_before: int, expires_at: int) -> dict[str, Any]:
        """ADD `amount` to a counter if it is at most `at_most_before` now."""
        return {
            "Update": {
                "TableName": self.table.name,
                "Key": {"pk": pk},
                "UpdateExpression": "ADD #n :amount SET expires_at = if_not_exists(expires_at, :expires)",
                "ConditionExpression": "attribute_not_exists(#n) OR #n <= :bound",
                "ExpressionAttributeNames": {"#n": attribute},
                "ExpressionAttributeValues": {":amount": amount, ":bound": at_most_before, ":expires": expires_at},
            }
        }

    def _add(self, pk: str, attribute: str, amount: int) -> dict[str, Any]:
        return {
            "Update": {
                "TableName": self.table.name,
                "Key": {"pk": pk},
                "UpdateExpression": "ADD #n :amount",
                "ExpressionAttributeNames": {"#n": attribute},
                "ExpressionAttributeValues": {":amount": amount},
            }
        }

    @staticmethod
    def _refused_limit(exc: ClientError) -> str:
        error = exc.response.get("Error", {})
        if error.get("Code") != "TransactionCanceledException":
            if error.get("Code") in (  # DynamoDB's own throttling or failure: retry, not a 429
                "ProvisionedThroughputExceededException",
                "ThrottlingException",
                "InternalServerError",
            ):
                raise TransientStorageError(f"DynamoDB is unavailable: {error.get('Code')}") from exc
            raise exc
        reasons = exc.response.get("CancellationReasons") or []
        for limit, reason in zip(_LIMITS, reasons, strict=False):
            if reason.get("Code") == "ConditionalCheckFailed":
                return limit
        raise TransientStorageError(f"admission was not decided: {[r.get('Code') for r in reasons]}") from exc

    def _sweep_expired(self, r: Reservation, now: float) -> bool:
        item = self.table.get_item(Key={"pk": f"{r.slot}#{r.user_id}"}, ConsistentRead=True).get("Item") or {}
        expired = {lease for lease in item.get("leases", ()) if int(lease.split(":", 1)[0]) < now}
        if not expired:
            return False
        self.table.update_item(
            Key={"pk": f"{r.slot}#{r.user_id}"},
            UpdateExpression="DELETE leases :expired",
            ExpressionAttributeValues={":expired": expired},
        )
        return True

    @staticmethod
    def _rate_limited(limit: str, tier: Tier, slot: Slot, moment: datetime) -> RateLimitedError:
        next_minute = 60 - moment.second
        tomorrow = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        if limit == "max_concurrent":
            most = tier.max_concurrent_streams if slot == "streams" else tier.max_concurrent_jobs
            return RateLimitedError(
                f"the {tier.name} tier allows {most} concurrent {slot}", limit=f"max_concurrent_{slot}", retry_after_s=1
            )
        if limit == "tokens_per_day":
            return RateLimitedError(
                f"the {tier.name} tier allows {tier.tokens_per_day} tokens a day",
                limit=limit,
                retry_after_s=int((tomorrow - moment).total_seconds()) + 1,
            )
        allowed = tier.requests_per_minute if limit == "requests_per_minute" else tier.tokens_per_minute
        unit = "requests" if limit == "requests_per_minute" else "tokens"
        return RateLimitedError(
            f"the {tier.name} tier allows {allowed} {unit} a minute", limit=limit, retry_after_s=next_minute
        )
