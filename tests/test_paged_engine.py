"""PagedEngine against plain full forward passes (no cache at all) on a tiny model."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _model_helpers import tiny_config, tiny_model
from model import paged_engine
from model.paged_engine import PagedEngine, row_buckets, width_buckets

G = 4  # page length


@pytest.fixture(scope="module")
def model():
    config = tiny_config(max_context=64)
    return config, tiny_model(config, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy continuation by full forward passes: independent of any cache or engine."""
    config, net = model
    graphdef, state = nnx.split(net)
    width = config.max_context  # fixed width: causal attention hides the padding after the ids

    @jax.jit
    def next_token(ids, n):
        logits, _ = nnx.merge(graphdef, state)(ids, jnp.arange(width)[None], None)
        return jnp.argmax(logits[0, n - 1])

    def run(prompt, n):
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(next_token(jnp.array([ids + [0] * (width - len(ids))]), len(ids))))
        return ids[len(prompt):]

    return run


@pytest.fixture(scope="module")
def engine(model):
    config, net = model
    return PagedEngine(config, net, max_slots=4, num_pages=60, page_len=G, prefill_chunk=32)


class Pages:
    """Hands out page ids in a shuffled order, so tables are never contiguous."""

    def __init__(self, num_pages, seed=0):
        self.free = list(range(1, num_pages))
        random.Random(seed).shuffle(self.free)

    def table_for(self, table, length):
        while len(table) * G < length:
            table.append(self.free.pop())
        return table


def generate(engine, pages, slot, prompt, n, chunk, table=None, start=0):
    table = table if table is not None else []
    token = None
    for s in range(start, len(prompt), chunk):
        piece = prompt[s:s + chunk]
        pages.table_for(table, s + len(piece))
        token = engine.prefill(slot, piece, s, table)
    out, pos = [token], len(prompt)
    while len(out) < n:
        pages.table_for(table, pos + 1)
        out.append(engine.decode([slot], [out[-1]], [pos], [table])[0])
        pos += 1
    return out, table


@pytest.mark.parametrize("length", [1, 3, 4, 9, 23])
def test_greedy_equals_full_forward(model, engine, reference, length):
    config, _ = model
    prompt = [(7 * i + 3) % config.vocab_size for i in range(length)]
    out, _ = generate(engine, Pages(60), 0, prompt, 10, chunk=8)  # chunks of 8: 23 takes three
    assert out == reference(prompt, 10)


def test_batched_decode_equals_solo(model, engine, reference):
    config, _ = model
    pages = Pages(60, seed=1)
    prompts = [[(5 * i + k) % config.vocab_size for i in range(n)] for k, n in
               enumerate((2, 11, 17))]
    tables, last, pos = [], [], []
    for slot, prompt in enumerate(prompts):
        table = pages.table_for([], len(prompt))
        last.append([engine.prefill(slot, prompt, 0, table)])
        tables.append(table)
        pos.append(len(prompt))
    for _ in range(8):
        for i in range(3):
            pages.table_for(tables[i], pos[i] + 1)
        tokens = engine.decode([0, 1, 2], [t[-1] for t in last], pos, tables)
        for i, t in enumerate(tokens):
            last[i].append(t)
            pos[i] += 1
    for prompt, out in zip(prompts, last):
        assert out == reference(prompt, 9)


def test_shared_prefix_pages_give_the_same_tokens(model, engine, reference):
    config, _ = model
    pages = Pages(60, seed=2)
    shared = [(3 * i + 1) % config.vocab_size for i in range(12)]  # 3 full pages
    _, table_a = generate(engine, pages, 0, shared + [5, 6], 4, chunk=16)
    # B reuses A's three full pages and computes only from position 12 on.
    prompt_b = shared + [9, 9, 9]
    out_b, _ = generate(engine, pages, 1, prompt_b, 6, chunk=16, table=table_a[:3], start=12)
    assert out_b == reference(prompt_b, 6)


def test_seeded_sampling_depends_on_seed_and_position_not_slot(model, engine):
    """A seeded request samples the same tokens alone in slot 0 as in slot 3 beside batch mates
    (greedy and sampled), and other tokens with another seed: preemption and recompute rely on it."""
    from model.sampling import SamplingParams

    config, _ = model
    prompt = [(11 * i + 2) % config.vocab_size for i in range(9)]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(slot, params, mates=()):
        pages = Pages(60, seed=slot)
        rows = [(slot, prompt, params), *mates]
        tables, last, pos = [], [], []
        for s, p, sp in rows:
            engine.set_params(s, sp)
            table = pages.table_for([], len(p))
            last.append([engine.prefill(s, p, 0, table)])
            tables.append(table)
            pos.append(len(p))
        for _ in range(12):
            for i in range(len(rows)):
                pages.table_for(tables[i], pos[i] + 1)
            tokens = engine.decode([r[0] for r in rows], [t[-1] for t in last], pos, tables)
            for i, t in enumerate(tokens):
                last[i].append(t)
                pos[i] += 1
        return last[0]

    alone = run(0, params)
    mates = ((0, prompt[:4], SamplingParams(temperature=2.0, seed=1)),
             (1, prompt[::-1], SamplingParams(temperature=0.0)))
    assert run(3, params, mates) == alone
    assert run(0, SamplingParams(temperature=1.0, top_p=0.95, seed=99)) != alone


