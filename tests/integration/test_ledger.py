"""The cost ledger against moto: entries and day totals written once, exact to the last digit, read back
per user, and written by the request store's finish and by the job stages that end a job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from local.stack import CREATORS, Template, creation_properties, load_template, physical_name
from precis.adapters.dynamodb import RequestStore
from precis.adapters.jobs import JobStore
from precis.adapters.ledger import LedgerStore
from precis.adapters.s3 import DocumentStore
from precis.domain.catalog import Catalog
from precis.domain.jobs import draft_key
from precis.domain.ledger import LedgerEntry, Totals, request_entry
from precis.domain.models import FinishReason, Style, Summary, Usage
from precis.domain.pipeline import JobPipeline
from precis.domain.summarize import ErrorInfo, Outcome
from precis.providers import ProviderFactory
from precis.settings import Settings

DAY = datetime(2026, 3, 14, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0
MINI = Catalog.bundled().resolve("gpt-4o-mini").info.price


def entry(
    id_: str,
    tokens: tuple[int, int],
    *,
    user: str = "alice",
    at: float = DAY,
    finish: FinishReason = FinishReason.STOP,
    kind: str = "request",
) -> LedgerEntry:
    usage = Usage(input_tokens=tokens[0], output_tokens=tokens[1])
    return LedgerEntry(
        id=id_, kind=kind, user_id=user, model="gpt-4o-mini", model_name="gpt-4o-mini", tier="pro", usage=usage,
        cost_usd=MINI.cost(usage), latency_ms={"ttft": 12.5, "total": 80.25}, finish_reason=finish, started_at=at,
    )  # fmt: skip


@pytest.fixture
def tables(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto with the tables of template.yaml and a documents bucket: what these tests use, without the
    queues, functions and state machine that conftest's `tables` creates too (seconds per test)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        template = Template.read()
        session = boto3.Session(region_name="us-east-1")
        session.client("s3").create_bucket(Bucket="test-documents")
        created = {}
        for logical_id in template.resources("AWS::DynamoDB::Table"):
            name = physical_name(template, logical_id, prefix="test")
            CREATORS["AWS::DynamoDB::Table"](session, name, template.resolve(creation_properties(template, logical_id)))
            created[logical_id] = session.resource("dynamodb").Table(name)
        yield created


@pytest.fixture
def ledger(tables: dict[str, Any]) -> LedgerStore:
    return LedgerStore(tables["LedgerTable"])


def test_an_entry_recorded_twice_is_written_and_counted_once(ledger: LedgerStore) -> None:
    first = entry("req_1", (1000, 200))
    assert ledger.record(first) is True
    assert ledger.record(first) is False, "the second run of a stage changes nothing"
    [day] = ledger.days("alice", date(2026, 3, 14), date(2026, 3, 14))
    assert (day.requests, day.jobs, day.input_tokens, day.output_tokens) == (1, 0, 1000, 200)
    assert day.cost_usd == Decimal("0.00027") == first.cost_usd
    assert list(ledger.entries("alice", date(2026, 3, 14), date(2026, 3, 14))) == [first]


def test_day_totals_are_the_exact_sum_of_the_days_entries(ledger: LedgerStore) -> None:
    """Costs of a few tokens are millionths of a dollar (4 tokens: 6E-7 USD); added up by the table's
    counters they stay exact, to the last digit, not rounded like floats."""
    sizes = [(4, 0), (1, 1), (42, 5), (0, 0), (123_456, 7_890), (3, 0), (999_999, 1)]
    reasons = [FinishReason.STOP, FinishReason.CANCELLED, FinishReason.ERROR, FinishReason.STOP]
    entries = [
        entry(f"req_{n}", tokens, at=DAY + n, finish=reasons[n % len(reasons)]) for n, tokens in enumerate(sizes)
    ]
    entries.append(entry("job_1", (500, 50), at=DAY + 99, kind="job", finish=FinishReason.LENGTH))
    # As the table gives a cost back (normalized): 6E-7, with no decimal point.
    entries[0] = entries[0].model_copy(update={"cost_usd": entries[0].cost_usd.normalize()})
    assert str(entries[0].cost_usd) == "6E-7"
    for one in entries:
        assert ledger.record(one)
    [day] = ledger.days("alice", date(2026, 3, 14), date(2026, 3, 14))
    expected = sum((Totals.of(one) for one in entries), Totals())
    assert Totals.model_validate(day.model_dump(exclude={"day"})) == expected
    assert day.cost_usd == sum((MINI.cost(one.usage) for one in entries), Decimal(0))
    assert (day.requests, day.jobs) == (7, 1)
    assert day.finish_reasons == {"stop": 3, "cancelled": 2, "error": 2, "length": 1}


def test_usage_is_the_callers_own_over_the_days_asked_with_its_most_expensive(ledger: LedgerStore) -> None:
    mine = [
        entry("req_cheap", (10, 1), at=DAY),
        entry("req_dear", (90_000, 4_000), at=DAY + HOUR),
        entry("req_mid", (5_000, 500), at=DAY + 24 * HOUR),
        entry("req_later", (70_000, 9_000), at=DAY + 3 * 24 * HOUR),  # outside the period asked for
    ]
    theirs = entry("req_theirs", (1_000_000, 100_000), user="bob", at=DAY + HOUR)
    for one in [*mine, theirs]:
        ledger.record(one)

    report = ledger.usage("alice", date(2026, 3, 14), date(2026, 3, 16), top=2)
    assert [d.day for d in report.days] == [date(2026, 3, 14), date(2026, 3, 15)]
    assert report.totals.requests == 3
    assert report.totals.input_tokens == 95_010 and report.totals.output_tokens == 4_501
    assert report.totals.cost_usd == sum((e.cost_usd for e in mine[:3]), Decimal(0))
    assert [e.id for e in report.most_expensive] == ["req_dear", "req_mid"]

    body = report.model_dump(mode="json", by_alias=True)
    assert body["from"] == "2026-03-14" and body["to"] == "2026-03-16"
    assert body["totals"]["cost_usd"] == format(report.totals.cost_usd, "f")
    assert "E" not in body["totals"]["cost_usd"] and "user_id" not in body["most_expensive"][0]
    assert "req_theirs" not in str(body) and ledger.usage("bob", date(2026, 3, 14), date(2026, 3, 14)).totals.requests


def outcome(request_id: str, finish: FinishReason, usage: Usage) -> Outcome:
    return Outcome(
        request_id=request_id,
        user_id="alice",
        model="gpt-4o-mini",
        model_name="gpt-4o-mini",
        tier="pro",
        summary=Summary(text="So far", style=Style.TLDR, finish_reason=finish),
        usage=usage,
        cost_usd=MINI.cost(usage),
        latency_ms={"preprocess": 1.5, "ttft": 20.0, "infer": 300.0, "total": 320.0},
        error=ErrorInfo(code="model_error", message="boom", retryable=True),
        retries=2,
        started_at=DAY,
    )


def test_a_request_is_finished_and_charged_in_one_write_and_only_once(tables: dict[str, Any]) -> None:
    ledger = LedgerStore(tables["LedgerTable"])
    store = RequestStore(tables["RequestsTable"], ledger=ledger)
    request_id = "req_" + "b" * 32
    store.create(request_id, "alice", "gpt-4o-mini", "tldr", input_tokens=100)
    ended = outcome(request_id, FinishReason.ERROR, Usage(input_tokens=1_234, output_tokens=56))
    store.finish(ended)
    store.finish(ended)  # a repeat still finishes the record, and charges nothing more

    record = store.get(request_id, "alice")
    assert record.status == "failed" and record.partial and record.usage == ended.usage
    [charged] = ledger.entries("alice", date(2026, 3, 14), date(2026, 3, 14))
    assert charged == request_entry(ended)
    assert (charged.retries, charged.error_code, charged.partial) == (2, "model_error", True)
    assert charged.latency_ms == ended.latency_ms
    [day] = ledger.days("alice", date(2026, 3, 14), date(2026, 3, 14))
    assert (day.requests, day.input_tokens, day.output_tokens, day.cost_usd) == (1, 1_234, 56, ended.cost_usd)
    assert day.finish_reasons == {"error": 1}


def test_a_cancel_meeting_the_finish_transaction_answers_with_the_request_not_an_error(
    tables: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DynamoDB refuses a write to an item that a transaction is writing (TransactionConflict): a
    cancel that comes while its request's finish (and cost) is being written."""
    store = RequestStore(tables["RequestsTable"], ledger=LedgerStore(tables["LedgerTable"]))
    request_id = "req_" + "d" * 32
    store.create(request_id, "alice", "gpt-4o-mini", "tldr", input_tokens=100)

    def in_a_transaction(**_: Any) -> None:
        error = {"Error": {"Code": "TransactionConflictException", "Message": "Transaction is ongoing for the item"}}
        raise ClientError(error, "UpdateItem")  # type: ignore[arg-type]

    monkeypatch.setattr(store.table, "update_item", in_a_transaction)
    assert store.request_cancel(request_id, "alice").status == "in_progress"


