"""Summarize One Chunk (inside the Map): one model call, its summary stored in S3.

Powertools Idempotency keyed on (job_id, index): a retried or repeated invocation returns the first
result instead of calling (and paying for) the model again.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from precis.domain.jobs import ChunkTask
from precis.observability import inject_lambda_context, logger, timed_stage, tracer
from precis.settings import Settings
from precis.wiring import build_pipeline

settings = Settings.from_env()
pipeline = build_pipeline(settings)
persistence = DynamoDBPersistenceLayer(table_name=settings.idempotency_table)
config = IdempotencyConfig(event_key_jmespath="[job_id, index]", expires_after_seconds=7 * 86_400)


@inject_lambda_context(correlation_id_path="job_id")
@tracer().capture_lambda_handler(capture_response=False)
@idempotent(config=config, persistence_store=persistence)
@timed_stage("summarize_chunk")  # inside: a replayed result is no stage run
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    task = ChunkTask.model_validate(event)
    result = pipeline.summarize_chunk(task.job_id, task.index)
    logger.info("chunk summarized", extra={"index": task.index})
    return result
