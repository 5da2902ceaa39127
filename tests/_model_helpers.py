"""Tiny model configs and parameter utilities shared by the model tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import checkpoint
from model.config import ModelConfig
from model.transformer import Transformer


def tiny_config(**changes) -> ModelConfig:
    """A 2-layer GQA model small enough to compile in about a second."""
    base = dict(
        name='tiny', vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
        tie_embeddings=False, max_context=64, bos_id=1, eos_ids=(2,),
    )
    return ModelConfig(**{**base, **changes})


def params_numpy(model: nnx.Module) -> dict:
    """Nested dict of float64 numpy arrays, keyed like nnx.state(model)."""
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    return _map(pure, lambda a: np.asarray(a, np.float64))


def tiny_model(config: ModelConfig, seed: int) -> Transformer:
    """A model with random NumPy weights (all of them, norm scales and biases included).

    Filling an abstract model avoids compiling a random-init kernel per parameter shape, which
    dominates test time on small machines. The same seed gives the same values in any dtype.
    """
    rng = np.random.default_rng(seed)
    n, h, d, f = config.n_heads, config.head_dim, config.d_model, config.mlp_dim
    fan_in = {'qkv_proj': d, 'o_proj': n * h, 'gate_up': d, 'down': f, 'unembed': d, 'table': 4}
    specs = dict(checkpoint.param_specs(config))

    def fetch(name: str) -> np.ndarray:
        leaf = name.rsplit('.', 1)[-1]
        shape = specs[name].shape
        if leaf == 'scale':
            values = (1.0 - config.norm_offset) + rng.normal(0.0, 0.3, shape)
        elif leaf.endswith('_bias'):
            values = rng.normal(0.0, 0.3, shape)
        else:
            values = rng.normal(0.0, fan_in[leaf] ** -0.5, shape)
        return values.astype(np.float32)

    return checkpoint.from_params(config, fetch)


def _map(tree, fn):
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def jitted(model: nnx.Module):
    """model's __call__ under one jax.jit (tests run faster than op-by-op eager dispatch)."""
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, tokens, positions, cache: nnx.merge(graphdef, state)(tokens, positions, cache))
    return lambda tokens, positions, cache=None: step(state, jnp.asarray(tokens), jnp.asarray(positions), cache)
