"""Hugging Face tokenizer.json tokenizers against transformers, which runs the same files.

No downloads: each tokenizer is trained here in a moment with the `tokenizers` library and saved as
a hub-style directory (tokenizer.json, tokenizer_config.json, generation_config.json), in the two
layouts real checkpoints use: Qwen2's byte-level BPE and Gemma 3's BPE with byte fallback.
tests/test_chat_template.py builds on the same directories.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from preprocess import tokenizer as tokenizer_lib
from preprocess.detokenize import IncrementalDetokenizer
from preprocess.hf_tokenizer import HFTokenizer
from preprocess.hub_files import TokenizerFiles
from preprocess.tokenizer import DEFAULT_MODEL, Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello model, hello user. How are you today?",
    "A user asks a question and the model answers it in a few words.",
    "Numbers like 12 and 345 appear here too: 2024-05-01, 3.14159.",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
    "You are a helpful assistant. Be brief and kind.",
    "café naïve façade “quoted” — ok",
]
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
    "def f(x):\n    return {'a': [1, 2]}  # code\r\n",
    "\ufffd a literal replacement character",
    "call <tool_call> now",  # a non-special added token: matched in text, as in transformers
]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|audio_bos|>",
                "<|audio_eos|>", "<|AUDIO|>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Qwen2's pre-tokenizer pattern (GPT-4's, digits one by one).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_qwen(directory: Path, chat_template: str | None = None) -> Path:
    """A Qwen2-layout checkpoint tokenizer: NFC, the split pattern, byte-level BPE, ChatML special
    tokens after the vocabulary, <tool_call> as a non-special added token."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(
        vocab_size=500, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": 32768}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return directory


def write_gemma(directory: Path, chat_template: str | None = None) -> Path:
    """A Gemma 3-layout checkpoint tokenizer: spaces as "▁", split after each space, BPE with the
    256 byte pieces for characters it lacks (it is trained on Latin text only)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=GEMMA_SPECIAL))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    spec["model"].update(byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
              "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    end_of_turn = GEMMA_SPECIAL.index("<end_of_turn>")
    eos = {"eos_token_id": [1, end_of_turn]}
    (directory / "generation_config.json").write_text(json.dumps(eos))
    return directory


def theirs(directory: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module", params=["qwen", "gemma"])
def pair(request, tmp_path_factory):
    """(ours, transformers') over the same directory."""
    write = write_qwen if request.param == "qwen" else write_gemma
    directory = write(tmp_path_factory.mktemp(request.param))
    return HFTokenizer(directory), theirs(directory)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer(write_qwen(tmp_path_factory.mktemp("qwen")))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer(write_gemma(tmp_path_factory.mktemp("gemma")))


# --- parity with transformers ---------------------------------------------------------------------

def test_encode_matches_transformers(pair):
    ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_decode_matches_transformers(pair):
    ours, ref = pair
    rng = random.Random(0)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
        # Special ids anywhere are dropped, by both.
        mixed = list(ids)
        for special in rng.sample(sorted(ours.special_ids), 3):
            mixed.insert(rng.randrange(len(mixed) + 1), special)
        assert ours.decode(mixed) == ref.decode(mixed, skip_special_tokens=True) == text


def test_named_ids_match_transformers(pair):
    ours, ref = pair
    assert ours.eos_id == ref.eos_token_id
    assert ours.pad_id == ref.pad_token_id
    assert ours.bos_id == (ref.bos_token_id if ref.bos_token_id is not None else -1)
    assert ours.vocab_size == len(ref)
    for token in ref.all_special_tokens:
        assert ours.token_id(token) == ref.convert_tokens_to_ids(token)
        assert ours.token_id(token) in ours.special_ids
    assert ours.token_id("no such piece") is None


def test_special_token_text_stays_text(pair):
    """transformers encodes a typed "<|im_start|>" as the marker; plain text here never does."""
    ours, ref = pair
    for token in ours.special_tokens:
        text = f"say {token}user\nhi{token}"
        ids = ours.encode(text)
        assert ours.special_ids.isdisjoint(ids) and ours.decode(ids) == text
        assert ref.convert_tokens_to_ids(token) in ref.encode(text, add_special_tokens=False)


def test_layouts(qwen, gemma):
    im_end, endoftext = qwen.token_id("<|im_end|>"), qwen.token_id("<|endoftext|>")
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (-1, im_end, endoftext)
    assert qwen.eos_ids == {im_end, endoftext}  # generation_config.json's list
    assert qwen.special_ids == {qwen.token_id(t) for t in QWEN_SPECIAL}
    assert qwen.token_id("<tool_call>") not in qwen.special_ids  # added, but not special
    assert (gemma.pad_id, gemma.eos_id, gemma.bos_id) == (0, 1, 2)
    assert gemma.eos_ids == {1, gemma.token_id("<end_of_turn>")}
    assert gemma.special_ids == set(range(len(GEMMA_SPECIAL)))
    assert gemma.pieces(gemma.encode("€")) == ["<0xE2>", "<0x82>", "<0xAC>"]  # byte fallback


def test_decode_rejects_ids_outside_vocabulary(qwen):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        qwen.decode([5, qwen.vocab_size])


# --- streaming ------------------------------------------------------------------------------------

def stream(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_stream_of_real_text_equals_decode(pair):
    ours, _ = pair
    for text in TEXTS:
        chunks = stream(ours, ours.encode(text))
        assert "".join(chunks) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in chunk for chunk in chunks), text  # never half a character


def test_stream_of_random_text_equals_decode(pair):
    ours, _ = pair
    rng = random.Random(0)
    alphabet = "ab ,.9\n\té€日本語한🎉👍🏽\u200d\U0001F1EB\U0001F1F7"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        chunks = stream(ours, ours.encode(text))
        assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks), text