@pytest.fixture
def pipeline(tables: dict[str, Any]) -> JobPipeline:
    s3 = boto3.client("s3", region_name="us-east-1")
    bucket = s3.list_buckets()["Buckets"][0]["Name"]
    return JobPipeline(
        JobStore(tables["JobsTable"]),
        DocumentStore(s3, bucket),
        ProviderFactory(Settings()),
        max_input_tokens=100_000,
        max_document_bytes=1_000_000,
        ledger=LedgerStore(tables["LedgerTable"]),
    )


def running_job(pipeline: JobPipeline, job_id: str, chunk: Usage, combine: Usage) -> None:
    jobs = pipeline.jobs
    assert isinstance(jobs, JobStore)
    jobs.create(job_id, "alice", f"jobs/{job_id}/document.txt", "gpt-4o-mini", Style.PARAGRAPH, 200)
    jobs.started(job_id, f"arn:aws:states:us-east-1:123456789012:execution:summarize:{job_id}")
    jobs.planned(job_id, 1)
    pipeline.documents.write_json(f"work/{job_id}/usage/chunk-00000.json", chunk.model_dump())
    pipeline.documents.write_json(f"work/{job_id}/usage/combine.json", combine.model_dump())


def test_a_job_is_charged_in_the_ledger_once_however_often_its_last_stage_runs(
    pipeline: JobPipeline, tables: dict[str, Any]
) -> None:
    today = datetime.now(UTC).date()
    ledger = LedgerStore(tables["LedgerTable"])
    chunk, combine = Usage(input_tokens=3_000, output_tokens=300), Usage(input_tokens=400, output_tokens=120)

    running_job(pipeline, "job_" + "1" * 32, chunk, combine)
    pipeline.documents.write_json(draft_key("job_" + "1" * 32), {"text": "All of it.", "finish_reason": "stop"})
    pipeline.finish("job_" + "1" * 32)
    pipeline.finish("job_" + "1" * 32)  # a retried Postprocess And Store

    running_job(pipeline, "job_" + "2" * 32, chunk, Usage())
    failure = {"Error": "PermanentModelError", "Cause": '{"errorMessage": "refused"}'}
    pipeline.record_failure("job_" + "2" * 32, failure)
    pipeline.record_failure("job_" + "2" * 32, failure)

    by_id = {e.id: e for e in ledger.entries("alice", today, today)}
    succeeded, failed = by_id["job_" + "1" * 32], by_id["job_" + "2" * 32]
    assert len(by_id) == 2
    assert (succeeded.kind, succeeded.finish_reason, succeeded.usage) == ("job", FinishReason.STOP, chunk + combine)
    assert succeeded.cost_usd == MINI.cost(chunk + combine) and succeeded.latency_ms["total"] >= 0
    assert (failed.finish_reason, failed.usage, failed.error_code) == (FinishReason.ERROR, chunk, "model_error")
    [day] = ledger.days("alice", today, today)
    assert (day.jobs, day.requests) == (2, 0)
    assert (day.input_tokens, day.output_tokens) == (6_400, 720)
    assert day.cost_usd == MINI.cost(chunk + combine) + MINI.cost(chunk)
    assert time.time() - succeeded.started_at < 60


