"""Fairness under a flood: does one user sending far more than their tier allows slow the others down?

The scenario of issue 4, shared by tests/e2e/test_fairness.py (which asserts on it) and `python -m
bench admission` (which prints it): nine well-behaved users (tier `pro`), each sending one request
every `PERIOD_S` (sequentially, in a steady pattern, their starts staggered), and one flooder (tier
`ten-a-minute`) sending `FLOOD_RATE` requests a second whatever the answers, all over real HTTP with
httpx and httpx-sse, model `local?ttft_ms=300&token_ms=10`. After a warm-up, the others' time to
first token (from sending the request to the first `token` event) is measured alone, then during the
flood, then alone again: the two alone halves are pooled, so that a slow drift of the machine during
the run does not read as the flood's doing.

The local stack is a fresh one in a process of its own (`ScenarioStack`, `python -m bench.fairness`),
moto in a third, as the streaming benchmark runs it: the load generator does not share the gateway's
GIL, and nothing another test or benchmark left in the stack weighs on the comparison.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
#: The e2e tests' tiers: the bundled ones and small budgets to run into.
TIERS_FILE = ROOT / "tests" / "data" / "tiers.json"
STEADY_TIER = "pro"  # 120 requests a minute: one a second is well within it
FLOODER_TIER = "ten-a-minute"
FLOODER_RPM = 10
STEADY_USERS = 9
MODEL = "local?ttft_ms=300&token_ms=10"
DOCUMENT = (ROOT / "local" / "samples" / "lighthouses.txt").read_text()
MAX_OUTPUT_TOKENS = 10
#: One request per user per period: with ~0.4 s streams, three or four of the nine stream at any time.
PERIOD_S = 1.0
FLOOD_RATE = 10.0
FLOOD_S = 20.0
#: The two alone halves together last as long as the flood.
ALONE_S = 20.0
#: The steady users' pattern runs this long first, not counted: a stack's first seconds are not its
#: steady state (moto imports its backends in the background, the functions run for the first time).
WARM_UP_S = 8.0
QUIET = {"POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true"}


@dataclass(frozen=True)
class Sample:
    """One request as its client saw it."""

    user: str
    status: int
    #: When it was sent (time.perf_counter()).
    sent_at: float
    #: Seconds from sending the request to the first `token` event (admitted requests).
    ttft_s: float | None = None
    finish_reason: str | None = None
    #: A refused request's error and Retry-After header.
    error: dict[str, Any] = field(default_factory=dict)
    retry_after: str | None = None
    #: Seconds from sending the request to the end of its response.
    total_s: float = 0.0


@dataclass
class Phase:
    seconds: float
    steady: list[Sample]
    flooder: list[Sample]
    #: When it began (time.perf_counter()).
    started: float = 0.0

    def steady_ttft(self) -> list[float]:
        return [s.ttft_s for s in self.steady if s.ttft_s is not None]

    def flooder_ttft(self) -> list[float]:
        return [s.ttft_s for s in self.flooder if s.ttft_s is not None]

    def admitted(self) -> list[Sample]:
        return [s for s in self.flooder if s.status == 200]

    def refused(self) -> list[Sample]:
        return [s for s in self.flooder if s.status == 429]

    def slowest(self, count: int = 4) -> str:
        """The others' slowest first tokens, each with when it was asked for in the phase."""
        slow = sorted((s for s in self.steady if s.ttft_s is not None), key=lambda s: -(s.ttft_s or 0))[:count]
        return ", ".join(f"{(s.ttft_s or 0) * 1000:.0f} ms at {s.sent_at - self.started:.1f} s" for s in slow)


@dataclass
class Result:
    alone: Phase
    flood: Phase


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def client_for(url: str, api_key: str, connections: int = 2) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=url,
        headers={"authorization": f"Bearer {api_key}"},
        limits=limits,
        timeout=httpx.Timeout(10.0, read=30.0),
    )


async def send(client: httpx.AsyncClient, user: str) -> Sample:
    """POST /v1/summarize and read the stream to its end, or the refusal."""
    body = {"text": DOCUMENT, "model": MODEL, "max_output_tokens": MAX_OUTPUT_TOKENS}
    started = time.perf_counter()
    ttft: float | None = None
    finish: str | None = None
    async with aconnect_sse(client, "POST", "/v1/summarize", json=body) as source:
        response = source.response
        if response.status_code != 200:
            error = json.loads(await response.aread()).get("error", {})
            return Sample(
                user,
                response.status_code,
                started,
                error=error,
                retry_after=response.headers.get("retry-after"),
                total_s=time.perf_counter() - started,
            )
        async for event in source.aiter_sse():
            if event.event == "token" and ttft is None:
                ttft = time.perf_counter() - started
            elif event.event == "done":
                finish = json.loads(event.data)["finish_reason"]
    return Sample(user, 200, started, ttft_s=ttft, finish_reason=finish, total_s=time.perf_counter() - started)


