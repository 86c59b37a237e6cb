"""The circuit breakers' shared state, one item per model in QuotasTable (`breaker#<model>`):

- `window`, `failures`, `users`: the current fixed window's transient failures and who had them;
- `open_until`: 0 while closed, else open until then and half-open after;
- `probe_until`: while half-open, the one probe call in flight (until then).

Every change is one conditional UpdateItem, so instances racing on the same breaker agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from precis.domain.breaker import BreakerPolicy, BreakerState
from precis.domain.errors import TransientStorageError

_NAMES = {"#window": "window", "#users": "users"}


class BreakerTable:
    def __init__(self, table: Any) -> None:
        self.table = table

    def read(self, model: str) -> BreakerState:
        with _storage():
            return _state(self.table.get_item(Key=_key(model)).get("Item"))

    def record_failure(self, model: str, user_id: str, now: float, policy: BreakerPolicy) -> BreakerState:
        window = int(now // policy.window_s)
        with _storage():
            item = self._count(model, user_id, window)
            state = _state(item)
            opens = (
                state.open_until == 0
                and int(item.get("failures", 0)) >= policy.failures_to_open
                and len(item.get("users", ())) >= policy.users_to_open
            )
            if not opens:
                return state
            try:
                return _state(
                    self.table.update_item(
                        Key=_key(model),
                        UpdateExpression="SET open_until = :until REMOVE probe_until",
                        ConditionExpression="attribute_not_exists(open_until) OR open_until = :zero",
                        ExpressionAttributeValues={":until": _decimal(now + policy.open_s), ":zero": 0},
                        ReturnValues="ALL_NEW",
                    )["Attributes"]
                )
            except ClientError as exc:
                _raise_unless_condition(exc)
                return self.read(model)  # another instance opened it first

    def claim_probe(self, model: str, now: float, until: float) -> bool:
        with _storage():
            try:
                self.table.update_item(
                    Key=_key(model),
                    UpdateExpression="SET probe_until = :until",
                    ConditionExpression="open_until > :zero AND open_until <= :now"
                    " AND (attribute_not_exists(probe_until) OR probe_until < :now)",
                    ExpressionAttributeValues={":until": _decimal(until), ":now": _decimal(now), ":zero": 0},
                )
                return True
            except ClientError as exc:
                _raise_unless_condition(exc)
                return False

    def reopen(self, model: str, until: float) -> BreakerState:
        with _storage():
            return _state(
                self.table.update_item(
                    Key=_key(model),
                    UpdateExpression="SET open_until = :until REMOVE probe_until",
                    ExpressionAttributeValues={":until": _decimal(until)},
                    ReturnValues="ALL_NEW",
                )["Attributes"]
            )

    def close(self, model: str) -> None:
        with _storage():
            self.table.update_item(
                Key=_key(model),
                UpdateExpression="SET open_until = :zero, failures = :zero REMOVE probe_until, #users",
                ExpressionAttributeNames={"#users": "users"},
                ExpressionAttributeValues={":zero": 0},
            )

    def _count(self, model: str, user_id: str, window: int) -> dict[str, Any]:
        """Add a failure to `window`'s count, starting the window when it is a new one."""
        for _ in range(2):
            try:
                return dict(
                    self.table.update_item(
                        Key=_key(model),
                        UpdateExpression="ADD failures :one, #users :user",
                        ConditionExpression="#window = :window",
                        ExpressionAttributeNames=_NAMES,
                        ExpressionAttributeValues={":one": 1, ":user": {user_id}, ":window": window},
                        ReturnValues="ALL_NEW",
                    )["Attributes"]
                )
            except ClientError as exc:
                _raise_unless_condition(exc)
            try:
                return dict(
                    self.table.update_item(
                        Key=_key(model),
                        UpdateExpression="SET #window = :window, failures = :one, #users = :user",
                        ConditionExpression="attribute_not_exists(#window) OR #window < :window",
                        ExpressionAttributeNames=_NAMES,
                        ExpressionAttributeValues={":one": 1, ":user": {user_id}, ":window": window},
                        ReturnValues="ALL_NEW",
                    )["Attributes"]
                )
            except ClientError as exc:
                _raise_unless_condition(exc)  # another instance started the window: count in it
        raise TransientStorageError(f"the breaker of {model!r} kept changing under us")


def _key(model: str) -> dict[str, str]:
    return {"pk": f"breaker#{model}"}


def _state(item: dict[str, Any] | None) -> BreakerState:
    item = item or {}
    return BreakerState(open_until=float(item.get("open_until", 0)), probe_until=float(item.get("probe_until", 0)))


def _decimal(seconds: float) -> Decimal:
    return Decimal(str(round(seconds, 3)))


def _raise_unless_condition(exc: ClientError) -> None:
    if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
        raise exc


@contextmanager
def _storage() -> Iterator[None]:
    """DynamoDB's own failures as `TransientStorageError`: the breaker fails open on them."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise TransientStorageError(f"the breaker's state is unavailable: {exc}") from exc
