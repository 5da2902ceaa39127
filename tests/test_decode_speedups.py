"""Decode speed paths of PagedEngine against references that know nothing of them.

- Ragged decode (`DecodePages`: each row reads only its own pages, listed on the host and read
  chunk by chunk): full-vocabulary logits of rows with very different lengths in one batch equal
  the model's dense forward (1e-5), with a sliding-window layer, on one device and on a mesh
  (sequence=4 x tensor=2), with lists longer than one chunk and a chunk boundary inside a row.
- Multi-step decode (`decode_steps`: k steps in one call, sampling on the device) equals k
  single steps token for token, greedy and sampled rows, on one device and on a mesh, and through
  the block-walking program for rows past the ragged bound.
- The engine thread's multi-step windows stream exactly what single steps stream (tokens, text,
  finish reasons by max tokens, stop token and stop sequence inside a window).
- Prefill chunks padded to a 3/4 bucket (96) equal the dense forward at every position.
- The prefill buckets, the list-length buckets and the chunk size.
"""

from __future__ import annotations

import asyncio
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _model_helpers import jitted, tiny_config, tiny_model
from model.config import LayerKind
from model.paged_engine import PagedEngine, flat_buckets, prefill_sizes, width_buckets
from model.sampling import SamplingParams
from model.sharded_cache import FLAT_CHUNK, ShardedPagedCache, flat_chunk
from preprocess.tokenizer import Tokenizer
from server.engine_loop import EngineLoop
from server.kv_manager import KVCacheManager
from server.validation import GenerationRequest
from test_mesh import RankPages, _logits_fn, _mesh

G = 4  # page length
TOL = 1e-5
KINDS = (LayerKind(window=7), LayerKind(rope=False, log_scale=64), LayerKind())


@pytest.fixture(scope='module')
def model():
    config = tiny_config(n_layers=3, layer_kinds=KINDS, max_context=256)
    return config, tiny_model(config, seed=6)


def _flat_logits_fn(engine):
    """Full-vocabulary logits of one ragged decode step: the engine's own page lists and cache
    (`ShardedPagedCache` with `DecodePages`), the logits instead of its sampled tokens."""
    @jax.jit
    def run(state, pages, flat, tokens, positions):
        net = nnx.merge(engine._graphdef, state)
        cache = ShardedPagedCache(k_pages=pages[0], v_pages=pages[1], local_tables=None,
                                  start=jnp.int32(0), mesh=engine.mesh, prefill=False, flat=flat)
        logits, cache = net(tokens[:, None], positions[:, None], cache)
        return logits[:, 0], (cache.k_pages, cache.v_pages)

    def step(tokens, positions, tables):
        rows = next(r for r in engine.row_buckets if r >= len(tokens))
        pad = rows - len(tokens)
        flat = engine._decode_pages(tables, positions, rows)
        logits, engine._pages = run(engine._state, engine._pages, flat,
                                    np.array([*tokens, *[0] * pad], np.int32),
                                    np.array([*positions, *[-1] * pad], np.int32))
        return np.asarray(logits)[:len(tokens)]

    return step


