"""Asynchronous jobs: the record a job keeps, where its files live, and the rules for S3 drops."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any, Literal

from pydantic import Field

from precis.domain.admission import Reservation
from precis.domain.errors import InvalidInputError
from precis.domain.models import FinishReason, Frozen, Style, Usage

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

INBOX = "inbox/"
SUMMARIES = "summaries/"
#: The owner of jobs dropped directly under inbox/ (drops under inbox/<user id>/ belong to that user).
DROP_OWNER = "s3-inbox"

# Keys of dropped objects: letters (any script), digits and a few separators; no "..", no
# backslashes, no control or shell characters.
_SAFE_KEY = re.compile(r"^inbox/[\w .,=+@()/-]{1,500}$")
_JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")


class JobError(Frozen):
    code: str
    message: str
    retryable: bool = False


class Job(Frozen):
    """A job as JobsTable keeps it and `GET /v1/jobs/{id}` shows it."""

    job_id: str
    owner: str = Field(exclude=True)
    status: JobStatus
    document_key: str
    model: str
    style: Style
    max_output_tokens: int
    chunks_total: int = 0
    chunks_done: int = 0
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    error: JobError | None = None
    summary_key: str | None = None
    markdown_key: str | None = None
    execution_arn: str | None = Field(default=None, exclude=True)
    #: What the job holds of its owner's tier budgets until it ends (None for S3 drops).
    reservation: Reservation | None = Field(default=None, exclude=True)
    #: The owner's tier's prompt allocation per call (None for S3 drops: the model's window).
    context_tokens: int | None = Field(default=None, exclude=True)
    created_at: float
    updated_at: float

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class JobTask(Frozen):
    """The input of a job stage: the state machine passes only the job id (the rest is stored)."""

    job_id: str


class ChunkTask(JobTask):
    index: int


class FailedJobTask(JobTask):
    """What the state machine's Catch passes on: the Step Functions error (Error, Cause)."""

    error: dict[str, Any]


def new_job_id() -> str:
    return f"job_{secrets.token_hex(16)}"


def job_id_for_object(bucket: str, key: str, etag: str) -> str:
    """The same object (bucket, key, ETag) is always the same job, so a duplicate S3 event or an
    SQS redelivery starts nothing new: it is also the state machine execution's name."""
    digest = hashlib.sha256(f"{bucket}\n{key}\n{etag.strip(chr(34))}".encode()).hexdigest()
    return f"job_{digest[:32]}"


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


def check_inbox_key(key: str) -> None:
    """Refuse keys that could escape inbox/ or confuse a reader: `..`, control characters, odd bytes."""
    if ".." in key.split("/") or "//" in key or not _SAFE_KEY.match(key) or key.endswith("/"):
        raise InvalidInputError(f"unsupported object key {key[:120]!r}: use letters, digits and ' _.,=+@()/-'")


def drop_owner(key: str) -> str:
    """Who a dropped object's job belongs to: the user of its folder, inbox/<user id>/<name>, so a
    user can watch it through the API; objects right under inbox/ belong to the bucket's writers."""
    parts = key.split("/")
    return parts[1] if len(parts) > 2 else DROP_OWNER


def document_key_for_job(job_id: str) -> str:
    """Where a job submitted through the API keeps its document."""
    return f"jobs/{job_id}/document.txt"


def summary_keys(job_id: str, document_key: str) -> tuple[str, str]:
    """Where a job's summary lands: next to its name for S3 drops (inbox/a/b.txt ->
    summaries/a/b.txt.json and .md), by job id for API jobs."""
    name = document_key[len(INBOX) :] if document_key.startswith(INBOX) else job_id
    return f"{SUMMARIES}{name}.json", f"{SUMMARIES}{name}.md"


def chunk_key(job_id: str, index: int) -> str:
    return f"work/{job_id}/chunks/{index:05d}.txt"


def chunk_summary_key(job_id: str, index: int) -> str:
    return f"work/{job_id}/summaries/{index:05d}.json"


def draft_key(job_id: str) -> str:
    return f"work/{job_id}/draft.json"
