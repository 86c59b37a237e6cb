"""The asynchronous pipeline on the local stack: where a long document's time goes, in one run.

1. A ~100k-token document (CPython's own documentation topics, `pydoc_data.topics`, joined in sorted
   order: real prose, deterministic, shipped with every Python) is dropped into the inbox of a local
   stack with the zero-latency `local` model. Wall time from the S3 put to the job's `succeeded`, and
   the wall time of each state of the execution, read off its Step Functions history.
2. Chunking throughput: `plan_chunks` on the same document in this process, with the chunk size
   `chunk_budget` gives the `local` model, after the tokenizer is warm.
3. The Map's speed-up: the same document through `POST /v1/jobs` with a model that takes time per
   token (`local?token_ms=20`), on a stack whose state machine has MaxConcurrency 1, then on one with 8.

Each part runs on a fresh stack (moto + the functions in one process, the gateway in this one), so
no run finds another's summaries in the local model's cache, and each stack first runs a one-chunk
warm-up job, so that the functions' first imports (cold starts) are not in the figures.
"""

from __future__ import annotations

import heapq
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

#: Zero latency: the pipeline's own cost. The S3-drop path always uses the default model.
DROP_MODEL = "local"
#: A model that takes time per output token, so that the Map's concurrency shows.
SLOW_MODEL = "local?token_ms=20"
TARGET_TOKENS = 100_000
CHUNKING_RUNS = 5
MAP_CONCURRENCY = (1, 8)
#: Every stack's functions log at WARNING (template.yaml gives them INFO, applied over the inherited
#: environment, so the override has to travel with the stack's own).
QUIET = {"POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true"}
TOP_STATES = ("Split Into Chunks", "Summarize Each Chunk", "Combine The Summaries", "Postprocess And Store")
TIMEOUT_S = 240.0
#: The warm-up job each stack runs first: one chunk, a few hundred tokens.
WARM_UP = (Path(__file__).resolve().parent.parent / "local" / "samples" / "lighthouses.txt").read_text("utf-8")


def document() -> str:
    """CPython's documentation topics, in sorted order, until cl100k_base counts >= TARGET_TOKENS."""
    from pydoc_data.topics import topics

    from precis.domain.tokens import count_tokens

    parts: list[str] = []
    estimate = 0
    names = iter(sorted(topics))
    # Per-part counts first (cheap), then the exact count of the joined text decides.
    while estimate < TARGET_TOKENS:
        parts.append(topics[next(names)])
        estimate += count_tokens(parts[-1]) + 1
    text = "\n\n".join(parts)
    while count_tokens(text) < TARGET_TOKENS:
        text += "\n\n" + topics[next(names)]
    return text


@dataclass
class JobRun:
    """One job through the state machine, its times in seconds from the moment it was submitted."""

    submitted: float  # epoch seconds, just before the S3 put or the POST
    accepted: float  # epoch seconds, when the put or the POST returned
    job: dict[str, Any]
    events: list[dict[str, Any]]
    #: State name -> (first entered, last exited), epoch seconds.
    states: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Map iteration index -> its wall time.
    iterations: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        entered: dict[str, float] = {}
        exited: dict[str, float] = {}
        started: dict[int, float] = {}
        for event in self.events:
            stamp = _epoch(event["timestamp"])
            if "stateEnteredEventDetails" in event:
                entered.setdefault(event["stateEnteredEventDetails"]["name"], stamp)
            elif "stateExitedEventDetails" in event:
                exited[event["stateExitedEventDetails"]["name"]] = stamp
            elif event["type"] == "MapIterationStarted":
                started[event["mapIterationStartedEventDetails"]["index"]] = stamp
            elif event["type"] == "MapIterationSucceeded":
                index = event["mapIterationSucceededEventDetails"]["index"]
                self.iterations[index] = stamp - started[index]
        self.states = {name: (entered[name], exited[name]) for name in entered if name in exited}

    @property
    def chunks(self) -> int:
        chunks: int = self.job["chunks_total"]
        return chunks

    def state_s(self, name: str) -> float:
        start, end = self.states[name]
        return end - start

    def execution_started_s(self) -> float:
        [started] = [e for e in self.events if e["type"] == "ExecutionStarted"]
        return _epoch(started["timestamp"]) - self.submitted

    def job_created_s(self) -> float:
        created: float = self.job["created_at"]
        return created - self.submitted

    def succeeded_s(self) -> float:
        """The job record's last write is the one that marks it succeeded (Postprocess And Store)."""
        updated: float = self.job["updated_at"]
        return updated - self.submitted


