"""Starter: SQS batches of S3 drops and queued jobs become state machine executions.

Each message is handled on its own (Powertools BatchProcessor): a failure reports only that message
in `batchItemFailures`, SQS redelivers it, and after five receives it goes to the dead-letter queue.
"""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from precis.observability import correlated, inject_lambda_context, logger, tracer
from precis.settings import Settings
from precis.wiring import build_intake

intake = build_intake(Settings.from_env())


def record_handler(record: SQSRecord) -> None:
    # Every line of a record carries its message id and its job's id as correlation id: from its
    # first line for a job the gateway queued (the `correlation_id` attribute), from the moment the
    # intake derives it for an S3 drop.
    attribute = record.message_attributes["correlation_id"]
    with correlated(
        attribute.string_value if attribute is not None else None,
        message_id=record.message_id,
        receive_count=int(record.attributes.approximate_receive_count),
    ):
        sent = record.attributes.get("SentTimestamp")  # epoch ms: when the message was queued
        try:
            intake.handle(json.loads(record.body), queued_at=int(sent) / 1000 if sent else None)
        except Exception as exc:  # logged here: the batch processor reports it to SQS, silently
            logger.warning("ingest message failed; SQS will deliver it again", extra={"error": type(exc).__name__})
            raise


@inject_lambda_context()
@tracer().capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # A processor per invocation: it keeps the batch's successes and failures as state, and the local
    # stack runs concurrent invocations in one process (Lambda gives each its own sandbox), where a
    # shared one mixes two batches' results and dead-letters good messages with the poison ones.
    processor = BatchProcessor(event_type=EventType.SQS)
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
