"""The cost ledger over real HTTP: what `GET /v1/usage` and `make report` say a user's requests and jobs
cost is what the providers reported they used, to the token and to the cent, however they ended.

Streams go to a gateway of this module's own (beside the session's stack, on the same local cloud and
tables) whose OpenAI-compatible upstream is a scripted fake that reports usage; `gpt-4o-mini` is priced
in the catalog. Jobs run in the stack's functions on the local model, whose usage is exact.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

import local.__main__ as cli
from local.report import percentile
from local.stack import LocalStack
from precis.domain.catalog import Catalog
from precis.domain.models import Usage
from tests.support.gateways import gateway_server
from tests.support.openai_server import ChatScript, FakeOpenAI
from tests.support.servers import BackgroundServer
from tests.support.waiting import wait_for

SAMPLE = (Path(__file__).resolve().parents[2] / "local" / "samples" / "lighthouses.txt").read_text()
REMOTE = "gpt-4o-mini"
PRICES = {model: info.price for model, info in Catalog.bundled().models.items()}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(stack: LocalStack, fake: FakeOpenAI) -> Iterator[BackgroundServer]:
    environment = {
        **stack.gateway_environment(),
        "PRECIS_OPENAI_BASE_URL": fake.base_url,
        # The failures injected here are this module's; they must not open the model's circuit.
        "PRECIS_BREAKER_USERS": "1000000",
    }
    with gateway_server(environment) as server:
        yield server


def new_user(stack: LocalStack, label: str) -> tuple[str, str]:
    user = f"{label}-{secrets.token_hex(4)}"
    key = f"pk_{user}"
    stack.add_key(key, user_id=user, tier="enterprise")
    return user, key


@pytest.fixture
def user(stack: LocalStack, gateway: BackgroundServer) -> Iterator[tuple[str, httpx.Client]]:
    name, key = new_user(stack, "ledger")
    with httpx.Client(
        base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=httpx.Timeout(10.0, read=30.0)
    ) as client:
        yield name, client


def summarize(client: httpx.Client, text: str, model: str, cancel_after_tokens: int | None = None) -> dict[str, Any]:
    """Stream a summary to its end (cancelling it after some tokens, if asked); return its done event
    with the request id."""
    request_id, done, tokens = "", None, 0
    with connect_sse(client, "POST", "/v1/summarize", json={"text": text, "model": model}) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            data = json.loads(sse.data)
            if sse.event == "meta":
                request_id = data["request_id"]
            elif sse.event == "token":
                tokens += 1
                if tokens == cancel_after_tokens:
                    assert client.post(f"/v1/requests/{request_id}/cancel").status_code == 202
            elif sse.event == "done":
                done = data
    assert done is not None
    return {**done, "request_id": request_id}


def cost(model: str, usage: dict[str, int]) -> Decimal:
    return PRICES[model.partition("?")[0]].cost(Usage.model_validate(usage))


def days() -> dict[str, str]:
    """Yesterday to today (UTC): whatever the clock did during the test, its requests are in there."""
    today = datetime.now(UTC).date()
    return {"from": (today - timedelta(days=1)).isoformat(), "to": today.isoformat()}


def test_ledger_totals_equal_the_providers_reported_usage_over_a_mixed_run(
    user: tuple[str, httpx.Client], fake: FakeOpenAI, stack: LocalStack, other_user: str
) -> None:
    _, client = user
    text = f"Ledger run {secrets.token_hex(4)}. " + SAMPLE[:1200]
    runs: list[tuple[str, dict[str, Any]]] = []

    fake.script = ChatScript(prompt_tokens=1_234, completion_tokens=56)
    runs.append(("success", summarize(client, text, REMOTE)))
    fake.script = ChatScript(deltas=(" the",) * 20, error_after=3)  # " the": one token each
    runs.append(("partial", summarize(client, text, REMOTE)))
    fake.script = ChatScript(error_status=400, error_message="this request is refused")
    runs.append(("failure", summarize(client, text, REMOTE)))
    fake.script = ChatScript(deltas=(" the",) * 200, chunk_delay_s=0.02)
    runs.append(("cancel", summarize(client, text, REMOTE, cancel_after_tokens=2)))
    runs.append(("local", summarize(client, SAMPLE, "local")))

    submitted = client.post("/v1/jobs", json={"text": SAMPLE, "model": "local", "max_output_tokens": 80})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]

    def job_ended() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(job_ended, timeout=30)
    assert job["status"] == "succeeded", job

    done = dict(runs)
    assert [done[k]["finish_reason"] for k in done] == ["stop", "error", "error", "cancelled", "stop"]
    assert done["partial"]["partial"] and done["cancel"]["partial"]
    # What the provider reported is what is charged, exactly; a call cut before it reported is counted.
    assert done["success"]["usage"] == {"input_tokens": 1_234, "output_tokens": 56}
    assert done["partial"]["usage"]["output_tokens"] == 3 and done["failure"]["usage"]["output_tokens"] == 0
    assert 2 <= done["cancel"]["usage"]["output_tokens"] < 200
    for run in done.values():  # and it is what each request's record says
        assert client.get(f"/v1/requests/{run['request_id']}").json()["usage"] == run["usage"]

    usages = [(REMOTE if key != "local" else "local", run["usage"]) for key, run in runs] + [("local", job["usage"])]
    expected_cost = sum((cost(model, usage) for model, usage in usages), Decimal(0))
    assert expected_cost > Decimal("0.0002"), "the priced calls cost something"

    report = client.get("/v1/usage", params=days())
    assert report.status_code == 200, report.text
    body = report.json()
    totals = body["totals"]
    assert (totals["requests"], totals["jobs"]) == (5, 1)
    assert totals["input_tokens"] == sum(usage["input_tokens"] for _, usage in usages)
    assert totals["output_tokens"] == sum(usage["output_tokens"] for _, usage in usages)
    assert Decimal(totals["cost_usd"]) == expected_cost  # to the last digit
    cents = Decimal("0.01")
    clients_sum = sum(Decimal(str(run["cost_usd"])) for run in done.values()) + Decimal(str(job["cost_usd"]))
    assert Decimal(totals["cost_usd"]).quantize(cents) == clients_sum.quantize(cents) == expected_cost.quantize(cents)
    assert totals["finish_reasons"] == {"stop": 3, "error": 2, "cancelled": 1}
    assert sum(day["requests"] + day["jobs"] for day in body["days"]) == 6

    listed = {entry["id"]: entry for entry in body["most_expensive"]}
    assert set(listed) == {run["request_id"] for run in done.values()} | {job_id}
    dearest = body["most_expensive"][0]
    assert dearest["id"] == done["success"]["request_id"] and dearest["model"] == REMOTE
    assert Decimal(dearest["cost_usd"]) == cost(REMOTE, done["success"]["usage"])
    assert listed[done["cancel"]["request_id"]]["finish_reason"] == "cancelled"
    assert listed[job_id]["kind"] == "job" and listed[job_id]["usage"] == job["usage"]

    # Only the caller's own: another user sees none of it.
    with httpx.Client(base_url=client.base_url, headers={"authorization": f"Bearer {other_user}"}) as other:
        theirs = other.get("/v1/usage", params=days()).json()
    assert not {e["id"] for e in theirs["most_expensive"]} & set(listed)


@pytest.mark.parametrize(
    ("params", "complaint"),
    [
        ({"from": "2026-13-01"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"from": "2026-03-01", "to": "2026-02-28"}, "before"),
        ({"from": "2026-01-01", "to": "2026-03-01"}, "31 days"),
        ({"top": "1000"}, ""),
    ],
)
def test_usage_refuses_bad_periods_with_a_structured_error(
    client: httpx.Client, params: dict[str, str], complaint: str
) -> None:
    response = client.get("/v1/usage", params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and complaint in error["message"] and error["retryable"] is False


def test_usage_needs_an_api_key(client: httpx.Client) -> None:
    response = client.get("/v1/usage", headers={"authorization": ""})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthenticated"


def test_report_prints_each_users_cost_and_stage_latencies_and_draws_a_png(
    user: tuple[str, httpx.Client],
    fake: FakeOpenAI,
    stack: LocalStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, client = user
    fake.script = ChatScript(prompt_tokens=2_000, completion_tokens=100)
    runs = [summarize(client, SAMPLE, REMOTE)]
    runs += [summarize(client, SAMPLE, f"local?ttft_ms={ms}&token_ms=1") for ms in (5, 40, 80)]

    state = tmp_path / "stack.json"
    state.write_text(json.dumps({"url": stack.url, "moto_endpoint": stack.moto_endpoint, **ledger_of(stack)}))
    monkeypatch.setattr(cli, "STATE", state)
    chart = tmp_path / "charts" / "latency.png"
    assert cli.main(["report", "--user", name, "--chart", str(chart)]) == 0
    printed = capsys.readouterr().out

    rows = {tuple(cells[:2]): cells[2:] for cells in table_rows(printed) if cells and cells[0] == name}
    local_usage = [run["usage"] for run in runs[1:]]
    assert rows == {
        (name, REMOTE): ["1", "0", "2,000", "100", format(cost(REMOTE, runs[0]["usage"]).normalize(), "f")],
        (name, "local"): [
            "3",
            "0",
            f"{sum(u['input_tokens'] for u in local_usage):,}",
            f"{sum(u['output_tokens'] for u in local_usage):,}",
            "0",
        ],
    }
    latencies = {cells[0]: cells[1:] for cells in table_rows(printed) if cells and cells[0] in ("ttft", "total")}
    for stage in ("ttft", "total"):  # the same percentiles as the latencies the clients were told
        seen = [run["latency_ms"][stage] for run in runs]
        assert latencies[stage][:3] == [str(len(seen)), f"{percentile(seen, 50):.1f}", f"{percentile(seen, 99):.1f}"]
    assert float(latencies["ttft"][2]) >= 80, "the slowest first token is the p99"

    png = chart.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    import matplotlib.image

    assert matplotlib.image.imread(str(chart)).shape[1] > 500


def ledger_of(stack: LocalStack) -> dict[str, str]:
    return {"ledger_table": stack.template.physical["LedgerTable"]}


def table_rows(printed: str) -> list[list[str]]:
    """The cells of every row of the rich tables in `printed`."""
    return [[cell.strip() for cell in line.strip("│ \n").split("│")] for line in printed.splitlines() if "│" in line]
