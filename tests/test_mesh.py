"""Ring attention and the sharded engine against single-device references, on 8 simulated CPU
devices (tests/conftest.py sets XLA_FLAGS): ring equals dense attention, a sharded pool equals a
dense cache through the whole model (with chunked prefill), and generation on a mesh equals
generation on one device, token for token."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _model_helpers import tiny_config, tiny_model
from model import attention, sharding
from model.kv_cache import KVCache
from model.paged_engine import PagedEngine
from model.ring_attention import ring_attention

G = 4  # page length
MESHES = {'seq8': sharding.MeshShape(sequence=8), 'seq4_tp2': sharding.MeshShape(sequence=4, tensor=2)}

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 devices: XLA_FLAGS='
                                '--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)')


def _mesh(name):
    shape = MESHES[name]
    return sharding.make_mesh(shape, jax.devices()[:shape.size])


def _dense_reference(q, k, v, positions, scale):
    mask = (positions[:, None, :] >= 0) & (positions[:, None, :] <= positions[:, :, None])  # [B, T, S]
    return attention.attend(q, k, v, mask, scale)


@pytest.mark.parametrize('length', [64, 40, 37, 3])
def test_ring_attention_equals_dense(length):
    """Tokens in any order across 8 shards (here: shuffled, padded to a multiple of 8 with -1)."""
    mesh = _mesh('seq8')
    rng = np.random.default_rng(length)
    b, n, k, h = 2, 4, 2, 8
    t = -(-length // 8) * 8
    positions = np.full((b, t), -1, np.int32)
    for row in range(b):
        positions[row, :length] = rng.permutation(length)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, k, k))
    got = jax.jit(lambda *a: ring_attention(*a, 0.3, mesh))(q, kk, v, jnp.asarray(positions))
    want = _dense_reference(q, kk, v, jnp.asarray(positions), 0.3)
    real = positions >= 0
    err = np.max(np.abs(np.asarray(got)[real] - np.asarray(want)[real]))
    assert err <= 1e-5, err


class RankPages:
    """Page ids for a pool striped over S devices: column j of a table comes from device j % S."""

    def __init__(self, num_pages, s, seed=0):
        per = num_pages // s
        self.s = s
        self.free = [[r * per + i for i in range(1, per)] for r in range(s)]
        for r, pages in enumerate(self.free):
            random.Random(seed + r).shuffle(pages)

    def table_for(self, table, length):
        while len(table) * G < length:
            table.append(self.free[len(table) % self.s].pop())
        return table


@pytest.fixture(scope='module')
def model():
    config = tiny_config(max_context=256)
    return config, tiny_model(config, seed=5)


def _logits_fn(engine):
    """Full-vocabulary logits of a prefill chunk through the engine's own layout and cache."""
    @jax.jit
    def run(state, pages, tokens, positions, tables, start):
        net = nnx.merge(engine._graphdef, state)
        logits, cache = net(tokens, positions, engine._cache(pages, tables, start, prefill=True))
        return logits, (cache.k_pages, cache.v_pages)

    def chunk(token_ids, start, table):
        bucket = next(b for b in engine.buckets if b >= len(token_ids))
        tokens, positions, _, _ = engine._stripe(token_ids, start, bucket)
        seq = engine._sharding(jax.sharding.PartitionSpec(None, 'sequence'))
        logits, engine._pages = run(engine._state, engine._pages, engine._put(tokens, seq),
                                    engine._put(positions, seq),
                                    engine._local_tables([table], engine.table_width), start)
        logits = np.asarray(logits)[0]
        return {int(p): logits[i] for i, p in enumerate(positions[0]) if p >= 0}

    return chunk


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('chunks', [(45,), (7, 16, 16, 6), (16, 3, 29)])
def test_sharded_prefill_equals_dense_cache(model, mesh_name, chunks):
    """The whole model over the sharded pool (ring attention inside each chunk, earlier chunks read
    from pages on every device) gives the logits of a dense-cache forward pass, within 1e-5."""
    config, net = model
    mesh = _mesh(mesh_name)
    s = mesh.shape['sequence']
    engine = PagedEngine(config, net, max_slots=2, num_pages=8 * s, page_len=G, prefill_chunk=64,
                         mesh=mesh)
    total = sum(chunks)
    ids = np.random.default_rng(sum(chunks) + s).integers(3, config.vocab_size, total).tolist()
    want, _ = jax.jit(lambda t, p, c: net(t, p, c))(
        jnp.asarray([ids]), jnp.arange(total)[None], KVCache.init(config, 1, 64))
    want = np.asarray(want)[0]
    run, pages, table, start = _logits_fn(engine), RankPages(8 * s, s), [], 0
    for n in chunks:
        got = run(ids[start:start + n], start, pages.table_for(table, start + n))
        assert sorted(got) == list(range(start, start + n))
        for p, row in got.items():
            np.testing.assert_allclose(row, want[p], atol=1e-5, rtol=0)
        start += n