async def steady_user(
    client: httpx.AsyncClient, user: str, offset: float, start: float, seconds: float
) -> list[Sample]:
    """One request every PERIOD_S from `start + offset`, each after the previous one ended (a slot
    missed because a stream ran long is skipped, so the rate never rises to catch up)."""
    samples: list[Sample] = []
    slot = 0
    while (due := start + offset + slot * PERIOD_S) < start + seconds:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        samples.append(await send(client, user))
        slot = max(slot + 1, math.ceil((time.perf_counter() - start - offset) / PERIOD_S))
    return samples


async def flooder(client: httpx.AsyncClient, start: float, seconds: float) -> list[Sample]:
    """FLOOD_RATE requests a second on a fixed schedule (an open loop: slow answers do not slow it)."""
    tasks: list[asyncio.Task[Sample]] = []
    for n in range(round(FLOOD_RATE * seconds)):
        await asyncio.sleep(max(0.0, start + n / FLOOD_RATE - time.perf_counter()))
        tasks.append(asyncio.create_task(send(client, "flooder")))
    return list(await asyncio.gather(*tasks))


async def phase(steady: Sequence[httpx.AsyncClient], flood: httpx.AsyncClient | None, seconds: float) -> Phase:
    start = time.perf_counter()
    users = [
        steady_user(client, f"user-{i}", i * PERIOD_S / len(steady), start, seconds) for i, client in enumerate(steady)
    ]
    flooding = [flooder(flood, start, seconds)] if flood is not None else []
    results = await asyncio.gather(*users, *flooding)
    flooded = results[len(steady)] if flooding else []
    return Phase(seconds, [s for samples in results[: len(steady)] for s in samples], flooded, start)


async def scenario(
    url: str, steady_keys: Sequence[str], flooder_key: str, alone_s: float = ALONE_S, flood_s: float = FLOOD_S
) -> Result:
    """Warm-up (not counted), alone (half), flood, alone (half)."""
    steady = [client_for(url, key) for key in steady_keys]
    flood = client_for(url, flooder_key, connections=100)
    try:
        await phase(steady, None, WARM_UP_S)
        before = await phase(steady, None, alone_s / 2)
        flooded = await phase(steady, flood, flood_s)
        after = await phase(steady, None, alone_s / 2)
    finally:
        for client in [*steady, flood]:
            await client.aclose()
    alone = Phase(before.seconds + after.seconds, before.steady + after.steady, [])
    return Result(alone=alone, flood=flooded)


# The stack, in a process of its own -------------------------------------------------------------


class ScenarioStack:
    """A fresh local stack (tiers from TIERS_FILE, quiet logs) with the scenario's API keys, served by
    `python -m bench.fairness` until closed."""

    def __init__(self, steady_users: int = STEADY_USERS) -> None:
        env = {**os.environ, **QUIET, "PYTHONPATH": os.pathsep.join([str(ROOT / "layers" / "core"), str(ROOT)])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fairness", str(steady_users)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        word, _, ready = self.process.stdout.readline().partition(" ")
        if word != "READY":
            self.close()
            raise RuntimeError("the scenario's local stack did not start (python -m bench.fairness)")
        info = json.loads(ready)
        self.url: str = info["url"]
        self.steady_keys: list[str] = info["steady_keys"]
        self.flooder_key: str = info["flooder_key"]
        #: For measuring the store directly: moto's endpoint and the tables' names.
        self.moto_endpoint: str = info["moto_endpoint"]
        self.tables: dict[str, str] = info["tables"]

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()  # the stack stops when its stdin closes
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> ScenarioStack:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _serve(steady_users: int) -> None:
    """Start the stack, add the keys, print `READY <json>` on stdout, serve until stdin closes."""
    import gc
    import secrets

    # The parent reads one line: everything else written to stdout (logs) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    from local.stack import LocalStack

    with LocalStack(port=0, overrides={"PRECIS_TIERS_FILE": str(TIERS_FILE)}) as stack:
        keys: dict[str, str] = {}
        for name, tier in [(f"steady{i}", STEADY_TIER) for i in range(steady_users)] + [("flooder", FLOODER_TIER)]:
            keys[name] = f"pk_{name}_{secrets.token_hex(8)}"
            stack.add_key(keys[name], user_id=f"{name}-{secrets.token_hex(4)}", tier=tier)
        info = {
            "url": stack.url,
            "steady_keys": [keys[f"steady{i}"] for i in range(steady_users)],
            "flooder_key": keys["flooder"],
            "moto_endpoint": stack.moto_endpoint,
            "tables": {name: stack.template.physical[name] for name in ("QuotasTable", "RequestsTable")},
        }
        # A warm server's startup heap (imports, the app, boto3's models) lives as long as it does:
        # kept out of the collector's full passes, which would otherwise stop the gateway for
        # 0.1-0.25 s now and then, whichever phase of the comparison that falls in.
        gc.collect()
        gc.freeze()
        print("READY", json.dumps(info), file=replies, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else STEADY_USERS)
