"""Postprocess: a model's draft becomes a clean summary in the requested style."""

from __future__ import annotations

import re

from precis.domain.models import FinishReason, Style, Summary

_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*(?=\s|$)")
#: A bullet's marker; a line cut right after it (a partial stream) has no space after it yet.
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])(?:\s+|$)")


def _cut_dangling(text: str) -> str:
    """Drop a trailing half-sentence; keep everything if there is no complete sentence at all."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else text


def postprocess(draft: str, style: Style, finish_reason: FinishReason) -> Summary:
    """Normalise whitespace and bullet markers; when the model stopped at its length limit, end on a
    complete sentence (or a complete bullet) instead of a dangling half."""
    text = draft.strip()
    if style is Style.BULLETS:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if finish_reason is FinishReason.LENGTH and len(lines) > 1 and not _SENTENCE_END.search(lines[-1]):
            lines = lines[:-1]
        elif finish_reason is FinishReason.LENGTH and lines:
            lines[-1] = _cut_dangling(lines[-1])
        items = (_BULLET.sub("", line) for line in lines)
        text = "\n".join("- " + item for item in items if item)  # a bare marker is no bullet
    else:
        text = re.sub(r"[ \t]+", " ", text)
        if style is Style.TLDR:
            text = " ".join(text.split())
        if finish_reason is FinishReason.LENGTH:
            text = _cut_dangling(text)
    return Summary(text=text.strip(), style=style, finish_reason=finish_reason)
