"""Paged attention: attend straight from the page pool, one block of pages at a time.

Same contract as `attention.attend` over a dense cache with `cache_mask` (the query at absolute
position p sees keys at positions <= p, and > p - window for a sliding-window layer), but it never
gathers the [B, S, K, H] copy: a loop over blocks of page-table columns gathers one
[K, B, pages_per_block, G, H] slice per step and folds it into an online softmax (running max m,
denominator l, accumulator o, all fp32). The loop runs only over the blocks some query of the batch
can see (`needed_columns`): it stops after the last page any query sees and, with a window, starts
at the first page inside any query's window, so a window layer costs its window, not the prefix.
Pages past a row's own length are masked (their table entries are the null page, so the gather is
cheap).

Alphabet: B T N K H as in docs/design.md, R query heads per kv head (N = K * R), P page, G page
length; C is a block of page-table columns inside the loop.

`paged_attend_partial` returns the unmerged (o, m, l) so that a sequence-sharded decode can attend to
each device's pages in place and combine the results with `merge_partials` (flash-decoding's
log-sum-exp merge), instead of moving K/V between devices.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.attention import MASK_VALUE, visible

# Keys folded in per loop step when pages_per_block is not given (rounded to whole pages).
_KEYS_PER_BLOCK = 256
_BIG = jnp.iinfo(jnp.int32).max


def check_window(window: int | None, where: str) -> None:
    """Raise ValueError unless `window` is None (global) or a positive int (static: one per layer)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral)
                               or window <= 0):
        raise ValueError(f'{where}: window={window!r} must be None (global attention) or a positive int.')


