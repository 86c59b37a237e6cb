"""The only Logger, Tracer and Metrics instances, and the telemetry of a finished request.

Correlation id = request id: `correlate(request_id)` puts it on every log line of the current task
(a ContextVar, so concurrent streams in one process never mix their ids).
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

if TYPE_CHECKING:
    from aws_lambda_powertools import Tracer

    from precis.domain.summarize import Outcome

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "precis")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Precis")

logger = Logger(service=SERVICE)


@cache
def tracer() -> Tracer:
    """The Tracer, for handlers the Lambda runtime invokes directly. Created on first use: importing
    the X-Ray SDK costs about 0.4 s, and the gateway has no use for it (behind the web adapter the
    app runs in a process of its own, outside the runtime's per-invocation trace context)."""
    from aws_lambda_powertools import Tracer

    return Tracer(service=SERVICE)


def correlate(request_id: str, **keys: str) -> None:
    logger.thread_safe_append_keys(correlation_id=request_id, **keys)


class RequestTelemetry:
    """Implements the domain's `Telemetry` port: one log line and one EMF record per request.

    Metrics go through an `EphemeralMetrics` per request because the shared `Metrics` instance would
    mix the dimensions of concurrent streams in one process. Dimensions stay bounded (model, tier,
    outcome): never the user id.
    """

    def record(self, outcome: Outcome) -> None:
        summary = outcome.summary
        logger.info(
            "request finished",
            extra={
                "correlation_id": outcome.request_id,
                "model": outcome.model,
                "tier": outcome.tier,
                "finish_reason": summary.finish_reason.value,
                "partial": summary.partial,
                "input_tokens": outcome.usage.input_tokens,
                "output_tokens": outcome.usage.output_tokens,
                "cost_usd": float(outcome.cost_usd),
                "latency_ms": outcome.latency_ms,
                "error_code": outcome.error.code if outcome.error else None,
                "client_disconnected": outcome.disconnected,
            },
        )
        metrics = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        metrics.add_dimension("model", outcome.model)
        metrics.add_dimension("tier", outcome.tier)
        metrics.add_dimension("outcome", summary.finish_reason.value)
        metrics.add_metric("InputTokens", MetricUnit.Count, outcome.usage.input_tokens)
        metrics.add_metric("OutputTokens", MetricUnit.Count, outcome.usage.output_tokens)
        metrics.add_metric("CostUSD", MetricUnit.NoUnit, float(outcome.cost_usd))
        for stage, ms in outcome.latency_ms.items():
            name = "TimeToFirstToken" if stage == "ttft" else f"{stage.capitalize()}Latency"
            metrics.add_metric(name, MetricUnit.Milliseconds, ms)
        metrics.flush_metrics()
