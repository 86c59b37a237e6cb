"""Streaming overhead: the gateway's stream against the model's own, in one run.

The model is `local?ttft_ms=500&token_ms=20`. At each concurrency level N, N clients each read
streams back to back for a fixed time (a closed loop, starts staggered over one stream's length),
twice: straight from the provider in this process (the model's own stream), and through the gateway
of a local stack in its own process (`python -m local serve`: uvicorn, plus moto in a third process
taking the DynamoDB calls of every request), over real HTTP. Overhead = gateway figure - model
figure, per percentile, so machine noise common to both cancels out as far as it can.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from precis.domain.models import Delta, Style
from precis.domain.prompts import summary_prompt
from precis.domain.tokens import encoding
from precis.providers.local import LocalModel

ROOT = Path(__file__).resolve().parent.parent
MODEL = "local?ttft_ms=500&token_ms=20"
DOCUMENT = (ROOT / "local" / "samples" / "lighthouses.txt").read_text()
MAX_OUTPUT_TOKENS = 120
#: How long each concurrency level runs, per side, and about how long one stream lasts.
SECONDS_PER_LEVEL = 8.0
STREAM_SECONDS = 2.5


@dataclass
class StreamTiming:
    meta_s: float
    ttft_s: float
    token_gap_s: float  # mean time between consecutive tokens
    tokens: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def model_stream() -> StreamTiming:
    model = LocalModel.from_options({"ttft_ms": "500", "token_ms": "20"})
    prompt = summary_prompt(DOCUMENT, Style.PARAGRAPH, MAX_OUTPUT_TOKENS)
    started = time.perf_counter()
    stamps = [
        time.perf_counter() - started
        async for event in model.stream(prompt, max_output_tokens=MAX_OUTPUT_TOKENS)
        if isinstance(event, Delta)
    ]
    return StreamTiming(0.0, stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps))


async def gateway_stream(client: httpx.AsyncClient) -> StreamTiming:
    body = {"text": DOCUMENT, "model": MODEL, "max_output_tokens": MAX_OUTPUT_TOKENS}
    started = time.perf_counter()
    meta = 0.0
    stamps: list[float] = []
    async with client.stream("POST", "/v1/summarize", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line == "event: meta":
                meta = time.perf_counter() - started
            elif line == "event: token":
                stamps.append(time.perf_counter() - started)
            elif line == "event: done":
                break
    return StreamTiming(meta, stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class StackProcess:
    """`python -m local serve` in its own process, so the load generator does not share its GIL."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.api_key = f"pk_bench_{secrets.token_hex(8)}"
        env = {
            **os.environ,
            "PRECIS_PORT": str(self.port),
            "PRECIS_DEV_API_KEY": self.api_key,
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            "POWERTOOLS_METRICS_DISABLED": "true",
            "PYTHONPATH": f"{ROOT / 'layers' / 'core'}{os.pathsep}{ROOT}",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "local", "serve"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("the local stack did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


async def closed_loop(concurrency: int, one_stream: Callable[[], Awaitable[StreamTiming]]) -> list[StreamTiming]:
    results: list[StreamTiming] = []
    deadline = time.perf_counter() + SECONDS_PER_LEVEL

    async def client(index: int) -> None:
        await asyncio.sleep(index * STREAM_SECONDS / concurrency)
        while time.perf_counter() < deadline:
            results.append(await one_stream())

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return results


async def measure(concurrency: int, url: str, api_key: str) -> tuple[list[StreamTiming], list[StreamTiming]]:
    own = await closed_loop(concurrency, model_stream)
    limits = httpx.Limits(max_connections=concurrency + 5, max_keepalive_connections=concurrency + 5)
    async with httpx.AsyncClient(
        base_url=url, headers={"authorization": f"Bearer {api_key}"}, limits=limits, timeout=60
    ) as client:
        await gateway_stream(client)  # warm the server and the first connection
        through = await closed_loop(concurrency, lambda: gateway_stream(client))
    return own, through


def moto_call_ms(calls: int = 100) -> tuple[float, float]:
    """What one DynamoDB call costs on the local stack: wall time against local/cloud.py's moto, and
    the client's own CPU (botocore), medians. Every request makes about four such calls."""
    import boto3

    cloud = subprocess.Popen(
        [sys.executable, "-m", "local.cloud"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert cloud.stdin is not None and cloud.stdout is not None
    try:
        port = int(cloud.stdout.readline().split()[1])
        client = boto3.client(
            "dynamodb",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_table(
            TableName="bench",
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        walls, cpus = [], []
        for i in range(calls):
            wall, cpu = time.perf_counter(), time.process_time()
            client.update_item(
                TableName="bench",
                Key={"pk": {"S": f"request#{i % 10}"}},
                UpdateExpression="SET #t = :t",
                ExpressionAttributeNames={"#t": "text"},
                ExpressionAttributeValues={":t": {"S": DOCUMENT[:600]}},
            )
            walls.append((time.perf_counter() - wall) * 1000)
            cpus.append((time.process_time() - cpu) * 1000)
        return statistics.median(walls), statistics.median(cpus)
    finally:
        cloud.stdin.close()
        cloud.wait(timeout=10)
        cloud.stdout.close()


def import_time_ms(runs: int = 5) -> tuple[float, float]:
    """Cold-start proxy: a fresh interpreter importing the gateway module (functions/gateway/app.py),
    and separately the tokenizer load the app does at startup. Medians of `runs` fresh processes."""
    code = (
        "import time; t = time.perf_counter(); import app; t1 = time.perf_counter();"
        "from precis.domain.tokens import encoding; encoding(); t2 = time.perf_counter();"
        "print((t1 - t) * 1000, (t2 - t1) * 1000)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "functions" / "gateway"), str(ROOT / "layers" / "core")]),
        "POWERTOOLS_TRACE_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    imports, tokenizer = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        first, second = map(float, out.stdout.split())
        imports.append(first)
        tokenizer.append(second)
    return statistics.median(imports), statistics.median(tokenizer)


def run(levels: tuple[int, ...] = (1, 10, 50)) -> str:
    encoding()  # the model's own stream must not pay the tokenizer's first load
    stack = StackProcess()
    rows: list[str] = []
    try:
        for concurrency in levels:
            own, through = asyncio.run(measure(concurrency, stack.url, stack.api_key))
            own_ttft = [t.ttft_s * 1000 for t in own]
            gw_ttft = [t.ttft_s * 1000 for t in through]
            own_gap = statistics.mean(t.token_gap_s for t in own) * 1000
            gw_gap = statistics.mean(t.token_gap_s for t in through) * 1000
            rows.append(
                f"| {concurrency} | {len(through)} "
                f"| {percentile(gw_ttft, 50) - percentile(own_ttft, 50):.1f} "
                f"| {percentile(gw_ttft, 99) - percentile(own_ttft, 99):.1f} "
                f"| {percentile([t.meta_s * 1000 for t in through], 99):.1f} | {gw_gap - own_gap:.2f} "
                f"| {percentile(own_ttft, 50):.0f} / {percentile(own_ttft, 99):.0f} "
                f"| {percentile(gw_ttft, 50):.0f} / {percentile(gw_ttft, 99):.0f} |"
            )
    finally:
        stack.close()
    import_ms, tokenizer_ms = import_time_ms()
    moto_wall_ms, moto_cpu_ms = moto_call_ms()

    lines = [
        f"Model `{MODEL}`, {MAX_OUTPUT_TOKENS} output tokens max; N clients in a closed loop for "
        f"{SECONDS_PER_LEVEL:.0f} s per side; gateway = local stack in its own process, moto in another.",
        "",
        "| streams | requests | TTFT overhead p50 (ms) | TTFT overhead p99 (ms) | meta p99 (ms) "
        "| per-token overhead (ms) | model TTFT p50 / p99 (ms) | gateway TTFT p50 / p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += rows
    lines += [
        "",
        "| cold-start proxy | median of 5 fresh interpreters (ms) |",
        "|---|---:|",
        f"| import functions/gateway/app.py | {import_ms:.0f} |",
        f"| tokenizer load at startup (lifespan) | {tokenizer_ms:.0f} |",
        "",
        "| one DynamoDB UpdateItem on the local stack (moto) | median (ms) |",
        "|---|---:|",
        f"| wall time | {moto_wall_ms:.1f} |",
        f"| CPU in the calling process (botocore) | {moto_cpu_ms:.1f} |",
    ]
    return "\n".join(lines)
