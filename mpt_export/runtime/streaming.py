"""Incremental detokenization for streaming: emit only text that is final.

Decoding token by token is not prefix-stable: a byte-level token can end in the middle of a UTF-8 character (the
decoder shows U+FFFD until the rest arrives), and a stop string may be building up at the end of the text. So each
push shows only the part that can no longer change: up to the first stop string (where the row then ends), without
trailing U+FFFD, and holding back a tail that could be the start of a stop string. At the end,
:meth:`TextStream.finish` emits whatever of the final text was held back — the concatenation of all emitted pieces
equals ``Session.decode_row`` for that row.

Each push decodes a short window, not the whole row (which would cost O(length) per token): the tokens since the
last complete character, decoded together with the few tokens before them, minus those tokens' own text — the way
Hugging Face's streamers do it, so decoders that treat the first token specially (a leading space) agree.
"""

from __future__ import annotations


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop or ():
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None, eos_token_id: int | None = None):
        self.tok = tokenizer
        self.stop = list(stop or [])
        self.eos = eos_token_id
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False
        self._done = ""  # text of ids[:_read], complete characters only
        self._prefix, self._read = 0, 0  # window start; end of the tokens whose text is in _done
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._longest = max((len(s) for s in self.stop), default=0)

    def _text(self) -> str:
        """The row's text so far (its last character may still be incomplete: U+FFFD)."""
        new = self.tok.decode(self.ids[self._prefix:])
        tail = new[len(self._prefix_text):]
        if tail and not new.endswith("\ufffd"):  # complete: commit, move the window
            self._done += tail
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
            return self._done
        return self._done + tail

    def push(self, token_id: int) -> str:
        """Add one generated token; -> the newly final text (often '')."""
        token_id = int(token_id)
        if self.stopped or (self.eos is not None and token_id == self.eos):
            return ""
        self.ids.append(token_id)
        text = self._text()
        start = max(0, len(self.shown) - self._longest)  # a stop string cannot lie wholly in what was shown
        cut = len(text)
        for s in self.stop:
            i = text.find(s, start)
            if i >= 0:
                cut, self.stopped = min(cut, i), True
        if not self.stopped:
            stable = text.rstrip("\ufffd")
            hold = 0
            for s in self.stop:  # the longest tail of the text that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(stable)), 0, -1):
                    if stable.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            cut = len(stable) - hold
        return self._emit(text[:cut])

    def finish(self, final_text: str) -> str:
        """-> the rest of ``final_text`` not yet emitted."""
        return self._emit(final_text)

    def _emit(self, text: str) -> str:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            delta, self.shown = text[len(self.shown):], text
            return delta
        return ""


MAX_PENDING = 8  # tokens at most whose text is held open in prefix_lengths (a UTF-8 character spans at most 4 bytes)


def prefix_lengths(tok, ids: list[int]) -> list[int]:
    """``[len(tok.decode(ids[:i])) for i in range(len(ids))]`` — each token's character offset in the text of
    ``ids`` (OpenAI's ``text_offset``) — in time linear in ``len(ids)``: each step decodes the short window
    :class:`TextStream` decodes (the tokens since the last complete character and the few before them), not the whole
    prefix. A run of tokens that never completes a character (stray bytes) is committed after :data:`MAX_PENDING`
    tokens, so the window stays short whatever the input."""
    out: list[int] = []
    done = 0  # characters of ids[:read]
    prefix = read = 0  # the window: ids[prefix:read] was decoded as prefix_text
    prefix_len = 0  # len(tok.decode(ids[prefix:read]))
    for i in range(len(ids)):
        if i == read:
            out.append(done)
            continue
        new = tok.decode(ids[prefix:i])
        tail = len(new) - prefix_len
        out.append(done + max(tail, 0))
        if tail > 0 and (not new.endswith("\ufffd") or i - read >= MAX_PENDING):  # complete: move the window
            done += tail
            prefix, read = read, i
            prefix_len = len(tok.decode(ids[prefix:read]))
    return out