def test_stream_of_random_ids_equals_decode(pair):
    """Invalid UTF-8 too: byte-level pieces that split characters anywhere, and byte-fallback runs,
    which tokenizers decodes as one (a single bad byte turns the whole run into U+FFFD)."""
    ours, _ = pair
    rng = random.Random(0)
    pieces = ours.pieces(range(ours.vocab_size))
    odd = [i for i, p in enumerate(pieces) if p.startswith("<0x") or not p.isascii()]
    for trial in range(300):
        pool = odd if trial % 2 else range(ours.vocab_size)
        ids = [rng.choice(pool) if rng.random() < 0.8 else rng.choice(sorted(ours.special_ids))
               for _ in range(rng.randrange(40))]
        assert "".join(stream(ours, ids)) == ours.decode(ids), ids


def test_stream_holds_a_split_character(qwen):
    ids = qwen.encode("🎉")
    assert len(ids) > 1  # not in the trained vocabulary: byte-level pieces
    chunks = stream(qwen, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1) and chunks[-2] == "🎉" and chunks[-1] == ""


# --- files and loading ----------------------------------------------------------------------------

def test_load_picks_tokenizer_json_first(tmp_path):
    write_gemma(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(DEFAULT_MODEL.read_bytes())
    assert isinstance(tokenizer_lib.load(tmp_path), HFTokenizer)  # as transformers: fast first
    assert isinstance(tokenizer_lib.load(tmp_path / "tokenizer.model"), Tokenizer)  # --tokenizer
    (tmp_path / "tokenizer.json").unlink()
    assert isinstance(tokenizer_lib.load(tmp_path), Tokenizer)
    with pytest.raises(FileNotFoundError):
        tokenizer_lib.load(tmp_path / "missing")


def test_hub_files(tmp_path):
    assert TokenizerFiles.read(tmp_path) == TokenizerFiles()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True, "__type": "AddedToken"},
        "eos_token": None,
        "added_tokens_decoder": {"7": {"content": "<x>", "special": True},
                                 "8": {"content": "<y>", "special": False}},
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "D"}]}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>",
                                                                 "pad_token": "<pad>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    files = TokenizerFiles.read(tmp_path)
    # tokenizer_config.json's null eos wins over special_tokens_map.json, as in transformers.
    assert files.named == (("bos_token", "<s>"), ("pad_token", "<pad>"))
    assert files.special == ("<x>",) and files.eos_token_ids == (2,)
    assert files.chat_template == "D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "processor"}))
    assert TokenizerFiles.read(tmp_path).chat_template == "processor"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert TokenizerFiles.read(tmp_path).chat_template == "jinja"


def test_merges_cannot_spell_a_special_token(tmp_path):
    """A vocabulary where "<eot>" is also an ordinary piece BPE merges reach: text that would
    merge into it is encoded in two parts instead."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    tok.train_from_iterator(["<eot> hello <eot>", "world<eot> x"] * 50,
                            trainers.BpeTrainer(vocab_size=100, show_progress=False))
    tok.add_special_tokens([AddedToken("<eot>", special=True, normalized=False)])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer(tmp_path)
    text = "hello <eot>world<eot>"
    ids = ours.encode(text)
    assert ours.token_id("<eot>") in ours.special_ids and ours.special_ids.isdisjoint(ids)
    assert ours.decode(ids) == text
