from __future__ import annotations

import pydoc_data.topics

import pytest

from precis.domain.catalog import Catalog
from precis.domain.chunking import plan_chunks, sentence_spans
from precis.domain.inference import chunk_budget
from precis.domain.models import Document, Style, TokenBudget
from precis.domain.tokens import count_tokens, token_pieces


def python_docs(min_tokens: int) -> str:
    """Real prose of any length: the Python reference that ships with every CPython."""
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    while count_tokens(text) < min_tokens:
        text += "\n\n" + text
    return text


def test_sentence_spans_tile_the_text_and_respect_initials_and_abbreviations() -> None:
    text = "Dr. Smith met John F. Kennedy in 1961. He said hi! Then e.g. this one.\n\nNew paragraph"
    spans = sentence_spans(text)
    assert "".join(text[s:e] for s, e in spans) == text
    assert [text[s:e].strip() for s, e in spans] == [
        "Dr. Smith met John F. Kennedy in 1961.",
        "He said hi!",
        "Then e.g. this one.",
        "New paragraph",
    ]


def test_short_document_is_one_chunk() -> None:
    plan = plan_chunks(Document(text="One sentence. Two sentences."), chunk_tokens=100, overlap_tokens=10)
    assert len(plan.chunks) == 1
    assert plan.chunks[0].text == "One sentence. Two sentences."


def test_chunks_end_on_sentence_boundaries_and_overlap_by_whole_sentences() -> None:
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(200)]
    text = " ".join(sentences)
    plan = plan_chunks(Document(text=text), chunk_tokens=120, overlap_tokens=30)
    assert len(plan.chunks) > 5
    for chunk in plan.chunks:
        assert chunk.tokens <= 120
        assert chunk.text == text[chunk.start : chunk.end]
        assert chunk.text.rstrip().endswith(".")
    for before, after in zip(plan.chunks, plan.chunks[1:], strict=False):
        assert after.start < before.end, "consecutive chunks overlap"
        assert after.start > before.start, "every chunk makes progress"
        overlap = text[after.start : before.end]
        assert 0 < count_tokens(overlap) <= 30 + 5
        assert overlap.startswith("Sentence number")
    assert plan.chunks[0].start == 0 and plan.chunks[-1].end == len(text)


def test_a_sentence_longer_than_a_chunk_is_cut_at_token_boundaries() -> None:
    text = "word " * 500 + "end. Short one."
    plan = plan_chunks(Document(text=text), chunk_tokens=100, overlap_tokens=10)
    assert len(plan.chunks) >= 5
    assert all(c.tokens <= 100 for c in plan.chunks)
    assert plan.chunks[0].start == 0 and plan.chunks[-1].end == len(text)
    for before, after in zip(plan.chunks, plan.chunks[1:], strict=False):
        assert before.start < after.start <= before.end


def test_token_pieces_rejoin_exactly_even_through_multibyte_characters() -> None:
    text = "naïve café 東京 🚀 emoji and ligatures ﬁ."
    pieces = token_pieces(text)
    assert "".join(pieces) == text
    assert len(pieces) <= count_tokens(text)


def test_200k_token_document_is_planned_with_every_chunk_in_budget() -> None:
    text = python_docs(200_000)
    plan = plan_chunks(Document(text=text), chunk_tokens=7_000, overlap_tokens=200)
    assert plan.total_tokens >= 200_000
    assert len(plan.chunks) >= 29
    assert all(c.tokens <= 7_000 for c in plan.chunks)
    assert plan.chunks[0].start == 0 and plan.chunks[-1].end == len(text)
    for before, after in zip(plan.chunks, plan.chunks[1:], strict=False):
        assert before.start < after.start <= before.end, "no gaps, no going back"


def test_budget_leaves_the_document_what_instructions_and_answer_do_not_take() -> None:
    budget = TokenBudget(context_window=8192, max_output_tokens=512, prompt_overhead=180)
    assert budget.document_tokens == 8192 - 512 - 180
    with pytest.raises(ValueError, match="greater than 0"):
        TokenBudget(context_window=0, max_output_tokens=1, prompt_overhead=0)


def test_a_tiers_context_allocation_caps_the_chunk_below_the_models_window() -> None:
    model = Catalog.bundled().models["claude-3-haiku"]
    window_only, _ = chunk_budget(model, Style.PARAGRAPH, 512)
    capped, overlap = chunk_budget(model, Style.PARAGRAPH, 512, context_tokens=8_000)
    assert window_only > 190_000 and capped < 8_000 and 0 < overlap <= capped // 10
    assert chunk_budget(model, Style.PARAGRAPH, 512, context_tokens=10**9)[0] == window_only
