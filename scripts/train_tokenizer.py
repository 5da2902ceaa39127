"""Trains ringserve's default tokenizer: preprocess/assets/ringserve.model.

    PYTHONPATH=. .venv/bin/python scripts/train_tokenizer.py [--out PATH]

BPE over the prose of preprocess.corpus, 8192 pieces. The same interpreter version gives the same
file byte for byte: the corpus comes in a fixed order, nothing is sampled or shuffled, and BPE
training has no randomness. Takes well under a minute on two cores.
"""

from __future__ import annotations

import argparse
import io
import string
from pathlib import Path

import sentencepiece as spm

from preprocess import corpus
from preprocess.tokenizer import SPECIAL_PIECES

VOCAB_SIZE = 8192
MAX_SENTENCES = 20_000  # the whole corpus today (~5k paragraphs); bounds time if it grows
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "preprocess" / "assets" / "ringserve.model"


def train(out: Path) -> None:
    paragraphs = list(corpus.iter_corpus_text())[:MAX_SENTENCES]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        # Ids 0-3, the control pieces in SPECIAL_PIECES order, 256 byte pieces, then merges.
        pad_id=0, pad_piece="<pad>",
        bos_id=1, bos_piece="<s>",
        eos_id=2, eos_piece="</s>",
        unk_id=3, unk_piece="<unk>",
        # Control, not user-defined: sentencepiece never produces a control piece from text, so user
        # text spelling "<start_of_turn>" cannot forge a turn; only prompt.py inserts these ids.
        control_symbols=list(SPECIAL_PIECES),
        byte_fallback=True,  # any UTF-8 text round-trips; unseen characters become byte pieces
        split_digits=True,
        # Text in, same text out: no NFKC, no collapsed spaces, no invented leading space (the chat
        # template encodes segments separately, so a dummy prefix would put a space in each).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        # Every printable ASCII character and typographic quote or dash gets a piece, however rare
        # in the corpus ("9" is rarer than "Q" in docstrings); anything else falls back to bytes.
        required_chars=string.digits + string.ascii_letters + string.punctuation + "‘’“”–—…",
        character_coverage=0.9995,
        max_sentence_length=1 << 16,  # paragraphs, not lines; a few are long
        input_sentence_size=0,  # use all, in order: no sampling
        shuffle_input_sentence=False,
        num_threads=2,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(paragraphs)} paragraphs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    train(parser.parse_args().out)


if __name__ == "__main__":
    main()
