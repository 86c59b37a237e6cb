"""Resuming a partial summary (`resume_from`): where it starts, its final call, what it reserves.

A resume is a new request over the same document. It continues the earlier request's summary so far
with a continuation prompt, so only the new call is paid for; when the earlier request had finished
its map step, the final call's inputs (the chunk summaries) were kept and that step is not run again.
"""

from __future__ import annotations

from precis.domain.inference import worst_case_tokens
from precis.domain.models import ChunkPlan, Frozen, Prompt, Style
from precis.domain.prompts import combine_prompt, continuation_prompt, prompt_tokens, summary_prompt
from precis.domain.tokens import count_tokens


class Resumption(Frozen):
    """Where a resumed request starts: the earlier request's summary so far, and the inputs of its
    final call when its map step had finished."""

    request_id: str
    text: str = ""
    final_inputs: tuple[str, ...] | None = None


def final_prompt(plan: ChunkPlan, style: Style, max_output_tokens: int, resume: Resumption | None) -> Prompt | None:
    """The final call's prompt when no map step is needed: a one-chunk document, or a resume whose
    final call's inputs were kept. None when the chunks must be summarized first."""
    if resume is not None and resume.final_inputs is not None:
        return combine_prompt(list(resume.final_inputs), style, max_output_tokens)
    if len(plan.chunks) == 1:
        return summary_prompt(plan.chunks[0].text, style, max_output_tokens)
    return None


def continued(final: Prompt, max_output_tokens: int, resume: Resumption | None) -> tuple[Prompt, int]:
    """The final call's prompt and output budget. A resume with a summary so far continues it with
    what is left of the budget, so that the whole summary stays within `max_output_tokens`."""
    if resume is None or not resume.text:
        return final, max_output_tokens
    prompt = continuation_prompt(final, resume.text)
    return prompt, max(1, max_output_tokens - count_tokens(prompt.summary_so_far))


def reserved_tokens(plan: ChunkPlan, style: Style, max_output_tokens: int, resume: Resumption | None) -> int:
    """The most tokens a request can use (every call's input and output budget): what admission
    reserves. A resume whose map step is done reserves its final call only."""
    final = final_prompt(plan, style, max_output_tokens, resume) if resume is not None else None
    if final is not None:
        prompt, budget = continued(final, max_output_tokens, resume)
        return prompt_tokens(prompt) + budget
    worst = worst_case_tokens(plan, style, max_output_tokens)
    if resume is not None and resume.text:  # the map step again, then a continuation
        empty = combine_prompt([], style, max_output_tokens)
        worst += prompt_tokens(continued(empty, max_output_tokens, resume)[0]) - prompt_tokens(empty)
    return worst