def _check_ragged(config, net, engine, pages, lengths, steps, seed):
    """Prefill rows of `lengths`, then `steps` ragged decode steps of all rows together; every
    row's logits must equal the dense forward's at its position."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, config.vocab_size, n + steps).tolist() for n in lengths]
    forward = jitted(net)
    width = max(map(len, seqs))  # one batch, one compiled forward: causal, so padding after is unseen
    batch = np.array([ids + [0] * (width - len(ids)) for ids in seqs])
    want = np.asarray(forward(batch, np.broadcast_to(np.arange(width), batch.shape))[0])
    tables = [[] for _ in lengths]
    for slot, n in enumerate(lengths):
        for start in range(0, n, engine.prefill_chunk):
            piece = seqs[slot][start:min(n, start + engine.prefill_chunk)]
            engine.prefill(slot, piece, start, pages.table_for(tables[slot], start + len(piece)))
    pos, step = list(lengths), _flat_logits_fn(engine)
    for _ in range(steps):
        for slot in range(len(lengths)):
            pages.table_for(tables[slot], pos[slot] + 1)
        got = step([s[p] for s, p in zip(seqs, pos)], pos, tables)
        for slot, p in enumerate(pos):
            np.testing.assert_allclose(got[slot], want[slot][p], atol=TOL, rtol=0)
        pos = [p + 1 for p in pos]


@pytest.mark.parametrize('max_slots, lengths', [
    (1, (150,)),  # 38 pages: three chunks of 16 entries, the last one partial
    (4, (3, 190, 60)),  # 1 + 48 + 16 entries in a 4-row bucket: row 2 crosses the chunk boundary
])
def test_ragged_decode_equals_dense_forward(model, max_slots, lengths):
    config, net = model
    engine = PagedEngine(config, net, max_slots=max_slots, num_pages=200, page_len=G,
                         prefill_chunk=64)
    _check_ragged(config, net, engine, RankPages(200, 1, seed=max_slots), lengths, steps=3,
                  seed=max_slots)


@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 devices (tests/conftest.py sets XLA_FLAGS)')
def test_ragged_decode_on_mesh_equals_dense_forward(model):
    """sequence=4 x tensor=2: each device lists only its own pages (page j of a sequence on device
    j % S) and kv heads; the per-device partials merge to the dense forward's logits.
    (tests/test_mesh.py generates through this path on sequence=8 too.)"""
    config, net = model
    mesh = _mesh('seq4_tp2')
    s = mesh.shape['sequence']
    engine = PagedEngine(config, net, max_slots=2, num_pages=32 * s, page_len=G, prefill_chunk=64,
                         mesh=mesh)
    _check_ragged(config, net, engine, RankPages(32 * s, s, seed=s), (5, 97), steps=3, seed=s)


def test_prefill_at_a_three_quarter_bucket_equals_dense_forward(model):
    """Chunks of 90 and 40 tokens take the 96 and 64 buckets (6 and 24 padding tokens); every
    position's logits equal the dense forward's."""
    config, net = model
    engine = PagedEngine(config, net, max_slots=1, num_pages=64, page_len=G, prefill_chunk=128)
    assert engine.buckets == (16, 32, 64, 96, 128)
    ids = np.random.default_rng(2).integers(3, config.vocab_size, 130).tolist()
    want = np.asarray(jitted(net)(np.array([ids]), np.arange(130)[None])[0])[0]
    run, pages, table = _logits_fn(engine), RankPages(64, 1), []
    for start, n in ((0, 90), (90, 40)):
        got = run(ids[start:start + n], start, pages.table_for(table, start + n))
        assert sorted(got) == list(range(start, start + n))
        for p, row in got.items():
            np.testing.assert_allclose(row, want[p], atol=TOL, rtol=0)


def test_list_buckets_and_chunks():
    assert prefill_sizes(512) == (16, 32, 64, 96, 128, 192, 256, 384, 512)
    assert prefill_sizes(64) == (16, 32, 64)
    assert flat_chunk(1) == 16 and flat_chunk(4) == 64 and flat_chunk(16) == FLAT_CHUNK == 128
    assert flat_buckets(256, 16) == (16, 64, 256)
    assert flat_buckets(4096, 128) == (128, 512, 2048, 4096)
    assert flat_buckets(300, 64) == (64, 256, 320)  # the cap rounded up to whole chunks
    assert flat_buckets(12, 16) == (12,)  # one chunk holds every entry


def _engine(config, net, mesh=None, num_pages=200):
    engine = PagedEngine(config, net, max_slots=3, num_pages=num_pages, page_len=G, prefill_chunk=32,
                         mesh=mesh, max_steps=6)
    for slot, params in enumerate([SamplingParams(temperature=0.0),
                                   SamplingParams(temperature=0.9, seed=7),
                                   SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=-3)]):
        engine.set_params(slot, params)
    return engine


def _prefill(engine, prompts, tables):
    """Each prompt (one chunk) into its slot; the first sampled tokens. Run again, it writes the
    same K/V on the same pages, so a second decode run starts from the same pool."""
    return [engine.prefill(slot, p, 0, t) for slot, (p, t) in enumerate(zip(prompts, tables))]


def _single_steps(engine, first, pos, tables, steps):
    out = [[t] for t in first]
    for i in range(steps):
        for o, t in zip(out, engine.decode([0, 1, 2], [o[-1] for o in out], [p + i for p in pos],
                                           tables)):
            o.append(t)
    return [o[1:] for o in out]


@pytest.mark.parametrize('mesh_name', [None, 'seq4_tp2'])
def test_multi_step_decode_equals_single_steps(model, mesh_name):
    """decode_steps(k) gives, token for token, what k calls of decode give (a greedy row and two
    sampled rows, one with top-k / top-p), and leaves the same K/V in the pool; a second call
    continues from the first exactly."""
    if mesh_name is not None and len(jax.devices()) < 8:
        pytest.skip('needs 8 devices (tests/conftest.py sets XLA_FLAGS)')
    config, net = model
    mesh = None if mesh_name is None else _mesh(mesh_name)
    s = 1 if mesh is None else mesh.shape['sequence']
    engine = _engine(config, net, mesh, 32 * s)
    rng = np.random.default_rng(21)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (9, 30, 2)]
    pages = RankPages(32 * s, s, seed=2)
    tables = [pages.table_for([], len(p) + 6) for p in prompts]  # room for the steps ahead
    first = _prefill(engine, prompts, tables)
    pos = [len(p) for p in prompts]
    got = [[] for _ in prompts]
    for steps in (4, 2):  # two calls: the second starts where the first's tokens end
        rows = engine.decode_steps([0, 1, 2], [g[-1] if g else t for g, t in zip(got, first)],
                                   [p + len(g) for p, g in zip(pos, got)], tables, steps=steps)
        for g, r in zip(got, rows):
            g.extend(r)
    pool = [np.asarray(x) for x in engine._pages]
    assert _prefill(engine, prompts, tables) == first
    assert got == _single_steps(engine, first, pos, tables, 6)
    for a, b in zip(pool, engine._pages):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-6, rtol=0)


def test_multi_step_walks_blocks_past_the_ragged_bound(model):
    """Rows longer than the ragged bound (lowered here to 2 pages a row) take the block-walking
    program one step at a time inside decode_steps: same tokens as single decode calls."""
    config, net = model
    engine = _engine(config, net)
    engine.flat_pages = 2  # any row past 8 positions walks
    engine.widths = tuple(w for w in width_buckets(engine.pages_per_seq) if w > 2)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (9, 30, 2)]
    pages = RankPages(200, 1, seed=3)
    tables = [pages.table_for([], len(p) + 4) for p in prompts]
    first = _prefill(engine, prompts, tables)
    pos = [len(p) for p in prompts]
    got = engine.decode_steps([0, 1, 2], first, pos, tables, steps=4)
    _prefill(engine, prompts, tables)
    assert got == _single_steps(engine, first, pos, tables, 4)


def test_multi_step_limits(model):
    config, net = model
    engine = PagedEngine(config, net, max_slots=1, num_pages=80, page_len=G, max_steps=4)
    with pytest.raises(ValueError, match='steps'):
        engine.decode_steps([0], [5], [3], [[1, 2]], steps=5)
    with pytest.raises(ValueError, match='max_len'):
        engine.decode_steps([0], [5], [config.max_context - 2], [list(range(1, 65))], steps=3)
    with pytest.raises(ValueError, match='max_steps'):
        PagedEngine(config, net, max_slots=1, num_pages=80, page_len=G, max_steps=0)


class CountingEngine(PagedEngine):
    """A real engine that records how many steps each decode_steps call ran."""

    def decode_steps(self, slots, tokens, positions, block_tables, steps=1):
        self.windows.append(steps)
        return super().decode_steps(slots, tokens, positions, block_tables, steps)


def _serve(engine, max_steps, requests, stop_ids=frozenset()):
    """Runs `requests` through a real EngineLoop (slots for all: nothing waits) whose windows hold
    at most `max_steps` steps; returns each request's (token ids, text, finish reason), the
    lengths of the engine calls it made and the loop's final stats."""
    engine.windows = []
    loop = EngineLoop(engine, KVCacheManager(64, G), Tokenizer.default(), stop_ids, max_slots=4,
                      token_budget=20, max_steps=max_steps)

    async def main():
        loop.start()
        streams = [loop.submit(r, time.monotonic()) for r in requests]
        results = [[e async for e in s] for s in streams]
        stats = loop.stats()
        loop.stop()
        return results, stats

    results, stats = asyncio.run(main())
    out = [(sum((e.token_ids for e in events), ()), ''.join(e.text for e in events),
            events[-1].finish_reason) for events in results]
    return out, engine.windows, stats


