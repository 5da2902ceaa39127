"""Attention math as pure functions: masks and dense grouped-query attention.

Paged and ring variants will live beside `attend` with the same (q, k, v, mask) contract.
Besides the shared alphabet (B T S N K H), R names the query heads that share one kv head
(N = K * R), so GQA never materialises repeated keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row softmaxes to uniform weights rather than NaN; far below any real score.
MASK_VALUE = -1e30


def causal_mask(length: int) -> jax.Array:
    """bool[1, T, T]: query t sees keys 0..t. Used without a cache, where index = order in the batch."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None]


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """bool[B, T, S]: the query at absolute position p sees cache indices s <= p.

    Built from indices, never from a stored length, so stale or padded entries beyond p are invisible.
    """
    s = jnp.arange(cache_len)
    return s[None, None, :] <= positions[:, :, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention with fp32 scores and softmax.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool[B or 1, T, S]; returns [B, T, N, H] in q's dtype.
    `scale` (1/sqrt(H)) is applied here and nowhere else.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, R, H]
    scores = jnp.einsum('BTKRH,BSKH->BKRTS', q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)  # [B, K, R, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('BKRTS,BSKH->BTKRH', probs, v)  # [B, T, K, R, H]
    return out.reshape(b, t, n, h).astype(q.dtype)
