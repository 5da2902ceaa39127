"""Attention math as pure functions: masks and dense grouped-query attention.

Paged and ring variants will live beside `attend` with the same (q, k, v, mask) contract.
Besides the shared alphabet (B T S N K H), R names the query heads that share one kv head
(N = K * R), so GQA never materialises repeated keys.

Performance notes (XLA:CPU, measured in docs/benchmarks.md): 5-D einsums such as
'BTKRH,BSKH->BKRTS' lower to many tiny batched dots. `attend` therefore puts the batch axes first
and folds the R query heads of a kv head into the query axis ([B, K, R*T, H] against [B, K, S, H]),
and a single-token query (decode) skips the dot entirely: a broadcast multiply and a reduction over
H, which XLA fuses into one pass over the keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row softmaxes to uniform weights rather than NaN; far below any real score.
MASK_VALUE = -1e30


def visible(key_pos: jax.Array, query_pos: jax.Array, window: int | None, key_span: jax.Array | None = None,
            query_span: jax.Array | None = None) -> jax.Array:
    """Whether a key at `key_pos` is visible to a query at `query_pos` (broadcast together):
    key <= query, and key > query - window for a sliding-window layer. Every attention path
    (dense, paged, sharded, ring) masks with this one rule.

    Spans (optional, ints broadcast like the positions; 0 = text): a key in the query's own nonzero
    span is visible even when it comes later, so one image's tokens see each other both ways. The
    window still bounds it, as transformers' Gemma 3 masks do: window AND (causal OR same span)."""
    ok = key_pos <= query_pos
    if query_span is not None:
        ok |= (key_span == query_span) & (query_span > 0)
    if window is not None:
        ok &= key_pos > query_pos - window
    return ok


def causal_mask(length: int, window: int | None = None, spans: jax.Array | None = None) -> jax.Array:
    """bool[1, T, T] (bool[B, T, T] with spans i32[B, T]): query t sees keys 0..t (t - window + 1..t
    with a window), and the keys of its own span. Used without a cache, where index = order in the
    batch."""
    idx = jnp.arange(length)
    if spans is None:
        return visible(idx[None, :], idx[:, None], window)[None]
    return visible(idx[None, None, :], idx[None, :, None], window, spans[:, None, :], spans[:, :, None])


def cache_mask(positions: jax.Array, cache_len: int, window: int | None = None,
               spans: jax.Array | None = None) -> jax.Array:
    """bool[B, T, S]: the query at absolute position p sees cache indices s <= p (and s > p - window).

    Built from indices, never from a stored length, so stale or padded entries beyond p are invisible.
    spans (optional, i32[B, T], 0 = text) are the spans of the T tokens just written at `positions`;
    a query also sees those of its own span. Earlier entries count as text, so a span must lie
    wholly inside these T tokens.
    """
    s = jnp.arange(cache_len)
    if spans is None:
        return visible(s[None, None, :], positions[:, :, None], window)
    rows = jnp.arange(positions.shape[0])[:, None]
    at = jnp.where(positions >= 0, positions, cache_len)  # padding (-1) dropped, not wrapped to the end
    key_span = jnp.zeros((positions.shape[0], cache_len), jnp.int32).at[rows, at].set(spans, mode='drop')
    return visible(s[None, None, :], positions[:, :, None], window, key_span[:, None, :], spans[:, :, None])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention with fp32 scores and softmax.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool[B or 1, T, S]; returns [B, T, N, H] in q's dtype.
    `scale` (1/sqrt(H)) is applied here and nowhere else.
    """
    if q.shape[1] == 1:
        return _attend_one(q, k, v, mask, scale)
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    r = n // kv_heads
    q = q.reshape(b, t, kv_heads, r, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, r * t, h)  # [B, K, R*T, H]
    k = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    v = v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    scores = jnp.einsum('BKQH,BKSH->BKQS', q, k, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, kv_heads, r, t, s)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)  # [B, K, R, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, r * t, s)
    out = jnp.einsum('BKQS,BKSH->BKQH', probs, v)  # [B, K, R*T, H]
    out = out.reshape(b, kv_heads, r, t, h).transpose(0, 3, 1, 2, 4)  # [B, T, K, R, H]
    return out.reshape(b, t, n, h).astype(q.dtype)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """`attend` for T = 1, all in fp32: multiply-and-reduce instead of dots with one query row."""
    b, _, n, h = q.shape
    kv_heads = k.shape[2]
    qf = q.reshape(b, 1, kv_heads, n // kv_heads, h).astype(jnp.float32)  # [B, 1, K, R, H]
    scores = jnp.sum(qf * k[:, :, :, None, :].astype(jnp.float32), axis=-1) * scale  # [B, S, K, R]
    scores = jnp.where(mask[:, 0, :, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=1)  # over S
    out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)  # [B, K, R, H]
    return out.reshape(b, 1, n, h).astype(q.dtype)
