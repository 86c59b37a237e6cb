"""JobsTable: one item per asynchronous job. Every transition is a conditional write, so a stage run
twice, a late stage after a cancel, or two starters racing cannot move a job backwards or charge it
twice."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from precis.adapters.dynamodb import from_dynamodb
from precis.domain.admission import Reservation
from precis.domain.errors import NotFoundError, TransientStorageError
from precis.domain.jobs import Job, JobError
from precis.domain.models import FinishReason, Style, Usage

_TRANSIENT = {"ProvisionedThroughputExceededException", "ThrottlingException", "InternalServerError"}
JOB_TTL_S = 30 * 86_400


def _now() -> Decimal:
    return Decimal(str(time.time()))


def _failed_condition(exc: ClientError) -> bool:
    """True when the write's condition failed; DynamoDB's own throttling and 5xx become
    TransientStorageError, which the state machine retries."""
    code = exc.response.get("Error", {}).get("Code")
    if code in _TRANSIENT:
        raise TransientStorageError(f"DynamoDB is unavailable: {code}") from exc
    return code == "ConditionalCheckFailedException"


class JobStore:
    def __init__(self, table: Any) -> None:
        self.table = table

    def create(
        self,
        job_id: str,
        owner: str,
        document_key: str,
        model: str,
        style: Style,
        max_output_tokens: int,
        error: JobError | None = None,
        reservation: Reservation | None = None,
        context_tokens: int | None = None,
    ) -> bool:
        """Create the job, queued (or already failed, with `error`); False if it exists already."""
        now = _now()
        item: dict[str, Any] = {
            "job_id": job_id,
            "owner": owner,
            "status": "queued" if error is None else "failed",
            "document_key": document_key,
            "model": model,
            "style": style.value,
            "max_output_tokens": max_output_tokens,
            "created_at": now,
            "updated_at": now,
            "expires_at": int(now) + JOB_TTL_S,
        }
        if error is not None:
            item["error"] = error.model_dump()
        if reservation is not None:
            item["reservation"] = reservation.model_dump()
        if context_tokens is not None:
            item["context_tokens"] = context_tokens
        try:
            self.table.put_item(Item=item, ConditionExpression="attribute_not_exists(job_id)")
        except ClientError as exc:
            if _failed_condition(exc):
                return False
            raise
        return True

    def get(self, job_id: str) -> Job | None:
        item = self.table.get_item(Key={"job_id": job_id}, ConsistentRead=True).get("Item")
        return None if item is None else _job(item)

    def get_owned(self, job_id: str, owner: str) -> Job:
        """The job if it belongs to `owner`; anyone else's job is as unknown as a missing one."""
        job = self.get(job_id)
        if job is None or job.owner != owner:
            raise NotFoundError(f"no job {job_id[:64]!r}")
        return job

    def delete(self, job_id: str) -> None:
        self.table.delete_item(Key={"job_id": job_id})

    def started(self, job_id: str, execution_arn: str) -> bool:
        return self._update(
            job_id,
            "SET #status = :running, execution_arn = :arn",
            "#status = :queued",
            {":running": "running", ":queued": "queued", ":arn": execution_arn},
        )

    def planned(self, job_id: str, chunks_total: int) -> None:
        self._update(
            job_id,
            "SET chunks_total = :total",
            "#status IN (:queued, :running)",
            {":total": chunks_total, ":queued": "queued", ":running": "running"},
        )

    def chunk_done(self, job_id: str, index: int) -> None:
        """A set, not a counter: a chunk summarized twice still counts once."""
        self._update(job_id, "ADD done_chunks :index", None, {":index": {index}})

    def checkpoint(self, job_id: str, text: str) -> None:
        self._update(job_id, "SET #text = :text", "#status = :running", {":text": text, ":running": "running"})

    def succeed(
        self,
        job_id: str,
        text: str,
        finish_reason: FinishReason,
        usage: Usage,
        cost_usd: Decimal,
        summary_key: str,
        markdown_key: str,
    ) -> bool:
        """Finish and charge the job, once: False when it was already finished (or cancelled)."""
        return self._update(
            job_id,
            "SET #status = :done, #text = :text, finish_reason = :finish, input_tokens = :input, "
            "output_tokens = :output, cost_usd = :cost, summary_key = :summary, markdown_key = :markdown, "
            "charged = :yes",
            "#status = :running AND attribute_not_exists(charged)",
            {
                ":done": "succeeded",
                ":running": "running",
                ":text": text,
                ":finish": finish_reason.value,
                ":input": usage.input_tokens,
                ":output": usage.output_tokens,
                ":cost": cost_usd,
                ":summary": summary_key,
                ":markdown": markdown_key,
                ":yes": True,
            },
        )

    def fail(self, job_id: str, error: JobError, usage: Usage, cost_usd: Decimal) -> bool:
        """Record a failure with what the job used; a finished or cancelled job stays as it is."""
        return self._update(
            job_id,
            "SET #status = :failed, #error = :error, finish_reason = :finish, input_tokens = :input, "
            "output_tokens = :output, cost_usd = :cost, charged = :yes",
            "#status IN (:queued, :running)",
            {
                ":failed": "failed",
                ":queued": "queued",
                ":running": "running",
                ":error": error.model_dump(),
                ":finish": FinishReason.ERROR.value,
                ":input": usage.input_tokens,
                ":output": usage.output_tokens,
                ":cost": cost_usd,
                ":yes": True,
            },
            names={"#error": "error"},
        )

    def cancel(self, job_id: str, owner: str) -> tuple[Job, bool]:
        """Cancel a queued or running job of `owner`: the job, and whether this call cancelled it (a
        finished one is returned as it is)."""
        job = self.get_owned(job_id, owner)
        cancelled = False
        if not job.finished:
            cancelled = self._update(
                job_id,
                "SET #status = :cancelled, finish_reason = :finish",
                "#status IN (:queued, :running)",
                {
                    ":cancelled": "cancelled",
                    ":queued": "queued",
                    ":running": "running",
                    ":finish": FinishReason.CANCELLED.value,
                },
            )
        return self.get_owned(job_id, owner), cancelled

    def _update(
        self,
        job_id: str,
        expression: str,
        condition: str | None,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> bool:
        args: dict[str, Any] = {
            "Key": {"job_id": job_id},
            "UpdateExpression": expression + (", " if expression.startswith("SET") else " SET ") + "updated_at = :now",
            "ExpressionAttributeValues": {**values, ":now": _now()},
            "ConditionExpression": "attribute_exists(job_id)" + (f" AND {condition}" if condition else ""),
        }
        all_names = {"#status": "status", "#text": "text", **(names or {})}
        used = {k: v for k, v in all_names.items() if k in args["UpdateExpression"] or k in args["ConditionExpression"]}
        if used:
            args["ExpressionAttributeNames"] = used
        try:
            self.table.update_item(**args)
        except ClientError as exc:
            if _failed_condition(exc):
                return False
            raise
        return True


def _job(item: dict[str, Any]) -> Job:
    item = from_dynamodb(item)
    return Job(
        job_id=item["job_id"],
        owner=item["owner"],
        status=item["status"],
        document_key=item["document_key"],
        model=item["model"],
        style=item["style"],
        max_output_tokens=item["max_output_tokens"],
        chunks_total=item.get("chunks_total", 0),
        chunks_done=len(item.get("done_chunks", ())),
        text=item.get("text", ""),
        finish_reason=item.get("finish_reason"),
        usage=Usage(input_tokens=item.get("input_tokens", 0), output_tokens=item.get("output_tokens", 0)),
        cost_usd=item.get("cost_usd", 0.0),
        error=item.get("error"),
        summary_key=item.get("summary_key"),
        markdown_key=item.get("markdown_key"),
        execution_arn=item.get("execution_arn"),
        reservation=item.get("reservation"),
        context_tokens=item.get("context_tokens"),
        created_at=item["created_at"],
        updated_at=item["updated_at"],
    )
