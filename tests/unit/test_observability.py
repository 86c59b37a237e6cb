"""Logs and traces at the lowest layer: correlation ids per thread, pseudonyms, stage marks."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest

from local.cloud import LambdaContext
from precis import observability
from precis.domain.breaker import BreakerState, CircuitBreaker
from precis.domain.errors import TransientStorageError
from precis.observability import (
    annotate,
    correlate,
    correlated,
    current_trace,
    inject_lambda_context,
    logger,
    pseudonym,
    record_stage,
    stage,
)
from tests.support.logs import captured_logs, json_lines


def context(name: str) -> LambdaContext:
    return LambdaContext(
        function_name=name,
        invoked_function_arn=f"arn:aws:lambda:us-east-1:123456789012:function:{name}",
        memory_limit_in_mb=1024,
        timeout_s=30,
    )


def test_pseudonym_is_stable_keyed_and_never_the_user_id() -> None:
    email = "jane.doe@example.com"
    assert pseudonym(email) == pseudonym(email)
    assert pseudonym(email) != pseudonym("john.doe@example.com")
    assert pseudonym(email).startswith("u_") and len(pseudonym(email)) == 18
    assert "jane" not in pseudonym(email)
    # Not a plain hash: anyone could hash a list of addresses and find hers.
    assert pseudonym(email)[2:] not in hashlib.sha256(email.encode()).hexdigest()


def test_concurrent_invocations_in_one_process_log_their_own_correlation_id() -> None:
    """The local stack runs every function in one process, a Map state's chunks at once: each
    invocation's lines carry its own job id, never another's."""
    both_logged = threading.Barrier(2, timeout=5)

    @inject_lambda_context(correlation_id_path="job_id")
    def handler(event: dict[str, Any], _: Any) -> None:
        logger.info("before", extra={"mine": event["job_id"]})
        both_logged.wait()  # the other invocation has started (and set its keys) by now
        logger.info("after", extra={"mine": event["job_id"]})

    with captured_logs() as logs:
        threads = [
            threading.Thread(target=handler, args=({"job_id": f"job_{n:032x}"}, context(f"fn-{n}"))) for n in (1, 2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    lines = json_lines(logs.lines)
    assert len(lines) == 4
    for line in lines:
        assert line["correlation_id"] == line["mine"], line
        assert line["function_name"] == f"fn-{int(line['mine'][4:], 16)}"


def test_an_invocation_without_a_correlation_id_does_not_inherit_the_last_one() -> None:
    @inject_lambda_context(correlation_id_path="job_id")
    def stage_handler(event: dict[str, Any], _: Any) -> None:
        logger.info("stage")

    @inject_lambda_context()
    def batch_handler(event: dict[str, Any], _: Any) -> None:
        logger.info("batch")

    with captured_logs() as logs:
        stage_handler({"job_id": "job_" + "a" * 32}, context("stage"))
        batch_handler({"Records": []}, context("batch"))
    stage_line, batch_line = json_lines(logs.lines)
    assert stage_line["correlation_id"] == "job_" + "a" * 32
    assert "correlation_id" not in batch_line


class UnavailableBreakerStore:
    def read(self, model: str) -> BreakerState:
        raise TransientStorageError("DynamoDB is unavailable")


def test_shared_codes_warnings_in_a_stage_carry_the_jobs_id_from_tasks_and_worker_threads() -> None:
    """The circuit breaker warns from wherever a stage calls it: an event loop's task (anyio.run, as
    the model stages run), a worker thread (anyio.to_thread, as the gateway calls it)."""
    breaker = CircuitBreaker(UnavailableBreakerStore())  # type: ignore[arg-type]

    @inject_lambda_context(correlation_id_path="job_id")
    def handler(event: dict[str, Any], _: Any) -> None:
        async def stage_work() -> None:
            breaker.admit("local")  # in the loop's task
            await anyio.to_thread.run_sync(breaker.admit, "local")  # in a worker thread

        anyio.run(stage_work)

    with captured_logs() as logs:
        handler({"job_id": "job_" + "b" * 32}, context("chunk"))
    warnings = json_lines(logs.lines)
    assert [line["message"] for line in warnings] == ["circuit breaker state unavailable; calling the model"] * 2
    assert {line["correlation_id"] for line in warnings} == {"job_" + "b" * 32}


def test_correlated_block_keys_end_with_the_block() -> None:
    """One SQS record's job and user must not label the next record's lines."""
    with captured_logs() as logs:
        with correlated(None, message_id="m1"):
            correlate("job_" + "1" * 32, user=pseudonym("alice"))
            logger.info("first record")
        with correlated(None, message_id="m2"):
            logger.info("second record, before its job id is known")
    first, second = json_lines(logs.lines)
    assert first["correlation_id"] == "job_" + "1" * 32 and first["user"] == pseudonym("alice")
    assert second["message_id"] == "m2" and "correlation_id" not in second and "user" not in second


class RecordedTrace:
    """An in-memory `observability.Trace`."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float, float, bool]] = []
        self.annotations: dict[str, Any] = {}

    def record(self, stage: str, started: float, ended: float, *, failed: bool = False) -> None:
        self.stages.append((stage, started, ended, failed))

    def annotate(self, annotations: dict[str, Any]) -> None:
        self.annotations.update(annotations)


def test_stages_are_recorded_only_while_a_request_is_traced() -> None:
    assert current_trace.get() is None
    with stage("auth"):
        pass
    record_stage("storage", 0.0)
    annotate(request_id="req_untraced")  # nothing to annotate: no error, nothing kept

    trace = RecordedTrace()
    token = current_trace.set(trace)
    try:
        with stage("auth"):
            pass
        with pytest.raises(KeyError), stage("admission"):
            raise KeyError("over a limit")
        record_stage("storage", 1.0, 2.0)
        annotate(request_id="req_1", model="local", tier="pro")
    finally:
        current_trace.reset(token)
    assert [(name, failed) for name, *_, failed in trace.stages] == [
        ("auth", False),
        ("admission", True),
        ("storage", False),
    ]
    assert trace.stages[2][1:3] == (1.0, 2.0)
    assert trace.annotations == {"request_id": "req_1", "model": "local", "tier": "pro"}


def test_untraced_stage_costs_one_context_variable_read() -> None:
    """No object per call when nothing is traced: the same do-nothing context manager every time."""
    assert stage("auth") is stage("streaming") is observability._UNTRACED
