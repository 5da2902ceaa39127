"""model/sampling.py: greedy, top-k / top-p sets, the sampled distribution, seeds, per-row independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.sampling import SamplingParams, params_arrays, row_keys, sample, seed_words

sample_jit = jax.jit(sample)


def draw(logits, params: list[SamplingParams], positions=None) -> np.ndarray:
    """Sample one token per row of logits [B, V], row b with params[b] at positions[b]."""
    logits = jnp.asarray(logits, dtype=jnp.float32)
    temperature, top_k, top_p, seeds = params_arrays(params)
    if positions is None:
        positions = np.zeros(len(params), dtype=np.int32)
    keys = row_keys(jnp.asarray(seeds), jnp.asarray(positions, dtype=jnp.int32))
    return np.asarray(sample_jit(logits, temperature, top_k, top_p, keys))


def draw_many(logits_row, p: SamplingParams, n: int) -> np.ndarray:
    """n draws from one row of logits [V]: the same seed at positions 0..n-1 (n distinct keys)."""
    logits = np.broadcast_to(np.asarray(logits_row, dtype=np.float32), (n, len(logits_row)))
    return draw(logits, [p] * n, positions=np.arange(n, dtype=np.int32))


def chi_square(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=len(probs))
    expected = probs * len(samples)
    support = expected > 0
    assert counts[~support].sum() == 0, "a token with probability 0 was sampled"
    return float((((counts - expected) ** 2)[support] / expected[support]).sum())


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(6, 50)) * 3
    params = [SamplingParams(temperature=0.0, top_k=k, top_p=p, seed=s)
              for s, (k, p) in enumerate([(0, 1.0), (5, 1.0), (0, 0.3), (2, 0.9), (1, 1.0), (50, 0.5)])]
    np.testing.assert_array_equal(draw(logits, params), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0, 1000.0])
def test_top_k_1_is_greedy(temperature):
    logits = np.random.default_rng(1).normal(size=(32, 100))
    params = [SamplingParams(temperature=temperature, top_k=1, seed=i) for i in range(32)]
    np.testing.assert_array_equal(draw(logits, params), logits.argmax(-1))


def test_top_k_set():
    logits = np.array([0.0, 3.0, 1.0, 2.9, -1.0, 2.8, 0.5, 2.7])  # top-3: ids 1, 3, 5
    samples = draw_many(logits, SamplingParams(temperature=5.0, top_k=3, seed=7), 2000)
    assert set(samples.tolist()) == {1, 3, 5}


def test_top_p_set():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: id 1 (0.5), id 3 (0.3), id 2 (0.15), id 0 (0.05)
    logits = np.log(probs)
    expected = {0.3: {1}, 0.55: {1, 3}, 0.75: {1, 3}, 0.85: {1, 3, 2}, 0.99: {0, 1, 2, 3}, 1e-6: {1}}
    for top_p, allowed in expected.items():
        samples = draw_many(logits, SamplingParams(temperature=1.0, top_p=top_p, seed=3), 3000)
        assert set(samples.tolist()) == allowed, top_p


def test_top_k_then_top_p():
    # top_k=3 leaves ids 1, 3, 2 renormalized to 0.526, 0.316, 0.158; top_p 0.8 then keeps ids 1 and 3.
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    samples = draw_many(logits, SamplingParams(top_k=3, top_p=0.8, seed=4), 3000)
    assert set(samples.tolist()) == {1, 3}


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (2.0, 0, 1.0),
                                                      (0.7, 4, 1.0), (1.0, 0, 0.9)])
def test_distribution_matches_softmax(temperature, top_k, top_p):
    logits = np.array([1.0, -0.5, 2.0, 0.3, 0.0, -2.0, 1.5, 0.8])
    probs = softmax(logits / temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), dtype=bool)
    keep[order[: top_k or len(probs)]] = True
    if top_p < 1.0:  # the minimal prefix (after top-k) whose mass reaches top_p
        renorm = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
        mass_before = np.cumsum(renorm[order]) - renorm[order]
        keep[order[mass_before >= top_p]] = False
    expected = np.where(keep, probs, 0.0)
    expected /= expected.sum()

    n = 40_000
    samples = draw_many(logits, SamplingParams(temperature, top_k, top_p, seed=11), n)
    dof = int(keep.sum()) - 1
    # Mean of chi-square is dof and its sd sqrt(2 dof); 6 dof + 10 sd is a loose bound a bug cannot meet.
    assert chi_square(samples, expected) < dof + 10 * np.sqrt(2 * dof)


def test_seeds_reproducible_and_distinct():
    logits = np.zeros((64, 1000))  # uniform: every draw is the key's alone
    positions = np.arange(64, dtype=np.int32)
    a = draw(logits, [SamplingParams(seed=1)] * 64, positions)
    b = draw(logits, [SamplingParams(seed=1)] * 64, positions)
    c = draw(logits, [SamplingParams(seed=2)] * 64, positions)
    d = draw(logits, [SamplingParams(seed=1 + (1 << 32))] * 64, positions)  # differs only in the high word
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 50
    assert (a != d).sum() > 50
    assert len(set(a.tolist())) > 50  # positions give different keys too


def test_rows_sample_as_if_alone():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 300)) * 2
    params = [
        SamplingParams(temperature=0.0, seed=9),  # greedy
        SamplingParams(temperature=1.0, seed=9),  # unfiltered: alone it takes the no-sort branch
        SamplingParams(temperature=0.8, top_k=20, seed=10),
        SamplingParams(temperature=1.3, top_p=0.7, seed=11),
        SamplingParams(temperature=1.0, top_k=5, top_p=0.5, seed=-3),
        SamplingParams(temperature=1.0, seed=9),  # same seed as row 1, other position
    ]
    positions = np.array([3, 3, 17, 5, 100, 4], dtype=np.int32)
    for trial in range(5):  # several positions so a lucky coincidence cannot pass
        together = draw(logits, params, positions + trial)
        alone = [draw(logits[b : b + 1], [params[b]], positions[b : b + 1] + trial)[0] for b in range(6)]
        np.testing.assert_array_equal(together, alone)


def test_one_compilation_for_any_parameters():
    traces = []

    def counted(*args):
        traces.append(1)  # runs only while tracing
        return sample(*args)

    jitted = jax.jit(counted)
    logits = np.random.default_rng(2).normal(size=(4, 64))
    for temps, ks, ps in [([0, 0, 0, 0], [0] * 4, [1.0] * 4), ([1, 0, 2, 1], [0, 3, 0, 1], [1, 0.5, 0.9, 1]),
                          ([0.5] * 4, [0] * 4, [1.0] * 4)]:
        keys = row_keys(jnp.zeros((4, 2), jnp.uint32), jnp.arange(4, dtype=jnp.int32))
        jitted(jnp.asarray(logits, jnp.float32), jnp.asarray(temps, jnp.float32),
               jnp.asarray(ks, jnp.int32), jnp.asarray(ps, jnp.float32), keys)
    assert len(traces) == 1


def test_seed_words():
    np.testing.assert_array_equal(seed_words(5), [5, 0])
    np.testing.assert_array_equal(seed_words((7 << 32) + 3), [3, 7])
    np.testing.assert_array_equal(seed_words(-1), [0xFFFFFFFF, 0xFFFFFFFF])


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=float("nan")),
                                    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
