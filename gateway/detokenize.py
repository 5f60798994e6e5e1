"""Streaming text out of streamed token ids, and string stop words on that text.

Byte-level BPE can split one UTF-8 character over several tokens, and some decoders
(SentencePiece's Metaspace) treat the first token of a decode call specially, so
text is decoded over a sliding window (prefix, read, end) and only emitted once the
window decodes to more text that does not end in U+FFFD. `finish` reconciles with a
decode of every id, so the streamed pieces always add up to `decode(all ids)`.
"""
from __future__ import annotations

from gateway.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # window start: decoded as context only
        self._read = 0    # ids before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, new_ids: list[int]) -> str:
        """Add ids; return the newly complete text (possibly empty)."""
        self.ids.extend(new_ids)
        if not new_ids:
            return ""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        full_text = self._decode(self.ids[self._prefix:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""
        delta = full_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text not yet emitted, such that the total equals decode(all ids)."""
        final = self._decode(self.ids)
        if final.startswith(self.text):
            delta = final[len(self.text):]
        else:  # a decoder that is not prefix-stable: emit the window's tail as is
            delta = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
        self.text += delta
        self._prefix = self._read = len(self.ids)
        return delta


class StopStrings:
    """Cuts streamed text at the first stop string. Text that could be the start of a
    stop string is held back until it is known not to be one."""

    def __init__(self, stop_words: list[str], include_stop_str: bool = False):
        self.stop_words = [w for w in dict.fromkeys(stop_words) if w]
        self.include_stop_str = include_stop_str
        self.stopped = False
        self._pending = ""

    def feed(self, text: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string is complete."""
        if self.stopped or not text:
            return ""
        buffer = self._pending + text
        if not self.stop_words:
            return buffer
        hit = None
        for word in self.stop_words:
            at = buffer.find(word)
            if at >= 0 and (hit is None or at < hit[0] or (at == hit[0] and len(word) > len(hit[1]))):
                hit = (at, word)
        if hit is not None:
            self.stopped, self._pending = True, ""
            at, word = hit
            return buffer[: at + len(word)] if self.include_stop_str else buffer[:at]
        hold = 0
        for word in self.stop_words:
            for n in range(min(len(word) - 1, len(buffer)), hold, -1):
                if buffer.endswith(word[:n]):
                    hold = n
                    break
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """At the end of generation, held-back text was not a stop string after all."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text
