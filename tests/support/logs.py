"""The log lines precis writes, read back by tests.

- `captured_logs()`: every line the precis Logger writes in this process (the gateway of the local
  stack runs here), formatted as it writes them: the Powertools JSON of its own handler.
- `json_lines(lines)`: the Powertools log lines among raw output lines (the local stack's functions
  write theirs, EMF records and the local cloud's own lines to one stream), parsed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from precis.observability import logger


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        # The Logger's own formatter: it reads the thread-safe keys (correlation id, user) of the
        # thread logging, so each record is formatted at once, in that thread.
        self.setFormatter(logger.registered_formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def captured_logs() -> Iterator[LogLines]:
    handler = LogLines()
    target = logging.getLogger(logger.name)
    target.addHandler(handler)
    try:
        yield handler
    finally:
        target.removeHandler(handler)


def json_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The Powertools log lines (JSON objects with a level and a message), without EMF records."""
    parsed = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "level" in value and "message" in value and "_aws" not in value:
            parsed.append(value)
    return parsed
