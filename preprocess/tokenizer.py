"""Text <-> token ids through a sentencepiece model: ringserve's own or a checkpoint's; and `load`,
which picks a checkpoint's tokenizer file.

Plain text never yields a special id. In ringserve's model the turn and media markers are control
pieces, which sentencepiece never matches in text; some checkpoints (Gemma) declare them as
user-defined pieces, which it would match, so `encode` breaks those strings up. Only prompt.py puts
special ids into a prompt, and `decode` drops them, so markers never leak into generated text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from preprocess import hf_tokenizer
from preprocess.hub_files import TokenizerFiles
from preprocess.tokenizer_protocol import (SpecialToken, TextTokenizer, alternation,
                                           ends_inside_character, text_ids)

# Pieces after <pad> <s> </s> <unk> (ids 0-3) in ringserve.model, at ids 4, 5, ... in this order.
# Appending is safe; reordering or removing changes ids and needs a retrained model.
SPECIAL_PIECES = (
    "<start_of_turn>",
    "<end_of_turn>",
    "<image>",
    "<audio>",
    "<video>",
    "<|media_start|>",
    "<|media_end|>",
    "<reserved_0>",
    "<reserved_1>",
    "<reserved_2>",
    "<reserved_3>",
    "<reserved_4>",
)
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "ringserve.model"
MODEL_FILE = "tokenizer.model"


def load(path: str | Path) -> TextTokenizer:
    """The tokenizer at `path`: a tokenizer.json or sentencepiece file, or a checkpoint directory,
    where tokenizer.json is preferred (transformers loads the fast tokenizer first; Gemma 3 ships
    both and they agree) and tokenizer.model is the fallback. Raises FileNotFoundError."""
    path = Path(path)
    if path.is_dir():
        for name in (hf_tokenizer.FILE, MODEL_FILE):
            if (path / name).is_file():
                return load(path / name)
        raise FileNotFoundError(f"{path} holds neither {hf_tokenizer.FILE} nor {MODEL_FILE}")
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    return hf_tokenizer.HFTokenizer(path) if path.suffix == ".json" else Tokenizer(path)


class Tokenizer:
    """A sentencepiece model, a `TextTokenizer`. Ids it lacks (Llama's has no pad) read -1, as in
    sentencepiece. A checkpoint's chat template and generation eos ids are read from the files
    beside the model (preprocess/hub_files.py); ringserve's own model has none."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():  # a Hugging Face checkpoint directory
            path = path / MODEL_FILE
        self.path = path
        files = TokenizerFiles.read(path.parent)
        self.chat_template: str | None = files.chat_template
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        controls: list[int] = []
        # Byte-fallback piece id -> the byte it stands for ("<0xE2>" -> 0xE2), for the detokenizer.
        self.byte_values: dict[int, int] = {}
        for i in range(self.vocab_size):
            if self._sp.is_control(i):
                controls.append(i)
            elif self._sp.is_byte(i):
                self.byte_values[i] = int(self._sp.id_to_piece(i)[3:5], 16)
        # Ringserve's markers, and the pieces a checkpoint's tokenizer_config.json marks special.
        named = {p: i for p in (*SPECIAL_PIECES, *files.special)
                 if (i := self.token_id(p)) is not None}
        self.special_ids: frozenset[int] = frozenset(controls) | frozenset(named.values())
        self.special_tokens: dict[str, SpecialToken] = {
            self._sp.id_to_piece(i): SpecialToken(self._sp.id_to_piece(i), i)
            for i in sorted(self.special_ids)}
        self.eos_ids: frozenset[int] = frozenset(files.eos_token_ids) | (
            {self.eos_id} if self.eos_id >= 0 else set())
        # Markers sentencepiece would match inside text (user-defined rather than control pieces).
        self._forgeable = frozenset(p for p, i in named.items() if not self._sp.is_control(i))
        self._forgeable_re = alternation(self._forgeable)

    @classmethod
    def default(cls) -> Tokenizer:
        """The committed preprocess/assets/ringserve.model (loaded once, shared)."""
        return _default()

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as is: no bos or eos, never a special id."""
        if not self._forgeable or not self._forgeable_re.search(text):
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._forgeable_re.finditer(text):
            marker = match.group()
            # "<" and "start_of_turn>" apart: neither half can match the marker any more.
            for part in (text[start : match.start()], marker[:1], marker[1:]):
                if part:
                    ids += self._sp.encode(part)
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special ids dropped (they stand for structure, not text)."""
        return self._sp.decode(text_ids(ids, self.vocab_size, self.special_ids))

    def incomplete(self, ids: Sequence[int]) -> bool:
        """Whether `ids` end in byte-fallback pieces that spell part of a character."""
        tail = b""
        for i in reversed(ids[-4:]):
            byte = self.byte_values.get(i)
            if byte is None:  # a text piece is whole characters: it ends any sequence
                break
            tail = bytes([byte]) + tail
        return ends_inside_character(tail)

    def token_id(self, piece: str) -> int | None:
        """The id of `piece`, or None if the model has no such piece."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Piece strings, for debugging and tests."""
        return [self._sp.id_to_piece(i) for i in ids]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


@functools.cache
def _default() -> Tokenizer:
    return Tokenizer(DEFAULT_MODEL)
