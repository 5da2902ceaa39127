"""Ring attention: exact causal attention over a sequence split across the devices of a mesh axis.

Each device keeps its block of queries; the K/V blocks travel once around the ring with
`lax.ppermute`, and each device folds every visiting block into an online softmax (running max m,
denominator l, accumulator o, all fp32): no device ever holds the whole sequence's K/V, and no
[T, T] score matrix exists, only [T/S, T/S] blocks. Masking comes from explicit global positions
that travel with the keys, so any assignment of tokens to devices works; the engine stripes tokens
by page (page j of a sequence on device j % S, model/sharded_cache.py), which balances causal work
across devices (Striped Attention, arXiv 2311.09431) and means each device computes exactly the
tokens whose K/V it stores. A visiting block with no key visible to any local query (all in the
future, all before every local query's sliding window, or padding) is skipped with `lax.cond`, and
the last rotation (which would only bring each block home) is not done: S blocks, S - 1 permutes.
Masking is `attention.visible` (with the layer's window, a static int or None, and optional
media spans whose tokens see each other both ways) plus "key position >= 0" for padding.

Functions whose name ends in `_shard` run inside `shard_map` and see per-shard shapes; the
alphabet is docs/design.md's (B T S N K H, R = N / K query heads per kv head), with Q = R * T the
query rows of one kv head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from model.attention import MASK_VALUE, visible
from model.paged_attention import Partial, check_window, key_bounds

_BIG = jnp.iinfo(jnp.int32).max


def empty_state(b: int, kv_heads: int, q_rows: int, h: int):
    """(o, m, l) for no keys yet: o f32[B, K, Q, H], m and l f32[B, K, Q]."""
    return (jnp.zeros((b, kv_heads, q_rows, h), jnp.float32),
            jnp.full((b, kv_heads, q_rows), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kv_heads, q_rows), jnp.float32))


def to_rows(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, N, ...] -> [B, K, R * T, ...] (row r * T + t is query head k * R + r at token t)."""
    b, t, n = x.shape[:3]
    x = x.reshape(b, t, kv_heads, n // kv_heads, *x.shape[3:])
    x = jnp.moveaxis(x, 1, 3)  # [B, K, R, T, ...]
    return x.reshape(b, kv_heads, -1, *x.shape[4:])


def from_rows(x: jax.Array, t: int) -> jax.Array:
    """Inverse of `to_rows`: [B, K, R * T, ...] -> [B, T, N, ...]."""
    b, kv_heads = x.shape[:2]
    x = x.reshape(b, kv_heads, -1, t, *x.shape[3:])  # [B, K, R, T, ...]
    x = jnp.moveaxis(x, 3, 1)  # [B, T, K, R, ...]
    return x.reshape(b, t, -1, *x.shape[4:])


def state_from_partial(part: Partial, kv_heads: int):
    """A normalised `Partial` ([B, T, N, H] ...) -> the (o unnormalised, m, l) row state."""
    o = to_rows(part.o.astype(jnp.float32), kv_heads) * to_rows(part.l, kv_heads)[..., None]
    return o, to_rows(part.m, kv_heads), to_rows(part.l, kv_heads)


def partial_from_state(state, t: int) -> Partial:
    o, m, l = state
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    return Partial(o=from_rows(o, t), m=from_rows(m, t), l=from_rows(l, t))


def fold_block(state, q_rows, q_pos_rows, k, v, k_pos, scale: float, window: int | None = None,
               q_span_rows=None, k_span=None):
    """Fold one K/V block into the online-softmax state.

    q_rows [B, K, Q, H]; q_pos_rows i32[B, Q]; k, v [B, S, K, H]; k_pos i32[B, S] (< 0: padding).
    A key is visible to a query iff its position is >= 0 and `attention.visible(key, query, window)`
    (key <= query, and key > query - window when `window` is given); with spans (q_span_rows
    i32[B, Q], k_span i32[B, S]; 0 = text) also a later key of the query's own span.
    """
    o, m, l = state
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
    s = jnp.einsum('BKQH,BKSH->BKQS', q_rows, kt, preferred_element_type=jnp.float32) * scale
    spans = () if q_span_rows is None else (k_span[:, None, :], q_span_rows[:, :, None])
    seen = (k_pos[:, None, :] >= 0) & visible(k_pos[:, None, :], q_pos_rows[:, :, None], window, *spans)  # [B, Q, S]
    seen = seen[:, None]  # [B, 1, Q, S]
    s = jnp.where(seen, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)  # masked keys add exactly 0
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=-1)
    pv = jnp.einsum('BKQS,BKSH->BKQH', p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    return alpha[..., None] * o + pv, m_new, l


def ring_attention_shard(q, k, v, q_pos, k_pos, scale: float, axis_name: str, axis_size: int,
                         init: Partial | None = None, window: int | None = None, q_span=None,
                         k_span=None) -> Partial:
    """Per-shard body: local queries q [B, T, N, H] at q_pos i32[B, T] attend every shard's keys.

    k, v [B, Tk, K, H] at k_pos i32[B, Tk] are this shard's block; they visit every other shard
    in turn. `init` (optional) is a Partial over other keys (e.g. earlier pages) to merge with.
    `window` (static, None = global): a query at p sees keys p - window < s <= p only.
    q_span i32[B, T], k_span i32[B, Tk] (optional, 0 = text): a query also sees the later keys of
    its own span (`attention.visible`); the spans travel with their keys.
    Returns this shard's queries' Partial (normalised o, m, l).
    """
    check_window(window, 'ring_attention')
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    r = n // kv_heads
    q_rows = to_rows(q, kv_heads)  # [B, K, Q, H]
    q_pos_rows = jnp.tile(q_pos.astype(jnp.int32), (1, r))  # [B, Q]: row r * T + t -> token t
    q_span_rows = None if q_span is None else jnp.tile(q_span, (1, r))
    state = empty_state(b, kv_heads, r * t, h) if init is None else state_from_partial(init, kv_heads)
    # Keys outside [q_first, q_max] are invisible to every local query (q_first: the lowest key any
    # local query's window reaches; 0 without a window).
    q_first, q_max = key_bounds(q_pos, window)
    perm = [(j, (j + 1) % axis_size) for j in range(axis_size)]
    k_pos = k_pos.astype(jnp.int32)
    # A later key is visible only through a span both sides have.
    q_in_span = jnp.bool_(False) if q_span is None else jnp.any(q_span > 0)
    for step in range(axis_size):
        k_min = jnp.min(jnp.where(k_pos >= 0, k_pos, _BIG))
        k_max = jnp.max(k_pos)  # -1 for an all-padding block, which k_min already skips
        later = jnp.bool_(False) if k_span is None else q_in_span & jnp.any(k_span > 0)
        state = jax.lax.cond(
            ((k_min <= q_max) | later) & (k_max >= q_first),  # some key may be visible to some local query
            lambda s, k=k, v=v, k_pos=k_pos, k_span=k_span: fold_block(s, q_rows, q_pos_rows, k, v, k_pos, scale,
                                                                       window, q_span_rows, k_span),
            lambda s: s,
            state)
        if step < axis_size - 1:  # the last rotation would only bring blocks home
            if k_span is None:
                k, v, k_pos = jax.lax.ppermute((k, v, k_pos), axis_name, perm)
            else:
                k, v, k_pos, k_span = jax.lax.ppermute((k, v, k_pos, k_span), axis_name, perm)
    return partial_from_state(state, t)


def ring_attention(q, k, v, positions, scale: float, mesh: Mesh, axis_name: str = 'sequence', *,
                   window: int | None = None) -> jax.Array:
    """Causal attention of q [B, T, N, H] over k, v [B, T, K, H] (global arrays), T split over
    `axis_name` in the given order: token t sits on shard t // (T / S) (T must divide evenly; pad
    with position -1). positions i32[B, T] are global positions (any order, -1 = padding).
    `window` (static, None = global): the query at p sees keys p - window < s <= p only.
    Returns [B, T, N, H] in q's dtype; a query that sees no key gets zeros.
    """
    size = mesh.shape[axis_name]
    seq = P(None, axis_name)

    def body(q, k, v, pos):
        part = ring_attention_shard(q, k, v, pos, pos, scale, axis_name, size, window=window)
        return part.o.astype(q.dtype)

    return jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq, seq), out_specs=seq,
                         check_vma=False)(q, k, v, positions)
