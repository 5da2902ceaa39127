"""Named model configurations and the seeded default checkpoint the server starts with."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from flax import nnx

from model import checkpoint
from model.config import AudioConfig, LayerKind, ModelConfig, VisionConfig
from model.transformer import Transformer

REPO_ROOT = Path(__file__).resolve().parents[1]
# The default tokenizer (8192 pieces); its vocabulary size must equal default_config().vocab_size.
DEFAULT_TOKENIZER = REPO_ROOT / 'preprocess' / 'assets' / 'ringserve.model'
TOKENIZER_FILE = 'tokenizer.model'
DEFAULT_SEED = 0
DEFAULT_NAME = 'ringserve-default'


def default_config() -> ModelConfig:
    """A small Llama-style model (about 5M parameters) that runs anywhere, randomly initialised.

    Its context limit is 1M tokens (2**20), with RoPE theta 5e7 (LWM's setting for 1M): model/rope.py
    keeps angles exact there, and the paged pool only spends memory on tokens actually held.
    It has tiny image (64 x 64 -> 16 tokens) and audio (10 s -> 100 tokens) encoders, about 1M
    parameters together, so media requests work end to end without downloads.
    """
    return ModelConfig(
        name='ringserve-default',
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        mlp_dim=768,
        mlp_activation='silu',
        norm_eps=1e-6,
        rope_theta=5e7,
        rope_scaling=None,
        tie_embeddings=True,
        logit_softcap=None,
        embed_scale=False,
        norm_offset=0.0,
        qkv_bias=False,
        max_context=1 << 20,
        dtype='float32',
        bos_id=1,
        eos_ids=(2,),
        vision=VisionConfig(),
        audio=AudioConfig(),
    )


def architecture() -> ModelConfig:
    """The default model's recipe: what `python -m train` trains from scratch (shipped default_config()
    equals it, with trained weights). About 2M decoder parameters plus the media encoders:

    - width 128, 4 layers alternating a local RoPE layer (a 32-key sliding window: word order and
      "what came just before me", which the copy heads need) and a global NoPE layer whose queries
      are scaled by log(p + 1) / log(256): no position to extrapolate, and attention that stays as
      sharp at 1M keys as at the 256 it was trained on (docs/model_card.md has the study);
    - 4 heads of 32 (no grouping: a kv head per query head), MLP 384, tied embeddings, fp32;
    - context limit 1M tokens (2**20); the local layers only ever see 32 positions, so RoPE's theta
      hardly matters and stays at 10,000;
    - tiny image (64 x 64 -> 16 tokens) and audio (10 s -> 100 tokens) encoders, random and frozen,
      so media requests work end to end without downloads.
    """
    local, glob = LayerKind(window=32), LayerKind(rope=False, log_scale=256)
    return ModelConfig(
        name=DEFAULT_NAME,
        vocab_size=8192,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        head_dim=32,
        mlp_dim=384,
        mlp_activation='silu',
        norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_embeddings=True,
        logit_softcap=None,
        embed_scale=False,
        norm_offset=0.0,
        qkv_bias=False,
        max_context=1 << 20,
        dtype='float32',
        bos_id=1,
        eos_ids=(2,),
        vision=VisionConfig(),
        audio=AudioConfig(),
        layer_kinds=(local, glob, local, glob),
    )


def bench_llama() -> ModelConfig:
    """A plain Llama of the first default model's shape (random weights): what bench/serving.py and
    bench/generate.py serve next to transformers' LlamaForCausalLM, which has no windowed or NoPE
    layers. Vocabulary 8192, width 256, 4 layers, 4 heads / 2 kv heads of 64, MLP 768, RoPE theta
    5e7, 1M-token context, fp32, no media encoders (about 5M parameters)."""
    return architecture().replace(name='ringserve-bench-llama', d_model=256, n_heads=4, n_kv_heads=2, head_dim=64,
                                  mlp_dim=768, rope_theta=5e7, layer_kinds=None, vision=None, audio=None)


def default_checkpoint_dir() -> Path:
    """$RINGSERVE_HOME/models/default if RINGSERVE_HOME is set, else <repo>/build/models/default."""
    home = os.environ.get('RINGSERVE_HOME')
    return Path(home) / 'models' / 'default' if home else REPO_ROOT / 'build' / 'models' / 'default'


def ensure_default_checkpoint(directory: str | Path | None = None) -> Path:
    """Make `directory` (default: default_checkpoint_dir()) hold the default checkpoint; return it.

    Nothing is rewritten when a checkpoint of the current default config is already there (one
    written for an older default config is replaced). A new one is the default config
    initialised with nnx.Rngs(DEFAULT_SEED), so every machine builds the same weights. Files are
    written beside the target and moved in, config last, so a reader never sees half a checkpoint.
    """
    directory = Path(directory) if directory is not None else default_checkpoint_dir()
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / checkpoint.CONFIG_FILE
    has_checkpoint = (config_file.is_file() and (directory / checkpoint.WEIGHTS_FILE).is_file()
                      and ModelConfig.from_json(config_file.read_text()) == default_config())
    has_tokenizer = (directory / TOKENIZER_FILE).is_file() or not DEFAULT_TOKENIZER.is_file()
    if has_checkpoint and has_tokenizer:
        return directory
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f'.{directory.name}-') as staging:
        staging = Path(staging)
        if not has_tokenizer:
            shutil.copyfile(DEFAULT_TOKENIZER, staging / TOKENIZER_FILE)
            os.replace(staging / TOKENIZER_FILE, directory / TOKENIZER_FILE)
        if not has_checkpoint:
            config = default_config()
            checkpoint.save(staging, config, Transformer(config, rngs=nnx.Rngs(DEFAULT_SEED)))
            os.replace(staging / checkpoint.WEIGHTS_FILE, directory / checkpoint.WEIGHTS_FILE)
            os.replace(staging / checkpoint.CONFIG_FILE, directory / checkpoint.CONFIG_FILE)
    return directory
