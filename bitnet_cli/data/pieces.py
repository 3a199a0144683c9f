"""Long documents encoded a piece at a time. `tokenizers` keeps a whole Encoding (ids, token
strings, offsets, masks) for what it is given: one 50 MB document took 7.4 GB to encode.
Pieces of about a megabyte, cut where the byte-level pre-tokenizer splits the text anyway,
encode to the same ids as the whole, in a few hundred megabytes at most."""

from __future__ import annotations

from typing import Iterator

import numpy as np

PIECE_CHARS = 1 << 20
SEARCH_CHARS = 64 << 10  # how far back from a piece's end a clean cut is looked for


def encode_long(tok, text: str, dtype: np.dtype) -> np.ndarray:
    """The ids of `text` (no EOT added), as one encoding of the whole would give them."""
    return np.concatenate([np.array(tok.encode(piece).ids, dtype=dtype)
                           for piece in pieces(text)])


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    start = 0
    while len(text) - start > size:
        end = _cut(text, start, start + size)
        yield text[start:end]
        start = end
    yield text[start:]


def _cut(text: str, start: int, near: int) -> int:
    """A place in (start, near] where GPT-2's pre-tokenizer (which byte-level BPE uses) starts a
    new pre-token whatever follows: after a newline that text follows, or at a single space
    between two words (' word' is one pre-token). BPE never merges across pre-tokens, so the
    two sides encode as they would together. Text with neither gets a plain cut."""
    low = max(start + 1, near - SEARCH_CHARS)
    at = text.rfind("\n", low - 1, near - 1)
    while at != -1:  # cut after the newline
        if not text[at + 1].isspace():
            return at + 1
        at = text.rfind("\n", low - 1, at)
    at = text.rfind(" ", low, near)
    while at != -1:  # cut before the space
        if not text[at - 1].isspace() and at + 1 < len(text) and not text[at + 1].isspace():
            return at
        at = text.rfind(" ", low, at)
    return near
