"""Token-aware chunking: cut at sentence boundaries, overlap consecutive chunks by whole sentences."""

from __future__ import annotations

import re
from typing import NamedTuple

from precis.domain.models import Chunk, ChunkPlan, Document
from precis.domain.tokens import count_many, count_tokens, token_pieces

# A sentence ends at . ! ? or … (plus closing quotes or brackets) followed by whitespace and a
# character that is not a lowercase letter, or at a blank line. A period after an initial ("John F.
# Kennedy") or a common abbreviation ("Dr.") does not end one, nor does "e.g. this".
_BOUNDARY = re.compile(
    r"(?:(?<!\b[A-Z])(?<!\b(?:Mr|Dr|Ms|St|Jr|Sr|vs|No))(?<!\bMrs)\.|[!?…。！？])[\"'”’)\]]*\s+(?=[^\sa-z])"
    r"|\n[ \t]*\n\s*"
)


class Span(NamedTuple):
    start: int
    end: int
    tokens: int


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`; they tile `text` exactly (whitespace included)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.end() > start:
            spans.append((start, match.end()))
            start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _units(text: str, max_tokens: int) -> list[Span]:
    """Sentences with their token counts; a sentence longer than `max_tokens` is cut at token
    boundaries, the only place left to cut it."""
    spans = sentence_spans(text)
    counts = count_many([text[s:e] for s, e in spans])
    units: list[Span] = []
    for (start, end), tokens in zip(spans, counts, strict=True):
        if tokens <= max_tokens:
            units.append(Span(start, end, tokens))
            continue
        pieces = token_pieces(text[start:end])
        for i in range(0, len(pieces), max_tokens):
            window = pieces[i : i + max_tokens]
            width = sum(len(p) for p in window)
            units.append(Span(start, start + width, len(window)))
            start += width
    return units


def plan_chunks(document: Document, chunk_tokens: int, overlap_tokens: int) -> ChunkPlan:
    """Split `document` into chunks of at most `chunk_tokens`, each starting with up to
    `overlap_tokens` of the previous chunk's last sentences so no idea is cut off from its context.
    A document that fits one chunk is one chunk."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    text = document.text
    total = count_tokens(text)
    if total <= chunk_tokens:  # the common case needs no sentence split at all
        return ChunkPlan(
            chunks=(Chunk(index=0, start=0, end=len(text), tokens=total, text=text),),
            total_tokens=total,
            chunk_tokens=chunk_tokens,
            overlap_tokens=overlap_tokens,
        )

    units = _units(text, chunk_tokens)
    chunks: list[Chunk] = []
    first = 0
    while first < len(units):
        last, tokens = first, 0
        while last < len(units) and tokens + units[last].tokens <= chunk_tokens:
            tokens += units[last].tokens
            last += 1
        start, end = units[first].start, units[last - 1].end
        chunks.append(Chunk(index=len(chunks), start=start, end=end, tokens=tokens, text=text[start:end]))
        if last == len(units):
            break
        # Step back over whole sentences for the overlap, leaving room for the next new sentence.
        room = min(overlap_tokens, chunk_tokens - units[last].tokens)
        first, overlap = last, 0
        while first - 1 >= 0 and units[first - 1].start > start and overlap + units[first - 1].tokens <= room:
            first -= 1
            overlap += units[first].tokens
    return ChunkPlan(chunks=tuple(chunks), total_tokens=total, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