def test_engine_loop_windows_equal_single_steps(model):
    """The engine thread with multi-step windows streams exactly what it streams one step at a
    time: same tokens, text and finish reasons for rows ending by max tokens, a stop token and a
    stop sequence inside a window, greedy and sampled; every page comes back."""
    config, net = model

    def request(i, max_new, stops=(), temperature=0.0):
        return GenerationRequest(request_id=f'r{i}', prompt_ids=(1, 5 + i, 7, 9 + 2 * i),
                                 params=SamplingParams(temperature=temperature, seed=i),
                                 max_new_tokens=max_new, stop_sequences=stops)

    engine = CountingEngine(config, net, max_slots=4, num_pages=64, page_len=G, max_len=64,
                            prefill_chunk=16, max_steps=5)
    probe, _, _ = _serve(engine, 1, [request(i, 20) for i in (2, 3)])
    ids = probe[0][0]
    stop_id = next(t for k, t in enumerate(ids) if k >= 3 and t not in ids[:k])  # ends row 0 early
    text = probe[1][1]
    stop_text = text[len(text) // 2:len(text) // 2 + 2]  # ends row 1 inside its text
    requests = [request(2, 20), request(3, 20, stops=(stop_text,)), request(4, 13, temperature=0.8),
                request(5, 2)]
    want, single, _ = _serve(engine, 1, requests, frozenset({stop_id}))
    got, multi, stats = _serve(engine, None, requests, frozenset({stop_id}))
    assert got == want
    assert {'STOP', 'STOP_SEQUENCE', 'MAX_TOKENS'} <= {reason for _, _, reason in want}
    assert all(len(ids) < 20 for ids, _, _ in want[:2])  # both stopped early
    assert max(multi) == 5 and max(single, default=1) == 1
    assert stats.running == 0 and stats.kv.used == 0
