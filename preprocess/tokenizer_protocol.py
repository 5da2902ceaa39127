"""What the server needs from a tokenizer, whichever library backs it.

Two implementations: preprocess/tokenizer.py (a sentencepiece `tokenizer.model`, ringserve's own
included) and preprocess/hf_tokenizer.py (a Hugging Face `tokenizer.json`). Code that tokenizes,
renders prompts or streams text takes a `TextTokenizer` and never asks which one it has.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class SpecialToken:
    """A token that stands for structure (a turn marker, bos, a media marker), never for text the
    user typed: chat templates write its text to mean it, `encode` never yields it, `decode` drops
    it. lstrip / rstrip: it swallows the whitespace before / after it, as tokenizers' AddedToken."""

    text: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


class TextTokenizer(Protocol):
    """Text <-> ids. Ids a tokenizer lacks (no bos, no pad) read -1, as in sentencepiece."""

    vocab_size: int  # ids are 0 .. vocab_size - 1
    bos_id: int
    eos_id: int
    pad_id: int
    special_ids: frozenset[int]  # decode() drops these; encode() never yields them
    special_tokens: Mapping[str, SpecialToken]  # by text, what a chat template may write
    eos_ids: frozenset[int]  # ids generation ends at (generation_config.json's, else eos_id)
    chat_template: str | None  # the checkpoint's Jinja chat template, if it ships one

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no bos or eos, never a special id."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special ids dropped; raises ValueError for ids outside the vocabulary."""
        ...

    def incomplete(self, ids: Sequence[int]) -> bool:
        """Whether the text of `ids` may still change when more ids follow (they end inside a
        character). The streaming detokenizer holds such ids back. Never True for an empty list."""
        ...

    def token_id(self, piece: str) -> int | None:
        """The id of `piece`, or None if there is no such piece."""
        ...

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Piece strings, for debugging and tests."""
        ...


def text_ids(ids: Iterable[int], vocab_size: int, special_ids: frozenset[int]) -> list[int]:
    """`ids` without the special ones (they stand for structure, not text), each checked to be
    in the vocabulary: what both tokenizers' `decode` turns into text."""
    kept: list[int] = []
    for i in ids:
        i = int(i)
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {vocab_size})")
        if i not in special_ids:
            kept.append(i)
    return kept


def ends_inside_character(tail: bytes) -> bool:
    """Whether UTF-8 `tail` ends in a lead byte with fewer continuation bytes than it needs.

    Lenient on purpose: invalid sequences (overlong, F8-FF leads) count as unfinished too, as if a
    longer character might follow. Holding text back is always safe; emitting it early is not.
    """
    continuations = 0
    for byte in reversed(tail[-4:]):
        if byte < 0x80:  # ASCII ends any sequence
            return False
        if byte < 0xC0:  # a continuation byte: look further back for its lead
            continuations += 1
            if continuations == 3:
                return False  # nothing longer than 4 bytes is waiting for more
            continue
        needed = 1 if byte < 0xE0 else 2 if byte < 0xF0 else 3
        return continuations < needed
    return False


def alternation(texts: Iterable[str]) -> re.Pattern:
    """A regex matching any of `texts`, the longest one where several start at the same place (as
    tokenizers' added-token trie matches). Built as a trie, not a flat `a|b|c`: Gemma declares
    thousands of special tokens, and a flat alternation would try each at every character."""
    trie: dict = {}
    for text in texts:
        if text:
            node = trie
            for char in text:
                node = node.setdefault(char, {})
            node[""] = {}  # a text ends here

    def build(node: dict) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy: the longer text is tried first; each branch starts with its own character, so
        # the first success is the longest match.
        return f"(?:{body})?" if "" in node else body

    return re.compile(build(trie) if trie else "(?!)")  # (?!) never matches
