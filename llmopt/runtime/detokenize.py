"""Incremental detokenization for streaming.

Decoding tokens one by one breaks multi-byte UTF-8 characters (a CJK character or an emoji is
often several byte-level tokens) and tokenizers that merge across tokens. The streamer decodes
the whole generated sequence each step and emits only text that is final: never a trailing
replacement character of an incomplete UTF-8 sequence, never text that could still turn out to
begin a stop string. So the concatenated deltas always equal the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


# tokens decoded before the ones whose text is not final yet: a window that starts this far back
# decodes them as the whole sequence does (a SentencePiece tokenizer drops the leading space of
# a window's first token only, and that token's text is already final)
CONTEXT = 4


class Streamer:
    """Feed token ids; get back text deltas that are safe to show.

    Each push decodes a short window, not the whole sequence: the text of the tokens before
    ``stable`` (the sequence up to the last push whose text ended on a whole character) is kept,
    and the window from ``CONTEXT`` tokens before it says what the newer tokens add. Where the
    window's text does not extend its context's (a tokenizer whose text changes behind a
    token), that push decodes the whole sequence. SmolLM2, 1000 generated tokens: 14.5 us per
    push instead of 174."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False
        self.text = ""
        self.stable = 0  # tokens whose text is final: the text of tokens[:stable] is final_text
        self.final_text = ""
        self.behind = False  # tokens were added (:meth:`add`) after ``text`` was last computed

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _text(self) -> str:
        """The text of every token so far, from a window after the final part."""
        start = max(0, self.stable - CONTEXT)
        if start == 0:
            return self._decode(self.tokens)
        context = self._decode(self.tokens[start:self.stable])
        window = self._decode(self.tokens[start:])
        if not window.startswith(context):
            return self._decode(self.tokens)
        return self.final_text + window[len(context):]

    def push(self, token: int) -> str:
        """Add a token; return the newly final text (possibly empty)."""
        self.tokens.append(token)
        return self._update()

    def add(self, token: int) -> None:
        """Add a token whose text nobody waits for (no stream, no stop string): it is decoded
        with the rest at :meth:`finish`, once, instead of a window each token."""
        self.tokens.append(token)
        self.behind = True

    def _update(self) -> str:
        """Bring ``text`` up to every token pushed; return the newly final text."""
        self.behind = False
        if self.tokenizer is None:  # token ids only: there is no text to stream
            return ""
        text = self._text()
        if not text.endswith(REPLACEMENT):  # a whole character: what follows only appends
            self.stable, self.final_text = len(self.tokens), text
        cut = _first_stop(text, self.stop)
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text
        if self.stopped:
            return self._emit(text)
        safe = text.rstrip(REPLACEMENT)
        held = _stop_prefix_len(safe, self.stop)
        return self._emit(safe[: len(safe) - held])

    def catch_up(self) -> str:
        """The text final so far of tokens only added; what :meth:`push` would have given."""
        return self._update() if self.behind else ""

    def finish(self) -> str:
        """Flush what was held back (an unfinished stop-string prefix, a trailing partial char)."""
        return self.catch_up() + self._emit(self.text)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best