def test_a_cancelled_job_is_charged_what_it_used_once_however_often_it_is_cancelled(
    pipeline: JobPipeline, tables: dict[str, Any]
) -> None:
    from precis.api.jobs import JobDesk

    assert isinstance(pipeline.documents, DocumentStore)
    desk = JobDesk(
        Settings(
            jobs_table=tables["JobsTable"].name,
            quotas_table=tables["QuotasTable"].name,
            ledger_table=tables["LedgerTable"].name,
            documents_bucket=pipeline.documents.bucket,
        )
    )
    job_id, used = "job_" + "3" * 32, Usage(input_tokens=2_500, output_tokens=80)
    running_job(pipeline, job_id, used, Usage())
    desk.jobs.checkpoint(job_id, "The first")
    assert desk.cancel(job_id, "alice").status == "cancelled"
    assert desk.cancel(job_id, "alice").status == "cancelled"  # a second DELETE

    today = datetime.now(UTC).date()
    ledger = LedgerStore(tables["LedgerTable"])
    [charged] = ledger.entries("alice", today, today)
    assert (charged.id, charged.kind, charged.finish_reason, charged.partial) == (
        job_id, "job", FinishReason.CANCELLED, True,
    )  # fmt: skip
    assert charged.usage == used and charged.cost_usd == MINI.cost(used)
    [day] = ledger.days("alice", today, today)
    assert (day.jobs, day.input_tokens, day.finish_reasons) == (1, 2_500, {"cancelled": 1})


