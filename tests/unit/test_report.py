"""`python -m local report`: its arithmetic, and the report of the last local stack once it stopped."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

import local.__main__ as cli
from local.report import cost_rows, dump, load, percentile, stage_latencies
from precis.domain.ledger import LedgerEntry
from precis.domain.models import Usage


def entry(n: int, user: str, model: str, latency: dict[str, float], kind: str = "request") -> LedgerEntry:
    usage = Usage(input_tokens=100 * n, output_tokens=n)
    return LedgerEntry(
        id=f"req_{n}", kind=kind, user_id=user, model=model, model_name=model, usage=usage,  # type: ignore[arg-type]
        cost_usd=Decimal(n) / 1_000_000, latency_ms=latency, finish_reason="stop", started_at=1_000.0 + n,  # type: ignore[arg-type]
    )  # fmt: skip


ENTRIES = [
    entry(1, "bob", "local", {"ttft": 30.0, "total": 100.0}),
    entry(2, "alice", "gpt-4o-mini", {"preprocess": 1.0, "ttft": 10.0, "total": 300.0}),
    entry(3, "alice", "gpt-4o-mini", {"ttft": 20.0, "total": 200.0}),
    entry(4, "alice", "local", {"total": 5_000.0}, kind="job"),
]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0 and percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_cost_rows_add_up_per_user_and_model() -> None:
    rows = cost_rows(ENTRIES)
    assert [(r.user_id, r.model, r.requests, r.jobs, r.input_tokens, r.output_tokens, r.cost_usd) for r in rows] == [
        ("alice", "gpt-4o-mini", 2, 0, 500, 5, Decimal("0.000005")),
        ("alice", "local", 0, 1, 400, 4, Decimal("0.000004")),
        ("bob", "local", 1, 0, 100, 1, Decimal("0.000001")),
    ]


def test_stage_latencies_come_in_pipeline_order_over_the_entries_that_have_the_stage() -> None:
    latencies = {s.stage: s for s in stage_latencies(ENTRIES)}
    assert list(latencies) == ["preprocess", "ttft", "total"]
    assert latencies["ttft"].samples == (30.0, 10.0, 20.0) and latencies["ttft"].p50 == 20.0
    assert latencies["total"].p99 == 5_000.0 and latencies["preprocess"].p50 == 1.0


def test_report_reads_the_last_stacks_saved_ledger_when_none_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "ledger.json"
    dump(ENTRIES, saved)
    assert load(saved) == ENTRIES
    monkeypatch.setattr(cli, "STATE", tmp_path / "no-stack.json")
    monkeypatch.setattr(cli, "LEDGER_COPY", saved)
    chart = tmp_path / "latency.png"
    assert cli.main(["report", "--chart", str(chart)]) == 0
    printed = capsys.readouterr().out
    assert "the last local stack" in printed
    total = next(line for line in printed.splitlines() if line.startswith("│ total"))
    assert [cell.strip() for cell in total.strip("│ ").split("│")] == ["total", "", "3", "1", "1,000", "10", "0.00001"]
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_says_so_when_no_stack_ever_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "STATE", tmp_path / "no-stack.json")
    monkeypatch.setattr(cli, "LEDGER_COPY", tmp_path / "no-ledger.json")
    assert cli.main(["report", "--chart", str(tmp_path / "x.png")]) == 2
    assert "no local stack is running" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()
