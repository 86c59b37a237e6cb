"""`GET /v1/usage`: the caller's own tokens and cost, from the cost ledger (precis.domain.ledger)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import anyio.to_thread
from fastapi import FastAPI, Header, Query

from precis.domain.errors import NotFoundError
from precis.domain.ledger import MAX_PERIOD_DAYS, MAX_TOP, usage_period

if TYPE_CHECKING:
    from precis.api.app import Services


def install(app: FastAPI, services: Services) -> None:
    @app.get("/v1/usage")
    async def usage(
        authorization: Annotated[str | None, Header()] = None,
        first: Annotated[
            str | None, Query(alias="from", description="First day, YYYY-MM-DD (UTC); default: today.")
        ] = None,
        last: Annotated[
            str | None,
            Query(alias="to", description=f"Last day, included; default: today. At most {MAX_PERIOD_DAYS} days."),
        ] = None,
        top: Annotated[int, Query(ge=0, le=MAX_TOP, description="How many of the most expensive to list.")] = 10,
    ) -> dict[str, Any]:
        """The caller's requests and jobs of the period: totals (tokens, cost in USD as an exact
        decimal string, counts by finish reason), the same per day, and the most expensive ones."""
        principal = await services.authenticate(authorization)
        start, end = usage_period(first, last, datetime.now(UTC).date())
        ledger = services.ledger
        if ledger is None:
            raise NotFoundError("this deployment keeps no cost ledger")
        report = await anyio.to_thread.run_sync(ledger.usage, principal.user_id, start, end, top)
        return report.model_dump(mode="json", by_alias=True)
