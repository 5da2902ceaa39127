"""The page pool split over the mesh's `sequence` axis, and attention over it.

Layout. The pool is `[L, K, P, G, H]` with P = S * P_local: device r of the sequence axis holds pages
[r * P_local, (r + 1) * P_local) (its local index 0 is its own null page), and K is split over the
`tensor` axis. Page j of every sequence lives on device j % S (the host's block manager allocates it
there, server/kv_manager.py), so appends spread evenly and a device stores 1/S of each context.
Block tables arrive per device, already in local page ids: `local_tables i32[B, S, C / S]`, whose
row [b, r] lists sequence b's pages r, r + S, r + 2S, ... (local index 0 = not allocated).

Attention (`ShardedPagedCache.attend`, called by each layer; the model does not know the mesh):
- decode (one token per row, rows replicated on every device): each device writes the new K/V of
  the rows whose page it owns, attends its own pages (a partial softmax), and the partials are
  merged across devices by log-sum-exp (pmax of m, psum of weighted o and l). New K/V never move.
- prefill (a chunk of one sequence, tokens striped by page: device r computes the tokens of the
  chunk's pages on r, so it writes only local pages): (a) the chunk's queries attend the context
  already in pages before the chunk (positions < start) on every device, by gathering the chunk's
  queries (small) rather than moving pages (large), then merging and scattering the partials back;
  (b) the chunk's own K/V go around the ring (model/ring_attention.py), folded into (a)'s state.
Sliding-window layers pass their window (a static int) down to every part: masks use
`attention.visible`, and page walks start at the first page inside any query's window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from model.attention import MASK_VALUE, visible
from model.paged_attention import Partial, check_window, key_bounds, needed_columns
from model.ring_attention import empty_state, fold_block, partial_from_state, ring_attention_shard, to_rows

SEQ = 'sequence'
TP = 'tensor'
POOL = P(None, TP, SEQ, None, None)  # [L, K, P, G, H]
# Decode gathers a device's pages at once up to this many keys per row (one fused pass: fastest on
# CPU for short contexts); past it, it walks them block by block and stops at the row's length.
GATHER_MAX_KEYS = 4096
# Keys per step when walking pages: large enough for matmul-sized blocks, small enough that the
# [K, R * T, keys] score block of a 2K-token chunk stays tens of MB.
KEYS_PER_BLOCK = 1024


@struct.dataclass
class ShardedPagedCache:
    """k_pages, v_pages: [L, K, P, G, H] global (sharded by POOL); local_tables: i32[B, S, C/S]."""

    k_pages: jax.Array
    v_pages: jax.Array
    local_tables: jax.Array
    start: jax.Array  # i32[]: prefill's chunk start (positions < start are already in pages)
    mesh: Mesh = struct.field(pytree_node=False)
    prefill: bool = struct.field(pytree_node=False)

    @property
    def span_limit(self) -> int:
        return self.local_tables.shape[1] * self.local_tables.shape[2] * self.k_pages.shape[3]

    def attend(self, layer: int, q, k, v, positions, scale: float, kv_span: int | None = None, *,
               window: int | None = None):
        """[B, T, N, H] and the updated cache. `kv_span` is ignored: tables are already bucketed.
        `window` (static, per layer; None = global): the query at p sees keys p - window < s <= p."""
        del kv_span
        check_window(window, 'ShardedPagedCache.attend')
        size = self.mesh.shape[SEQ]
        heads = P(None, None, TP, None)
        if self.prefill:
            fn = lambda *a: _prefill_shard(*a, layer=layer, scale=scale, size=size, window=window)
            tok = P(None, SEQ, TP, None)  # [B, T, N|K, H]: tokens striped over devices, heads split
            in_specs = (tok, tok, tok, P(None, SEQ), POOL, POOL, P(None, SEQ, None), P())
        else:
            fn = lambda *a: _decode_shard(*a, layer=layer, scale=scale, size=size, window=window)
            tok = heads  # rows replicated over the sequence axis
            in_specs = (tok, tok, tok, P(), POOL, POOL, P(None, SEQ, None), P())
        out, k_pages, v_pages = jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=(tok, POOL, POOL), check_vma=False,
        )(q, k, v, positions, self.k_pages, self.v_pages, self.local_tables, self.start)
        return out, self.replace(k_pages=k_pages, v_pages=v_pages)


# ---- per-shard bodies (inside shard_map: every shape below is per shard) ----


def _write_local(pool, layer, x, positions, table, rank, size):
    """Write x [B, T, K, H] at positions [B, T] into the pages this shard owns; drop the rest.

    pool [L, K, P_local, G, H]; table i32[B, C_local] (local ids, 0 = unallocated)."""
    g = pool.shape[3]
    col = positions // g  # the sequence's page index
    owned = (positions >= 0) & (col % size == rank)
    local_col = jnp.clip(col // size, 0, table.shape[1] - 1)
    page = jnp.take_along_axis(table, local_col, axis=1)  # [B, T]
    page = jnp.where(owned & (page != 0), page, pool.shape[2])  # out of range: dropped
    return pool.at[layer, :, page, positions % g].set(x.astype(pool.dtype), mode='drop')


def _local_partial(q, k_pool, v_pool, layer, table, positions, rank, size, scale, window=None,
                   key_end=None) -> Partial:
    """q [B, T, N, H] at positions [B, T] over this shard's pages of `layer` (pools [L, K, P, G, H],
    table i32[B, C_local], local ids), walking blocks of KEYS_PER_BLOCK keys from the first page
    inside any query's window (page 0 without one) to the last page any query sees. `key_end`
    (optional, i32[]): keys at positions >= key_end are left out (prefill's earlier context). The
    loop gathers from the whole pool: slicing out the layer first would make XLA copy that layer's
    pages (the whole pool, over the layers) on every call.

    Same maths as model/paged_attention.py's `paged_attend_partial`, in ring attention's row
    layout ([B, K, R * T, H] queries against [B, K, keys, H] blocks: one batched matmul per block,
    which XLA:CPU runs far faster than the 6-D einsum there)."""
    b, t, n, h = q.shape
    _, kv_heads, _, g, _ = k_pool.shape
    cols = table.shape[1]
    per_block = max(1, min(cols, KEYS_PER_BLOCK // g))
    blocks = -(-cols // per_block)
    table = jnp.pad(table, ((0, 0), (0, blocks * per_block - cols)))  # null pages, masked below
    r = n // kv_heads
    q_rows = to_rows(q, kv_heads)  # [B, K, Q, H]
    pos_rows = jnp.tile(positions.astype(jnp.int32), (1, r))  # [B, Q]
    # Column j holds the sequence's page rank + j * size; walk only columns holding a key some
    # query can see.
    first_key, last_key = key_bounds(positions, window)
    if key_end is not None:
        last_key = jnp.minimum(last_key, key_end - 1)
    first_col, end_col = needed_columns(first_key, last_key, g, cols, rank, size)
    first_block = first_col // per_block
    end_block = jnp.where(end_col > first_col, (end_col + per_block - 1) // per_block, first_block)
    offsets = (jnp.arange(per_block) * size * g)[:, None] + jnp.arange(g)[None, :]  # [C, G]

    def body(i, state):
        ids = jax.lax.dynamic_slice_in_dim(table, i * per_block, per_block, axis=1)  # [B, C]
        kb = jnp.swapaxes(k_pool[layer, :, ids], 2, 3).reshape(b, per_block * g, kv_heads, h)
        vb = jnp.swapaxes(v_pool[layer, :, ids], 2, 3).reshape(b, per_block * g, kv_heads, h)
        key_pos = ((rank + i * per_block * size) * g + offsets).reshape(-1)  # [C * G]
        real = jnp.repeat(ids != 0, g, axis=1)  # [B, C * G]: null pages are padding
        if key_end is not None:
            real &= key_pos[None, :] < key_end
        key_pos = jnp.where(real, key_pos[None, :], -1)  # [B, C * G]
        return fold_block(state, q_rows, pos_rows, kb, vb, key_pos, scale, window)

    state = jax.lax.fori_loop(first_block, end_block, body, empty_state(b, kv_heads, r * t, h))
    return partial_from_state(state, t)


def _decode_shard(q, k, v, positions, k_pages, v_pages, tables, start, *, layer, scale, size, window):
    """q [B, 1, N, H], k/v [B, 1, K, H], positions [B, 1] (all rows, replicated); tables [B, 1, C_l]."""
    del start
    rank = jax.lax.axis_index(SEQ)
    table = tables[:, 0]
    k_pages = _write_local(k_pages, layer, k, positions, table, rank, size)
    v_pages = _write_local(v_pages, layer, v, positions, table, rank, size)
    if table.shape[1] * k_pages.shape[3] <= GATHER_MAX_KEYS:
        part = _gathered_partial(q, k_pages[layer], v_pages[layer], table, positions, rank, size, scale,
                                 window)
    else:
        part = _local_partial(q, k_pages, v_pages, layer, table, positions, rank, size, scale, window)
    m_star = jax.lax.pmax(part.m, SEQ)
    w = part.l * jnp.exp(part.m - m_star)  # 0 for shards that see no key
    o = jax.lax.psum(part.o * w[..., None], SEQ)
    l = jax.lax.psum(w, SEQ)
    return (o / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype), k_pages, v_pages


def _gathered_partial(q, k_pool, v_pool, table, positions, rank, size, scale, window) -> Partial:
    """Decode's partial over this shard's pages: gather the (bucketed) table's pages at once and
    attend densely. One fused pass, faster on CPU than the block loop for a single query row."""
    b, t, n, h = q.shape
    kv_heads, _, g, _ = k_pool.shape
    cols = table.shape[1]
    kb = jnp.take(k_pool, table, axis=1).reshape(kv_heads, b, cols * g, h)  # [K, B, S, H]
    vb = jnp.take(v_pool, table, axis=1).reshape(kv_heads, b, cols * g, h)
    key_pos = ((rank + jnp.arange(cols) * size)[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)  # [S]
    seen = visible(key_pos[None, None, :], positions[:, :, None], window)  # [B, T, S]
    seen = (seen & (table != 0).repeat(g, axis=1)[:, None, :])[:, :, None, None, :]  # [B, T, 1, 1, S]
    r = n // kv_heads
    qf = q.reshape(b, t, kv_heads, r, h).astype(jnp.float32)
    s = jnp.einsum('BTKRH,KBSH->BTKRS', qf, kb.astype(jnp.float32)) * scale
    s = jnp.where(seen, s, MASK_VALUE)
    m = jnp.max(s, axis=-1)  # [B, T, K, R]
    p = jnp.where(seen, jnp.exp(s - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum('BTKRS,KBSH->BTKRH', p, vb.astype(jnp.float32)) / jnp.where(l > 0, l, 1.0)[..., None]
    return Partial(o=o.reshape(b, t, n, h), m=m.reshape(b, t, n), l=l.reshape(b, t, n))


def _prefill_shard(q, k, v, positions, k_pages, v_pages, tables, start, *, layer, scale, size, window):
    """q [1, T_l, N, H], k/v [1, T_l, K, H], positions [1, T_l]: this shard's stripe of the chunk
    (padding at -1); tables [1, 1, C_l]; start: the chunk's first position."""
    rank = jax.lax.axis_index(SEQ)
    table = tables[:, 0]
    t_local = q.shape[1]
    k_pages = _write_local(k_pages, layer, k, positions, table, rank, size)
    v_pages = _write_local(v_pages, layer, v, positions, table, rank, size)
    # (a) Earlier context: every query of the chunk against this shard's pages before `start`.
    q_all = jax.lax.all_gather(q, SEQ, axis=1, tiled=True)  # [1, S * T_l, N, H]
    pos_all = jax.lax.all_gather(positions, SEQ, axis=1, tiled=True)
    # Queries keep their own positions (the window is relative to them); keys stop before `start`.
    part = _local_partial(q_all, k_pages, v_pages, layer, table, pos_all, rank, size, scale, window,
                          key_end=start)
    m_star = jax.lax.pmax(part.m, SEQ)
    w = part.l * jnp.exp(part.m - m_star)
    o = jax.lax.psum_scatter(part.o * w[..., None], SEQ, scatter_dimension=1, tiled=True)  # [1, T_l, N, H]
    l = jax.lax.psum_scatter(w, SEQ, scatter_dimension=1, tiled=True)
    m = jax.lax.dynamic_slice_in_dim(m_star, rank * t_local, t_local, axis=1)
    earlier = Partial(o=o / jnp.where(l > 0, l, 1.0)[..., None], m=jnp.where(l > 0, m, MASK_VALUE), l=l)
    # (b) The chunk itself: its K/V blocks go around the ring.
    part = ring_attention_shard(q, k, v, positions, positions, scale, SEQ, size, init=earlier,
                                window=window)
    return part.o.astype(q.dtype), k_pages, v_pages
