from __future__ import annotations

import time

import anyio
import pytest

from precis.domain.errors import InvalidInputError, ModelThrottledError, PermanentModelError, TransientModelError
from precis.domain.models import Completion, Delta, FinishReason, Prompt, Style
from precis.domain.prompts import prompt_tokens, summary_prompt
from precis.providers.local import LocalModel, extract

pytestmark = pytest.mark.anyio

DOC = (
    "The Apollo program was the third United States human spaceflight program. It was carried out by NASA "
    "and landed the first humans on the Moon from 1968 to 1972. The program was first conceived during the "
    "Eisenhower administration. Apollo 11 landed on the Moon on July 20, 1969, with Neil Armstrong and Buzz "
    "Aldrin. Six Apollo missions landed on the Moon in all. The program returned 382 kg of lunar rocks. "
    "Cats are nice."
)


async def collect(model: LocalModel, max_output_tokens: int = 200, style: Style = Style.PARAGRAPH) -> list[object]:
    prompt = summary_prompt(DOC, style, max_output_tokens)
    return [event async for event in model.stream(prompt, max_output_tokens=max_output_tokens)]


def test_extract_picks_representative_sentences_in_document_order() -> None:
    summary = extract(DOC, Style.TLDR, 200)
    assert summary.startswith("The Apollo program was the third")
    assert "Cats are nice" not in summary
    assert extract(DOC, Style.TLDR, 200) == summary, "deterministic"
    bullets = extract(DOC, Style.BULLETS, 200).splitlines()
    assert 2 <= len(bullets) <= 6 and all(b.startswith("- ") for b in bullets)


async def test_streams_token_by_token_and_reports_usage() -> None:
    events = await collect(LocalModel.from_options({}))
    deltas = [e for e in events if isinstance(e, Delta)]
    completion = events[-1]
    assert isinstance(completion, Completion)
    assert len(deltas) > 10
    assert completion.usage.output_tokens == len(deltas)
    assert completion.usage.input_tokens == prompt_tokens(summary_prompt(DOC, Style.PARAGRAPH, 200))
    assert completion.finish_reason is FinishReason.STOP


async def test_output_budget_is_a_hard_limit_with_finish_reason_length() -> None:
    events = await collect(LocalModel.from_options({}), max_output_tokens=5)
    assert sum(isinstance(e, Delta) for e in events) == 5
    assert isinstance(events[-1], Completion) and events[-1].finish_reason is FinishReason.LENGTH


async def test_latency_profile_delays_first_token_and_paces_the_rest() -> None:
    model = LocalModel.from_options({"ttft_ms": "150", "token_ms": "10"})
    prompt = summary_prompt(DOC, Style.TLDR, 200)
    started = time.monotonic()
    stamps = [
        time.monotonic() - started async for e in model.stream(prompt, max_output_tokens=200) if isinstance(e, Delta)
    ]
    assert stamps[0] >= 0.15
    assert stamps[-1] >= 0.15 + 0.01 * (len(stamps) - 1)


@pytest.mark.parametrize(
    ("kind", "error"),
    [("transient", TransientModelError), ("permanent", PermanentModelError), ("throttle", ModelThrottledError)],
)
async def test_failure_profile_fails_after_n_tokens_with_usage(kind: str, error: type[Exception]) -> None:
    model = LocalModel.from_options({"fail_after": "3", "fail": kind})
    received: list[object] = []

    async def consume() -> None:
        async for event in model.stream(summary_prompt(DOC, Style.PARAGRAPH, 200), max_output_tokens=200):
            received.append(event)

    with pytest.raises(error) as caught:
        await consume()
    assert len(received) == 3 and all(isinstance(e, Delta) for e in received)
    assert caught.value.usage is not None and caught.value.usage.output_tokens == 3  # type: ignore[attr-defined]


async def test_closing_the_stream_stops_generation() -> None:
    model = LocalModel.from_options({"token_ms": "5"})
    stream = model.stream(summary_prompt(DOC, Style.PARAGRAPH, 200), max_output_tokens=200)
    first = await anext(stream)
    assert isinstance(first, Delta)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_cancelling_the_consumer_stops_it_within_one_token() -> None:
    model = LocalModel.from_options({"token_ms": "1000"})
    with anyio.move_on_after(0.2):
        async for _ in model.stream(summary_prompt(DOC, Style.PARAGRAPH, 200), max_output_tokens=200):
            pass


