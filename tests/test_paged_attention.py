"""Paged equals dense: PagedKVCache against KVCache, paged_attend against attend + cache_mask.

All in float32 under jax.jit; pages are handed out shuffled from the pool (never contiguous) and the
pool's unowned pages hold large garbage, so reading a wrong page cannot go unnoticed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _model_helpers import tiny_config, tiny_model
from model import attention
from model.kv_cache import KVCache
from model.kv_pages import NULL_PAGE, PagedKVCache, page_bytes, pages_for_budget
from model.paged_attention import Partial, merge_partials, paged_attend, paged_attend_partial

G = 4  # page length
PAGES_PER_SEQ = 5  # max_len 20
NUM_PAGES = 32
H = 8
TOL = 1e-5


def _page_table(rng, pages_needed: list[int]) -> np.ndarray:
    """i32[B, PAGES_PER_SEQ]: each row's first pages_needed[b] entries drawn shuffled from 1..NUM_PAGES-1."""
    ids = rng.permutation(np.arange(1, NUM_PAGES))
    table = np.full((len(pages_needed), PAGES_PER_SEQ), NULL_PAGE, np.int32)
    used = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = ids[used:used + n]
        used += n
    return table


def _scatter_pool(rng, dense: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[K, P, G, H] pool holding dense [B, S, K, H] at `table`'s pages; garbage elsewhere, zero null page."""
    b, s, k, h = dense.shape
    pool = rng.normal(0.0, 100.0, (k, NUM_PAGES, G, h)).astype(np.float32)
    pool[:, NULL_PAGE] = 0.0
    for row in range(b):
        for col, page in enumerate(table[row]):
            if page != NULL_PAGE:
                pool[:, page] = dense[row, col * G:(col + 1) * G].transpose(1, 0, 2)  # [K, G, H]
    return pool


def _problem(seed: int, n_heads: int, kv_heads: int, positions: np.ndarray):
    """q, dense k/v [B, S, K, H], their paged form, and the page table covering each row's last position."""
    rng = np.random.default_rng(seed)
    b, t = positions.shape
    s = PAGES_PER_SEQ * G
    q = rng.normal(size=(b, t, n_heads, H)).astype(np.float32)
    k = rng.normal(size=(b, s, kv_heads, H)).astype(np.float32)
    v = rng.normal(size=(b, s, kv_heads, H)).astype(np.float32)
    table = _page_table(rng, [int(p.max()) // G + 1 for p in positions])
    return q, k, v, _scatter_pool(rng, k, table), _scatter_pool(rng, v, table), table


@jax.jit
def _dense(q, k, v, positions):
    mask = attention.cache_mask(positions, k.shape[1])
    return attention.attend(q, k, v, mask, 1.0 / np.sqrt(q.shape[-1]))


@functools.partial(jax.jit, static_argnames='pages_per_block')
def _paged(q, k_pages, v_pages, table, positions, pages_per_block=None):
    return paged_attend(q, k_pages, v_pages, table, positions, 1.0 / np.sqrt(q.shape[-1]),
                        pages_per_block=pages_per_block)


HEADS = [pytest.param(4, 2, id='gqa'), pytest.param(2, 2, id='mha')]
BLOCKS = [pytest.param(1, id='block1'), pytest.param(2, id='block2-ragged'), pytest.param(None, id='block-default')]


@pytest.mark.parametrize('n_heads, kv_heads', HEADS)
@pytest.mark.parametrize('pages_per_block', BLOCKS)
def test_decode_matches_dense(n_heads, kv_heads, pages_per_block):
    # Lengths 1, 4 (a full page), 7, 13 and 20 (the whole table): decode query at length - 1.
    positions = np.array([[0], [3], [6], [12], [19]], np.int32)
    q, k, v, kp, vp, table = _problem(0, n_heads, kv_heads, positions)
    got = _paged(q, kp, vp, table, positions, pages_per_block=pages_per_block)
    want = _dense(q, k, v, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL)


@pytest.mark.parametrize('n_heads, kv_heads', HEADS)
@pytest.mark.parametrize('pages_per_block', BLOCKS)
@pytest.mark.parametrize('starts', [pytest.param([0, 4, 8], id='page-boundary'),
                                    pytest.param([1, 6, 13], id='mid-page')])
def test_prefill_chunk_matches_dense(n_heads, kv_heads, pages_per_block, starts):
    chunk = 6
    positions = np.array(starts, np.int32)[:, None] + np.arange(chunk, dtype=np.int32)[None, :]  # [B, T]
    q, k, v, kp, vp, table = _problem(1, n_heads, kv_heads, positions)
    got = _paged(q, kp, vp, table, positions, pages_per_block=pages_per_block)
    want = _dense(q, k, v, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL)


def test_query_that_sees_nothing_is_zero_and_finite():
    positions = np.array([[-1, 2]], np.int32)
    q, _, _, kp, vp, table = _problem(2, 4, 2, positions)
    got = np.asarray(_paged(q, kp, vp, table, positions))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[0, 0], 0.0)


# ---------------------------------------------------------------------------------------------
# merge_partials: attention over key shards, merged, equals attention over all keys.
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('page_offset', 'page_stride'))
def _partial(q, k_pages, v_pages, table, positions, page_offset=0, page_stride=1):
    return paged_attend_partial(q, k_pages, v_pages, table, positions, 1.0 / np.sqrt(q.shape[-1]),
                                page_offset=page_offset, page_stride=page_stride, pages_per_block=2)


@pytest.mark.parametrize('split', ['halves', 'round-robin'])
def test_merge_partials_of_two_key_shards_equals_whole(split):
    # Row 0 sees only page 0, so its second shard is empty (l = 0) in both splits.
    positions = np.array([[1], [9], [19]], np.int32)
    q, k, v, kp, vp, table = _problem(3, 4, 2, positions)
    if split == 'halves':
        shards = [_partial(q, kp, vp, table[:, :3], positions),
                  _partial(q, kp, vp, table[:, 3:], positions, page_offset=3)]
    else:
        shards = [_partial(q, kp, vp, table[:, 0::2], positions, page_offset=0, page_stride=2),
                  _partial(q, kp, vp, table[:, 1::2], positions, page_offset=1, page_stride=2)]
    assert float(shards[1].l[0].max()) == 0.0
    whole = _partial(q, kp, vp, table, positions)
    want = np.asarray(_dense(q, k, v, positions))
    for merged in (jax.jit(merge_partials)(shards),
                   jax.jit(functools.partial(merge_partials, axis=1))(
                       Partial(*(jnp.stack(f, axis=1) for f in zip(*shards))))):
        np.testing.assert_allclose(np.asarray(merged.o), want, rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(merged.o), np.asarray(whole.o), rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(merged.m), np.asarray(whole.m), rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(merged.l), np.asarray(whole.l), rtol=1e-6)


def test_merge_of_empty_shards_is_zero():
    empty = Partial(o=jnp.zeros((1, 1, 2, H)), m=jnp.full((1, 1, 2), attention.MASK_VALUE), l=jnp.zeros((1, 1, 2)))
    merged = merge_partials([empty, empty])
    np.testing.assert_array_equal(np.asarray(merged.o), 0.0)
    np.testing.assert_array_equal(np.asarray(merged.l), 0.0)


# ---------------------------------------------------------------------------------------------
# PagedKVCache: write then read equals the dense KVCache; padding never lands in the pool.
# ---------------------------------------------------------------------------------------------
_write = jax.jit(lambda cache, layer_kvs, positions: _write_layers(cache, layer_kvs, positions))


def _write_layers(cache, layer_kvs, positions):
    for layer, (k, v) in enumerate(layer_kvs):
        cache = cache.write(layer, positions, k, v)
    return cache


def _random_kv(rng, cfg, b, t):
    shape = (b, t, cfg.n_kv_heads, cfg.head_dim)
    return [(rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))
            for _ in range(cfg.n_layers)]


