"""The engine: the narrow surface between server/ and the model.

Design note.
1. Slots. The engine owns one dense KV cache [L, max_slots, max_len, K, H], allocated once. A request
   lives in one slot from `prefill` to `free`; the caller (server/'s scheduler) picks slots and
   never sees an array: ids and numbers go in, token ids come out (JetStream's prefill / insert /
   generate / free split, with prefill and insert fused because the cache is dense).
2. Two compiled steps, both over (params, cache, ...) with the cache donated so XLA updates it in
   place. `prefill` runs ONE slot: it slices that slot's cache row out, runs the model with B=1 on a
   chunk padded to a power-of-two bucket (16 ... prefill_chunk), writes the row back and computes
   logits (and samples) only at the last real position. `decode` runs ALL slots at once, one token
   each, at positions = each slot's length; free slots compute garbage that nobody reads.
   Span buckets: attention never reads the whole cache row (max_len, 8192 for the default model)
   when the sequences are short. A decode step attends only the first `span` cache indices, span
   being the smallest bucket of `spans` (16, 64, 256, ... times 4, then max_len) that covers the
   longest active sequence. A prompt's first chunk slices out, and attends, just the first `bucket`
   indices of its row; later chunks of a long prompt attend the whole row. So the compiled shapes
   are a small fixed set (`prefill_shapes`: (bucket, span) pairs; `spans` for decode) that `warmup`
   compiles: afterwards no prompt length, slot or mix of requests compiles anything new.
3. Positions are absolute cache indices (model/kv_cache.py's invariant), so a long prompt is fed as
   consecutive chunks and only the last chunk samples. Bucket padding writes garbage at positions
   that are masked until overwritten (or dropped past max_len).
4. Sampling parameters live in per-slot host arrays passed to every step, so one compiled decode
   serves any mix of greedy and sampled requests. A token's key comes from (seed, its absolute
   position) alone: the same request gives the same tokens in any slot next to any batch mates.
5. Host bookkeeping per slot: active flag, length (tokens whose K/V are in the cache) and the next
   input token (the last sampled one). `decode` advances every active slot by one. Not thread-safe:
   one thread (server/'s engine loop) drives an Engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.kv_cache import KVCache
from model.sampling import SamplingParams, params_arrays, row_keys, sample

MIN_BUCKET = 16


def prefill_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """Padded chunk lengths: powers of two from 16 below prefill_chunk, then prefill_chunk itself."""
    buckets = []
    size = MIN_BUCKET
    while size < prefill_chunk:
        buckets.append(size)
        size *= 2
    return (*buckets, prefill_chunk)


def span_buckets(max_len: int) -> tuple[int, ...]:
    """Decode attention spans (cache indices read per step): 16, 64, 256, ... (x4) below max_len, then
    max_len. Coarser than the prefill buckets to keep warmup's compilations few."""
    spans = []
    size = MIN_BUCKET
    while size < max_len:
        spans.append(size)
        size *= 4
    return (*spans, max_len)


