"""Incremental detokenization: text deltas for a growing token sequence.

Decoding token by token breaks multi-byte characters and word-piece spacing, so each delta is the
difference between decoding a short window with and without the newest tokens; text ending in
U+FFFD (an incomplete character) is held back until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Callable

_WINDOW = 5


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_token_ids: list[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_token_ids[-_WINDOW:])
        self._read = len(self._ids)
        self._prefix = max(self._read - _WINDOW, 0)
        self.text = ""  # all text emitted so far

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        # Keep the window short: decode cost stays constant per token.
        if self._prefix > 64:
            cut = self._prefix
            self._ids = self._ids[cut:]
            self._prefix -= cut
            self._read -= cut
        self.text += delta
        return delta


class StopChecker:
    """Cuts generated text at the first stop string, as OpenAI-style APIs do.

    Text that could be the start of a stop string is held back until the next delta shows
    whether it is, so no part of a stop string is ever sent; ``flush`` releases it at the end.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text to emit, whether a stop string matched)."""
        if not self._stops:
            return delta, False
        buf = self._pending + delta
        hits = [h for h in (buf.find(s) for s in self._stops) if h >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending
