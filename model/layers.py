"""Building blocks: RMSNorm, RoPE, embedder, attention and MLP modules, the decoder block.

Parameters are stored in the config dtype; norms, RoPE rotation, attention softmax and logits are
computed in float32 and cast back. Weight layouts (einsum letters as in docs/design.md, R = N / K
query heads per kv head), chosen so every projection is one plain [rows, D] x [D, cols] matmul (XLA:CPU
runs those far faster than head-batched einsums, see docs/benchmarks.md) and so that tensor
parallelism splits one axis of each (the kv heads, the MLP hidden axis) without moving columns:
qkv_proj [D, K, R + 2, H] (for kv head k: its R query heads, then its key, then its value; query head
n = k * R + r, Hugging Face's grouping), qkv_bias [K, R + 2, H], o_proj [N * H, D], gate_up [D, 2, F]
(gate, then up), down [F, D], embedding table [V, D]; norm scales [D], or [H] for the per-head
query and key norms (q_norm, k_norm).

Every parameter names its logical axes (`axes=` metadata); model/sharding.py maps them to the mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import numpy as np

from model import attention
from model import rope as rope_lib
from model.config import GLOBAL_ROPE, LayerKind, ModelConfig


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype, axes: tuple) -> nnx.Param:
    return nnx.Param(_normal(rngs, shape, std).astype(dtype), axes=axes)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return jax.random.normal(rngs.params(), shape, jnp.float32) * std


def group_qkv(q, k, v, kv_heads: int):
    """Per-projection columns q [..., N * H], k and v [..., K * H] -> [..., K, R + 2, H] (our layout).

    Works for weights ([D, cols]) and biases ([cols]), numpy or jax.
    """
    xp = jnp if isinstance(q, jax.Array) else np
    lead, h = q.shape[:-1], k.shape[-1] // kv_heads
    q = q.reshape(*lead, kv_heads, -1, h)  # [..., K, R, H]: query head n = k * R + r
    k = k.reshape(*lead, kv_heads, 1, h)
    v = v.reshape(*lead, kv_heads, 1, h)
    return xp.concatenate([q, k, v], axis=-2)


def apply_rope(x: jax.Array, positions: jax.Array, rope: rope_lib.RopeTables | rope_lib.MRopeTables) -> jax.Array:
    """Rotate-half RoPE (HF Llama convention). x: [B, T, N, H]; positions: i32[B, T], or i32[3, B, T]
    with MRopeTables.

    Angles come from `rope` (model/rope.py), exact for positions up to millions.
    """
    cos, sin = rope.cos_sin(positions)  # f32[B, T, H/2] each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale); offset 1.0 gives Gemma's (1 + w), whose scale starts at 0."""

    def __init__(self, dim: int, *, eps: float, offset: float, dtype, axes: tuple[str, ...] = ('embed',)):
        self.eps = eps
        self.offset = offset
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype), axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Embedder(nnx.Module):
    """Token table [V, D], used for lookup and (when tied) for the output projection."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        # std D**-0.25: tied logits then have std ~D**0.25, peaked but not one-hot for a random model.
        self.table = normal_param(rngs, (config.vocab_size, config.d_model), config.d_model**-0.25,
                                  config.jnp_dtype, axes=('vocab', 'embed'))
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


def log_length_scale(positions: jax.Array, base: int) -> jax.Array:
    """f32[B, T, 1, 1]: log(p + 1) / log(base) for queries at positions p (0 for padding, p < 0)."""
    p = jnp.maximum(positions, 0).astype(jnp.float32)
    return (jnp.log1p(p) / math.log(base))[:, :, None, None]


class Attention(nnx.Module):
    """Fused q/k/v projection + (with config.qk_norm) per-head query and key RMSNorm + RoPE + cache
    write + `attention.attend`, as the layer's `LayerKind` says: RoPE (the model's or the local
    settings) or none (NoPE), a sliding window or global, a log-length query scale or none. Which
    RoPE tables a layer gets is the caller's choice (Transformer, from `config.rope_inv_freq(kind)`)."""

    def __init__(self, config: ModelConfig, kind: LayerKind = GLOBAL_ROPE, *, rngs: nnx.Rngs):
        d, n, k, h, dtype = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.jnp_dtype
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.scale = config.attn_scale
        self.window, self.rope, self.log_scale = kind.window, kind.rope, kind.log_scale
        if config.qk_norm:
            norm = dict(eps=config.norm_eps, offset=config.norm_offset, dtype=dtype, axes=('head_dim',))
            self.q_norm, self.k_norm = RMSNorm(h, **norm), RMSNorm(h, **norm)
        else:
            self.q_norm = self.k_norm = None
        # Drawn per head in [heads, D, H] (the order and shapes of earlier ringserve versions), so a
        # seed still gives the same model, then laid out as one matrix.
        q, k_, v = (_normal(rngs, (count, d, h), d**-0.5).transpose(1, 0, 2).reshape(d, count * h)
                    for count in (n, k, k))
        self.qkv_proj = nnx.Param(group_qkv(q, k_, v, k).astype(dtype),
                                  axes=('embed', 'kv_heads', 'qkv', 'head_dim'))  # [D, K, R+2, H]
        self.o_proj = nnx.Param(_normal(rngs, (n, h, d), (n * h) ** -0.5).reshape(n * h, d).astype(dtype),
                                axes=('heads', 'embed'))  # [N*H, D]
        self.qkv_bias = (nnx.Param(jnp.zeros((k, n // k + 2, h), dtype), axes=('kv_heads', 'qkv', 'head_dim'))
                         if config.qkv_bias else None)

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # i32[B, T]
        rope: rope_lib.RopeTables,
        cache,  # KVCache | PagedKVCache | a sharded cache | None; see `attend` below
        layer: int,
        kv_span: int | None = None,
        spans: jax.Array | None = None,  # i32[B, T]
        rope_positions: jax.Array | None = None,  # i32[3, B, T] for M-RoPE (rope is then MRopeTables)
    ):
        """Without a cache, causal attention over the T tokens; with one, `cache.attend` writes the
        new K/V and attends (dense, paged or sharded: the cache decides). `spans` (0 = text): each
        query also sees the tokens of its own nonzero span (`attention.visible`). `positions` place
        tokens in the cache and in masks; RoPE turns by `rope_positions` when given, else by
        `positions`."""
        b, t, _ = x.shape
        n, kv_heads, h = self.n_heads, self.n_kv_heads, self.head_dim
        w = self.qkv_proj[...]
        qkv = x @ w.reshape(w.shape[0], -1)  # [B, T, K * (R + 2) * H]
        qkv = qkv.reshape(b, t, kv_heads, n // kv_heads + 2, h)  # [B, T, K, R + 2, H]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...]
        q = qkv[:, :, :, :-2].reshape(b, t, n, h)  # [B, T, N, H]
        k = qkv[:, :, :, -2]  # [B, T, K, H]
        v = qkv[:, :, :, -1]  # [B, T, K, H]
        if self.q_norm is not None:  # Gemma 3 bounds attention logits so (Gemma 2 soft-capped them)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            turn = positions if rope_positions is None else rope_positions
            q, k = apply_rope(q, turn, rope), apply_rope(k, turn, rope)
        if self.log_scale is not None:
            q = (q.astype(jnp.float32) * log_length_scale(positions, self.log_scale)).astype(q.dtype)
        if cache is None:
            out = attention.attend(q, k, v, attention.causal_mask(t, self.window, spans), self.scale)
        else:
            # Caches that never see spans need not know the keyword.
            span_arg = {} if spans is None else dict(spans=spans)
            out, cache = cache.attend(layer, q, k, v, positions, self.scale, kv_span, window=self.window,
                                      **span_arg)  # [B, T, N, H]
        return out.reshape(b, t, n * h) @ self.o_proj[...], cache


class MLP(nnx.Module):
    """Gated MLP: down(act(x @ gate) * (x @ up)); SwiGLU with silu, GeGLU with gelu_tanh."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dtype = config.d_model, config.mlp_dim, config.jnp_dtype
        self.activation = config.mlp_activation
        gate, up = _normal(rngs, (d, f), d**-0.5), _normal(rngs, (d, f), d**-0.5)
        self.gate_up = nnx.Param(jnp.stack([gate, up], axis=1).astype(dtype),
                                 axes=('embed', 'gate_up', 'mlp'))  # [D, 2, F]
        self.down = normal_param(rngs, (f, d), f**-0.5, dtype, axes=('mlp', 'embed'))  # [F, D]

    def __call__(self, x: jax.Array) -> jax.Array:
        # One matmul with two output axes; F stays whole per tensor shard (no column shuffle).
        gate_up = jnp.einsum('BTD,DCF->BTCF', x, self.gate_up[...])  # [B, T, 2, F]
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]  # [B, T, F] each
        if self.activation == 'silu':
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=True)
        return (gate * up) @ self.down[...]


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)). With config.post_norms
    (Gemma 2 / 3's "sandwich"), each branch's output is normed too before it is added:
    x + post_norm(attn(norm(x))), then x + post_norm(mlp(norm(x)))."""

    def __init__(self, config: ModelConfig, kind: LayerKind = GLOBAL_ROPE, *, rngs: nnx.Rngs):
        norm = dict(eps=config.norm_eps, offset=config.norm_offset, dtype=config.jnp_dtype)
        self.attn_norm = RMSNorm(config.d_model, **norm)
        self.attn = Attention(config, kind, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, **norm)
        self.mlp = MLP(config, rngs=rngs)
        # Norms draw no random numbers, so a seed gives the other weights their old values.
        if config.post_norms:
            self.attn_post_norm, self.mlp_post_norm = RMSNorm(config.d_model, **norm), RMSNorm(config.d_model, **norm)
        else:
            self.attn_post_norm = self.mlp_post_norm = None

    def __call__(self, x, positions, rope, cache, layer, kv_span=None, spans=None, rope_positions=None):
        h, cache = self.attn(self.attn_norm(x), positions, rope, cache, layer, kv_span, spans,
                             rope_positions)  # [B, T, D]
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))  # [B, T, D]
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        x = x + h
        return x, cache