def test_bad_calls_name_the_limit(model, engine):
    with pytest.raises(ValueError, match="prefill chunk of 33 tokens: must be 1..32"):
        engine.prefill(0, [5] * 33, 0, list(range(1, 10)))
    with pytest.raises(ValueError, match="must be 1..32"):
        engine.prefill(0, [], 0, [])
    with pytest.raises(ValueError, match="max_len"):
        engine.prefill(0, [5] * 8, 60, list(range(1, 18)))
    with pytest.raises(ValueError, match="decode of 5 rows"):
        engine.decode([0, 1, 2, 3, 0], [5] * 5, [1] * 5, [[1]] * 5)


def test_no_compilation_after_warmup(model):
    config, net = model
    engine = PagedEngine(config, net, max_slots=3, num_pages=60, page_len=G, prefill_chunk=16)
    engine.warmup()
    compiled = engine.compile_count
    assert engine.row_buckets == (1, 2, 3)
    rows = len(engine.row_buckets)
    decode = sum(len(engine.flat_sizes(r)) + len(engine.widths) for r in engine.row_buckets)
    # Sampling: prefill's one row; block-walking decode's row buckets (ragged decode samples inside).
    sampling = rows if engine.widths else 1
    assert compiled == len(engine.buckets) + decode + sampling
    pages = Pages(60, seed=4)
    rng = np.random.default_rng(0)
    tables = []
    for slot, length in enumerate([1, 5, 16, 17, 30]):
        prompt = rng.integers(0, config.vocab_size, length).tolist()
        _, table = generate(engine, pages, slot % 3, prompt, 5, chunk=16)
        tables.append((table, length + 4))
    for rows in (1, 2, 3):  # every row bucket, after requests of every length
        engine.decode(list(range(rows)), [1] * rows, [p for _, p in tables[:rows]],
                      [t for t, _ in tables[:rows]])
        engine.decode_steps(list(range(rows)), [1] * rows, [p - 4 for _, p in tables[:rows]],
                            [t for t, _ in tables[:rows]], steps=3)
    assert engine.compile_count == compiled


def test_no_compilation_after_warmup_when_decode_walks_blocks(model, monkeypatch):
    """Rows past the ragged bound decode one block-walking step at a time, each step fed the
    token the last one sampled on the device: a window of several such steps compiles nothing
    new (it did once: the sampled token's device placement was a shape warm-up never saw)."""
    monkeypatch.setattr(paged_engine, "FLAT_MAX_KEYS", 2 * G)  # any row past 8 positions walks
    config, net = model
    engine = PagedEngine(config, net, max_slots=2, num_pages=60, page_len=G, prefill_chunk=32,
                         max_steps=4)
    assert engine.flat_pages == 2 and engine.widths
    engine.warmup()
    compiled = engine.compile_count
    pages = Pages(60, seed=5)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (13, 30)]
    tables = [pages.table_for([], len(p) + 4) for p in prompts]
    first = [engine.prefill(slot, p, 0, t) for slot, (p, t) in enumerate(zip(prompts, tables))]
    for rows in (1, 2):
        got = engine.decode_steps(list(range(rows)), first[:rows],
                                  [len(p) for p in prompts[:rows]], tables[:rows], steps=4)
        assert all(len(g) == 4 for g in got)
    assert engine.compile_count == compiled


def test_width_buckets():
    # Powers of four, 3/4 points up to 256 pages, then the whole table; multiples of S on a mesh.
    assert width_buckets(512) == (1, 4, 12, 16, 48, 64, 192, 256, 512)
    assert width_buckets(65536)[-4:] == (1024, 4096, 16384, 65536)
    assert width_buckets(10) == (1, 4, 10)
    assert width_buckets(64, multiple=8) == (8, 16, 48, 64)


def test_row_buckets():
    assert row_buckets(1) == (1,)
    assert row_buckets(5) == (1, 2, 4, 5)
    assert row_buckets(16) == (1, 2, 4, 8, 16)


def test_row_bucket_padding_changes_no_row(model, engine):
    """The same rows decoded in a 2-row bucket and padded into the 4-row one give equal tokens
    (padding rows write nothing, so the pages after each call are the same too)."""
    config, _ = model
    pages = Pages(60, seed=5)
    prompts = [[(3 * i + k) % config.vocab_size for i in range(n)] for k, n in enumerate((6, 13))]
    tables = [pages.table_for([], len(p) + 1) for p in prompts]
    first = [engine.prefill(slot, p, 0, t) for slot, (p, t) in enumerate(zip(prompts, tables))]
    pos = [len(p) for p in prompts]
    two = engine.decode([0, 1], first, pos, tables)  # bucket 2
    three = engine.decode([0, 1, 0], first + [first[0]], pos + [pos[0]], tables + [tables[0]])
    assert three[:2] == two  # bucket 4, rewriting the same K/V at the same positions
    assert three[2] == two[0]
