"""Sliding-window attention in every cache path, against the dense reference (`attention.attend` +
`cache_mask(..., window)`, or the model's dense forward).

- `paged_attend` / `paged_attend_partial`: windows 1, 3, G, 2G+1 and None over shuffled pages with
  garbage in unowned pages; pages in blocks the loop must skip (entirely before every query's
  window) hold NaN, so walking one would poison the output: the block skipping is tested, not
  only the mask.
- The whole model with mixed layer kinds (window 5, NoPE + log scale, global RoPE): `PagedKVCache`
  prefill in chunks off page boundaries and decode steps equal the dense forward.
- The sharded pool on a mesh (sequence=8; sequence=4 x tensor=2): chunked prefill and decode (both
  the gathered and the block-walking decode path) equal the dense forward; ring attention with a
  window equals dense with a window.
All float32, tolerance 1e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _model_helpers import jitted, tiny_config, tiny_model
from model import attention
from model.config import LayerKind
from model.kv_pages import NULL_PAGE, PagedKVCache
from model.paged_attention import merge_partials, paged_attend, paged_attend_partial
from model.paged_engine import PagedEngine
from model.ring_attention import ring_attention
from model.sharded_cache import GATHER_MAX_KEYS
from test_mesh import G as MESH_G, MESHES, RankPages, _logits_fn, _mesh

G = 4  # page length
PAGES_PER_SEQ = 8  # max_len 32
NUM_PAGES = 64
H = 8
TOL = 1e-5
SCALE = 1.0 / np.sqrt(H)
WINDOWS = [pytest.param(w, id=f'w{w}') for w in (1, 3, G, 2 * G + 1, None)]
KINDS = (LayerKind(window=5), LayerKind(rope=False, log_scale=64), LayerKind())


# ---------------------------------------------------------------------------------------------
# paged_attend with a window
# ---------------------------------------------------------------------------------------------
def _problem(seed: int, positions: np.ndarray, n_heads: int = 4, kv_heads: int = 2):
    """q, dense k/v [B, S, K, H], shuffled page table covering each row, and the paged pools (pages
    nobody owns hold large garbage, the null page zeros)."""
    rng = np.random.default_rng(seed)
    b, t = positions.shape
    s = PAGES_PER_SEQ * G
    q = rng.normal(size=(b, t, n_heads, H)).astype(np.float32)
    k = rng.normal(size=(b, s, kv_heads, H)).astype(np.float32)
    v = rng.normal(size=(b, s, kv_heads, H)).astype(np.float32)
    ids = rng.permutation(np.arange(1, NUM_PAGES))
    table = np.full((b, PAGES_PER_SEQ), NULL_PAGE, np.int32)
    used = 0
    for row in range(b):
        n = int(positions[row].max()) // G + 1
        table[row, :n] = ids[used:used + n]
        used += n

    def pool(dense):
        out = rng.normal(0.0, 100.0, (kv_heads, NUM_PAGES, G, H)).astype(np.float32)
        out[:, NULL_PAGE] = 0.0
        for row in range(b):
            for col, page in enumerate(table[row]):
                if page != NULL_PAGE:
                    out[:, page] = dense[row, col * G:(col + 1) * G].transpose(1, 0, 2)  # [K, G, H]
        return out

    return q, k, v, pool(k), pool(v), table


def _first_needed_page(positions: np.ndarray, window: int | None) -> int:
    """The lowest page any real query's window reaches (0 without a window)."""
    real = positions[positions >= 0]
    if window is None or real.size == 0:
        return 0
    return max(0, int(real.min()) - window + 1) // G