class Engine:
    """Prefill / decode / free over a fixed set of slots sharing one KV cache. See the module note."""

    def __init__(
        self,
        config: ModelConfig,
        model: nnx.Module,
        *,
        max_slots: int = 8,
        max_len: int | None = None,
        prefill_chunk: int = 512,
    ):
        max_len = config.max_context if max_len is None else max_len
        if max_slots <= 0:
            raise ValueError(f'max_slots={max_slots}: must be >= 1.')
        if max_len < 2:
            raise ValueError(f'max_len={max_len}: must be >= 2 (one prompt token plus one generated).')
        if prefill_chunk <= 0:
            raise ValueError(f'prefill_chunk={prefill_chunk}: must be >= 1.')
        self.config = config
        self.max_slots = max_slots
        self._max_len = max_len
        # A chunk longer than the cache would only pad; cap it there.
        self.prefill_chunk = min(prefill_chunk, max_len)
        self.buckets = prefill_buckets(self.prefill_chunk)
        self.spans = span_buckets(max_len)
        self.prefill_shapes = self._reachable_prefill_shapes()

        self._graphdef, self._state = nnx.split(model)
        self.param_count = int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
        self._cache = KVCache.init(config, max_slots, max_len)
        self._traces = 0
        self._prefill_step = jax.jit(self._prefill_fn, donate_argnums=(1,), static_argnames=('span',))
        self._decode_step = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=('span',))

        # Host state per slot (see note 5). Free slots keep length 0 and greedy parameters.
        self._active = np.zeros(max_slots, dtype=bool)
        self._lengths = np.zeros(max_slots, dtype=np.int32)
        self._next = np.zeros(max_slots, dtype=np.int32)
        self._temperature, self._top_k, self._top_p, self._seeds = params_arrays(
            [SamplingParams(temperature=0.0)] * max_slots
        )

    # ----- public surface -----

    @property
    def max_len(self) -> int:
        """Cache positions per slot: prompt + generated tokens of a request must stay below it."""
        return self._max_len

    @property
    def compile_count(self) -> int:
        """Distinct compilations so far (each trace of a step compiles once)."""
        return self._traces

    @property
    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self._active)]

    @property
    def active_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self._active)]

    def slot_length(self, slot: int) -> int:
        """Tokens of this slot's request held in the cache (prompt, then one more per decode)."""
        self._check_slot(slot)
        return int(self._lengths[slot])

    def prefill(self, slot: int, token_ids, params: SamplingParams) -> int:
        """Put a prompt into a free slot and return its first sampled token.

        Prompts longer than prefill_chunk go through in consecutive chunks. The slot is active
        afterwards: the returned token is its next decode input.
        """
        self._check_slot(slot)
        if self._active[slot]:
            raise ValueError(f'slot {slot} is in use: free it before prefilling it again.')
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        n = len(tokens)
        if n == 0:
            raise ValueError('empty prompt: give at least one token (e.g. bos).')
        if n > self._max_len - 1:
            raise ValueError(
                f'prompt of {n} tokens does not fit: at most max_len - 1 = {self._max_len - 1} '
                '(one position is kept for the first generated token).'
            )
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f'token ids must be in [0, {self.config.vocab_size}).')
        temperature, top_k, top_p, seeds = params_arrays([params])

        token = None
        for start in range(0, n, self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk]
            bucket = next(b for b in self.buckets if b >= len(chunk))
            padded = np.zeros((1, bucket), dtype=np.int32)
            padded[0, : len(chunk)] = chunk
            token, self._cache = self._prefill_step(
                self._state, self._cache, np.int32(slot), padded, np.int32(start), np.int32(len(chunk)),
                temperature, top_k, top_p, seeds, span=self._prefill_span(start, bucket),
            )  # fmt: skip
        # Only the last chunk's token counts; earlier ones were sampled and dropped (one extra argmax).
        first = int(token)

        self._active[slot] = True
        self._lengths[slot] = n
        self._next[slot] = first
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = temperature[0], top_k[0], top_p[0]
        self._seeds[slot] = seeds[0]
        return first

    def decode(self) -> np.ndarray:
        """i32[max_slots]: the next token of every active slot (free slots hold garbage).

        Each active slot's last token is fed at position = its length; lengths then grow by one.
        """
        if not self._active.any():
            return np.zeros(self.max_slots, dtype=np.int32)
        full = self._active & (self._lengths >= self._max_len)
        if full.any():
            raise ValueError(
                f'slots {np.flatnonzero(full).tolist()} are at max_len={self._max_len}: '
                'stop or free them before decoding again.'
            )
        positions = np.where(self._active, self._lengths, 0).astype(np.int32)
        tokens, self._cache = self._decode_step(
            self._state, self._cache, self._next, positions,
            self._temperature, self._top_k, self._top_p, self._seeds, span=self._span_for(positions.max() + 1),
        )  # fmt: skip
        tokens = np.asarray(tokens)
        self._next = np.where(self._active, tokens, self._next).astype(np.int32)
        self._lengths = np.where(self._active, self._lengths + 1, self._lengths).astype(np.int32)
        return tokens

    def free(self, slot: int) -> None:
        """Release a slot; its cache row is simply overwritten by the next prefill."""
        self._check_slot(slot)
        self._active[slot] = False
        self._lengths[slot] = 0
        self._next[slot] = 0

    def warmup(self) -> None:
        """Compile every prefill (bucket, span) and every decode span, so serving never compiles.

        Writes only to cache positions that no request has reached (slot 0's, which must be free, and
        each slot's next position), and changes no slot's state.
        """
        if self._active[0]:
            raise ValueError('warmup needs slot 0 free.')
        temperature, top_k, top_p, seeds = params_arrays([SamplingParams(temperature=0.0)])
        for bucket, span in self.prefill_shapes:
            tokens = np.full((1, bucket), self.config.bos_id, dtype=np.int32)
            _, self._cache = self._prefill_step(
                self._state, self._cache, np.int32(0), tokens, np.int32(0), np.int32(1),
                temperature, top_k, top_p, seeds, span=span,
            )  # fmt: skip
        positions = np.where(self._active, self._lengths, 0).astype(np.int32)
        for span in self.spans:
            tokens, self._cache = self._decode_step(
                self._state, self._cache, self._next, positions,
                self._temperature, self._top_k, self._top_p, self._seeds, span=span,
            )  # fmt: skip
        jax.block_until_ready(tokens)

    # ----- shapes -----

    def _span_for(self, length: int) -> int:
        """The smallest span bucket holding cache indices 0 .. length - 1."""
        return next(s for s in self.spans if s >= min(length, self._max_len))

    def _prefill_span(self, start: int, bucket: int) -> int:
        """Cache indices a chunk padded to `bucket` at `start` attends: the chunk itself when it is a
        prompt's first (start 0), else the whole row (one shape per bucket, not per bucket and span)."""
        return bucket if start == 0 else self._max_len

    def _reachable_prefill_shapes(self) -> tuple[tuple[int, int], ...]:
        """Every (bucket, span) some prompt of at most max_len - 1 tokens reaches, in a stable order."""
        shapes = []
        for start in range(0, self._max_len - 1, self.prefill_chunk):
            longest = min(self.prefill_chunk, self._max_len - 1 - start)  # real tokens this chunk can hold
            smaller = 0
            for bucket in self.buckets:
                shape = (bucket, self._prefill_span(start, bucket))
                if smaller < longest and shape not in shapes:  # chunks of smaller+1 .. bucket tokens land here
                    shapes.append(shape)
                smaller = bucket
        return tuple(shapes)

    # ----- compiled steps -----

    def _prefill_fn(self, state, cache, slot, tokens, start, n_real, temperature, top_k, top_p, seeds, *, span):
        """tokens i32[1, bucket] at positions start.. of `slot`, attending cache indices < span
        -> (token i32[], cache)."""
        self._traces += 1  # Python runs only while tracing: one count per compilation
        model = nnx.merge(self._graphdef, state)
        layers, _, _, kv_heads, head_dim = cache.k.shape
        corner = (0, slot, 0, 0, 0)
        row = jax.tree.map(lambda x: jax.lax.dynamic_slice(x, corner, (layers, 1, span, kv_heads, head_dim)), cache)
        positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # [1, T]
        # Padding past the span is dropped by the cache write; only the last real position gets logits.
        last, row = model(tokens, positions, row, logits_at=(n_real - 1)[None, None])  # [1, 1, V]
        cache = jax.tree.map(lambda x, r: jax.lax.dynamic_update_slice(x, r, corner), cache, row)
        keys = row_keys(seeds, (start + n_real)[None])  # the sampled token's position
        return sample(last[:, 0], temperature, top_k, top_p, keys)[0], cache

    def _decode_fn(self, state, cache, tokens, positions, temperature, top_k, top_p, seeds, *, span):
        """tokens i32[B] at positions i32[B] (B = max_slots, every position < span) -> (next tokens i32[B], cache)."""
        self._traces += 1
        model = nnx.merge(self._graphdef, state)
        logits, cache = model(tokens[:, None], positions[:, None], cache, kv_span=span)  # [B, 1, V]
        keys = row_keys(seeds, positions + 1)  # the sampled token's position
        return sample(logits[:, 0], temperature, top_k, top_p, keys), cache

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f'slot {slot} is out of range [0, {self.max_slots}).')
