"""Streaming detokenization: text for each new token id, as soon as it is final.

Decoding ids one at a time and concatenating is wrong twice over: a byte-fallback character spans
several ids (<0xE2> <0x82> <0xAC> is "€"), and sentencepiece drops the leading space of the first
piece it decodes. So, as vLLM and Hugging Face's TextStreamer do, each step decodes a short window,
the ids of the last emitted chunk (context) plus the ids not yet emitted (pending), and returns the
window's text minus the context's text. Both decodes see the same first piece, so the leading-space
rule cancels out, and the window holds a handful of ids, so each step costs O(1).

Pending ids are held while the tokenizer says their text may still change (`incomplete`): they end
in an unfinished UTF-8 sequence (sentencepiece byte pieces, byte-level BPE pieces), or, for
tokenizers that decode a run of byte pieces as one, inside such a run. That is the only case where
a later id can change text already decoded, so emitting at any other point is final.
"""

from __future__ import annotations

from preprocess.tokenizer_protocol import TextTokenizer


class IncrementalDetokenizer:
    """`"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)`, one call per id."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._context: list[int] = []  # ids of the last emitted chunk
        self._context_text = ""  # tokenizer.decode(self._context)
        self._pending: list[int] = []  # ids whose text has not been returned yet

    def push(self, token_id: int) -> str:
        """Adds one id; returns the text it completes ("" while a character is unfinished)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"(size {self._tokenizer.vocab_size})")
        if token_id in self._tokenizer.special_ids:
            return ""  # decode() drops these too, so a byte sequence may run across them
        self._pending.append(token_id)
        if self._tokenizer.incomplete(self._pending):
            return ""
        return self._emit()

    def flush(self) -> str:
        """At end of stream: returns whatever is held (an unfinished character reads as U+FFFD)."""
        return self._emit() if self._pending else ""

    def _emit(self) -> str:
        window = self._context + self._pending
        text = self._tokenizer.decode(window)[len(self._context_text) :]
        self._context, self._pending = self._pending, []
        self._context_text = self._tokenizer.decode(self._context)
        return text
