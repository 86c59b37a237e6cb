"""Split Into Chunks: the document cut at sentence boundaries, each chunk stored in S3."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from precis.domain.jobs import JobTask
from precis.observability import inject_lambda_context, logger, timed_stage, tracer
from precis.settings import Settings
from precis.wiring import build_pipeline

pipeline = build_pipeline(Settings.from_env())


@inject_lambda_context(correlation_id_path="job_id")
@tracer().capture_lambda_handler(capture_response=False)
@timed_stage("split")
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    task = JobTask.model_validate(event)
    chunks = pipeline.split(task.job_id)
    logger.info("document split", extra={"chunks": len(chunks)})
    return {"chunks": chunks}