def test_a_request_is_finished_even_when_its_ledger_cannot_be_written(tables: dict[str, Any]) -> None:
    missing = boto3.resource("dynamodb", region_name="us-east-1").Table("no-such-ledger")
    store = RequestStore(tables["RequestsTable"], ledger=LedgerStore(missing))
    request_id = "req_" + "c" * 32
    store.create(request_id, "alice", "gpt-4o-mini", "tldr", input_tokens=100)
    store.finish(outcome(request_id, FinishReason.STOP, Usage(input_tokens=10, output_tokens=2)))
    record = store.get(request_id, "alice")
    assert record.status == "completed" and record.usage == Usage(input_tokens=10, output_tokens=2)


def test_the_ledger_is_written_only_by_what_ends_requests_and_jobs_and_read_only_by_the_gateway() -> None:
    template = load_template()
    resources = template["Resources"]
    table = resources["LedgerTable"]["Properties"]
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    [index] = table["GlobalSecondaryIndexes"]
    assert index["IndexName"] == "ByCost" and [k["AttributeName"] for k in index["KeySchema"]] == [
        "user_day",
        "cost_usd",
    ]
    assert template["Globals"]["Function"]["Environment"]["Variables"]["PRECIS_LEDGER_TABLE"] == {"Ref": "LedgerTable"}

    writers = {
        name
        for name, resource in resources.items()
        if resource["Type"] == "AWS::Serverless::Function"
        and {"Ref": "LedgerWritePolicy"} in resource["Properties"].get("Policies", [])
    }
    assert writers == {"GatewayFunction", "PostprocessFunction", "RecordFailureFunction"}
    [write] = resources["LedgerWritePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert write["Action"] == ["dynamodb:PutItem", "dynamodb:UpdateItem"]
    assert write["Resource"] == {"Fn::GetAtt": ["LedgerTable", "Arn"]}

    def mentions_ledger(policy: Any) -> bool:
        return "LedgerTable" in str(policy) and policy != {"Ref": "LedgerWritePolicy"}

    for name, resource in resources.items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        others = [policy for policy in resource["Properties"].get("Policies", []) if mentions_ledger(policy)]
        if name != "GatewayFunction":
            assert others == [], name
            continue
        [read] = others  # GET /v1/usage: a Query of the table and its index, nothing else
        [statement] = read["Statement"]
        assert statement["Action"] == "dynamodb:Query" and len(statement["Resource"]) == 2