def _epoch(value: datetime | float) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def _execution_arn(stack: Any, job_id: str) -> str:
    machine: str = stack.template.attributes["SummarizeStateMachine"]["Ref"]
    return f"{machine.replace(':stateMachine:', ':execution:')}:{job_id}"


def _wait_for_job(stack: Any, client: Any, job_id: str) -> dict[str, Any]:
    """The job once `succeeded`; an error as soon as the job or its execution ends otherwise."""
    import boto3

    sfn: Any = boto3.client("stepfunctions")
    deadline = time.monotonic() + TIMEOUT_S
    polls = 0
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200:
            job: dict[str, Any] = response.json()
            if job["status"] == "succeeded":
                return job
            if job["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        polls += 1
        if polls % 20 == 0:  # a stage that cannot even record its failure leaves the job running
            try:
                execution = sfn.describe_execution(executionArn=_execution_arn(stack, job_id))
            except sfn.exceptions.ExecutionDoesNotExist:
                execution = {"status": "NOT STARTED"}
            if execution["status"] not in ("RUNNING", "SUCCEEDED", "NOT STARTED"):
                raise RuntimeError(f"job {job_id}: its execution ended {execution['status']}: {execution.get('error')}")
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {TIMEOUT_S:.0f} s")


def _history(stack: Any, job_id: str) -> list[dict[str, Any]]:
    import boto3

    arn = _execution_arn(stack, job_id)
    sfn: Any = boto3.client("stepfunctions")  # events as plain dicts
    events: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"executionArn": arn, "maxResults": 1000}
    while True:
        page = sfn.get_execution_history(**kwargs)
        events += page["events"]
        if not page.get("nextToken"):
            return events
        kwargs["nextToken"] = page["nextToken"]


#: `submit(stack, client, text, model) -> (submitted, accepted, job_id)`, epoch seconds.
Submit = Callable[[Any, Any, str, str], tuple[float, float, str]]


def _on_stack(template_overrides: dict[str, str], submit: Submit, text: str, model: str) -> tuple[JobRun, JobRun]:
    """Start a stack; submit a one-chunk warm-up job with the zero-latency model (every function's
    first import, and moto's lazily loaded backends, are paid there), then `text` with `model`.
    Both runs, warm-up first."""
    import httpx

    from local.stack import LocalStack, Template

    template = Template.read(overrides=template_overrides)
    runs: list[JobRun] = []
    with (
        LocalStack(port=0, template=template, overrides=dict(QUIET)) as stack,
        httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {stack.api_key}"}, timeout=60) as client,
    ):
        for body, name in ((WARM_UP, DROP_MODEL), (text, model)):
            submitted, accepted, job_id = submit(stack, client, body, name)
            job = _wait_for_job(stack, client, job_id)
            runs.append(JobRun(submitted=submitted, accepted=accepted, job=job, events=_history(stack, job_id)))
    warm_up, measured = runs
    return warm_up, measured


