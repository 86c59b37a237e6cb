"""Service tiers (precis/data/tiers.json): the limits an API key's user gets."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

from pydantic import Field

from precis.domain.models import Frozen, Limits


class Tier(Frozen):
    name: str
    requests_per_minute: int = Field(gt=0)
    tokens_per_minute: int = Field(gt=0)
    tokens_per_day: int = Field(gt=0)
    max_input_tokens: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    max_concurrent_streams: int = Field(gt=0)
    max_concurrent_jobs: int = Field(gt=0)
    context_tokens: int = Field(ge=1024)
    #: Models to fall back on, in order, when the one asked for is unavailable (its circuit open, or
    #: failing transiently before any text). Only models of the same provider are used.
    fallback_models: tuple[str, ...] = ()

    def limits(self, max_input_tokens: int, max_output_tokens: int) -> Limits:
        """This tier's limits, its input and output capped by the deployment's and the model's."""
        return Limits(
            max_input_tokens=min(self.max_input_tokens, max_input_tokens),
            max_output_tokens=min(self.max_output_tokens, max_output_tokens),
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            tokens_per_day=self.tokens_per_day,
            max_concurrent_streams=self.max_concurrent_streams,
            max_concurrent_jobs=self.max_concurrent_jobs,
            context_tokens=self.context_tokens,
        )


class Tiers:
    """The tiers of one configuration file; a name it does not know (a key stored before its tier
    was removed) gets the default tier rather than nothing."""

    def __init__(self, tiers: dict[str, Tier], default: str) -> None:
        self.tiers = tiers
        self.default = default

    @classmethod
    @cache
    def load(cls, path: str | None = None) -> Tiers:
        """precis/data/tiers.json, or the file at `path` (PRECIS_TIERS_FILE) instead."""
        text = (
            Path(path).read_text("utf-8")
            if path
            else resources.files("precis.data").joinpath("tiers.json").read_text("utf-8")
        )
        raw = json.loads(text)
        return cls({name: Tier(name=name, **limits) for name, limits in raw["tiers"].items()}, raw["default"])

    def named(self, name: str) -> Tier:
        return self.tiers.get(name) or self.tiers[self.default]
