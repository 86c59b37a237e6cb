"""Postprocess And Store: the summary as JSON and Markdown under summaries/; the job charged once."""

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
@timed_stage("postprocess")
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    task = JobTask.model_validate(event)
    summary_key = pipeline.finish(task.job_id)
    logger.info("summary stored")  # not its key: a drop's names its owner's folder
    return {"summary_key": summary_key}