def test_write_then_read_equals_dense_cache():
    cfg = tiny_config()
    rng = np.random.default_rng(4)
    b = 3
    table = _page_table(rng, [PAGES_PER_SEQ] * b)
    paged = PagedKVCache.init(cfg, NUM_PAGES, G, b, PAGES_PER_SEQ).with_page_table(table)
    dense = KVCache.init(cfg, b, paged.max_len)
    assert paged.max_len == PAGES_PER_SEQ * G
    # A prefill chunk starting mid-page, then decode steps at different positions per row.
    steps = [np.array([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [10, 11, 12, 13, 14, 15]], np.int32)]
    steps += [np.array([[6], [9], [16]], np.int32) + i for i in range(4)]
    for positions in steps:
        kvs = _random_kv(rng, cfg, b, positions.shape[1])
        paged, dense = _write(paged, kvs, positions), _write(dense, kvs, positions)
    read = jax.jit(lambda cache, layer: cache.read(layer), static_argnums=1)
    for layer in range(cfg.n_layers):
        k, v = read(paged, layer)
        np.testing.assert_array_equal(np.asarray(k), np.asarray(dense.k[layer]))
        np.testing.assert_array_equal(np.asarray(v), np.asarray(dense.v[layer]))
        for span in (1, G, 2 * G + 1):  # a prefix, as the model's kv_span reads it
            k, v = cache_read_span(paged, layer, span)
            np.testing.assert_array_equal(np.asarray(k), np.asarray(dense.k[layer, :, :span]))
            np.testing.assert_array_equal(np.asarray(v), np.asarray(dense.v[layer, :, :span]))


