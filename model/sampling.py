"""Token sampling: per-row temperature, top-k and top-p over a batch of logits.

Every row of a batch carries its own parameters, so one compiled `sample` serves a decode batch whose
requests asked for different things. A row's random key comes from (its seed, its absolute token
position) alone, never from its slot or its batch mates: the same request gives the same tokens
whatever else the engine is running.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_U32 = 1 << 32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature: 0 means greedy (argmax, exactly); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens; 0 means no limit.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1.0 means off.
    seed: any integer (int64 from the API is fine); with the position it fixes each token's key.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def seed_words(seed: int) -> np.ndarray:
    """u32[2]: the (low, high) 32-bit words of a seed taken modulo 2**64 (negative int64 seeds work)."""
    seed %= _U32 * _U32
    return np.array([seed % _U32, seed // _U32], dtype=np.uint32)


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """Typed PRNG keys [B] for rows with seed words u32[B, 2] sampling the token at positions i32[B].

    key = fold_in(fold_in(key(low word), high word), position): built from 32-bit pieces so that it
    works without jax_enable_x64 and gives the same key inside and outside jit.
    """

    def one(words, position):
        key = jax.random.key(words[0])
        return jax.random.fold_in(jax.random.fold_in(key, words[1]), position)

    return jax.vmap(one)(seeds, positions)


def sample(
    logits: jax.Array,  # f32[B, V]
    temperature: jax.Array,  # f32[B]; 0 = greedy
    top_k: jax.Array,  # i32[B]; 0 = off
    top_p: jax.Array,  # f32[B]; 1 = off
    keys: jax.Array,  # typed keys [B]
) -> jax.Array:  # i32[B]
    """One token per row, each row with its own parameters. Jit-friendly: fixed shapes, no host sync.

    Sampling is always a Gumbel-argmax over the full vocabulary in vocabulary order, with filtered
    tokens set to -inf; a row's draw therefore depends only on its key and its own logits, not on
    which branch its batch mates made the batch take.
    """
    logits = logits.astype(jnp.float32)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    any_sampled = jnp.any(temperature > 0)
    any_filtered = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1.0)))

    def sampled(_):
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        scaled = logits / safe_t[:, None]  # [B, V]
        # The sort is the expensive part; skip it when no sampled row filters.
        scaled = jax.lax.cond(
            any_filtered, lambda s: _filter(s, top_k, top_p), lambda s: s, scaled
        )
        tokens = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, tokens, greedy_tokens)

    # An all-greedy batch (the common serving case) costs one argmax.
    return jax.lax.cond(any_sampled, sampled, lambda _: greedy_tokens, None)


def _filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """scaled logits [B, V] with tokens outside each row's top-k / top-p set at -inf."""
    batch, vocab = scaled.shape
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V] vocab ids, most likely first
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]  # [1, V]

    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [B]
    in_top_k = rank < k[:, None]  # [B, V]
    sorted_logits = jnp.where(in_top_k, sorted_logits, -jnp.inf)

    # top-p on the distribution left after top-k (as transformers does). Keep token j while the mass
    # before it is still short of top_p: the minimal prefix reaching top_p, and always rank 0.
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # top_p 1 is off, no rounding
    keep_sorted = in_top_k & in_top_p

    rows = jnp.arange(batch)[:, None]
    keep = jnp.zeros((batch, vocab), dtype=bool).at[rows, order].set(keep_sorted)  # back to vocab order
    return jnp.where(keep, scaled, -jnp.inf)


def params_arrays(params: list[SamplingParams]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host arrays (temperature f32[B], top_k i32[B], top_p f32[B], seed words u32[B, 2]) for a batch."""
    return (
        np.array([p.temperature for p in params], dtype=np.float32),
        np.array([min(p.top_k, 2**31 - 1) for p in params], dtype=np.int32),
        np.array([p.top_p for p in params], dtype=np.float32),
        np.stack([seed_words(p.seed) for p in params]).astype(np.uint32),
    )
