"""Admission and fairness (issue 4): `python -m bench admission`.

Three measurements, printed as Markdown tables:

1. The flood (bench/fairness.py, the scenario tests/e2e/test_fairness.py asserts on): time to first
   token per user class, the nine well-behaved users alone and during a 20 s flood by a tenth user on
   a ten-requests-a-minute tier, and what the flooder got.
2. What admission costs per request: `QuotaStore.reserve` (one TransactWriteItems that checks the
   tier's counters, takes a stream slot and creates the request record) and `settle` (one more that
   refunds the unused tokens and frees the slot), against the same local stack's moto, next to the
   PutItem that would create the record without admission; and a refusal, asked and remembered.
3. Upstream calls per request when the model fails 30% of calls (`local?fail_rate=0.3`), through the
   real `Summarizer` and its retry loop (at most 3 attempts; per user, retries at most 20% of the last
   minute's calls, at least 3): one busy user, and many users with one request each.
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from bench import fairness

#: Requests timed against the store, per kind of write.
STORE_ROUNDS = 100
REFUSAL_ROUNDS = 50
#: Request records in the table for the second round of store timings.
FULL_TABLE = 1_000
FAIL_RATE = 0.3
RETRY_REQUESTS = 500
RETRY_IN_FLIGHT = 10


def _ms(values: list[float], q: float) -> str:
    return f"{fairness.percentile(values, q) * 1000:.0f}"


# 1. The flood --------------------------------------------------------------------------------------


def flood_tables(result: fairness.Result) -> list[str]:
    alone, flood = result.alone, result.flood
    rows = [
        ("the 9 well-behaved users", "alone (10 s before + 10 s after)", alone.steady_ttft()),
        ("the 9 well-behaved users", "during the flood (20 s)", flood.steady_ttft()),
        ("the flooder, its admitted requests", "during the flood (20 s)", flood.flooder_ttft()),
    ]
    lines = [
        "| user class | when | requests | TTFT p50 (ms) | TTFT p99 (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {who} | {when} | {len(ttft)} | {_ms(ttft, 50)} | {_ms(ttft, 99)} |" for who, when, ttft in rows]
    ratio50 = fairness.percentile(flood.steady_ttft(), 50) / fairness.percentile(alone.steady_ttft(), 50)
    ratio99 = fairness.percentile(flood.steady_ttft(), 99) / fairness.percentile(alone.steady_ttft(), 99)
    limits = Counter(str(s.error.get("limit")) for s in flood.refused())
    refused = [s.total_s for s in flood.refused()]
    lines += [
        "",
        "| the flood | |",
        "|---|---:|",
        f"| the others' TTFT during / alone, p50 | {ratio50:.2f}x |",
        f"| the others' TTFT during / alone, p99 (the test's bound: 1.20x) | **{ratio99:.2f}x** |",
        f"| flooder requests sent | {len(flood.flooder)} |",
        f"| admitted | {len(flood.admitted())} |",
        f"| refused with 429 | {len(refused)} ({', '.join(f'{n} {limit}' for limit, n in limits.items())}) |",
        f"| 429 round trip p50 / p99 (ms) | {_ms(refused, 50)} / {_ms(refused, 99)} |",
    ]
    return lines


# 2. What admission costs ---------------------------------------------------------------------------


class _Timed:
    """Wall and calling-thread CPU seconds of each call, by name."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        #: Request records in the table when the timing started and ended.
        self.records = (0, 0)

    def __call__(self, name: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return call(*args, **kwargs)
        finally:
            self.cpu.setdefault(name, []).append(time.thread_time() - cpu)
            self.wall.setdefault(name, []).append(time.perf_counter() - wall)

    def merge(self, other: _Timed) -> None:
        for name in other.wall:
            self.wall.setdefault(name, []).extend(other.wall[name])
            self.cpu.setdefault(name, []).extend(other.cpu[name])

    def median_ms(self, name: str) -> tuple[float, float]:
        return statistics.median(self.wall[name]) * 1000, statistics.median(self.cpu[name]) * 1000


def store_costs(stack: fairness.ScenarioStack, records: int) -> _Timed:
    """Admission's writes against the stack's moto, one at a time, with the requests table holding
    `records` records (filled up first, kept at that size): STORE_ROUNDS admissions (reserve, settle,
    and the record's PutItem for comparison), then REFUSAL_ROUNDS users on a one-request-a-minute
    tier, each admitted once and then refused twice."""
    import boto3
    from botocore.config import Config

    from precis.adapters.dynamodb import RequestStore
    from precis.adapters.quotas import QuotaStore
    from precis.domain.errors import RateLimitedError
    from precis.domain.models import Usage
    from precis.domain.tiers import Tiers

    dynamodb = boto3.resource(
        "dynamodb",
        endpoint_url=stack.moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard"}),
    )
    requests_table = dynamodb.Table(stack.tables["RequestsTable"])
    quotas_table = dynamodb.Table(stack.tables["QuotasTable"])
    requests = RequestStore(requests_table)
    roomy = Tiers.load(str(fairness.TIERS_FILE)).named("enterprise")
    tight = roomy.model_copy(update={"name": "one-a-minute", "requests_per_minute": 1})
    used = Usage(input_tokens=900, output_tokens=30)
    timed = _Timed()
    user = f"bench-{secrets.token_hex(4)}"

    def record() -> dict[str, Any]:
        return requests.creation(f"req_{secrets.token_hex(16)}", user, "local", "paragraph", 900)

    with requests_table.batch_writer() as batch:
        for _ in range(records - requests_table.scan(Select="COUNT")["Count"]):
            batch.put_item(Item=record()["Item"])
    quotas = QuotaStore(quotas_table)
    quotas.settle(quotas.reserve(user, roomy, 1200, "streams", record=record()), used)  # warm the connection
    for _ in range(STORE_ROUNDS):
        admitted, alone = record(), record()
        held = timed("reserve", quotas.reserve, user, roomy, 1200, "streams", record=admitted)
        timed("settle", quotas.settle, held, used)
        timed("put", requests_table.meta.client.put_item, **alone)
        for written in (admitted, alone):  # the table stays at its size
            requests_table.delete_item(Key={"pk": written["Item"]["pk"]})
    rounds = 0
    while rounds < REFUSAL_ROUNDS:
        store, flooder = QuotaStore(quotas_table), f"bench-flood-{secrets.token_hex(4)}"
        store.settle(store.reserve(flooder, tight, 1200, "streams"), used)
        this_round, refused = _Timed(), 0
        for name in ("refused, asked", "refused, remembered"):  # the first refusal of a minute, then the next
            try:
                store.settle(this_round(name, store.reserve, flooder, tight, 1200, "streams", record=record()), used)
            except RateLimitedError:
                refused += 1
        if refused == 2:  # else a new minute began meanwhile: the round does not count
            timed.merge(this_round)
            rounds += 1
    timed.records = (records, requests_table.scan(Select="COUNT")["Count"])
    return timed


def store_table(before: _Timed, after: _Timed) -> list[str]:
    lines = [
        f"| one write, median | {before.records[0]:,} records: wall (ms) | CPU here (ms) "
        f"| {after.records[0]:,} records: wall (ms) | CPU here (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "reserve": "`reserve`: TransactWriteItems, 4 conditional updates + the record's Put",
        "settle": "`settle`: TransactWriteItems, 3 updates",
        "put": "for comparison: the record's PutItem alone (no admission)",
        "refused, asked": "a refusal, the first of its minute: the transaction, cancelled",
        "refused, remembered": "a refusal later in that minute: remembered, no call",
    }
    for name, label in names.items():
        (w1, c1), (w2, c2) = before.median_ms(name), after.median_ms(name)
        lines.append(f"| {label} | {w1:.1f} | {c1:.2f} | {w2:.1f} | {c2:.2f} |")
    costs = []
    for timed in (before, after):
        wall = sum(timed.median_ms(name)[0] for name in ("reserve", "settle")) - timed.median_ms("put")[0]
        cpu = sum(timed.median_ms(name)[1] for name in ("reserve", "settle")) - timed.median_ms("put")[1]
        costs += [f"**{wall:.1f}**", f"{cpu:.2f}"]
    lines.append(f"| **admission per request**: reserve + settle - PutItem | {' | '.join(costs)} |")
    return lines


# 3. Upstream calls under failures ------------------------------------------------------------------

_REQUEST: contextvars.ContextVar[int] = contextvars.ContextVar("request")


class _CountingProviders:
    """The real providers, each `stream` call (one upstream call) counted for the request making it."""

    def __init__(self) -> None:
        from precis.providers import ProviderFactory

        self.factory = ProviderFactory()
        self.calls: Counter[int] = Counter()

    def build(self, spec: Any) -> Any:
        provider = self.factory.build(spec)
        calls = self.calls

        class Counted:
            def stream(self, prompt: Any, *, max_output_tokens: int) -> AsyncIterator[Any]:
                calls[_REQUEST.get()] += 1
                return provider.stream(prompt, max_output_tokens=max_output_tokens)

        return Counted()


class _Nowhere:
    """Journal and telemetry that keep nothing: the retry loop is what is measured."""

    def checkpoint(self, *_: Any) -> None: ...
    def save_final_inputs(self, *_: Any) -> None: ...
    def finish(self, *_: Any) -> None: ...
    def record(self, *_: Any) -> None: ...
    def cancelled(self, request_ids: list[str]) -> set[str]:
        return set()


async def upstream_calls(users: int, seed: int) -> tuple[int, Counter[int], int]:
    """RETRY_REQUESTS requests spread over `users` users, RETRY_IN_FLIGHT at a time, through one
    Summarizer whose model fails FAIL_RATE of its calls. Requests; calls per request -> requests;
    requests that failed."""
    from precis.domain.cancellation import CancelWatch
    from precis.domain.catalog import Catalog
    from precis.domain.chunking import plan_chunks
    from precis.domain.models import Document, Limits, Style
    from precis.domain.summarize import Summarizer, SummaryTask

    providers, nowhere = _CountingProviders(), _Nowhere()
    summarizer = Summarizer(providers, nowhere, nowhere, CancelWatch(nowhere))
    spec = Catalog.bundled().resolve(f"local?fail_rate={FAIL_RATE}&seed={seed}")
    plan = plan_chunks(Document(text=fairness.DOCUMENT), chunk_tokens=7_000, overlap_tokens=50)
    slots = asyncio.Semaphore(RETRY_IN_FLIGHT)
    failed = 0

    async def one(index: int) -> None:
        nonlocal failed
        task = SummaryTask(
            request_id=f"req_{index:032x}",
            user_id=f"user-{index % users}",
            tier="pro",
            model=spec,
            style=Style.PARAGRAPH,
            max_output_tokens=fairness.MAX_OUTPUT_TOKENS,
            plan=plan,
            limits=Limits(max_input_tokens=200_000, max_output_tokens=1024),
            document_tokens=plan.total_tokens,
        )

        async def emit(_: Any) -> None: ...

        async with slots:
            _REQUEST.set(index)
            outcome = await summarizer.run(task, emit)
        failed += outcome.error is not None

    await asyncio.gather(*(one(i) for i in range(RETRY_REQUESTS)))
    return RETRY_REQUESTS, Counter(providers.calls.values()), failed


def retry_table() -> list[str]:
    cases = [
        ("one busy user", 1, 1),
        (f"{RETRY_REQUESTS} users, one request each", RETRY_REQUESTS, 2),
    ]
    p = FAIL_RATE
    lines = [
        f"| {RETRY_REQUESTS} requests, {RETRY_IN_FLIGHT} in flight, model fails {p:.0%} of calls "
        "| upstream calls per request | requests by calls (1 / 2 / 3) | requests that failed |",
        "|---|---:|---:|---:|",
        f"| expected with no retry budget (3 attempts) | {1 + p + p * p:.2f} | "
        f"{1 - p:.0%} / {p * (1 - p):.0%} / {p * p:.0%} | {p**3:.1%} |",
    ]
    for label, users, seed in cases:
        requests, by_calls, failed = asyncio.run(upstream_calls(users, seed))
        calls = sum(n * count for n, count in by_calls.items())
        spread = " / ".join(str(by_calls.get(n, 0)) for n in (1, 2, 3))
        lines.append(f"| {label} | **{calls / requests:.2f}** | {spread} | {failed / requests:.1%} |")
    return lines


def run() -> str:
    began = time.perf_counter()
    with fairness.ScenarioStack() as stack:
        result = asyncio.run(fairness.scenario(stack.url, stack.steady_keys, stack.flooder_key))
    with fairness.ScenarioStack(steady_users=0) as stack:
        empty, full = store_costs(stack, 0), store_costs(stack, FULL_TABLE)
    retries = retry_table()
    elapsed = time.perf_counter() - began
    lines = [
        f"Model `{fairness.MODEL}`, {fairness.MAX_OUTPUT_TOKENS} output tokens; the local stack in its own "
        "process (moto in a third), fresh tables; httpx + httpx-sse clients in this process. Nine users "
        f"(tier `{fairness.STEADY_TIER}`) each send one request every {fairness.PERIOD_S:.0f} s, one after "
        f"the other, starts staggered; the flooder (tier `{fairness.FLOODER_TIER}`: {fairness.FLOODER_RPM} "
        f"requests a minute) sends {fairness.FLOOD_RATE:.0f} a second for {fairness.FLOOD_S:.0f} s. TTFT = "
        "from sending the request to the first `token` event.",
        "",
        *flood_tables(result),
        "",
        "What admission costs: the store's writes timed one at a time from this process against a "
        "fresh local stack's moto, first with an empty requests table, then with the table filled "
        f"with {FULL_TABLE:,} request records (the scenario above leaves ~400); CPU = this thread's "
        "(botocore), not moto's.",
        "",
        *store_table(empty, full),
        "",
        f"Upstream calls per request with `local?fail_rate={FAIL_RATE}&seed=<n>` (each call fails "
        "transiently before its first token with that probability; one seeded sequence of draws per "
        "model id, taken in the order the calls happen), through `Summarizer` (no circuit breaker, no "
        "fallback model) with the default `RetryPolicy`.",
        "",
        *retries,
        "",
        f"Whole suite: {elapsed:.0f} s.",
    ]
    return "\n".join(lines)
