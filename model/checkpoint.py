"""Checkpoint IO: Hugging Face Llama / Qwen2 / Gemma directories and ringserve's own format.

ringserve's format is a directory with `ringserve_config.json` (ModelConfig.to_json) and
`model.safetensors` whose tensor names are the model's parameter paths joined by dots
('embedder.table', 'layers.0.attn.q_proj', ...), stored in the layouts of model/layers.py.

Loading builds an abstract model (shapes only, no random init) and fills it one tensor at a time,
so at most one tensor exists twice (host copy and device copy) at any moment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from model.config import HF_MODEL_TYPES, ModelConfig
from model.transformer import Transformer

CONFIG_FILE = 'ringserve_config.json'
WEIGHTS_FILE = 'model.safetensors'
HF_CONFIG_FILE = 'config.json'

# HF torch_dtype -> ours. float16 weights are widened to float32 (exact) rather than narrowed to bfloat16.
_HF_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float32'}

Fetch = Callable[[str], np.ndarray]


def load(path: str | Path, dtype: str | None = None) -> tuple[ModelConfig, Transformer]:
    """Load a ringserve checkpoint or a Hugging Face directory; `dtype` overrides the stored one."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        config = ModelConfig.from_json((path / CONFIG_FILE).read_text())
        if dtype is not None:
            config = config.replace(dtype=dtype)
        with _TensorFiles([path / WEIGHTS_FILE]) as files:
            return config, from_params(config, files.get)
    if (path / HF_CONFIG_FILE).is_file():
        return _load_hf(path, dtype)
    raise ValueError(
        f'{path} is not a checkpoint directory: expected {CONFIG_FILE} + {WEIGHTS_FILE} (ringserve) '
        f'or {HF_CONFIG_FILE} + *.safetensors (Hugging Face {"/".join(HF_MODEL_TYPES)}).'
    )


def save(path: str | Path, config: ModelConfig, model: Transformer) -> Path:
    """Write ringserve's format into directory `path` (created if needed); returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # safetensors writes from one dict, so the host copy of all weights exists while saving.
    tensors = {name: np.asarray(value) for name, value in _flatten(nnx.state(model, nnx.Param).to_pure_dict())}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={'format': 'ringserve'})
    # Config last: its presence marks a complete checkpoint.
    (path / CONFIG_FILE).write_text(config.to_json() + '\n')
    return path


def from_params(config: ModelConfig, fetch: Fetch) -> Transformer:
    """A Transformer whose parameters come from `fetch(name)`, called once per ringserve name.

    Each array is checked for shape, cast to the config dtype and released before the next fetch.
    """
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = state.to_pure_dict()
    for name, spec in list(_flatten(pure)):
        array = fetch(name)
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(f'Tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(spec.shape)}.')
        _set(pure, name, jnp.asarray(array, dtype=spec.dtype))
        del array
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)


def param_specs(config: ModelConfig) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    """(ringserve tensor name, shape and dtype) for every parameter of `config`, in a stable order."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return list(_flatten(nnx.state(abstract, nnx.Param).to_pure_dict()))


# ------------------------------------------------------------------------------------------------
# Hugging Face.
# ------------------------------------------------------------------------------------------------
def _load_hf(path: Path, dtype: str | None) -> tuple[ModelConfig, Transformer]:
    hf = json.loads((path / HF_CONFIG_FILE).read_text())
    if hf.get('model_type') not in HF_MODEL_TYPES:
        raise ValueError(
            f'{path / HF_CONFIG_FILE}: model_type {hf.get("model_type")!r} is not supported; '
            f'supported: {", ".join(HF_MODEL_TYPES)}.'
        )
    if dtype is None:
        dtype = _HF_DTYPES.get(str(hf.get('torch_dtype') or hf.get('dtype') or 'float32'), 'float32')
    config = ModelConfig.from_hf_config(hf, dtype=dtype)
    files = sorted(path.glob('*.safetensors'))
    if not files:
        raise ValueError(f'{path} has {HF_CONFIG_FILE} but no *.safetensors weights (.bin is not supported).')
    with _TensorFiles(files) as tensors:
        prefix = 'model.' if 'model.embed_tokens.weight' in tensors.names else ''
        sources = _hf_sources(config, prefix)
        missing = sorted(hf_name for hf_name, _ in sources.values() if hf_name not in tensors.names)
        if missing:
            raise ValueError(f'{path} lacks tensors {missing} needed by {hf["model_type"]} config.')

        def fetch(name: str) -> np.ndarray:
            hf_name, convert = sources[name]
            return convert(tensors.get(hf_name))

        return config, from_params(config, fetch)