def _poison_skipped(pool: np.ndarray, table: np.ndarray, positions, window, per_block,
                    offset: int = 0, stride: int = 1) -> tuple[np.ndarray, int]:
    """NaN into the pages of the blocks a walk over `table` (column j = page offset + j * stride)
    must skip because they lie before every query's window; returns the pool and how many columns
    were poisoned. Computed here from the rule, independently of the implementation."""
    first_page = _first_needed_page(positions, window)
    first_col = next((j for j in range(table.shape[1]) if offset + j * stride >= first_page), table.shape[1])
    skipped = (first_col // per_block) * per_block
    pool = pool.copy()
    for page in table[:, :skipped].reshape(-1):
        if page != NULL_PAGE:
            pool[:, page] = np.nan
    return pool, skipped


@functools.partial(jax.jit, static_argnames='window')
def _dense(q, k, v, positions, window=None):
    return attention.attend(q, k, v, attention.cache_mask(positions, k.shape[1], window), SCALE)


@functools.partial(jax.jit, static_argnames=('pages_per_block', 'window'))
def _paged(q, k_pages, v_pages, table, positions, pages_per_block=None, window=None):
    return paged_attend(q, k_pages, v_pages, table, positions, SCALE, pages_per_block=pages_per_block,
                        window=window)


POSITIONS = {
    # Decode rows of lengths 1, 4, 7, 14, 23 and 32 (the whole table).
    'decode': np.array([[0], [3], [6], [13], [22], [31]], np.int32),
    # Prefill chunks starting mid-page, near the start: windows reach back to page 0.
    'chunks-early': np.arange(6, dtype=np.int32)[None] + np.array([[1], [6], [13]], np.int32),
    # Late chunks (one padded with -1 at the end): windows start pages after page 0, so whole blocks
    # are skipped, and with 3 pages per block the window starts mid-block.
    'chunks-late': np.array([[18, 19, 20, 21, 22, 23], [21, 22, 23, 24, 25, 26],
                             [25, 26, 27, 28, -1, -1]], np.int32),
}


@pytest.mark.parametrize('window', WINDOWS)
@pytest.mark.parametrize('case, pages_per_block', [('decode', None), ('decode', 3), ('chunks-early', 1),
                                                   ('chunks-late', 1), ('chunks-late', 3)])
def test_paged_attend_window_matches_dense(case, pages_per_block, window):
    positions = POSITIONS[case]
    q, k, v, kp, vp, table = _problem(len(case), positions)
    want = np.asarray(_dense(q, k, v, positions, window=window))
    per_block = pages_per_block or PAGES_PER_SEQ  # the default block covers this whole table
    kp, skipped = _poison_skipped(kp, table, positions, window, per_block)
    vp, _ = _poison_skipped(vp, table, positions, window, per_block)
    if case == 'chunks-late' and window is not None and window <= G:
        assert skipped >= 3  # the skip is exercised: windows <= G start at page 3 or later
    got = np.asarray(_paged(q, kp, vp, table, positions, pages_per_block=pages_per_block, window=window))
    real = positions >= 0
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=TOL)
    np.testing.assert_array_equal(got[~real], 0.0)  # padding queries see nothing


@functools.partial(jax.jit, static_argnames=('page_offset', 'page_stride', 'window'))
def _partial(q, k_pages, v_pages, table, positions, page_offset, page_stride, window):
    return paged_attend_partial(q, k_pages, v_pages, table, positions, SCALE, page_offset=page_offset,
                                page_stride=page_stride, pages_per_block=1, window=window)


@pytest.mark.parametrize('window', [3, 2 * G + 1])
def test_round_robin_partials_with_window_merge_to_dense(window):
    """Two round-robin shards (offset 0 / 1, stride 2), as the sharded decode walks them: each skips
    its own columns before the window, and the merge equals dense attention."""
    positions = POSITIONS['chunks-late']
    q, k, v, kp, vp, table = _problem(7, positions)
    for rank in range(2):
        kp, _ = _poison_skipped(kp, table[:, rank::2], positions, window, 1, offset=rank, stride=2)
        vp, _ = _poison_skipped(vp, table[:, rank::2], positions, window, 1, offset=rank, stride=2)
    shards = [_partial(q, kp, vp, table[:, rank::2], positions, rank, 2, window) for rank in range(2)]
    got = np.asarray(merge_partials(shards).o)
    want = np.asarray(_dense(q, k, v, positions, window=window))
    real = positions >= 0
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=TOL)


def test_bad_window_is_refused():
    positions = POSITIONS['decode']
    q, _, _, kp, vp, table = _problem(0, positions)
    with pytest.raises(ValueError, match='window'):
        paged_attend(q, kp, vp, table, positions, SCALE, window=0)


# ---------------------------------------------------------------------------------------------
# The whole model over PagedKVCache, mixed layer kinds
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mixed_model():
    config = tiny_config(n_layers=3, layer_kinds=KINDS, max_context=256)
    return config, tiny_model(config, seed=3)


@pytest.mark.parametrize('kv_span', [pytest.param(None, id='paged-walk'),
                                     pytest.param(PAGES_PER_SEQ * G, id='gather-span')])
def test_model_paged_cache_equals_dense_forward(mixed_model, kv_span):
    config, net = mixed_model
    rng = np.random.default_rng(8)
    b, total = 2, 24
    tokens = rng.integers(3, config.vocab_size, (b, total)).astype(np.int32)
    want = np.asarray(jitted(net)(tokens, np.broadcast_to(np.arange(total, dtype=np.int32), (b, total)))[0])
    # Row 1 runs 3 tokens behind row 0 (padding -1 in its first chunk), so the rows differ in length.
    lag = np.array([[0], [3]], np.int32)
    cache = PagedKVCache.init(config, NUM_PAGES, G, b, PAGES_PER_SEQ)
    garbage = rng.normal(0.0, 100.0, cache.k_pages.shape).astype(np.float32)
    garbage[:, :, NULL_PAGE] = 0.0
    table = rng.permutation(np.arange(1, NUM_PAGES))[:b * PAGES_PER_SEQ].reshape(b, PAGES_PER_SEQ)
    cache = cache.replace(k_pages=jnp.asarray(garbage), v_pages=jnp.asarray(-garbage)).with_page_table(table)
    step = jax.jit(lambda tok, pos, cache: net(tok, pos, cache, kv_span=kv_span))
    start = 0
    for n in (5, 5, 5, 1, 1, 1, 1):  # chunks ending off page boundaries (5, 10, 15), then decode steps
        pos = start + np.arange(n, dtype=np.int32)[None] - lag  # [B, T]
        pos = np.where(pos >= 0, pos, -1)
        tok = np.take_along_axis(tokens, np.maximum(pos, 0), axis=1)
        logits, cache = step(tok, pos, cache)
        logits = np.asarray(logits)
        for row in range(b):
            for t in range(n):
                if pos[row, t] >= 0:
                    np.testing.assert_allclose(logits[row, t], want[row, pos[row, t]], rtol=0, atol=TOL)
        start += n


