"""Model calls and the map-reduce arithmetic shared by the streaming gateway and the job stages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from precis.domain.catalog import ModelInfo
from precis.domain.errors import ModelError, TransientModelError
from precis.domain.models import ChunkPlan, Completion, FinishReason, Prompt, Style, TokenBudget, Usage
from precis.domain.ports import ModelProvider
from precis.domain.prompts import combine_prompt, prompt_tokens, scaffold_tokens
from precis.domain.tokens import count_tokens

#: Output budget of one chunk's summary in the map step, and of a combining round.
MAP_OUTPUT_TOKENS = 384


def chunk_budget(
    model: ModelInfo, style: Style, max_output_tokens: int, context_tokens: int | None = None
) -> tuple[int, int]:
    """Chunk size and overlap, in tokens, so that any one call (chunk, combine or final) fits the
    model's context window with its instructions and its answer, and sends at most `context_tokens`
    of prompt (the caller's tier's allocation; a longer document is summarized in chunks)."""
    budget = TokenBudget(
        context_window=model.context_window,
        max_output_tokens=max(max_output_tokens, MAP_OUTPUT_TOKENS),
        prompt_overhead=scaffold_tokens(style, max_output_tokens) + 32,
    )
    chunk_tokens = budget.document_tokens
    if context_tokens is not None:
        chunk_tokens = min(chunk_tokens, context_tokens - budget.prompt_overhead)
    return chunk_tokens, min(200, chunk_tokens // 10)


async def call_model(
    provider: ModelProvider,
    prompt: Prompt,
    max_output_tokens: int,
    *,
    on_usage: Callable[[Usage], None],
    on_text: Callable[[str], Awaitable[None]] | None = None,
    idle_timeout_s: float | None = None,
) -> tuple[str, FinishReason]:
    """One model call. `on_usage` gets its usage however the call ends (success, failure or
    cancellation): the provider's report when there is one, else the prompt and the text received,
    counted with cl100k_base. When the model sends nothing (no text, no end) for `idle_timeout_s`,
    the call is given up as a `TransientModelError`, whatever the provider's own timeouts."""
    parts: list[str] = []
    counted: int | None = 0  # output tokens as the provider counted its deltas, while it does
    usage: Usage | None = None
    finish = FinishReason.STOP
    stream: Any = provider.stream(prompt, max_output_tokens=max_output_tokens)
    try:
        while True:
            # Only the wait for the model is timed, not `on_text` (a slow client is not a hung model).
            with anyio.move_on_after(idle_timeout_s) as idle:
                event = await anext(stream, None)
            if idle.cancelled_caught:
                raise TransientModelError(f"the model sent nothing for {idle_timeout_s:g} s")
            if event is None:
                break
            if isinstance(event, Completion):
                usage, finish = event.usage, event.finish_reason
                continue
            parts.append(event.text)
            counted = None if counted is None or event.tokens is None else counted + event.tokens
            if on_text is not None:
                await on_text(event.text)
    except ModelError as exc:
        usage = exc.usage
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        if usage is None:
            output = counted if counted is not None else count_tokens("".join(parts))
            usage = Usage(input_tokens=prompt_tokens(prompt), output_tokens=output)
        on_usage(usage)
    return "".join(parts), finish


async def reduce_to_prompt(
    summaries: list[str],
    style: Style,
    max_output_tokens: int,
    room: int,
    summarize: Callable[[Prompt, int], Awaitable[str]],
    on_progress: Callable[[int, int], Awaitable[None]] | None = None,
) -> Prompt:
    """The prompt that combines `summaries` into the final summary. When they are too long for one
    call (`room` tokens), they are summarized in groups first, as often as it takes."""
    final_inputs = await reduce_summaries(summaries, room, summarize, on_progress)
    return combine_prompt(final_inputs, style, max_output_tokens)


async def reduce_summaries(
    summaries: list[str],
    room: int,
    summarize: Callable[[Prompt, int], Awaitable[str]],
    on_progress: Callable[[int, int], Awaitable[None]] | None = None,
) -> list[str]:
    """The final stage's inputs: `summaries` combined in groups (as often as it takes) until they
    fit one call of `room` tokens; `combine_prompt` of them is the final prompt."""
    max_tokens = MAP_OUTPUT_TOKENS
    while count_tokens("\n\n".join(summaries)) > room and len(summaries) > 1:
        groups = group(summaries, room)
        if len(groups) == len(summaries):
            break  # every summary alone fills a call: combining cannot shrink them further
        combined: list[str] = []
        for done, members in enumerate(groups, start=1):
            combined.append(await summarize(combine_prompt(members, Style.PARAGRAPH, max_tokens), max_tokens))
            if on_progress is not None:
                await on_progress(done, len(groups))
        summaries = combined
    return summaries


def group(texts: list[str], room: int) -> list[list[str]]:
    """Consecutive texts packed into groups of at most `room` tokens (a lone oversized text forms its
    own group: the model call will truncate it, which beats looping forever)."""
    groups: list[list[str]] = [[]]
    used = 0
    for text, tokens in zip(texts, [count_tokens(t) for t in texts], strict=True):
        if groups[-1] and used + tokens > room:
            groups.append([])
            used = 0
        groups[-1].append(text)
        used += tokens
    return groups


def worst_case_tokens(plan: ChunkPlan, style: Style, max_output_tokens: int) -> int:
    """The most tokens summarizing `plan` can use: every call's input and output budget. Admission
    reserves this before the first call and settles to the real usage after the last."""
    scaffold = scaffold_tokens(style, max_output_tokens)
    if len(plan.chunks) == 1:
        return plan.total_tokens + scaffold + max_output_tokens
    mapped = sum(chunk.tokens + scaffold + MAP_OUTPUT_TOKENS for chunk in plan.chunks)
    combined = len(plan.chunks) * MAP_OUTPUT_TOKENS + scaffold + max_output_tokens
    return mapped + combined


def job_token_estimate(document_tokens: int, chunk_tokens: int, style: Style, max_output_tokens: int) -> int:
    """`worst_case_tokens` for a document not yet chunked: every chunk's call, the combining call."""
    chunks = max(1, -(-document_tokens // max(1, chunk_tokens - 200)))
    scaffold = scaffold_tokens(style, max_output_tokens)
    if chunks == 1:
        return document_tokens + scaffold + max_output_tokens
    return document_tokens + chunks * (2 * scaffold + 2 * MAP_OUTPUT_TOKENS + 200) + max_output_tokens