def _hf_sources(config: ModelConfig, prefix: str) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """ringserve name -> (HF tensor name, conversion). torch Linear weights are [out, in]."""
    n, k, h, d = config.n_heads, config.n_kv_heads, config.head_dim, config.d_model

    def heads_in(count):  # [count * H, D] -> [count, D, H]
        return lambda w: w.reshape(count, h, d).transpose(0, 2, 1)

    def bias(count):  # [count * H] -> [count, H]
        return lambda b: b.reshape(count, h)

    def same(w):
        return w

    def transpose(w):
        return w.T

    sources = {
        'embedder.table': (f'{prefix}embed_tokens.weight', same),
        'final_norm.scale': (f'{prefix}norm.weight', same),
    }
    if not config.tie_embeddings:
        sources['unembed'] = ('lm_head.weight', same)
    for i in range(config.n_layers):
        hf, ours = f'{prefix}layers.{i}.', f'layers.{i}.'
        sources.update({
            f'{ours}attn_norm.scale': (f'{hf}input_layernorm.weight', same),
            f'{ours}mlp_norm.scale': (f'{hf}post_attention_layernorm.weight', same),
            f'{ours}attn.q_proj': (f'{hf}self_attn.q_proj.weight', heads_in(n)),
            f'{ours}attn.k_proj': (f'{hf}self_attn.k_proj.weight', heads_in(k)),
            f'{ours}attn.v_proj': (f'{hf}self_attn.v_proj.weight', heads_in(k)),
            # [D, N * H] -> [N, H, D]
            f'{ours}attn.o_proj': (f'{hf}self_attn.o_proj.weight', lambda w: w.reshape(d, n, h).transpose(1, 2, 0)),
            f'{ours}mlp.gate': (f'{hf}mlp.gate_proj.weight', transpose),
            f'{ours}mlp.up': (f'{hf}mlp.up_proj.weight', transpose),
            f'{ours}mlp.down': (f'{hf}mlp.down_proj.weight', transpose),
        })
        if config.qkv_bias:
            sources.update({
                f'{ours}attn.q_bias': (f'{hf}self_attn.q_proj.bias', bias(n)),
                f'{ours}attn.k_bias': (f'{hf}self_attn.k_proj.bias', bias(k)),
                f'{ours}attn.v_bias': (f'{hf}self_attn.v_proj.bias', bias(k)),
            })
    expected = {name for name, _ in param_specs(config)}
    assert set(sources) == expected, sorted(set(sources) ^ expected)  # the mapping covers every parameter
    return sources


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------
class _TensorFiles:
    """Name -> tensor across one or more safetensors files, read one tensor at a time as numpy."""

    def __init__(self, files: list[Path]):
        self._paths = files
        self._handles = []
        self._where: dict[str, int] = {}

    def __enter__(self) -> _TensorFiles:
        for index, file in enumerate(self._paths):
            if not file.is_file():
                raise ValueError(f'Missing weights file {file}.')
            handle = safe_open(str(file), framework='np')
            self._handles.append(handle)
            for name in handle.keys():
                self._where[name] = index
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()

    @property
    def names(self) -> dict[str, int]:
        """Tensor name -> index of the file holding it (a dict, so `in` is O(1))."""
        return self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ValueError(f'Tensor {name!r} is missing from {[str(p) for p in self._paths]}.')
        return self._handles[self._where[name]].get_tensor(name)


def _flatten(tree: dict, prefix: str = '') -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            yield from _flatten(value, name + '.')
        else:
            yield name, value


def _set(tree: dict, name: str, value: jax.Array) -> None:
    *parents, leaf = name.split('.')
    for part in parents:
        tree = tree[int(part) if part.isdigit() and int(part) in tree else part]
    tree[int(leaf) if leaf.isdigit() and int(leaf) in tree else leaf] = value