@pytest.mark.parametrize("options", [{"ttft_ms": "-1"}, {"fail_after": "x"}, {"bogus": "1"}, {"fail": "sometimes"}])
def test_bad_profile_options_are_rejected(options: dict[str, str]) -> None:
    with pytest.raises(InvalidInputError):
        LocalModel.from_options(options)


async def test_fail_first_fails_the_first_attempts_of_a_prompt_then_succeeds() -> None:
    model = LocalModel.from_options({"fail_first": "2", "ttft_ms": "1"})
    prompt = summary_prompt(DOC + " Unique to this test.", Style.TLDR, 100)
    for _ in range(2):
        with pytest.raises(TransientModelError):
            async for _event in model.stream(prompt, max_output_tokens=100):
                pass
    events = [e async for e in model.stream(prompt, max_output_tokens=100)]
    assert isinstance(events[-1], Completion)


async def test_fail_if_fails_only_prompts_that_contain_the_marker() -> None:
    model = LocalModel.from_options({"fail_if": "POISON", "fail": "permanent"})
    events = [e async for e in model.stream(summary_prompt(DOC, Style.TLDR, 100), max_output_tokens=100)]
    assert isinstance(events[-1], Completion)
    with pytest.raises(PermanentModelError):
        async for _event in model.stream(summary_prompt(DOC + " POISON here.", Style.TLDR, 100), max_output_tokens=100):
            pass


async def first_event_or_failure(model: LocalModel, prompt: Prompt) -> str:
    """How a call starts: "delta" (its first event is a token) or "failed" (transiently, before any)."""
    stream = model.stream(prompt, max_output_tokens=100)
    try:
        first = await anext(stream)
    except TransientModelError as exc:
        usage = exc.usage  # type: ignore[attr-defined]
        return "failed" if usage is not None and usage.output_tokens == 0 else f"failed with {usage}"
    finally:
        await stream.aclose()
    return "delta" if isinstance(first, Delta) else type(first).__name__


async def test_fail_rate_fails_that_share_of_calls_transiently_before_the_first_token() -> None:
    prompt = summary_prompt(DOC, Style.TLDR, 100)
    outcomes = [
        await first_event_or_failure(LocalModel.from_options({"fail_rate": "0.3", "seed": "11"}), prompt)
        for _ in range(1000)
    ]
    assert set(outcomes) == {"failed", "delta"}
    assert 250 <= outcomes.count("failed") <= 350, outcomes.count("failed")
    again = [
        await first_event_or_failure(LocalModel.from_options({"fail_rate": "0.3", "seed": "12"}), prompt)
        for _ in range(1000)
    ]
    assert again != outcomes, "each seed is its own sequence"


async def test_fail_rate_draws_one_sequence_per_profile_so_a_seed_repeats_it() -> None:
    from precis.providers import local

    prompt = summary_prompt(DOC, Style.TLDR, 100)
    options = {"fail_rate": "0.5", "seed": "3", "ttft_ms": "0"}
    local._DRAWS.clear()
    first = [await first_event_or_failure(LocalModel.from_options(options), prompt) for _ in range(40)]
    local._DRAWS.clear()
    second = [await first_event_or_failure(LocalModel.from_options(options), prompt) for _ in range(40)]
    assert first == second and "failed" in first and "delta" in first


async def test_fail_rate_zero_and_one_never_and_always_fail() -> None:
    prompt = summary_prompt(DOC, Style.TLDR, 100)
    never = [await first_event_or_failure(LocalModel.from_options({"fail_rate": "0"}), prompt) for _ in range(50)]
    always = [await first_event_or_failure(LocalModel.from_options({"fail_rate": "1"}), prompt) for _ in range(50)]
    assert set(never) == {"delta"} and set(always) == {"failed"}


@pytest.mark.parametrize("rate", ["-0.1", "1.5", "often"])
def test_fail_rate_outside_zero_to_one_is_rejected(rate: str) -> None:
    with pytest.raises(InvalidInputError):
        LocalModel.from_options({"fail_rate": rate})
