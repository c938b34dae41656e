"""Incremental detokenization with stop strings, for streaming.

Decoding token by token is not the same as decoding the whole sequence: a character can span several
byte-level tokens (the partial decode ends in U+FFFD) and SentencePiece-style tokenizers drop a
leading space when a decode *starts* at a word-initial token. So each new token is decoded inside a
small window that starts a few tokens back (``_prefix``), and only the text past the window's
previous decode is new; text that ends in an incomplete character is held until it completes.

Stop strings: text that could still turn into a stop string (a suffix of the text that is a prefix
of some stop string) is held back, so a client never receives part of a stop string.
"""
from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class StreamText:
    """Feed token ids with :meth:`push`; get the text that is safe to send now."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # all decoded text so far (may end with held-back characters)
        self.sent = 0  # len of the text already returned
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] is the context window of the last decode
        self._read = 0
        self._scan_from = 0  # stop strings cannot start before this index of self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly safe text ("" if nothing yet). Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended for another reason than a stop string: return whatever was held back."""
        if self.stopped:
            return ""
        if self._read < len(self.ids):  # trailing tokens that never formed a complete character
            rest = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
            self.text += rest
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            longest = max(len(s) for s in self.stop)
            hits = [p for p in (self.text.find(s, self._scan_from) for s in self.stop) if p >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                self.text = self.text[:end]
                return self._emit(end)
            self._scan_from = max(0, len(self.text) - longest + 1)
            if not final:
                return self._emit(len(self.text) - self._held())
        return self._emit(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out
