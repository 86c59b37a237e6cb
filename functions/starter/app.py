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

from precis.observability import logger
from precis.settings import Settings
from precis.wiring import build_intake

intake = build_intake(Settings.from_env())
processor = BatchProcessor(event_type=EventType.SQS)


def record_handler(record: SQSRecord) -> None:
    logger.info(
        "ingest message",
        extra={"message_id": record.message_id, "receive_count": record.attributes.approximate_receive_count},
    )
    intake.handle(json.loads(record.body))


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
