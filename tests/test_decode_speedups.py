"""Decode speed paths of PagedEngine against references that know nothing of them.

- Ragged decode (`DecodePages`: each row reads only its own pages, listed on the host and read
  chunk by chunk): full-vocabulary logits of rows with very different lengths in one batch equal
  the model's dense forward (1e-5), with a sliding-window layer, on one device and on meshes
  (sequence=8; sequence=4 x tensor=2), with lists longer than one chunk and a chunk boundary
  inside a row.
- The list-length buckets and the chunk size.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from _model_helpers import jitted, tiny_config, tiny_model
from model.config import LayerKind
from model.paged_engine import PagedEngine, flat_buckets
from model.sharded_cache import FLAT_CHUNK, flat_chunk
from test_mesh import MESHES, RankPages, _mesh

G = 4  # page length
TOL = 1e-5
KINDS = (LayerKind(window=7), LayerKind(rope=False, log_scale=64), LayerKind())


@pytest.fixture(scope='module')
def model():
    config = tiny_config(n_layers=3, layer_kinds=KINDS, max_context=256)
    return config, tiny_model(config, seed=6)


def _flat_logits(engine, slots, tokens, positions, tables):
    """Full-vocabulary logits of one ragged decode step (the engine's own lists and program)."""
    rows = next(r for r in engine.row_buckets if r >= len(slots))
    pad = rows - len(slots)
    flat = engine._decode_pages(tables, positions, rows)
    logits, engine._pages = engine._flat_step(
        engine._state, engine._pages, flat, np.array([*tokens, *[0] * pad], np.int32),
        np.array([*positions, *[-1] * pad], np.int32))
    return np.asarray(logits)[:len(slots)]


def _check_ragged(config, net, engine, pages, lengths, steps, seed):
    """Prefill rows of `lengths`, then `steps` ragged decode steps of all rows together; every
    row's logits must equal the dense forward's at its position."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, config.vocab_size, n + steps).tolist() for n in lengths]
    forward = jitted(net)
    want = [np.asarray(forward(np.array([ids]), np.arange(len(ids))[None])[0])[0] for ids in seqs]
    tables = [[] for _ in lengths]
    for slot, n in enumerate(lengths):
        for start in range(0, n, engine.prefill_chunk):
            piece = seqs[slot][start:min(n, start + engine.prefill_chunk)]
            engine.prefill(slot, piece, start, pages.table_for(tables[slot], start + len(piece)))
    pos = list(lengths)
    for _ in range(steps):
        for slot in range(len(lengths)):
            pages.table_for(tables[slot], pos[slot] + 1)
        got = _flat_logits(engine, list(range(len(lengths))), [s[p] for s, p in zip(seqs, pos)],
                           pos, tables)
        for slot, p in enumerate(pos):
            np.testing.assert_allclose(got[slot], want[slot][p], atol=TOL, rtol=0)
        pos = [p + 1 for p in pos]


@pytest.mark.parametrize('max_slots, lengths', [
    (1, (150,)),  # 38 pages: three chunks of 16 entries, the last one partial
    (2, (101, 35)),  # 26 + 9 entries: row 0 crosses the chunk boundary at 32
    (4, (3, 190, 60)),  # very different lengths in one batch, padded to the 4-row bucket
])
def test_ragged_decode_equals_dense_forward(model, max_slots, lengths):
    config, net = model
    engine = PagedEngine(config, net, max_slots=max_slots, num_pages=200, page_len=G,
                         prefill_chunk=64)
    _check_ragged(config, net, engine, RankPages(200, 1, seed=max_slots), lengths, steps=5,
                  seed=max_slots)


@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 devices (tests/conftest.py sets XLA_FLAGS)')
@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_ragged_decode_on_mesh_equals_dense_forward(model, mesh_name):
    """Each device lists only its own pages (page j of a sequence on device j % S); the per-device
    partials merge to the dense forward's logits."""
    config, net = model
    mesh = _mesh(mesh_name)
    s = mesh.shape['sequence']
    engine = PagedEngine(config, net, max_slots=2, num_pages=32 * s, page_len=G, prefill_chunk=64,
                         mesh=mesh)
    _check_ragged(config, net, engine, RankPages(32 * s, s, seed=s), (5, 97), steps=4, seed=s)


def test_list_buckets_and_chunks():
    assert flat_chunk(1) == 16 and flat_chunk(4) == 64 and flat_chunk(16) == FLAT_CHUNK == 128
    assert flat_buckets(256, 16) == (16, 64, 256)
    assert flat_buckets(4096, 128) == (128, 512, 2048, 4096)
    assert flat_buckets(300, 64) == (64, 256, 320)  # the cap rounded up to whole chunks
    assert flat_buckets(12, 16) == (12,)  # one chunk holds every entry