cache_read_span = jax.jit(lambda cache, layer, span: cache.read(layer, span), static_argnums=(1, 2))


def test_padding_positions_are_dropped():
    cfg = tiny_config()
    rng = np.random.default_rng(5)
    table = _page_table(rng, [2, 1])  # row 0 owns positions 0..7, row 1 positions 0..3
    cache = PagedKVCache.init(cfg, NUM_PAGES, G, 2, PAGES_PER_SEQ).with_page_table(table)
    # Row 0: two real tokens, then padding (past max_len, negative, and in unallocated pages 2..4).
    # Row 1: one real token, then padding that would land in its unallocated page 1 or the null page.
    positions = np.array([[6, 7, 20, 23, -1, 8, 19], [0, -3, 4, 7, 12, 99, -20]], np.int32)
    kvs = _random_kv(rng, cfg, 2, positions.shape[1])
    cache = _write(cache, kvs, positions)
    k_pages = np.asarray(cache.k_pages)  # [L, K, P, G, H]
    expected = np.zeros_like(k_pages)
    for layer, (k, _) in enumerate(kvs):
        for row, t in [(0, 0), (0, 1), (1, 0)]:
            p = positions[row, t]
            expected[layer, :, table[row, p // G], p % G] = k[row, t]
    np.testing.assert_array_equal(k_pages, expected)  # null page, unowned pages, other row's pages: zero
    assert not np.any(np.asarray(cache.v_pages)[:, :, NULL_PAGE])


def test_pages_for_budget():
    cfg = tiny_config()  # L=2, K=2, H=8, float32: a page of 4 tokens is 2*2*2*4*8*4 = 1024 bytes
    assert page_bytes(cfg, 4) == 1024
    assert pages_for_budget(cfg, 4, 10 * 1024 + 1023) == 10
    assert page_bytes(cfg, 4, jnp.bfloat16) == 512
    with pytest.raises(ValueError, match='at least 2'):
        pages_for_budget(cfg, 4, 1500)


@pytest.mark.skipif(not hasattr(KVCache, 'read'),
                    reason="Block still reads cache.k[layer]; turns on when both caches expose read(layer)")
def test_transformer_prefill_and_decode_paged_equals_dense():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=0)
    rng = np.random.default_rng(6)
    b, prompt = 2, 7
    tokens = rng.integers(3, cfg.vocab_size, (b, prompt + 3)).astype(np.int32)
    paged = PagedKVCache.init(cfg, NUM_PAGES, G, b, PAGES_PER_SEQ).with_page_table(
        _page_table(rng, [PAGES_PER_SEQ] * b))
    dense = KVCache.init(cfg, b, paged.max_len)
    step = jax.jit(lambda tok, pos, cache: model(tok, pos, cache))
    positions = np.broadcast_to(np.arange(prompt, dtype=np.int32), (b, prompt))
    (want, dense), (got, paged) = step(tokens[:, :prompt], positions, dense), step(tokens[:, :prompt], positions, paged)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL)
    for i in range(prompt, prompt + 3):
        pos = np.full((b, 1), i, np.int32)
        (want, dense), (got, paged) = step(tokens[:, i:i + 1], pos, dense), step(tokens[:, i:i + 1], pos, paged)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL)
