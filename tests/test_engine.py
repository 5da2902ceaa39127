"""model/engine.py: the engine's tokens equal a plain model loop, alone or batched, chunked or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _model_helpers import tiny_config
from model.engine import Engine, prefill_buckets, span_buckets
from model.kv_cache import KVCache
from model.sampling import SamplingParams
from model.transformer import Transformer

GREEDY = SamplingParams(temperature=0.0)
MAX_LEN = 96


@pytest.fixture(scope="module")
def config():
    return tiny_config(max_context=MAX_LEN)


@pytest.fixture(scope="module")
def model(config):
    return Transformer(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(config, model):
    """One warmed engine shared by the tests (each frees its slots), so buckets compile once."""
    eng = Engine(config, model, max_slots=4, max_len=MAX_LEN, prefill_chunk=32)
    eng.warmup()
    return eng


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 97, size=n).tolist()


def reference_greedy(config, model, tokens: list[int], steps: int) -> list[int]:
    """Prompt in one call, then one token per call, through Transformer.__call__ and a B=1 KVCache."""
    cache = KVCache.init(config, 1, MAX_LEN)
    step = jax.jit(lambda t, p, c: model(t, p, c))
    n = len(tokens)
    logits, cache = step(jnp.asarray([tokens], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None], cache)
    out = [int(jnp.argmax(logits[0, -1]))]
    for i in range(steps):
        logits, cache = step(jnp.asarray([[out[-1]]], jnp.int32), jnp.asarray([[n + i]], jnp.int32), cache)
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


def run_alone(engine: Engine, tokens, params, steps: int, slot: int = 0) -> list[int]:
    out = [engine.prefill(slot, tokens, params)]
    for _ in range(steps):
        out.append(int(engine.decode()[slot]))
    engine.free(slot)
    return out


def test_buckets():
    assert prefill_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert prefill_buckets(100) == (16, 32, 64, 100)
    assert prefill_buckets(8) == (8,)
    assert span_buckets(8192) == (16, 64, 256, 1024, 4096, 8192)
    assert span_buckets(96) == (16, 64, 96)


def test_warmup_compiles_every_shape_a_long_prompt_reaches(engine):
    # max_len 96, chunk 32: a first chunk attends its own bucket, later chunks the whole row.
    assert engine.prefill_shapes == ((16, 16), (32, 32), (16, 96), (32, 96))
    assert engine.spans == (16, 64, 96)


@pytest.mark.parametrize("n", [1, 16, 17, 30])
def test_greedy_matches_plain_model_loop(config, model, engine, n):
    tokens = prompt(n, seed=n)
    assert run_alone(engine, tokens, GREEDY, steps=12) == reference_greedy(config, model, tokens, steps=12)


def test_chunked_prefill_equals_unchunked(config, model, engine):
    tokens = prompt(75, seed=1)  # chunks of 32, 32, 11 in the shared engine
    unchunked = Engine(config, model, max_slots=2, max_len=MAX_LEN, prefill_chunk=MAX_LEN)
    assert unchunked.buckets[-1] >= 75
    expected = run_alone(unchunked, tokens, GREEDY, steps=10)
    assert run_alone(engine, tokens, GREEDY, steps=10) == expected
    assert expected == reference_greedy(config, model, tokens, steps=10)


def test_slots_together_equal_alone(engine):
    """Different prompt lengths, joined at different steps, one freed midway and its slot reused."""
    requests = {  # name: (prompt, sampling, slot, join step, tokens to generate)
        "a": (prompt(7, 10), GREEDY, 2, 0, 20),
        "b": (prompt(23, 11), SamplingParams(temperature=0.9, top_k=20, seed=5), 0, 3, 8),
        "c": (prompt(40, 12), SamplingParams(temperature=1.2, top_p=0.8, seed=6), 3, 5, 15),
        "d": (prompt(12, 13), SamplingParams(temperature=0.7, seed=7), 0, 13, 10),  # reuses b's slot
    }
    alone = {name: run_alone(engine, p, sp, steps=n - 1, slot=1) for name, (p, sp, _, _, n) in requests.items()}

    got = {name: [] for name in requests}
    running = {}
    for step in range(40):
        for name, (p, sp, slot, join, n) in requests.items():
            if join == step:
                assert slot in engine.free_slots
                got[name].append(engine.prefill(slot, p, sp))
                running[name] = slot
        if not running:
            break
        tokens = engine.decode()
        for name, slot in list(running.items()):
            got[name].append(int(tokens[slot]))
            if len(got[name]) == requests[name][4]:
                engine.free(slot)
                del running[name]
    assert got == alone
    assert engine.active_slots == []


def test_seeded_sampling_reproducible_and_slot_independent(engine):
    tokens = prompt(9, seed=20)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    first = run_alone(engine, tokens, params, steps=15, slot=0)
    assert run_alone(engine, tokens, params, steps=15, slot=3) == first
    other_seed = run_alone(engine, tokens, SamplingParams(temperature=1.0, top_p=0.95, seed=99), steps=15)
    assert other_seed != first

    # Now with batch mates in every other slot, sampled and greedy.
    engine.prefill(0, prompt(30, 21), SamplingParams(temperature=2.0, seed=1))
    engine.prefill(1, prompt(3, 22), GREEDY)
    out = [engine.prefill(2, tokens, params)]
    engine.prefill(3, prompt(17, 23), SamplingParams(temperature=0.5, top_k=3, seed=1234))
    for _ in range(15):
        out.append(int(engine.decode()[2]))
    for slot in range(4):
        engine.free(slot)
    assert out == first


def test_lengths_and_errors(engine):
    assert engine.free_slots == [0, 1, 2, 3] and engine.max_len == MAX_LEN
    engine.prefill(1, prompt(10, 30), GREEDY)
    assert engine.slot_length(1) == 10 and engine.active_slots == [1]
    engine.decode()
    assert engine.slot_length(1) == 11
    with pytest.raises(ValueError, match="in use"):
        engine.prefill(1, [5], GREEDY)
    engine.free(1)
    with pytest.raises(ValueError, match="does not fit"):
        engine.prefill(0, prompt(MAX_LEN, 31), GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.prefill(4, [5], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.prefill(0, [], GREEDY)

    # The longest prompt fits, and the decodes up to max_len work; one more raises.
    engine.prefill(0, prompt(MAX_LEN - 1, 32), GREEDY)
    engine.decode()
    assert engine.slot_length(0) == MAX_LEN
    with pytest.raises(ValueError, match="max_len"):
        engine.decode()
    engine.free(0)
    assert engine.param_count > 0


def test_no_compilation_after_warmup(engine):
    warm = engine.compile_count
    assert warm == len(engine.prefill_shapes) + len(engine.spans)
    rng = np.random.default_rng(40)
    for n in [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, MAX_LEN - 1]:
        slot = int(rng.integers(0, 4))
        sp = SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_k=int(rng.integers(0, 5)), seed=n)
        engine.prefill(slot, prompt(n, n), sp)
        if n < MAX_LEN - 1:
            engine.decode()
        engine.free(slot)
    assert engine.compile_count == warm