def dropped(text: str) -> tuple[JobRun, JobRun]:
    """The document put under inbox/dev/ on a stack with the template's defaults (an S3 drop always
    uses the default model, `local`)."""
    import boto3

    from precis.domain.jobs import job_id_for_object

    def submit(stack: Any, _client: Any, body: str, _model: str) -> tuple[float, float, str]:
        s3 = boto3.client("s3")
        bucket, key = stack.template.physical["DocumentsBucket"], f"inbox/dev/{uuid.uuid4().hex}.txt"
        submitted = time.time()
        etag = s3.put_object(Bucket=bucket, Key=key, Body=body.encode())["ETag"]
        return submitted, time.time(), job_id_for_object(bucket, key, etag)

    return _on_stack({}, submit, text, DROP_MODEL)


def posted(text: str, concurrency: int) -> tuple[JobRun, JobRun]:
    """The document sent to POST /v1/jobs with SLOW_MODEL, the Map at MaxConcurrency `concurrency`."""

    def submit(_stack: Any, client: Any, body: str, model: str) -> tuple[float, float, str]:
        submitted = time.time()
        response = client.post("/v1/jobs", json={"text": body, "model": model})
        response.raise_for_status()
        return submitted, time.time(), str(response.json()["job_id"])

    return _on_stack({"MapMaxConcurrency": str(concurrency)}, submit, text, SLOW_MODEL)


def chunking_throughput(text: str) -> tuple[float, float, int, int, int]:
    """Median MB/s of plan_chunks and of count_tokens alone on `text`; chunk size, overlap, chunks."""
    from precis.domain.catalog import Catalog
    from precis.domain.chunking import plan_chunks
    from precis.domain.inference import chunk_budget
    from precis.domain.models import Document, Style
    from precis.domain.tokens import count_tokens
    from precis.settings import Settings

    info = Catalog.bundled().resolve(DROP_MODEL).info
    chunk_tokens, overlap = chunk_budget(info, Style.PARAGRAPH, Settings().default_max_output_tokens)
    megabytes = len(text.encode()) / 1e6
    count_tokens(text)  # warm: the tokenizer's load and first pass are not chunking
    plan_chunks(Document(text=text), chunk_tokens, overlap)
    plan_s, count_s = [], []
    chunks = 0
    for _ in range(CHUNKING_RUNS):
        started = time.perf_counter()
        chunks = len(plan_chunks(Document(text=text), chunk_tokens, overlap).chunks)
        plan_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        count_tokens(text)
        count_s.append(time.perf_counter() - started)
    return megabytes / statistics.median(plan_s), megabytes / statistics.median(count_s), chunk_tokens, overlap, chunks


def ideal_map_s(iterations: dict[int, float], slots: int) -> float:
    """The Map's wall time if `slots` iterations ran at once at the durations measured one at a time:
    items start in index order, each as soon as a slot is free (what MaxConcurrency does)."""
    free = [0.0] * slots
    end = 0.0
    for index in sorted(iterations):
        start = heapq.heappop(free)
        end = max(end, start + iterations[index])
        heapq.heappush(free, start + iterations[index])
    return end