# ---------------------------------------------------------------------------------------------
# Mesh: the sharded pool (ring prefill, sharded decode) and ring attention, with windows
# ---------------------------------------------------------------------------------------------
mesh_only = pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 devices (tests/conftest.py sets XLA_FLAGS)')


def _decode_logits_fn(engine):
    """Full-vocabulary decode logits for rows at given positions, with tables of a given width."""
    @jax.jit
    def run(state, pages, tables, tokens, positions):
        net = nnx.merge(engine._graphdef, state)
        logits, cache = net(tokens[:, None], positions[:, None], engine._cache(pages, tables, 0, prefill=False))
        return logits[:, 0], (cache.k_pages, cache.v_pages)

    def step(tokens, positions, tables, width):
        logits, engine._pages = run(engine._state, engine._pages, engine._local_tables(tables, width),
                                    np.asarray(tokens, np.int32), np.asarray(positions, np.int32))
        return np.asarray(logits)

    return step


@mesh_only
@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_sharded_prefill_and_decode_equal_dense_forward(mixed_model, mesh_name):
    """Two sequences prefilled in chunks (ring attention inside a chunk, earlier pages on every
    device), then decoded together: with narrow tables (decode gathers its pages) and with tables
    wider than GATHER_MAX_KEYS per device (decode walks blocks); logits equal the dense forward."""
    assert MESH_G == G
    config, net = mixed_model
    mesh = _mesh(mesh_name)
    s = mesh.shape['sequence']
    engine = PagedEngine(config, net, max_slots=2, num_pages=8 * s, page_len=G, prefill_chunk=32, mesh=mesh)
    rng = np.random.default_rng(s)
    chunks = [(7, 16, 10), (13, 6)]  # chunk ends off page boundaries
    steps = 4
    seqs = [rng.integers(3, config.vocab_size, sum(c) + 2 * steps).tolist() for c in chunks]
    forward = jitted(net)
    want = [np.asarray(forward(np.array([ids]), np.arange(len(ids))[None])[0])[0] for ids in seqs]
    prefill, pages = _logits_fn(engine), RankPages(8 * s, s, seed=1)
    tables = [[], []]
    for i, sizes in enumerate(chunks):
        start = 0
        for n in sizes:
            got = prefill(seqs[i][start:start + n], start, pages.table_for(tables[i], start + n))
            assert sorted(got) == list(range(start, start + n))
            for p, row in got.items():
                np.testing.assert_allclose(row, want[i][p], atol=TOL, rtol=0)
            start += n
    decode = _decode_logits_fn(engine)
    lengths = [sum(c) for c in chunks]
    narrow = s * 4  # covers 16 pages: 64 positions
    wide = s * (GATHER_MAX_KEYS // G + 1)  # more keys per device than the gathered path takes
    for width in [narrow] * steps + [wide] * steps:
        for i in range(2):
            pages.table_for(tables[i], lengths[i] + 1)
        logits = decode([seqs[i][lengths[i]] for i in range(2)], lengths, tables, width)
        for i in range(2):
            np.testing.assert_allclose(logits[i], want[i][lengths[i]], atol=TOL, rtol=0)
            lengths[i] += 1


def _dense_window_reference(q, k, v, positions, scale, window):
    mask = (positions[:, None, :] >= 0) & attention.visible(positions[:, None, :], positions[:, :, None], window)
    return attention.attend(q, k, v, mask, scale)


@mesh_only
@pytest.mark.parametrize('length, window, order', [(37, 1, 'shuffled'), (37, 2, 'sorted'),
                                                   (40, 3, 'shuffled'), (29, 6, 'sorted')])
def test_ring_attention_window_equals_dense(length, window, order):
    """Lengths that are not multiples of 8 (padded with -1); tokens shuffled across shards, or in
    order (contiguous blocks of c = 5 and 4 tokens, so blocks before a shard's windows are skipped
    by the cond; windows 2 and c + 2 put the last key of an earlier block exactly at the first key
    the shard's first query sees, so skipping one block too many fails)."""
    mesh = _mesh('seq8')
    rng = np.random.default_rng(length + window)
    b, n, k, h = 2, 4, 2, 8
    t = -(-length // 8) * 8
    positions = np.full((b, t), -1, np.int32)
    for row in range(b):
        positions[row, :length] = rng.permutation(length) if order == 'shuffled' else np.arange(length)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, k, k))
    got = jax.jit(lambda *a: ring_attention(*a, 0.3, mesh, window=window))(q, kk, v, jnp.asarray(positions))
    want = _dense_window_reference(q, kk, v, jnp.asarray(positions), 0.3, window)
    real = positions >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=TOL, rtol=0)
