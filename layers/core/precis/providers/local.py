"""The offline default model: a real extractive summarizer, deterministic, streamed token by token.

It ranks the document's sentences by the frequency of their content words (with a small bonus for
leading sentences), keeps the best that fit the style and the output budget, and emits them in
document order. A latency and failure profile taken from the model id (`local?ttft_ms=500&
token_ms=20&fail_after=40&fail=transient`, or `fail_rate=0.3` for a flaky upstream) makes it behave
like a remote model for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationError

from precis.domain.chunking import sentence_spans
from precis.domain.errors import (
    InvalidInputError,
    ModelThrottledError,
    PermanentModelError,
    TransientModelError,
)
from precis.domain.models import Completion, Delta, FinishReason, Frozen, ModelEvent, Prompt, Style, Usage
from precis.domain.prompts import prompt_tokens
from precis.domain.tokens import count_tokens, token_pieces

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "been",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "his",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "may",
        "might",
        "more",
        "most",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "should",
        "so",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "to",
        "too",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "will",
        "with",
        "would",
        "you",
        "your",
        "also",
        "been",
        "being",
        "over",
        "under",
        "about",
        "after",
        "before",
        "between",
        "both",
        "each",
        "few",
        "other",
        "some",
        "any",
        "all",
    ]
)
_SENTENCES = {Style.TLDR: 2, Style.BULLETS: 6, Style.PARAGRAPH: 5}
_FAILURES = {"transient": TransientModelError, "permanent": PermanentModelError, "throttle": ModelThrottledError}


class LocalProfile(Frozen):
    """How the local model pretends to be remote. Failures happen after `fail_after` tokens (0 when
    only `fail_first` or `fail_if` is given), only for prompts whose document contains `fail_if`,
    and only on the first `fail_first` attempts of the same prompt in this process.

    Independently of those, each call fails before its first token with probability `fail_rate`
    (a flaky upstream), drawn from one random sequence per profile in this process: seeded by
    `seed` when given (the same calls in the same order fail again), else from the OS."""

    ttft_ms: float = Field(default=0, ge=0, le=120_000)
    token_ms: float = Field(default=0, ge=0, le=10_000)
    fail_after: int | None = Field(default=None, ge=0)
    fail: Literal["transient", "permanent", "throttle"] = "transient"
    fail_first: int | None = Field(default=None, ge=1)
    fail_if: str | None = Field(default=None, min_length=1, max_length=200)
    fail_rate: float = Field(default=0, ge=0, le=1)
    seed: int | None = None


#: Attempts per (profile, prompt) in this process, for `fail_first`.
_ATTEMPTS: Counter[str] = Counter()
#: One random sequence per profile in this process, for `fail_rate` (a model is built per call).
_DRAWS: dict[str, random.Random] = {}


def extract(document: str, style: Style, max_output_tokens: int) -> str:
    """The extractive summary of `document`: its most representative sentences, in order."""
    sentences = [" ".join(document[s:e].split()) for s, e in sentence_spans(document)]
    candidates = [(i, s) for i, s in enumerate(sentences) if len(_WORD.findall(s)) >= 4]
    if not candidates:
        candidates = [(i, s) for i, s in enumerate(sentences) if s]
    if not candidates:
        return ""
    words = [[w for w in (m.lower() for m in _WORD.findall(s)) if w not in _STOPWORDS] for _, s in candidates]
    frequency = Counter(w for ws in words for w in set(ws))
    top = max(frequency.values(), default=1)

    def score(k: int) -> float:
        ws = words[k]
        content = sum(frequency[w] / top for w in ws) / math.sqrt(len(ws) + 1)
        lead = 0.25 if candidates[k][0] < 3 else 0.0
        return content + lead

    ranked = sorted(range(len(candidates)), key=lambda k: (-score(k), k))
    chosen: list[int] = []
    budget = max_output_tokens
    for k in ranked:
        if len(chosen) == _SENTENCES[style]:
            break
        cost = count_tokens(candidates[k][1]) + 2
        if cost > budget and chosen:
            continue
        chosen.append(k)
        budget -= cost
    picked = [candidates[k][1] for k in sorted(chosen)]
    if style is Style.BULLETS:
        return "\n".join(f"- {s}" for s in picked)
    return " ".join(picked)


@lru_cache(maxsize=32)
def _answer(prompt: Prompt, max_output_tokens: int) -> tuple[int, tuple[str, ...]]:
    """Input tokens and output token pieces for a prompt. Deterministic, so cached: the local model
    stands in for a remote one, whose work costs this process nothing; benchmarks that send the
    same document again should measure the gateway, not the summarizer's sentence ranking.

    A continuation (`prompt.summary_so_far`, see `prompts.continuation_prompt`) gets what follows the
    text so far in the answer to the same document with the whole budget (this call's, plus what
    the text so far used): a resumed summary then reads exactly as an uninterrupted one. When that
    answer does not start with the text so far (another model wrote it), it gets the whole answer."""
    so_far = prompt.summary_so_far
    answer = extract(prompt.document, prompt.style, max_output_tokens + (count_tokens(so_far) if so_far else 0))
    if so_far and answer.startswith(so_far):
        answer = answer[len(so_far) :]
    return prompt_tokens(prompt), tuple(token_pieces(answer))


class LocalModel:
    def __init__(self, profile: LocalProfile) -> None:
        self.profile = profile

    @classmethod
    def from_options(cls, options: dict[str, str]) -> LocalModel:
        try:
            return cls(LocalProfile.model_validate(options))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidInputError(f"bad local model options: {problems}") from exc

    def _fails_at(self, prompt: Prompt) -> int | None:
        profile = self.profile
        if profile.fail_rate > 0:
            key = profile.model_dump_json()
            draws = _DRAWS.get(key)
            if draws is None:
                draws = _DRAWS[key] = random.Random(profile.seed)
            if draws.random() < profile.fail_rate:
                return 0
        if profile.fail_after is None and profile.fail_first is None and profile.fail_if is None:
            return None
        if profile.fail_if is not None and profile.fail_if not in prompt.document:
            return None
        if profile.fail_first is not None:
            attempt = hashlib.sha256(f"{profile.model_dump_json()}\n{prompt.user_message()}".encode()).hexdigest()
            _ATTEMPTS[attempt] += 1
            if _ATTEMPTS[attempt] > profile.fail_first:
                return None
        return profile.fail_after or 0

    async def stream(self, prompt: Prompt, *, max_output_tokens: int) -> AsyncIterator[ModelEvent]:
        profile = self.profile
        fail_at = self._fails_at(prompt)
        input_tokens, pieces = _answer(prompt, max_output_tokens)
        finish: Literal[FinishReason.STOP, FinishReason.LENGTH] = FinishReason.STOP
        if len(pieces) > max_output_tokens:
            pieces, finish = pieces[:max_output_tokens], FinishReason.LENGTH
        # Emit on a schedule from the start, so per-token sleeps do not drift.
        start = time.monotonic()
        for index, piece in enumerate(pieces):
            if index == fail_at:
                raise _FAILURES[profile.fail](
                    f"local model failed after {index} tokens (its failure profile)",
                    usage=Usage(input_tokens=input_tokens, output_tokens=index),
                )
            due = start + (profile.ttft_ms + index * profile.token_ms) / 1000
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield Delta(text=piece, tokens=1)
        if fail_at is not None and fail_at == len(pieces):
            raise _FAILURES[profile.fail](
                f"local model failed after {len(pieces)} tokens",
                usage=Usage(input_tokens=input_tokens, output_tokens=len(pieces)),
            )
        yield Completion(usage=Usage(input_tokens=input_tokens, output_tokens=len(pieces)), finish_reason=finish)
