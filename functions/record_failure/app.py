"""Record The Failure: the job failed with a structured error; the chunk summaries stay in S3."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from precis.domain.jobs import FailedJobTask
from precis.observability import inject_lambda_context, logger, timed_stage, tracer
from precis.settings import Settings
from precis.wiring import build_pipeline

pipeline = build_pipeline(Settings.from_env())


@inject_lambda_context(correlation_id_path="job_id")
@tracer().capture_lambda_handler(capture_response=False)
@timed_stage("record_failure")
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    failed = FailedJobTask.model_validate(event)
    logger.warning("job failed", extra={"error": failed.error.get("Error")})
    pipeline.record_failure(failed.job_id, failed.error)
    return {"job_id": failed.job_id}