def run() -> str:
    # Before precis.observability is imported (by the gateway): its Logger reads them once.
    os.environ.update(QUIET)
    from precis.domain.tokens import count_tokens

    began = time.perf_counter()
    text = document()
    tokens = count_tokens(text)
    size_mb = len(text.encode()) / 1e6

    cold, drop = dropped(text)
    plan_mbs, count_mbs, chunk_tokens, overlap, planned = chunking_throughput(text)
    slow = {concurrency: posted(text, concurrency)[1] for concurrency in MAP_CONCURRENCY}
    elapsed = time.perf_counter() - began

    usage = drop.job["usage"]
    lines = [
        f"Document: CPython's `pydoc_data.topics` joined in sorted order, {tokens:,} cl100k_base tokens, "
        f"{size_mb:.2f} MB; dropped under `inbox/dev/` with model `{DROP_MODEL}` (zero latency); "
        f"{drop.chunks} chunks of <= {chunk_tokens:,} tokens; the job's model calls used "
        f"{usage['input_tokens']:,} input and {usage['output_tokens']:,} output tokens. The stack first ran "
        f"a one-chunk warm-up job ({count_tokens(WARM_UP):,} tokens) so that the functions' first imports are "
        "not in these figures; that cold job is the last row.",
        "",
        "| S3 drop, model `local` | starts at (s) | wall time (s) |",
        "|---|---:|---:|",
        f"| S3 put ({size_mb:.2f} MB into moto) returns | 0.00 | {drop.accepted - drop.submitted:.2f} |",
        f"| S3 put -> job record created (S3 -> SQS -> starter) | 0.00 | {drop.job_created_s():.2f} |",
        f"| S3 put -> ExecutionStarted | 0.00 | {drop.execution_started_s():.2f} |",
    ]
    for name in TOP_STATES:
        start, _end = drop.states[name]
        lines.append(f"| {name} | {start - drop.submitted:.2f} | {drop.state_s(name):.2f} |")
    lines += [
        f"| **S3 put -> job `succeeded`** | 0.00 | **{drop.succeeded_s():.2f}** |",
        f"| for comparison: the warm-up job (1 chunk, cold functions), put -> `succeeded` | 0.00 "
        f"| {cold.succeeded_s():.2f} |",
        "",
        f"Chunking in-process: `plan_chunks` with `chunk_budget` for `{DROP_MODEL}` ({chunk_tokens:,}-token chunks, "
        f"{overlap}-token overlap) on the same {size_mb:.2f} MB document -> {planned} chunks; median of "
        f"{CHUNKING_RUNS} runs after a warm-up.",
        "",
        "| chunking | MB/s |",
        "|---|---:|",
        f"| `plan_chunks` (count, sentence split, per-sentence counts, packing) | {plan_mbs:.2f} |",
        f"| `count_tokens` alone on the whole text (one of its steps) | {count_mbs:.2f} |",
    ]
    one, many = (slow[c] for c in MAP_CONCURRENCY)
    chunk_times = list(one.iterations.values())
    slow_usage = one.job["usage"]
    lines += [
        "",
        f"The Map's speed-up: the same document through `POST /v1/jobs` with model `{SLOW_MODEL}` "
        f"({one.chunks} chunks; the job's calls used {slow_usage['input_tokens']:,} input and "
        f"{slow_usage['output_tokens']:,} output tokens), on a fresh stack per MaxConcurrency "
        "(each warmed up by a one-chunk job first, as above).",
        "",
        "| MaxConcurrency | Summarize Each Chunk (s) | one chunk p50 / max (s) | Combine The Summaries (s) "
        "| POST -> 202 (s) | POST -> ExecutionStarted (s) | POST -> `succeeded` (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency, job in slow.items():
        per_chunk = list(job.iterations.values())
        lines.append(
            f"| {concurrency} | {job.state_s('Summarize Each Chunk'):.2f} "
            f"| {statistics.median(per_chunk):.2f} / {max(per_chunk):.2f} "
            f"| {job.state_s('Combine The Summaries'):.2f} | {job.accepted - job.submitted:.2f} "
            f"| {job.execution_started_s():.2f} "
            f"| {job.succeeded_s():.2f} |"
        )
    top = MAP_CONCURRENCY[-1]
    measured = one.state_s("Summarize Each Chunk") / many.state_s("Summarize Each Chunk")
    ideal = sum(chunk_times) / ideal_map_s(one.iterations, top)
    lines += [
        "",
        "| Map speed-up | ratio |",
        "|---|---:|",
        f"| measured: Summarize Each Chunk at 1 / at {top} | **{measured:.2f}x** |",
        f"| ideal for these {len(chunk_times)} chunk durations with {top} in flight | {ideal:.2f}x |",
        f"| end to end: POST -> `succeeded` at 1 / at {top} | {one.succeeded_s() / many.succeeded_s():.2f}x |",
        "",
        f"Whole suite: {elapsed:.0f} s (three local stacks started and stopped).",
    ]
    return "\n".join(lines)
