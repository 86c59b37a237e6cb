"""Read EMF records out of captured stdout, checked against the rules CloudWatch applies to them
(https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html):
a record CloudWatch would drop fails here instead."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

UNITS = {unit.value for unit in MetricUnit}


@dataclass(frozen=True)
class Emitted:
    """One metric of one EMF record, as CloudWatch extracts it."""

    namespace: str
    name: str
    unit: str
    value: float
    #: Each dimension set the metric is published under, with its values.
    dimension_sets: tuple[dict[str, str], ...]
    record: dict[str, Any]

    @property
    def dimension_names(self) -> set[frozenset[str]]:
        return {frozenset(dimensions) for dimensions in self.dimension_sets}

    @property
    def dimensions(self) -> dict[str, str]:
        """Every dimension of the record with its value."""
        return {name: value for dimensions in self.dimension_sets for name, value in dimensions.items()}


def emf_records(stdout: str) -> list[dict[str, Any]]:
    """The EMF records among the lines of `stdout` (log lines and anything else are skipped), each checked."""
    records = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "_aws" in record:
            _check(record)
            records.append(record)
    return records


def metrics(stdout: str) -> list[Emitted]:
    """Every metric of every EMF record in `stdout`, in order."""
    found = []
    for record in emf_records(stdout):
        for directive in record["_aws"]["CloudWatchMetrics"]:
            sets = tuple({name: record[name] for name in names} for names in directive["Dimensions"])
            for metric in directive["Metrics"]:
                value = record[metric["Name"]]
                [value] = value if isinstance(value, list) else [value]
                found.append(
                    Emitted(directive["Namespace"], metric["Name"], metric.get("Unit", "None"), value, sets, record)
                )
    return found


def by_name(emitted: list[Emitted]) -> dict[str, Emitted]:
    """The metrics by name, when each name appears once."""
    named = {m.name: m for m in emitted}
    assert len(named) == len(emitted), f"a metric appears more than once: {[m.name for m in emitted]}"
    return named


def _check(record: dict[str, Any]) -> None:
    aws = record["_aws"]
    assert isinstance(aws["Timestamp"], int) and aws["Timestamp"] > 1_600_000_000_000, aws
    directives = aws["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives, record
    for directive in directives:
        assert isinstance(directive["Namespace"], str) and directive["Namespace"], directive
        assert directive["Dimensions"], "a metric without dimensions cannot be told apart from any other"
        for names in directive["Dimensions"]:
            assert 1 <= len(names) <= 30 and len(set(names)) == len(names), names
            for name in names:
                assert isinstance(record.get(name), str) and record[name], f"dimension {name} has no value"
        assert 1 <= len(directive["Metrics"]) <= 100, directive
        for metric in directive["Metrics"]:
            assert metric.get("Unit", "None") in UNITS, metric
            value = record[metric["Name"]]
            values = value if isinstance(value, list) else [value]
            assert values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values), metric
