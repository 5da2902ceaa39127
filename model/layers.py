"""Building blocks: RMSNorm, RoPE, embedder, attention and MLP modules, the decoder block.

Parameters are stored in the config dtype; norms, RoPE rotation, attention softmax and logits are
computed in float32 and cast back. Weight layouts (einsum letters as in docs/design.md), chosen so
every projection is one plain [rows, D] x [D, cols] matmul (XLA:CPU runs those far faster than
head-batched einsums, see docs/benchmarks.md):
qkv_proj [D, (N + 2K) * H] (columns: the N query heads, then K key heads, then K value heads, each H
wide), qkv_bias [(N + 2K) * H], o_proj [N * H, D], gate_up [D, 2F] (gate columns, then up), down [F, D],
embedding table [V, D].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention
from model.config import ModelConfig
from model.kv_cache import KVCache


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
    return nnx.Param(_normal(rngs, shape, std).astype(dtype))


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return jax.random.normal(rngs.params(), shape, jnp.float32) * std


def _heads_to_columns(w: jax.Array) -> jax.Array:
    """[heads, D, H] -> [D, heads * H], column = head * H + h (Hugging Face's row order)."""
    heads, d, h = w.shape
    return w.transpose(1, 0, 2).reshape(d, heads * h)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF Llama convention). x: [B, T, N, H]; positions: i32[B, T]; inv_freq: f32[H/2].

    The one place angles are formed: long-context precision work (e.g. splitting positions) goes here.
    """
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale); offset 1.0 gives Gemma's (1 + w), whose scale starts at 0."""

    def __init__(self, dim: int, *, eps: float, offset: float, dtype):
        self.eps = eps
        self.offset = offset
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Embedder(nnx.Module):
    """Token table [V, D], used for lookup and (when tied) for the output projection."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        # std D**-0.25: tied logits then have std ~D**0.25, peaked but not one-hot for a random model.
        self.table = normal_param(rngs, (config.vocab_size, config.d_model), config.d_model**-0.25, config.jnp_dtype)
        self.scale = math.sqrt(config.d_model) if config.embed_scale else None

    def encode(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.table[...], tokens, axis=0)  # [B, T, D]
        if self.scale is not None:
            # Rounded to the activation dtype first, as Gemma's reference does.
            x = x * jnp.asarray(self.scale, jnp.float32).astype(x.dtype)
        return x


def unembed(x: jax.Array, table: jax.Array, softcap: float | None) -> jax.Array:
    """f32[B, T, V] logits from x: [B, T, D] and table: [V, D], optionally soft-capped."""
    logits = jnp.einsum('BTD,VD->BTV', x, table, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


class Attention(nnx.Module):
    """Fused q/k/v projection + RoPE + cache write + `attention.attend`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, dtype = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.jnp_dtype
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.scale = config.attn_scale
        # Drawn per head in [heads, D, H] (the order and shapes of earlier ringserve versions), so a
        # seed still gives the same model, then laid out as one matrix.
        heads = [_normal(rngs, (count, d, h), d**-0.5) for count in (n, k, k)]  # q, k, v
        self.qkv_proj = nnx.Param(jnp.concatenate([_heads_to_columns(w) for w in heads], axis=1).astype(dtype))
        self.o_proj = nnx.Param(_normal(rngs, (n, h, d), (n * h) ** -0.5).reshape(n * h, d).astype(dtype))  # [N*H, D]
        self.qkv_bias = nnx.Param(jnp.zeros(((n + 2 * k) * h,), dtype)) if config.qkv_bias else None

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # i32[B, T]
        inv_freq: jax.Array,  # f32[H/2]
        mask: jax.Array,  # bool[B or 1, T, S]
        cache: KVCache | None,
        layer: int,
        kv_span: int | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """With a cache, attends its first `kv_span` indices (all when None); `mask` is [.., T, kv_span]."""
        b, t, _ = x.shape
        n, kv_heads, h = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = x @ self.qkv_proj[...]  # [B, T, (N + 2K) * H]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...]
        qkv = qkv.reshape(b, t, n + 2 * kv_heads, h)
        qk = apply_rope(qkv[:, :, : n + kv_heads], positions, inv_freq)  # [B, T, N + K, H]
        q, k, v = qk[:, :, :n], qk[:, :, n:], qkv[:, :, n + kv_heads :]  # [B, T, N | K | K, H]
        if cache is not None:
            cache = cache.write(layer, positions, k, v)
            k, v = cache.read(layer, kv_span)  # [B, S, K, H]
        out = attention.attend(q, k, v, mask, self.scale)  # [B, T, N, H]
        return out.reshape(b, t, n * h) @ self.o_proj[...], cache


class MLP(nnx.Module):
    """Gated MLP: down(act(x @ gate) * (x @ up)); SwiGLU with silu, GeGLU with gelu_tanh."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dtype = config.d_model, config.mlp_dim, config.jnp_dtype
        self.activation = config.mlp_activation
        gate, up = _normal(rngs, (d, f), d**-0.5), _normal(rngs, (d, f), d**-0.5)
        self.gate_up = nnx.Param(jnp.concatenate([gate, up], axis=1).astype(dtype))  # [D, 2F]
        self.down = normal_param(rngs, (f, d), f**-0.5, dtype)  # [F, D]

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(x @ self.gate_up[...], 2, axis=-1)  # [B, T, F] each
        if self.activation == 'silu':
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=True)
        return (gate * up) @ self.down[...]


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.norm_eps, offset=config.norm_offset, dtype=config.jnp_dtype)
        self.attn_norm = RMSNorm(config.d_model, **norm)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, **norm)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask, cache, layer, kv_span=None):
        h, cache = self.attn(self.attn_norm(x), positions, inv_freq, mask, cache, layer, kv_span)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache
