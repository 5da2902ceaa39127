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
  A device reads its pages one of two ways. Flat (`_flat_partial`): a list of (page, row) entries
  read chunk by chunk (plain 4 KB row gathers) with a per-row online softmax. The engine builds
  the list on the host (`DecodePages`), row after row, holding only the pages each row attends,
  so a batch costs the sum of its rows' lengths, not rows x the longest; narrow tables become
  such a list on the device. Block walk (tables wider than GATHER_MAX_KEYS keys a device):
  blocks of KEYS_PER_BLOCK keys up to the longest row, from the first page inside any window.
- prefill (a chunk of one sequence, tokens striped by page: device r computes the tokens of the
  chunk's pages on r, so it writes only local pages): (a) the chunk's queries attend the context
  already in pages before the chunk (positions < start) on every device, by gathering the chunk's
  queries (small) rather than moving pages (large), then merging and scattering the partials back;
  (b) the chunk's own K/V go around the ring (model/ring_attention.py), folded into (a)'s state.
Sliding-window layers pass their window (a static int) down to every part: masks use
`attention.visible`, and page walks start at the first page inside any query's window.
Media spans (prefill only; Gemma 3's images see themselves both ways) touch only (b): a span never
crosses chunks, so every key of a query's span is in its own chunk.
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
# Decode reads a device's pages as a flat list up to this many keys per row (fastest on CPU for
# short contexts); past it, it walks them block by block (which skips pages before a window).
GATHER_MAX_KEYS = 4096
FLAT_MAX_KEYS = GATHER_MAX_KEYS  # the same bound for the engine's ragged page lists
# Ragged lists are read in chunks of 16 entries (pages) a row, at most 128 (2048 keys per kv head,
# so a chunk's K and V, 2 MB at H = 64 fp32, stay in cache between the gather and the products).
FLAT_CHUNK = 128


def flat_chunk(rows: int) -> int:
    """Entries a ragged decode reads per loop step for a batch of `rows` rows."""
    return min(FLAT_CHUNK, 16 * rows)
# Keys per step when walking pages: large enough for matmul-sized blocks, small enough that the
# [K, R * T, keys] score block of a 2K-token chunk stays tens of MB.
KEYS_PER_BLOCK = 1024


@struct.dataclass
class DecodePages:
    """The pages a decode batch attends, as one flat list per device (built on the host, see
    PagedEngine.decode): device r's entries name its local pages, grouped by row in row order,
    padding last. F is a bucket (a multiple of `flat_chunk(B)`), so shapes stay few.

    pages: i32[S, F] local page ids (0 = padding); rows: i32[S, F] the row of each entry (sorted;
    padding repeats the last row); cols: i32[S, F] the entry's page number in its sequence
    (positions cols * G ... + G - 1; -1 = padding); starts: i32[B, S] the index of row b's first
    entry in device r's list (its page j, if on r, is entry starts[b, r] + j // S).

    A list may hold pages past a row's position (allocated for later steps of a multi-step
    decode): keys after the query's position are masked, and a step writes its token into the
    entry of its own position."""

    pages: jax.Array
    rows: jax.Array
    cols: jax.Array
    starts: jax.Array


@struct.dataclass
class ShardedPagedCache:
    """k_pages, v_pages: [L, K, P, G, H] global (sharded by POOL); local_tables: i32[B, S, C/S];
    decode reads `flat` instead of the tables when it is given."""

    k_pages: jax.Array
    v_pages: jax.Array
    local_tables: jax.Array | None
    start: jax.Array  # i32[]: prefill's chunk start (positions < start are already in pages)
    mesh: Mesh = struct.field(pytree_node=False)
    prefill: bool = struct.field(pytree_node=False)
    flat: DecodePages | None = None

    @property
    def span_limit(self) -> int:
        return self.local_tables.shape[1] * self.local_tables.shape[2] * self.k_pages.shape[3]

    def attend(self, layer: int, q, k, v, positions, scale: float, kv_span: int | None = None, *,
               window: int | None = None, spans: jax.Array | None = None):
        """[B, T, N, H] and the updated cache. `kv_span` is ignored: tables are already bucketed.
        `window` (static, per layer; None = global): the query at p sees keys p - window < s <= p.
        `spans` (prefill only, i32[B, T] striped like the tokens, 0 = text): a query also sees the
        later tokens of its own span, which must lie wholly inside the chunk."""
        del kv_span
        check_window(window, 'ShardedPagedCache.attend')
        if spans is not None and not self.prefill:
            raise ValueError('ShardedPagedCache.attend: spans are for prefill; decode tokens are text.')
        size = self.mesh.shape[SEQ]
        heads = P(None, None, TP, None)
        if self.flat is not None and not self.prefill:
            fn = lambda *a: _flat_decode_shard(*a, layer=layer, scale=scale, size=size, window=window)
            lists = P(SEQ, None)  # [S, F]: one list per device
            in_specs = (heads, heads, heads, P(), POOL, POOL, lists, lists, lists, P(None, SEQ))
            f = self.flat
            out, k_pages, v_pages = jax.shard_map(
                fn, mesh=self.mesh, in_specs=in_specs, out_specs=(heads, POOL, POOL), check_vma=False,
            )(q, k, v, positions, self.k_pages, self.v_pages, f.pages, f.rows, f.cols, f.starts)
            return out, self.replace(k_pages=k_pages, v_pages=v_pages)
        if self.prefill:
            fn = lambda *a: _prefill_shard(*a, layer=layer, scale=scale, size=size, window=window)
            tok = P(None, SEQ, TP, None)  # [B, T, N|K, H]: tokens striped over devices, heads split
            in_specs = (tok, tok, tok, P(None, SEQ), POOL, POOL, P(None, SEQ, None), P())
        else:
            fn = lambda *a: _decode_shard(*a, layer=layer, scale=scale, size=size, window=window)
            tok = heads  # rows replicated over the sequence axis
            in_specs = (tok, tok, tok, P(), POOL, POOL, P(None, SEQ, None), P())
        args = (q, k, v, positions, self.k_pages, self.v_pages, self.local_tables, self.start)
        if spans is not None:  # striped like the positions
            args, in_specs = (*args, spans), (*in_specs, P(None, SEQ))
        out, k_pages, v_pages = jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=(tok, POOL, POOL), check_vma=False,
        )(*args)
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
    return _scatter(pool, layer, page, positions % g, x)


def _scatter(pool, layer, page, offset, x):
    """pool [L, K, P, G, H] with x [B, T, K, H] stored at (page, offset) [B, T] of `layer`; pages
    out of range are dropped. A single update is sent with a dropped twin: XLA turns a one-index
    dropping scatter into a select over the whole pool (a copy of it per layer)."""
    if page.size == 1:
        page = jnp.concatenate([page, jnp.full_like(page, pool.shape[2])], axis=1)
        offset = jnp.concatenate([offset, offset], axis=1)
        x = jnp.concatenate([x, x], axis=1)
    return pool.at[layer, :, page, offset].set(x.astype(pool.dtype), mode='drop')


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
        b, cols = table.shape  # every column of every row, as one flat list
        pad = -(b * cols) % min(flat_chunk(b), b * cols)
        part = _flat_partial(q, k_pages, v_pages, layer, jnp.pad(table.reshape(-1), (0, pad)),
                             jnp.pad(jnp.repeat(jnp.arange(b), cols), (0, pad), constant_values=b - 1),
                             jnp.pad(jnp.where(table != 0, rank + jnp.arange(cols) * size, -1).reshape(-1),
                                     (0, pad), constant_values=-1),
                             positions, scale, window)
    else:
        part = _local_partial(q, k_pages, v_pages, layer, table, positions, rank, size, scale, window)
    return _merge_rows(part, q.dtype), k_pages, v_pages


def _flat_decode_shard(q, k, v, positions, k_pages, v_pages, pages, rows, cols, starts, *, layer, scale,
                       size, window):
    """q [B, 1, N, H], k/v [B, 1, K, H], positions [B, 1] (replicated); pages/rows/cols [1, F] and
    starts [B, 1]: this device's share of `DecodePages`."""
    g = k_pages.shape[3]
    col = positions // g  # [B, 1]: the page of each row's new token
    entry = jnp.clip(starts + col // size, 0, pages.shape[1] - 1)
    mine = (positions >= 0) & (col % size == jax.lax.axis_index(SEQ)) & (cols[0][entry] == col)
    page = jnp.where(mine & (pages[0][entry] != 0), pages[0][entry], k_pages.shape[2])  # [B, 1]
    k_pages = _scatter(k_pages, layer, page, positions % g, k)
    v_pages = _scatter(v_pages, layer, page, positions % g, v)
    part = _flat_partial(q, k_pages, v_pages, layer, pages[0], rows[0], cols[0], positions, scale, window)
    return _merge_rows(part, q.dtype), k_pages, v_pages


def _merge_rows(part: Partial, dtype):
    """Log-sum-exp merge of every device's decode partial: [B, 1, N, H] in `dtype`."""
    m_star = jax.lax.pmax(part.m, SEQ)
    w = part.l * jnp.exp(part.m - m_star)  # 0 for shards that see no key
    o = jax.lax.psum(part.o * w[..., None], SEQ)
    l = jax.lax.psum(w, SEQ)
    return (o / jnp.where(l > 0, l, 1.0)[..., None]).astype(dtype)


def _flat_partial(q, k_pool, v_pool, layer, pages, rows, cols, positions, scale, window) -> Partial:
    """Decode's partial over a flat page list: q [B, 1, N, H] at positions [B, 1]; pools
    [L, K, P, G, H] (this shard's); pages, rows, cols i32[F] as in `DecodePages` (rows sorted, F a
    multiple of the chunk).

    A loop over chunks of `flat_chunk(B)` entries stops after the last real one (so a list bucket
    costs its used part). Each chunk is gathered as [chunk, K] rows of [G, H] (the pool seen as
    [L * K * P, G, H]: plain row copies; a gather that also transposes runs 3-4x slower on
    XLA:CPU), scored against each entry's own row's query, and folded into per-row online-softmax
    state through a one-hot [chunk, B] matrix (a small matmul, no scatter). Rows without entries
    get l = 0, m = MASK_VALUE."""
    b, _, n, h = q.shape
    _, kv_heads, p_local, g, _ = k_pool.shape
    r = n // kv_heads
    size = pages.shape[0]
    chunk = min(flat_chunk(b), size)
    used = jnp.max(jnp.where(cols >= 0, jnp.arange(size), -1)) + 1  # entries up to the last real one
    pool_rows = (layer * kv_heads + jnp.arange(kv_heads))[None, :] * p_local  # [1, K]
    k_rows, v_rows = k_pool.reshape(-1, g, h), v_pool.reshape(-1, g, h)  # [L * K * P, G, H]
    q = q.reshape(b, kv_heads, r, h)

    def body(i, state):
        m, l, o = state  # [B, K, R], [B, K, R], [B, K, R, H]
        at = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk)
        page, row, col = at(pages), at(rows), at(cols)  # [E]
        idx = pool_rows + page[:, None]  # [E, K]
        kb = k_rows.at[idx].get(mode='promise_in_bounds')  # [E, K, G, H]
        vb = v_rows.at[idx].get(mode='promise_in_bounds')
        s = jnp.einsum('EKRH,EKGH->EKRG', q[row], kb, preferred_element_type=jnp.float32) * scale
        key_pos = col[:, None] * g + jnp.arange(g)  # [E, G]
        seen = (col[:, None] >= 0) & visible(key_pos, positions[row, :1], window)
        seen = seen[:, None, None, :]  # [E, 1, 1, G]
        s = jnp.where(seen, s, MASK_VALUE)
        one_hot = row[:, None] == jnp.arange(b)[None, :]  # [E, B]
        m_chunk = jnp.max(jnp.where(one_hot[:, :, None, None], jnp.max(s, axis=-1)[:, None], MASK_VALUE),
                          axis=0)  # [B, K, R]
        m_new = jnp.maximum(m, m_chunk)
        p = jnp.where(seen, jnp.exp(s - m_new[row][..., None]), 0.0)  # [E, K, R, G]
        pv = jnp.einsum('EKRG,EKGH->EKRH', p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        w = one_hot.astype(jnp.float32)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.einsum('EB,EKR->BKR', w, jnp.sum(p, axis=-1))
        o = alpha[..., None] * o + jnp.einsum('EB,EKRH->BKRH', w, pv)
        return m_new, l, o

    init = (jnp.full((b, kv_heads, r), MASK_VALUE, jnp.float32), jnp.zeros((b, kv_heads, r), jnp.float32),
            jnp.zeros((b, kv_heads, r, h), jnp.float32))
    m, l, o = jax.lax.fori_loop(0, (used + chunk - 1) // chunk, body, init)
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    return Partial(o=o.reshape(b, 1, n, h), m=m.reshape(b, 1, n), l=l.reshape(b, 1, n))


def _prefill_shard(q, k, v, positions, k_pages, v_pages, tables, start, spans=None, *, layer, scale, size,
                   window):
    """q [1, T_l, N, H], k/v [1, T_l, K, H], positions [1, T_l]: this shard's stripe of the chunk
    (padding at -1); tables [1, 1, C_l]; start: the chunk's first position; spans [1, T_l] or None."""
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
                                window=window, q_span=spans, k_span=spans)
    return part.o.astype(q.dtype), k_pages, v_pages
