"""Text <-> token ids through a Hugging Face `tokenizer.json` (the `tokenizers` library).

Qwen2 and its VL / Audio variants ship only this file (byte-level BPE); Gemma 3 ships it next to
its tokenizer.model. Ids match transformers' fast tokenizer, which runs the same library on the
same file; the differences are on purpose:

- Plain text never yields a special id. tokenizers matches special tokens inside any text it
  encodes, so a user who types "<|im_start|>" would get a turn marker; here the library runs with
  `encode_special_tokens`, which reads them as the characters they are. Only chat_template.py puts
  special ids into a prompt, and it finds them in the text the template itself wrote.
- bos, eos and pad come from tokenizer_config.json (or special_tokens_map.json), the eos ids
  generation stops at from generation_config.json, as transformers reads them.
- `clean_up_tokenization_spaces` is not applied: transformers skips it for BPE too, and it would
  make streamed text differ from decoded text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from preprocess.hub_files import TokenizerFiles
from preprocess.tokenizer_protocol import (SpecialToken, alternation, ends_inside_character,
                                           text_ids)

FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer:
    """A `TextTokenizer` (preprocess/tokenizer_protocol.py) over a tokenizer.json."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():  # a checkpoint directory
            path = path / FILE
        self.path = path
        files = TokenizerFiles.read(path.parent)
        self._tk = tokenizers.Tokenizer.from_file(str(path))
        # Some files carry a training-time length limit or padding; prompts are never cut here.
        self._tk.no_truncation()
        self._tk.no_padding()
        # Special tokens in the text are read as text; non-special added tokens (Qwen's
        # <tool_call>) still match, as they do in transformers.
        self._tk.encode_special_tokens = True
        self.vocab_size: int = max(self._tk.get_vocab(with_added_tokens=True).values()) + 1
        self.chat_template: str | None = files.chat_template

        named = {name: self._tk.token_to_id(text) for name, text in files.named}
        self.bos_id: int = _id(named.get("bos_token"))
        self.pad_id: int = _id(named.get("pad_token"))
        self.unk_id: int = _id(named.get("unk_token"))
        self.eos_id: int = _id(named.get("eos_token"))
        if self.eos_id < 0 and files.eos_token_ids:
            self.eos_id = files.eos_token_ids[0]
        self.eos_ids: frozenset[int] = frozenset(files.eos_token_ids) | (
            {self.eos_id} if self.eos_id >= 0 else set())

        special = {token.content: SpecialToken(token.content, i, token.lstrip, token.rstrip)
                   for i, token in self._tk.get_added_tokens_decoder().items() if token.special}
        for name, text in files.named:  # named tokens are special even where the file forgets
            if (i := named[name]) is not None and text not in special:
                special[text] = SpecialToken(text, i)
        self.special_tokens: dict[str, SpecialToken] = special
        self.special_ids: frozenset[int] = frozenset(t.id for t in special.values())
        self._special_re = alternation(special)

        decoders = _decoder_types(json.loads(self._tk.to_str()).get("decoder"))
        self._byte_level = "ByteLevel" in decoders
        self._byte_fallback = not self._byte_level and "ByteFallback" in decoders

    def encode(self, text: str) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if self.special_ids.isdisjoint(ids):
            return ids
        # A model whose merges can spell a special token (its text is also an ordinary piece):
        # "<" and "start_of_turn>" apart cannot.
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            for part in (text[start:match.start()], match.group()[:1], match.group()[1:]):
                if part:
                    ids += self._tk.encode(part, add_special_tokens=False).ids
            start = match.end()
        if start < len(text):
            ids += self._tk.encode(text[start:], add_special_tokens=False).ids
        if not self.special_ids.isdisjoint(ids):
            raise ValueError(f"{self.path}: cannot encode {text!r} without special ids")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode(text_ids(ids, self.vocab_size, self.special_ids),
                               skip_special_tokens=False)

    def incomplete(self, ids: Sequence[int]) -> bool:
        ids = [i for i in ids[-8:] if i not in self.special_ids]
        if not ids:
            return False
        if self._byte_fallback:
            # tokenizers decodes a run of byte pieces as one: if any byte in it is invalid UTF-8,
            # every byte of the run reads U+FFFD. Text before the run's end can still change.
            return self._fallback_byte(ids[-1]) is not None
        if not self._byte_level:
            return False  # every piece is whole characters
        tail = b""
        for i in reversed(ids):
            tail = self._level_bytes(i) + tail
            if len(tail) >= 4:
                break
        return ends_inside_character(tail)

    def token_id(self, piece: str) -> int | None:
        return self._tk.token_to_id(piece)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self._tk.id_to_token(int(i)) or "" for i in ids]

    def _level_bytes(self, token_id: int) -> bytes:
        """The bytes the ByteLevel decoder makes of a piece: each character mapped back to its
        byte when all of them are byte characters, else the piece's own UTF-8 (added tokens)."""
        piece = self._tk.id_to_token(token_id) or ""
        table = _byte_level_table()
        if all(char in table for char in piece):
            return bytes(table[char] for char in piece)
        return piece.encode()

    def _fallback_byte(self, token_id: int) -> int | None:
        match = _BYTE_PIECE.fullmatch(self._tk.id_to_token(token_id) or "")
        return int(match.group(1), 16) if match else None

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _id(i: int | None) -> int:
    return -1 if i is None else i


def _decoder_types(decoder: dict | None) -> set[str]:
    """Decoder types in a tokenizer.json's decoder, through Sequences."""
    if not decoder:
        return set()
    found = {decoder.get("type")}
    for inner in decoder.get("decoders") or ():
        found |= _decoder_types(inner)
    return found


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> character table, inverted: printable bytes stand for themselves, the
    others for characters from U+0100 on (tokenizers' ByteLevel uses the same)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table
