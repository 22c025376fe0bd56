"""Token ids -> text as it streams: complete UTF-8 only, spaces right, stop strings cut.

`IncrementalDecoder` turns a growing list of generated ids into text deltas. Decoding each token on
its own would lose SentencePiece's word-initial spaces ("▁Hello" decodes to "Hello" at the start of a
string) and would print half characters (a character outside the vocabulary arrives as several
byte tokens, e.g. "🙂" = <0xF0> <0x9F> <0x99> <0x82>). So each step decodes a short window that
starts a few tokens back and emits only what the window adds beyond the text already shown, and
holds text back while it ends in an incomplete character (U+FFFD). `flush` emits whatever remains at
the end. The deltas concatenate to `tokenizer.decode(ids, skip_special_tokens=True)` for any ids
that spell valid UTF-8 (byte tokens that never form a character may come out differently: the whole
decode turns bytes already shown as text into U+FFFD when an invalid byte follows them).

`StopMatcher` watches the text for stop strings (the template's end-of-turn text, a caller's
`stop`): text that could still become a stop string is held back, and once one appears the text
before it is all that is released.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class IncrementalDecoder:
    """Streams the text of generated token ids.

    Args:
      tokenizer: a Hugging Face tokenizer (`decode(ids, skip_special_tokens=True)` is used).
      context: tokens decoded before the new ones so word-initial spaces come out right.
    """

    def __init__(self, tokenizer, *, context: int = 4):
        self.tokenizer = tokenizer
        self.context = context
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, ids: Iterable[int]) -> str:
        """Add generated ids; returns the newly complete text ("" while a character is unfinished)."""
        self.ids.extend(int(t) for t in ids)
        if len(self.ids) == self._read:
            return ""
        shown = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(shown) or text.endswith(REPLACEMENT):
            return ""
        self._prefix = max(self._prefix, self._read - self.context)
        self._read = len(self.ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """The text still held back (an unfinished character at the very end is emitted as U+FFFD)."""
        if len(self.ids) == self._read:
            return ""
        shown = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(shown) :]


class StopMatcher:
    """Cuts streamed text at the first stop string.

    `feed(delta)` returns the text that is safe to show: everything except a tail that may be the
    start of a stop string. After a stop string appears, `stopped` is True and later feeds return "".
    `flush()` releases a held tail at the end of generation (no stop string followed).
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)
        self.stopped = False
        self._held = ""

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._held + delta
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self._held = True, ""
            return text[: min(cuts)]
        keep = 0  # longest tail of `text` that is a proper prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = ("" if self.stopped else self._held), ""
        return held
