"""Job rules and the starter's intake, with in-memory fakes of the job table and Step Functions."""

from __future__ import annotations

import time
from typing import Any

import pytest

from precis.domain.errors import InvalidInputError
from precis.domain.jobs import (
    DROP_OWNER,
    Job,
    JobError,
    check_inbox_key,
    job_id_for_object,
    summary_keys,
)
from precis.domain.models import Style
from precis.domain.pipeline import JobIntake

BUCKET = "docs"
Intake = tuple["JobIntake", "MemoryJobs", "MemoryExecutions"]


class MemoryJobs:
    def __init__(self) -> None:
        self.items: dict[str, Job] = {}

    def create(
        self,
        job_id: str,
        owner: str,
        document_key: str,
        model: str,
        style: Style,
        max_output_tokens: int,
        error: JobError | None = None,
    ) -> bool:
        if job_id in self.items:
            return False
        now = time.time()
        self.items[job_id] = Job(
            job_id=job_id, owner=owner, status="queued" if error is None else "failed", document_key=document_key,
            model=model, style=style, max_output_tokens=max_output_tokens, error=error, created_at=now, updated_at=now,
        )  # fmt: skip
        return True

    def get(self, job_id: str) -> Job | None:
        return self.items.get(job_id)

    def started(self, job_id: str, execution_arn: str) -> bool:
        job = self.items[job_id]
        if job.status != "queued":
            return False
        self.items[job_id] = job.model_copy(update={"status": "running", "execution_arn": execution_arn})
        return True


class MemoryExecutions:
    def __init__(self) -> None:
        self.started: dict[str, dict[str, Any]] = {}
        self.stopped: list[str] = []

    def start(self, name: str, payload: dict[str, Any]) -> str:
        self.started.setdefault(name, payload)
        return f"arn:aws:states:us-east-1:123456789012:execution:summarize:{name}"

    def stop(self, execution_arn: str, cause: str) -> None:
        self.stopped.append(execution_arn)


def s3_event(key: str, size: int = 100, etag: str = "abc", bucket: str = BUCKET) -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventSource": "aws:s3",
                "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": size, "eTag": etag}},
            }
        ]
    }


@pytest.fixture
def intake() -> Intake:
    jobs, executions = MemoryJobs(), MemoryExecutions()
    desk = JobIntake(
        jobs, executions, bucket=BUCKET, default_model="local", default_max_output_tokens=512, max_document_bytes=1000
    )
    return desk, jobs, executions


@pytest.mark.parametrize(
    "key",
    ["inbox/report.txt", "inbox/a/b c/d-e_f.2026.md", "inbox/(draft) v2, final=1.txt", "inbox/Präsentation 東京.txt"],
)
def test_ordinary_inbox_keys_are_accepted(key: str) -> None:
    check_inbox_key(key)


@pytest.mark.parametrize(
    "key",
    ["inbox/../secrets.txt", "inbox/a/../../b", "summaries/x.txt", "inbox/", "inbox//x", "inbox/x\x00y",
     "inbox/tab\there",
     "inbox/" + "a" * 600, "inbox/back\\slash", "inbox/ümlaut?.txt"],
)  # fmt: skip
def test_keys_that_could_escape_or_confuse_are_refused(key: str) -> None:
    with pytest.raises(InvalidInputError):
        check_inbox_key(key)


def test_the_same_object_is_always_the_same_job() -> None:
    assert job_id_for_object("b", "inbox/x", '"etag1"') == job_id_for_object("b", "inbox/x", "etag1")
    assert job_id_for_object("b", "inbox/x", "etag1") != job_id_for_object("b", "inbox/x", "etag2")
    assert len(job_id_for_object("b", "inbox/x", "e")) <= 80, "an execution name is at most 80 characters"


def test_summaries_land_next_to_the_dropped_name_or_by_job_id() -> None:
    assert summary_keys("job_1", "inbox/a/b.txt") == ("summaries/a/b.txt.json", "summaries/a/b.txt.md")
    assert summary_keys("job_1", "jobs/job_1/document.txt") == ("summaries/job_1.json", "summaries/job_1.md")


def test_s3_test_event_is_ignored(intake: Intake) -> None:
    desk, jobs, executions = intake
    desk.handle({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET})
    assert not jobs.items and not executions.started


def test_a_drop_becomes_a_running_job_named_by_its_object(
    intake: Intake,
) -> None:
    desk, jobs, executions = intake
    desk.handle(s3_event("inbox/q3+board+notes.txt"))
    [job] = jobs.items.values()
    assert job.document_key == "inbox/q3 board notes.txt", "S3 event keys are URL-encoded"
    assert job.owner == DROP_OWNER and job.status == "running"
    assert executions.started == {job.job_id: {"job_id": job.job_id}}


def test_a_drop_in_a_users_folder_belongs_to_that_user(intake: Intake) -> None:
    desk, jobs, _ = intake
    desk.handle(s3_event("inbox/alice/notes.txt"))
    [job] = jobs.items.values()
    assert job.owner == "alice"


def test_a_duplicate_drop_starts_nothing_new(intake: Intake) -> None:
    desk, jobs, executions = intake
    desk.handle(s3_event("inbox/a.txt"))
    desk.handle(s3_event("inbox/a.txt"))
    assert len(jobs.items) == 1 and len(executions.started) == 1


@pytest.mark.parametrize(
    ("key", "size", "code"),
    [
        ("inbox/../x.txt", 10, "invalid_input"),
        ("inbox/empty.txt", 0, "invalid_document"),
        ("inbox/big.txt", 5000, "invalid_document"),
    ],
)  # fmt: skip
def test_a_bad_drop_is_a_failed_job_with_a_reason_and_no_execution(
    intake: Intake, key: str, size: int, code: str
) -> None:
    desk, jobs, executions = intake
    desk.handle(s3_event(key, size=size))
    [job] = jobs.items.values()
    assert job.status == "failed" and job.error is not None and job.error.code == code
    assert not executions.started


@pytest.mark.parametrize(
    "message",
    [{}, {"job_id": "not-a-job"}, {"Records": []}, {"Records": ["x"]}, s3_event("inbox/a.txt", bucket="someone-elses")],
)
def test_messages_that_are_neither_drops_nor_jobs_are_refused(intake: Intake, message: dict[str, Any]) -> None:
    desk, jobs, _ = intake
    with pytest.raises(InvalidInputError):
        desk.handle(message)
    assert not jobs.items


def test_a_queued_api_job_is_started_and_a_cancelled_one_is_not(
    intake: Intake,
) -> None:
    desk, jobs, executions = intake
    jobs.create("job_" + "1" * 32, "alice", "jobs/x/document.txt", "local", Style.TLDR, 100)
    jobs.create("job_" + "2" * 32, "alice", "jobs/y/document.txt", "local", Style.TLDR, 100)
    jobs.items["job_" + "2" * 32] = jobs.items["job_" + "2" * 32].model_copy(update={"status": "cancelled"})
    desk.handle({"job_id": "job_" + "1" * 32})
    desk.handle({"job_id": "job_" + "2" * 32})
    assert list(executions.started) == ["job_" + "1" * 32]