def _generate(engine, pages, prompts, steps, chunk):
    """Chunked prefill of each prompt, then batched greedy decode of all of them."""
    tables = [[] for _ in prompts]
    last = []
    for i, prompt in enumerate(prompts):
        for start in range(0, len(prompt), chunk):
            piece = prompt[start:start + chunk]
            token = engine.prefill(i, piece, start, pages.table_for(tables[i], start + len(piece)))
        last.append(token)
    out = [[t] for t in last]
    lengths = [len(p) for p in prompts]
    for _ in range(steps):
        for i in range(len(prompts)):
            pages.table_for(tables[i], lengths[i] + 1)
        toks = engine.decode(list(range(len(prompts))), [o[-1] for o in out], lengths, tables)
        for i, t in enumerate(toks):
            out[i].append(t)
            lengths[i] += 1
    return out


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_generation_on_mesh_equals_one_device(model, mesh_name):
    config, net = model
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 38, 21)]
    one = PagedEngine(config, net, max_slots=3, num_pages=64, page_len=G, prefill_chunk=16)
    want = _generate(one, RankPages(64, 1), prompts, steps=12, chunk=13)
    mesh = _mesh(mesh_name)
    s = mesh.shape['sequence']
    sharded = PagedEngine(config, net, max_slots=3, num_pages=16 * s, page_len=G, prefill_chunk=16,
                          mesh=mesh)
    got = _generate(sharded, RankPages(16 * s, s, seed=4), prompts, steps=12, chunk=13)
    assert got == want


def test_pool_is_split_over_the_sequence_axis(model):
    config, net = model
    mesh = _mesh('seq8')
    engine = PagedEngine(config, net, max_slots=2, num_pages=64, page_len=G, mesh=mesh)
    one = PagedEngine(config, net, max_slots=2, num_pages=64, page_len=G)
    assert engine.pool_bytes_per_device * 8 == one.pool_bytes_per_device
    shard_shapes = {s.data.shape for s in engine._pages[0].addressable_shards}
    assert shard_shapes == {(config.n_layers, config.n_kv_heads, 8, G, config.head_dim)}


def test_page_on_wrong_device_is_refused(model):
    config, net = model
    engine = PagedEngine(config, net, max_slots=2, num_pages=64, page_len=G, mesh=_mesh('seq8'))
    with pytest.raises(ValueError, match='wrong device'):
        engine.prefill(0, [5, 6, 7], 0, [9])  # page 9 is on device 1; column 0 belongs to device 0


def test_a_checkpoint_loads_straight_into_its_shards(model, tmp_path):
    """checkpoint.load onto a mesh places every parameter as the engine wants it (no device holds
    a whole tensor that the tensor axis splits), the engine keeps those arrays without copying,
    and it generates the tokens of an unsharded load."""
    from model import checkpoint

    config, net = model
    checkpoint.save(tmp_path, config, net)
    mesh = _mesh('seq4_tp2')
    _, placed = checkpoint.load(tmp_path, mesh=mesh)
    params = nnx.state(placed, nnx.Param)
    want = sharding.param_shardings(params, mesh)
    leaves = jax.tree.leaves(params)
    assert all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(leaves, jax.tree.leaves(want)))
    split = [a for a in leaves if 'tensor' in a.sharding.spec]
    assert split and all(s.data.shape != a.shape for a in split for s in a.addressable_shards)
    engine = PagedEngine(config, placed, max_slots=3, num_pages=16 * 4, page_len=G, prefill_chunk=16, mesh=mesh)
    kept = jax.tree.leaves(nnx.state(nnx.merge(engine._graphdef, engine._state), nnx.Param))
    assert all(a is b for a, b in zip(kept, leaves))
    prompts = [[5, 9, 14, 3, 77, 21], list(range(3, 40))]
    one = PagedEngine(config, net, max_slots=3, num_pages=64, page_len=G, prefill_chunk=16)
    assert (_generate(engine, RankPages(64, 4, seed=2), prompts, steps=8, chunk=13)
            == _generate(one, RankPages(64, 1), prompts, steps=8, chunk=13))
