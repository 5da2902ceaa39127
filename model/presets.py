"""The embedded default model the server starts with (model/assets/default/), its recipe, and where it is installed."""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from pathlib import Path

from model import checkpoint
from model.config import AudioConfig, LayerKind, ModelConfig, VisionConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# The default tokenizer (8192 pieces); its vocabulary size must equal default_config().vocab_size.
DEFAULT_TOKENIZER = REPO_ROOT / 'preprocess' / 'assets' / 'ringserve.model'
TOKENIZER_FILE = 'tokenizer.model'
DEFAULT_SEED = 0
DEFAULT_NAME = 'ringserve-default'
# The shipped default model: trained weights stored as bfloat16, config in float32 (cast on load).
SHIPPED_DEFAULT = REPO_ROOT / 'model' / 'assets' / 'default'


def default_config() -> ModelConfig:
    """The embedded default model's configuration, read from its shipped checkpoint
    (model/assets/default/, written by scripts/ship_default_model.py from a `python -m train` run).

    docs/model_card.md says what it is: a small decoder trained on synthetic needle-in-a-haystack
    tasks, local RoPE layers and global NoPE layers with a log-length scale, 1M-token context, and
    the tiny image and audio encoders, trained to find a shown or spoken needle word.
    """
    return ModelConfig.from_json((SHIPPED_DEFAULT / checkpoint.CONFIG_FILE).read_text())


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
    - tiny image (64 x 64 -> 16 tokens) and audio (10 tokens a second) encoders, trained on the
      video and spoken needles (docs/training.md), so media requests work end to end without downloads.
      Audio windows overlap: each 10 s window hands on the 80 rows of its middle 8 s and hears 1 s
      either side (context_frames=100), so a word cut by an 8 s edge is heard whole by one window.
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
        audio=AudioConfig(context_frames=100),
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
    """Make `directory` (default: default_checkpoint_dir()) hold the shipped default model and the
    default tokenizer; return it.

    Nothing is rewritten when the files there already equal the shipped ones (a checkpoint left by
    an older default is replaced). Files are written beside the target and moved in, config last,
    so a reader never sees half a checkpoint.
    """
    directory = Path(directory) if directory is not None else default_checkpoint_dir()
    directory.mkdir(parents=True, exist_ok=True)
    wanted = [(SHIPPED_DEFAULT / checkpoint.WEIGHTS_FILE, checkpoint.WEIGHTS_FILE),
              (DEFAULT_TOKENIZER, TOKENIZER_FILE),
              (SHIPPED_DEFAULT / checkpoint.CONFIG_FILE, checkpoint.CONFIG_FILE)]  # config last
    stale = [(source, name) for source, name in wanted if not _same_file(source, directory / name)]
    if not stale:
        return directory
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f'.{directory.name}-') as staging:
        for source, name in stale:
            shutil.copyfile(source, Path(staging) / name)
            os.replace(Path(staging) / name, directory / name)
    return directory


def _same_file(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
