"""The model catalog: which models exist, who serves them, their windows and their prices.

Read from precis/data/models.json, the one place prices live. A model is asked for by id, optionally
with provider options as a query string: `local?ttft_ms=500&token_ms=20&fail_after=40`.
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Literal
from urllib.parse import parse_qsl

from precis.domain.errors import InvalidInputError, UnknownModelError
from precis.domain.models import Frozen, Price

ProviderName = Literal["local", "bedrock", "openai"]


class ModelInfo(Frozen):
    id: str
    provider: ProviderName
    provider_model_id: str
    context_window: int
    max_output_tokens: int
    price: Price


class ModelSpec(Frozen):
    """A model as a request names it: the catalog entry plus per-request provider options."""

    info: ModelInfo
    options: dict[str, str]
    name: str


class Catalog:
    def __init__(self, models: dict[str, ModelInfo]) -> None:
        self.models = models

    @classmethod
    @cache
    def bundled(cls) -> Catalog:
        raw = json.loads(resources.files("precis.data").joinpath("models.json").read_text("utf-8"))
        return cls(
            {
                model_id: ModelInfo(
                    id=model_id,
                    provider=entry["provider"],
                    provider_model_id=entry["provider_model_id"],
                    context_window=entry["context_window"],
                    max_output_tokens=entry["max_output_tokens"],
                    price=Price(
                        input_per_mtok=Decimal(entry["usd_per_mtok_input"]),
                        output_per_mtok=Decimal(entry["usd_per_mtok_output"]),
                    ),
                )
                for model_id, entry in raw["models"].items()
            }
        )

    def resolve(self, name: str) -> ModelSpec:
        """`name` is a catalog id with an optional `?key=value&...` of provider options."""
        model_id, _, query = name.partition("?")
        info = self.models.get(model_id)
        if info is None:
            raise UnknownModelError(f"unknown model {model_id[:80]!r}; known: {', '.join(sorted(self.models))}")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise InvalidInputError(f"malformed model options {query[:80]!r}") from exc
        options = dict(pairs)
        if len(options) != len(pairs):
            raise InvalidInputError("a model option is given twice")
        return ModelSpec(info=info, options=options, name=name)
