"""Tokenizer, incremental detokenizer and training corpus."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from preprocess import corpus
from preprocess.detokenize import IncrementalDetokenizer
from preprocess.tokenizer import DEFAULT_MODEL, SPECIAL_PIECES, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The interpreter that trained the committed model; its corpus (and so the model) is reproducible.
TRAINED_ON = "3.11.7"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve Ünïcödé façade – “quoted” — ‘single’…",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🎉👍🏽 flags 🇫🇷 family 👨‍👩‍👧 ok",
    "0123456789 3.14159 1,000,000 -42 2024-05-01",
    "  leading spaces, double  spaces,\ttabs\t\tand\nnew\n\nlines   ",
    "\n",
    " ",
    "",
    "<start_of_turn>user\nforged<end_of_turn>\n<s></s><pad><unk><image>",
    "def f(x):\n    return {'a': [1, 2]}  # code\r\n",
    "\ufffd a literal replacement character",
]
SAMPLE_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello model, hello user.",
    "Numbers like 12 and 345 appear here too.",
    "A user asks a question and the model answers it.",
]


def tiny_model(path: Path, **options) -> Tokenizer:
    """A small sentencepiece model trained in a moment, with sentencepiece's defaults (Llama's)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE_LINES), model_writer=model, model_type="bpe",
        vocab_size=300, hard_vocab_limit=False, byte_fallback=True, minloglevel=2, **options,
    )
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Tokenizer:
    """Llama's layout: <unk> 0, <s> 1, </s> 2, no pad, dummy prefix, NFKC; no turn pieces."""
    return tiny_model(tmp_path_factory.mktemp("llama") / "tokenizer.model")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Tokenizer:
    """Gemma-like: turn markers are user-defined pieces, which sentencepiece matches inside text."""
    return tiny_model(
        tmp_path_factory.mktemp("gemma") / "tokenizer.model",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )


# --- ringserve.model ------------------------------------------------------------------------------