def key_bounds(positions: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    """(first, last) i32[]: the lowest and highest key positions any real query (position >= 0)
    of `positions` can see under `attention.visible`. last = -1 when no query is real; first is 0
    without a window and int32 max when no query is real."""
    positions = positions.astype(jnp.int32)
    last = jnp.max(positions)
    if window is None:
        return jnp.int32(0), last
    first = jnp.min(jnp.where(positions >= 0, positions - (window - 1), _BIG))
    return jnp.maximum(first, 0), last


def needed_columns(first_key, last_key, page_len: int, cols: int, page_offset=0,
                   page_stride: int = 1) -> tuple[jax.Array, jax.Array]:
    """[first_col, end_col) i32[]: the columns of a table (column j holds the sequence's page
    `page_offset + j * page_stride`) that hold a key in [first_key, last_key]; empty when none do.

    A page p holds keys [p * G, (p + 1) * G): it is needed iff first_key // G <= p <= last_key // G.
    """
    first_page = first_key // page_len - page_offset
    last_page = last_key // page_len - page_offset
    first_col = jnp.clip(-(-first_page // page_stride), 0, cols)  # ceil: first column at or after it
    end_col = jnp.clip(last_page // page_stride + 1, 0, cols)
    return first_col, jnp.maximum(end_col, first_col)


class Partial(NamedTuple):
    """Attention over a subset of keys, before merging.

    o: f32[B, T, N, H], already normalised over that subset (0 where it holds no visible key);
    m: f32[B, T, N], the max scaled score (MASK_VALUE where none is visible);
    l: f32[B, T, N], sum of exp(score - m) (0 where none is visible).
    """

    o: jax.Array
    m: jax.Array
    l: jax.Array


def paged_attend(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [K, P, G, H]
    v_pages: jax.Array,  # [K, P, G, H]
    page_table: jax.Array,  # i32[B, pages_per_seq]
    positions: jax.Array,  # i32[B, T]
    scale: float,
    *,
    pages_per_block: int | None = None,
    window: int | None = None,
) -> jax.Array:
    """[B, T, N, H] in q's dtype: query at absolute position p attends keys at positions <= p (and
    > p - window when `window` is given: a sliding-window layer).

    Equals `attend(q, k, v, cache_mask(positions, S, window), scale)` on the dense gather of the same
    pages for every query that sees at least one key; a query that sees none (position < 0) gets zeros.
    """
    part = paged_attend_partial(q, k_pages, v_pages, page_table, positions, scale,
                                pages_per_block=pages_per_block, window=window)
    return part.o.astype(q.dtype)


def paged_attend_partial(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [K, P, G, H]
    v_pages: jax.Array,  # [K, P, G, H]
    page_table: jax.Array,  # i32[B, C_total]
    positions: jax.Array,  # i32[B, T]
    scale: float,
    *,
    page_offset: int | jax.Array = 0,
    page_stride: int = 1,
    pages_per_block: int | None = None,
    window: int | None = None,
) -> Partial:
    """Attention of q over the pages in `page_table`, as an unmerged `Partial`.

    Column j of `page_table` holds the sequence's page number `page_offset + j * page_stride`, i.e. the
    keys at absolute positions [(page_offset + j*page_stride) * G, ... + G). The defaults describe a
    whole table; a shard of it is described by its offset and stride: contiguous halves are
    (offset 0, stride 1) and (offset C/2, stride 1); round-robin over S ranks is (offset rank, stride S).
    `page_offset` may be traced (e.g. `lax.axis_index`); `page_stride` is static.

    `window` (static, None = global): the query at position p sees keys p - window < s <= p; the loop
    starts at the first block holding such a key for some query.

    `scale` (1/sqrt(H)) is applied here, to the scores, and nowhere else.
    """
    check_window(window, 'paged_attend')
    b, t, n, h = q.shape
    kv_heads, _, g, _ = k_pages.shape
    cols = page_table.shape[1]
    if n % kv_heads:
        raise ValueError(f'paged_attend: {n} query heads are not a multiple of {kv_heads} kv heads.')
    if page_stride <= 0:
        raise ValueError(f'paged_attend: page_stride must be > 0, got {page_stride}.')
    per_block = pages_per_block or max(1, _KEYS_PER_BLOCK // g)
    per_block = min(per_block, cols)
    num_blocks = -(-cols // per_block)
    if num_blocks * per_block != cols:  # pad with null pages; their columns are masked below
        page_table = jnp.pad(page_table, ((0, 0), (0, num_blocks * per_block - cols)))
    r = n // kv_heads
    q = q.reshape(b, t, kv_heads, r, h)  # [B, T, K, R, H]
    positions = positions.astype(jnp.int32)
    page_offset = jnp.asarray(page_offset, jnp.int32)

    # Only blocks holding a key some query sees are walked: past the last page any query sees, and
    # (with a window) before the first page inside any query's window, nothing is visible.
    first_col, end_col = needed_columns(*key_bounds(positions, window), g, cols, page_offset, page_stride)
    first_block = first_col // per_block
    end_block = jnp.where(end_col > first_col, (end_col + per_block - 1) // per_block, first_block)

    offsets_in_block = jnp.arange(per_block)[:, None] * (page_stride * g) + jnp.arange(g)[None, :]  # [C, G]

    def body(i, carry):
        o, m, l = carry  # [B, K, R, T, H], [B, K, R, T], [B, K, R, T]
        start = i * per_block
        ids = jax.lax.dynamic_slice_in_dim(page_table, start, per_block, axis=1)  # i32[B, C]
        kb = jnp.take(k_pages, ids, axis=1)  # [K, B, C, G, H]
        vb = jnp.take(v_pages, ids, axis=1)  # [K, B, C, G, H]
        key_pos = (page_offset + start * page_stride) * g + offsets_in_block  # [C, G]
        col_ok = (start + jnp.arange(per_block)) < cols  # [C]
        seen = visible(key_pos[None, None], positions[:, :, None, None], window)  # [B, T, C, G]
        seen = (seen & col_ok[None, None, :, None])[:, None, None]  # [B, 1, 1, T, C, G]
        s = jnp.einsum('BTKRH,KBCGH->BKRTCG', q, kb, preferred_element_type=jnp.float32) * scale
        s = jnp.where(seen, s, MASK_VALUE)  # [B, K, R, T, C, G]
        m_new = jnp.maximum(m, jnp.max(s, axis=(-2, -1)))  # [B, K, R, T]
        # Masked keys get exactly 0 (not exp(MASK - m), which is 1 while no key has been seen).
        p = jnp.where(seen, jnp.exp(s - m_new[..., None, None]), 0.0)  # [B, K, R, T, C, G]
        alpha = jnp.exp(m - m_new)  # [B, K, R, T]
        l = alpha * l + jnp.sum(p, axis=(-2, -1))
        pv = jnp.einsum('BKRTCG,KBCGH->BKRTH', p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        o = alpha[..., None] * o + pv
        return o, m_new, l

    init = (
        jnp.zeros((b, kv_heads, r, t, h), jnp.float32),
        jnp.full((b, kv_heads, r, t), MASK_VALUE, jnp.float32),
        jnp.zeros((b, kv_heads, r, t), jnp.float32),
    )
    o, m, l = jax.lax.fori_loop(first_block, end_block, body, init)
    o = o / jnp.where(l > 0, l, 1.0)[..., None]  # normalised; 0 where nothing was visible
    return Partial(
        o=jnp.moveaxis(o, 3, 1).reshape(b, t, n, h),  # [B, T, N, H]
        m=jnp.moveaxis(m, 3, 1).reshape(b, t, n),  # [B, T, N]
        l=jnp.moveaxis(l, 3, 1).reshape(b, t, n),  # [B, T, N]
    )


def merge_partials(parts: Partial | tuple[Partial, ...] | list[Partial], axis: int | None = None) -> Partial:
    """Log-sum-exp merge of partials over disjoint key sets: m* = max m_i,
    o = sum o_i l_i e^(m_i - m*) / sum l_i e^(m_i - m*), l* = sum l_i e^(m_i - m*).

    Either a sequence of `Partial`s, or one `Partial` whose fields are stacked along `axis`, counted
    from the front of m's shape (e.g. the result of an all_gather across a sequence-sharded mesh
    axis). Shards with no visible key (l = 0) contribute nothing; if none has one, o is 0. The result
    is itself a Partial, so merging is associative and can be done pairwise or all at once.
    """
    if axis is None:
        if isinstance(parts, Partial):
            raise ValueError('merge_partials: a single stacked Partial needs the axis its shards lie along.')
        parts = list(parts)
        stacked = Partial(*(jnp.stack(fields) for fields in zip(*parts)))
        axis = 0
    else:
        stacked = parts
        axis = axis % stacked.m.ndim  # o has one more (trailing) axis than m and l
    m_star = jnp.max(stacked.m, axis=axis, keepdims=True)  # [..., 1, ...]
    w = stacked.l * jnp.exp(stacked.m - m_star)  # 0 for empty shards (l = 0)
    l_star = jnp.sum(w, axis=axis)
    o = jnp.sum(stacked.o.astype(jnp.float32) * w[..., None], axis=axis)
    o = o / jnp.where(l_star > 0, l_star, 1.0)[..., None]
    return Partial(o=o, m=jnp.squeeze(m_star, axis), l=l_star)
