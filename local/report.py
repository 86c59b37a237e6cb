"""`python -m local report` (`make report`): what the local stack's requests and jobs cost, and where
their time went, from its cost ledger (LedgerTable).

Prints a table of requests, jobs, tokens and cost per user and model, and one of the latency per
stage (p50, p99, max: nearest-rank percentiles over the entries that have the stage), and writes a
PNG chart of each stage's latency distribution. The ledger is read from the running local stack
(`.local/stack.json` says where its moto is) or, when none runs, from the copy the last one saved
when it stopped (`.local/ledger.json`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from precis.domain.ledger import LedgerEntry

#: The stages a request's latency is reported in (precis.domain.summarize), in pipeline order; a job
#: has only its total.
STAGES = ("preprocess", "map", "reduce", "ttft", "infer", "postprocess", "total")
LOCAL_LEDGER_TABLE = "precis-local-LedgerTable"


@dataclass(frozen=True)
class CostRow:
    user_id: str
    model: str
    requests: int = 0
    jobs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    def plus(self, entry: LedgerEntry) -> CostRow:
        return CostRow(
            self.user_id,
            self.model,
            self.requests + (entry.kind == "request"),
            self.jobs + (entry.kind == "job"),
            self.input_tokens + entry.usage.input_tokens,
            self.output_tokens + entry.usage.output_tokens,
            self.cost_usd + entry.cost_usd,
        )


@dataclass(frozen=True)
class StageLatency:
    stage: str
    samples: tuple[float, ...]

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value that at least q % of the values do not exceed."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def cost_rows(entries: Iterable[LedgerEntry]) -> list[CostRow]:
    """Requests, jobs, tokens and cost per (user, model), sorted by user then model."""
    rows: dict[tuple[str, str], CostRow] = {}
    for entry in entries:
        key = (entry.user_id, entry.model)
        rows[key] = rows.get(key, CostRow(*key)).plus(entry)
    return [rows[key] for key in sorted(rows)]


def stage_latencies(entries: Iterable[LedgerEntry]) -> list[StageLatency]:
    """Each stage's latencies, over the entries that went through it (known stages first, in order)."""
    samples: dict[str, list[float]] = {}
    for entry in entries:
        for stage, ms in entry.latency_ms.items():
            samples.setdefault(stage, []).append(ms)
    order = [s for s in STAGES if s in samples] + sorted(set(samples) - set(STAGES))
    return [StageLatency(stage, tuple(samples[stage])) for stage in order]


def _tokens(n: int) -> str:
    return f"{n:,}"


def _usd(amount: Decimal) -> str:
    return format(amount.normalize() if amount else Decimal(0), "f")


def cost_table(rows: list[CostRow]) -> Table:
    table = Table(title="cost and tokens per user and model", title_justify="left")
    table.add_column("user")
    table.add_column("model")
    for name in ("requests", "jobs", "input tokens", "output tokens", "cost USD"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            row.user_id,
            row.model,
            str(row.requests),
            str(row.jobs),
            _tokens(row.input_tokens),
            _tokens(row.output_tokens),
            _usd(row.cost_usd),
        )
    total = CostRow(
        "total",
        "",
        sum(r.requests for r in rows),
        sum(r.jobs for r in rows),
        sum(r.input_tokens for r in rows),
        sum(r.output_tokens for r in rows),
        sum((r.cost_usd for r in rows), Decimal(0)),
    )
    table.add_section()
    table.add_row(
        "total",
        "",
        str(total.requests),
        str(total.jobs),
        _tokens(total.input_tokens),
        _tokens(total.output_tokens),
        _usd(total.cost_usd),
        style="bold",
    )
    return table


def latency_table(latencies: list[StageLatency]) -> Table:
    table = Table(title="latency per stage (ms)", title_justify="left")
    table.add_column("stage")
    for name in ("n", "p50", "p99", "max"):
        table.add_column(name, justify="right")
    for stage in latencies:
        table.add_row(
            stage.stage,
            str(len(stage.samples)),
            f"{stage.p50:.1f}",
            f"{stage.p99:.1f}",
            f"{max(stage.samples):.1f}",
        )
    return table


def latency_chart(latencies: list[StageLatency], path: Path, title: str) -> None:
    """Each stage's latency distribution as a box plot (every sample drawn too), on a log scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the machine has
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.55 * max(len(latencies), 1)), dpi=110)
    try:
        if latencies:
            data = [[max(ms, 0.01) for ms in stage.samples] for stage in latencies]
            positions = list(range(len(latencies), 0, -1))  # pipeline order, top to bottom
            axes.boxplot(data, positions=positions, orientation="horizontal", widths=0.6, showfliers=False)
            for position, samples in zip(positions, data, strict=True):
                jitter = [position + 0.18 * math.sin(n * 2.399) for n in range(len(samples))]
                axes.scatter(samples, jitter, s=9, alpha=0.45, color="tab:blue")
            p99 = [max(stage.p99, 0.01) for stage in latencies]
            axes.scatter(p99, positions, marker="|", s=260, linewidths=2, color="tab:red", label="p99", zorder=3)
            axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
            axes.set_yticks(positions, [f"{s.stage} (n={len(s.samples)})" for s in latencies])
            axes.set_xscale("log")
        else:
            axes.text(0.5, 0.5, "no requests yet", ha="center", va="center", transform=axes.transAxes)
            axes.set_yticks([])
        axes.set_xlabel("milliseconds (log scale)")
        axes.set_title(title)
        axes.grid(axis="x", which="both", alpha=0.3)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


def report(entries: list[LedgerEntry], console: Console, chart: Path) -> tuple[list[CostRow], list[StageLatency]]:
    """Print both tables, write the chart; return what was printed."""
    rows, latencies = cost_rows(entries), stage_latencies(entries)
    requests = sum(e.kind == "request" for e in entries)
    console.print(cost_table(rows))
    console.print(latency_table(latencies))
    latency_chart(latencies, chart, f"precis: latency per stage ({requests} requests, {len(entries) - requests} jobs)")
    console.print(f"latency chart: {chart}")
    return rows, latencies


# Where the entries come from -------------------------------------------------------------------


def dump(entries: Iterable[LedgerEntry], path: Path) -> None:
    """Save the entries (what a stopping local stack leaves for `report`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**e.model_dump(mode="json"), "user_id": e.user_id} for e in entries]
    path.write_text(json.dumps(rows))


def load(path: Path) -> list[LedgerEntry]:
    return [LedgerEntry.model_validate(row) for row in json.loads(path.read_text())]


def live_entries(state: dict[str, Any]) -> list[LedgerEntry]:
    """Every entry of a running local stack's ledger (its moto, as `.local/stack.json` describes it)."""
    import boto3
    from botocore.config import Config

    from precis.adapters.ledger import LedgerStore

    dynamodb = boto3.resource(
        "dynamodb",
        endpoint_url=state["moto_endpoint"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30),
    )
    return list(LedgerStore(dynamodb.Table(state.get("ledger_table", LOCAL_LEDGER_TABLE))).all_entries())