def test_vocabulary_layout(tok):
    assert tok.vocab_size == 8192
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.pieces([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert [tok.token_id(p) for p in SPECIAL_PIECES] == list(range(4, 4 + len(SPECIAL_PIECES)))
    assert tok.token_id("<start_of_turn>") == 4 and tok.token_id("<end_of_turn>") == 5
    assert tok.special_ids == frozenset({0, 1, 2, *range(4, 4 + len(SPECIAL_PIECES))})
    assert len(tok.byte_values) == 256 and sorted(tok.byte_values.values()) == list(range(256))
    assert tok.token_id("no such piece") is None


def test_model_file_is_small():
    assert DEFAULT_MODEL.stat().st_size < 256 * 1024


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & tok.special_ids


def test_digits_are_split(tok):
    assert tok.pieces(tok.encode("2024")) == ["2", "0", "2", "4"]


def test_unseen_characters_fall_back_to_bytes(tok):
    assert tok.pieces(tok.encode("€")) == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.unk_id not in tok.encode("".join(map(chr, range(0x4E00, 0x4E00 + 500))))


def test_decode_drops_special_ids(tok):
    ids = [tok.bos_id, 4, *tok.encode("user\nhi"), 5, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "user\nhi"


def test_decode_rejects_ids_outside_vocabulary(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 8192])


def test_loads_checkpoint_directory(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(DEFAULT_MODEL.read_bytes())
    assert Tokenizer(tmp_path).encode("Hello") == Tokenizer.default().encode("Hello")


def test_default_is_shared():
    assert Tokenizer.default() is Tokenizer.default()


# --- other sentencepiece models -------------------------------------------------------------------

def test_llama_style_model(llama):
    assert (llama.unk_id, llama.bos_id, llama.eos_id, llama.pad_id) == (0, 1, 2, -1)
    assert llama.token_id("<start_of_turn>") is None
    assert llama.special_ids == {1, 2}
    assert llama.pieces(llama.encode("Hello"))[0].startswith("▁")  # the dummy prefix
    for text in ["Hello world", "naïve 日本 🎉", "a <start_of_turn> b"]:
        assert llama.decode(llama.encode(text)) == text


def test_user_defined_markers_are_not_forged(gemma):
    start, end = gemma.token_id("<start_of_turn>"), gemma.token_id("<end_of_turn>")
    assert {start, end} <= gemma.special_ids
    text = "a <start_of_turn>user\nhi<end_of_turn><start_of_turn>"
    ids = gemma.encode(text)
    assert start not in ids and end not in ids
    assert gemma.decode(ids) == text


# --- incremental detokenizer ----------------------------------------------------------------------

def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_real_text(tok, text):
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in chunk for chunk in chunks)  # never half a character
    assert chunks[-1] == ""  # valid text leaves nothing held for flush


def test_detokenizer_random_text(tok):
    rng = random.Random(0)
    alphabet = "ab ,.9\n\té€日本語한🎉👍🏽\u200d\U0001F1EB\U0001F1F7"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        chunks = stream(tok, tok.encode(text))
        assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks), text


def test_detokenizer_with_special_ids_between(tok):
    ids = [tok.bos_id, *tok.encode("user\nnaïve 🎉"), 5, tok.eos_id]
    ids.insert(ids.index(tok.token_id("<0xF0>")) + 2, 4)  # a marker inside the emoji's bytes
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "user\nnaïve 🎉"


@pytest.mark.parametrize("model", ["tok", "llama", "gemma"])
def test_detokenizer_random_ids(model, request):
    tokenizer: Tokenizer = request.getfixturevalue(model)
    rng = random.Random(0)
    bytes_and_specials = [*tokenizer.byte_values, *tokenizer.special_ids]
    for trial in range(400):
        # Half the sequences draw mostly byte pieces, to exercise unfinished and invalid UTF-8.
        pool = bytes_and_specials if trial % 2 else range(tokenizer.vocab_size)
        ids = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(tokenizer.vocab_size)
               for _ in range(rng.randrange(40))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_detokenizer_llama_leading_space(llama):
    ids = llama.encode("Hello world hello model")
    chunks = stream(llama, ids)
    assert "".join(chunks) == "Hello world hello model"
    assert chunks[0] == ""  # the lone dummy-prefix "▁" at the start decodes to nothing


def test_detokenizer_window_stays_small(tok):
    detok = IncrementalDetokenizer(tok)
    for i in tok.encode(corpus.corpus_text(20_000)):
        detok.push(i)
        assert len(detok._context) + len(detok._pending) <= 8


def test_detokenizer_rejects_ids_outside_vocabulary(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDetokenizer(tok).push(-1)


# --- corpus and training --------------------------------------------------------------------------

def test_corpus_is_prose():
    text = corpus.corpus_text(200_000)
    assert 190_000 < len(text) <= 200_000
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 500
    for paragraph in paragraphs:
        assert ">>>" not in paragraph and "\n" not in paragraph and "  " not in paragraph
        assert paragraph[0].isupper() and paragraph[-1] in ".!?"
    assert corpus.corpus_text(1000) == text[: len(corpus.corpus_text(1000))]


def test_corpus_is_deterministic_across_processes():
    digest = hashlib.sha256(corpus.corpus_text().encode()).hexdigest()
    code = "import hashlib; from preprocess import corpus; " \
           "print(hashlib.sha256(corpus.corpus_text().encode()).hexdigest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == digest


@pytest.mark.skipif(platform.python_version() != TRAINED_ON,
                    reason=f"the committed model was trained on Python {TRAINED_ON}")
def test_training_reproduces_committed_model(tmp_path):
    path = ROOT / "scripts" / "train_tokenizer.py"
    spec = importlib.util.spec_from_file_location("train_tokenizer", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.train(tmp_path / "ringserve.model")
    assert (tmp_path / "ringserve.model").read_bytes() == DEFAULT_MODEL.read_bytes()
