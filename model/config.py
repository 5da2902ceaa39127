"""Model configuration: one frozen dataclass that every other model/ file reads.

Axis alphabet (see docs/design.md): B batch, T query length, S key length, N query heads,
K kv heads, H head dim, D model dim, F MLP hidden, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

MLP_ACTIVATIONS = ('silu', 'gelu_tanh')
DTYPES = ('float32', 'bfloat16')
ROPE_KINDS = ('linear', 'llama3')

# Hugging Face `hidden_act` names -> ours. Gemma's legacy "gelu" means the tanh approximation.
_HF_ACTIVATIONS = {
    'silu': 'silu',
    'swish': 'silu',
    'gelu_pytorch_tanh': 'gelu_tanh',
    'gelu_tanh': 'gelu_tanh',
    'gelu_new': 'gelu_tanh',
}
HF_MODEL_TYPES = ('llama', 'qwen2', 'gemma')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Context extension applied to RoPE inverse frequencies (as transformers does).

    kind 'linear': every inverse frequency divided by `factor`.
    kind 'llama3': low frequencies divided by `factor`, high ones kept, a smooth blend between,
    with the band edges set by `original_max_position_embeddings / {low,high}_freq_factor`.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f'RopeScaling.kind={self.kind!r}: use one of {ROPE_KINDS} (or rope_scaling=None).')
        if not self.factor > 0:
            raise ValueError(f'RopeScaling.factor={self.factor}: must be > 0 (1.0 means no scaling).')
        if self.kind == 'llama3':
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    f'llama3 RopeScaling needs high_freq_factor > low_freq_factor > 0, got '
                    f'{self.high_freq_factor} and {self.low_freq_factor}.'
                )
            if self.original_max_position_embeddings <= 0:
                raise ValueError('llama3 RopeScaling.original_max_position_embeddings must be a positive int.')

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (Llama / Qwen2 / Gemma family)."""

    name: str
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    mlp_activation: str = 'silu'
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    embed_scale: bool = False  # Gemma multiplies token embeddings by sqrt(D).
    norm_offset: float = 0.0  # 1.0 for Gemma's RMSNorm, which scales by (1 + w).
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v (not on o).
    max_context: int = 8192
    dtype: str = 'float32'
    bos_id: int = 1
    eos_ids: tuple[int, ...] = (2,)

    def __post_init__(self):
        # JSON gives lists and dicts; normalise so equality and hashing behave.
        if isinstance(self.eos_ids, int):
            object.__setattr__(self, 'eos_ids', (self.eos_ids,))
        else:
            object.__setattr__(self, 'eos_ids', tuple(int(i) for i in self.eos_ids))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, 'rope_scaling', RopeScaling(**self.rope_scaling))
        for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
                      'max_context'):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f'ModelConfig.{field}={value!r}: must be a positive int.')
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f'n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: '
                'each kv head must serve the same number of query heads (GQA).'
            )
        if self.head_dim % 2:
            raise ValueError(f'head_dim={self.head_dim}: RoPE rotates pairs, so head_dim must be even.')
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f'mlp_activation={self.mlp_activation!r}: use one of {MLP_ACTIVATIONS}.')
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype={self.dtype!r}: use one of {DTYPES}.')
        if not self.norm_eps > 0:
            raise ValueError(f'norm_eps={self.norm_eps}: must be > 0.')
        if not self.rope_theta > 0:
            raise ValueError(f'rope_theta={self.rope_theta}: must be > 0.')
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f'logit_softcap={self.logit_softcap}: use None for no capping, or a value > 0.')
        if self.norm_offset not in (0.0, 1.0):
            raise ValueError(f'norm_offset={self.norm_offset}: use 0.0 (Llama RMSNorm) or 1.0 (Gemma (1+w)).')
        if not 0 <= self.bos_id < self.vocab_size:
            raise ValueError(f'bos_id={self.bos_id} is outside the vocabulary [0, {self.vocab_size}).')
        if not self.eos_ids:
            raise ValueError('eos_ids is empty: give at least one end-of-sequence id.')
        for i in self.eos_ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f'eos id {i} is outside the vocabulary [0, {self.vocab_size}).')

    # Derived values.
    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one kv head (N // K)."""
        return self.n_heads // self.n_kv_heads

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def rope_inv_freq(self) -> np.ndarray:
        """f32[H // 2] inverse frequencies, computed in float32 exactly as transformers does."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['eos_ids'] = list(self.eos_ids)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f'Unknown ModelConfig fields {sorted(unknown)}; known fields are {sorted(known)}.')
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, dtype: str = 'float32') -> ModelConfig:
        """Translate a Hugging Face `config.json` dict (llama, qwen2 or gemma)."""
        model_type = hf.get('model_type')
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f'Unsupported Hugging Face model_type {model_type!r}; supported: {HF_MODEL_TYPES}.')
        d_model = hf['hidden_size']
        n_heads = hf['num_attention_heads']
        head_dim = hf.get('head_dim') or d_model // n_heads
        gemma = model_type == 'gemma'
        act_name = hf.get('hidden_activation') or hf.get('hidden_act') or ('gelu_pytorch_tanh' if gemma else 'silu')
        if gemma and act_name == 'gelu':
            act_name = 'gelu_pytorch_tanh'  # transformers does the same for legacy Gemma configs
        if act_name not in _HF_ACTIVATIONS:
            raise ValueError(f'Unsupported hidden_act {act_name!r}; supported: {sorted(_HF_ACTIVATIONS)}.')
        if hf.get('mlp_bias'):
            raise ValueError('mlp_bias=True is not supported (ringserve MLPs have no biases).')
        if model_type != 'qwen2' and hf.get('attention_bias'):
            raise ValueError(f'attention_bias=True {model_type} models are not supported (o_proj would need a bias).')
        theta, scaling = _hf_rope(hf)
        eos = hf.get('eos_token_id')
        eos_ids = (2,) if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        bos = hf.get('bos_token_id')
        return cls(
            name=hf.get('_name_or_path') or model_type,
            vocab_size=hf['vocab_size'],
            d_model=d_model,
            n_layers=hf['num_hidden_layers'],
            n_heads=n_heads,
            n_kv_heads=hf.get('num_key_value_heads') or n_heads,
            head_dim=head_dim,
            mlp_dim=hf['intermediate_size'],
            mlp_activation=_HF_ACTIVATIONS[act_name],
            norm_eps=hf.get('rms_norm_eps', 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=hf.get('tie_word_embeddings', gemma),
            logit_softcap=hf.get('final_logit_softcapping'),
            embed_scale=gemma,
            norm_offset=1.0 if gemma else 0.0,
            qkv_bias=model_type == 'qwen2',
            max_context=hf.get('max_position_embeddings', 8192),
            dtype=dtype,
            bos_id=1 if bos is None else bos,
            eos_ids=eos_ids,
        )


def _hf_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from either transformers 5 `rope_parameters` or the older keys."""
    params = dict(hf.get('rope_parameters') or {})
    old = hf.get('rope_scaling') or {}
    merged = {**old, **params}
    theta = float(merged.get('rope_theta', hf.get('rope_theta', 10000.0)))
    kind = merged.get('rope_type', merged.get('type', 'default'))
    if kind in (None, 'default'):
        return theta, None
    if merged.get('partial_rotary_factor', 1.0) != 1.0:
        raise ValueError('partial_rotary_factor != 1 is not supported.')
    if kind == 'linear':
        return theta, RopeScaling('linear', float(merged['factor']))
    if kind == 'llama3':
        return theta, RopeScaling(
            'llama3',
            float(merged['factor']),
            low_freq_factor=float(merged['low_freq_factor']),
            high_freq_factor=float(merged['high_freq_factor']),
            original_max_position_embeddings=int(merged['original_max_position_embeddings']),
        )
    raise ValueError(f'Unsupported rope type {kind!r}; supported: default, {ROPE_KINDS}.')


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """f32[H // 2]: transformers' `_compute_{default,linear_scaling,llama3}_rope_parameters`, in float32."""
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
    inv_freq = (f32(1.0) / (f32(theta) ** exponents)).astype(f32)
    if scaling is None:
        return inv_freq
    factor = f32(scaling.factor)
    if scaling.kind == 'linear':
        return (inv_freq / factor).astype(f32)
    old_len = f32(scaling.original_max_position_embeddings)
    low, high = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(f32)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)
