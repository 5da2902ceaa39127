"""The paged engine: runs a scheduler's step on one page pool shared by every request.

Design note.
1. Memory. One `PagedKVCache` pool [L, K, P, G, H] is allocated at start-up from a byte budget.
   Which pages a request owns is decided on the host (server/kv_manager.py) and arrives here as a
   block table of page ids per call: ids and numbers go in, sampled token ids come out.
2. Two compiled steps, both over (params, pool, ...) with the pool donated so XLA updates it in place.
   `prefill` computes one chunk of one request: tokens [start, start + n) padded to a power-of-two
   bucket (16 ... prefill_chunk); padding gets position -1, so its K/V are dropped, never written.
   `decode` computes one token for up to `max_slots` requests at once; unused rows have an all-null
   block table and position -1, so they write nothing.
3. Shapes. Prefill attends over the whole table width (`pages_per_seq`); decode attends over a
   width bucket (powers of four pages, up to `pages_per_seq`) covering the longest row, so short
   conversations do not pay for the 8K (or 1M) context. `warmup` compiles every bucket; after it no
   prompt length, table or mix of requests compiles anything (`compile_count` says so).
4. Sampling parameters live in per-slot host arrays; a token's key comes from (seed, its absolute
   position) alone, so a request preempted and recomputed, or moved to another slot, samples the
   same tokens.
5. Not thread-safe: one thread (server/'s engine loop) drives it.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.engine import prefill_buckets
from model.kv_pages import NULL_PAGE, PagedKVCache
from model.sampling import SamplingParams, params_arrays, row_keys, sample

WIDTH_GROWTH = 4  # decode width buckets grow by this factor (in pages)


def width_buckets(pages_per_seq: int) -> tuple[int, ...]:
    widths, w = [], 1
    while w < pages_per_seq:
        widths.append(w)
        w *= WIDTH_GROWTH
    return (*widths, pages_per_seq)


class PagedEngine:
    """Prefill chunks and batched decode over a shared page pool. See the module note."""

    def __init__(self, config: ModelConfig, model: nnx.Module, *, max_slots: int, num_pages: int,
                 page_len: int = 16, max_len: int | None = None, prefill_chunk: int = 512):
        max_len = config.max_context if max_len is None else max_len
        if max_slots <= 0:
            raise ValueError(f"max_slots={max_slots}: must be >= 1")
        if max_len < 2:
            raise ValueError(f"max_len={max_len}: must be >= 2")
        self.config = config
        self.max_slots = max_slots
        self.max_len = max_len
        self.page_len = page_len
        self.pages_per_seq = math.ceil(max_len / page_len)
        self.prefill_chunk = min(prefill_chunk, max_len)
        self.buckets = prefill_buckets(self.prefill_chunk)
        self.widths = width_buckets(self.pages_per_seq)

        self._graphdef, self._state = nnx.split(model)
        self.param_count = int(sum(np.size(x) for x in jax.tree.leaves(
            nnx.state(model, nnx.Param))))
        pool = PagedKVCache.init(config, num_pages, page_len, 1, self.pages_per_seq)
        self._pages = (pool.k_pages, pool.v_pages)
        self.num_pages = num_pages
        self._traces = 0
        self._prefill_step = jax.jit(self._prefill_fn, donate_argnums=(1,))
        self._decode_step = jax.jit(self._decode_fn, donate_argnums=(1,))
        greedy = [SamplingParams(temperature=0.0)] * max_slots
        self._temperature, self._top_k, self._top_p, self._seeds = params_arrays(greedy)

    @property
    def compile_count(self) -> int:
        return self._traces

    def set_params(self, slot: int, params: SamplingParams) -> None:
        """Sampling parameters of the request that now holds `slot`."""
        t, k, p, s = params_arrays([params])
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = t[0], k[0], p[0]
        self._seeds[slot] = s[0]

    def prefill(self, slot: int, token_ids: Sequence[int], start: int,
                block_table: Sequence[int]) -> int:
        """Computes tokens at positions [start, start + len(token_ids)) of one request.

        Returns the token sampled after the last of them (callers drop it when the chunk does not
        end the known tokens). `block_table` must cover every position up to the chunk's end.
        """
        n = len(token_ids)
        if not 0 < n <= self.prefill_chunk:
            raise ValueError(f"prefill chunk of {n} tokens: must be 1..{self.prefill_chunk}")
        if start + n > self.max_len:
            raise ValueError(f"positions up to {start + n} pass max_len={self.max_len}")
        bucket = next(b for b in self.buckets if b >= n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = token_ids
        sl = slice(slot, slot + 1)
        token, self._pages = self._prefill_step(
            self._state, self._pages, self._table([block_table], self.pages_per_seq), tokens,
            np.int32(start), np.int32(n),
            self._temperature[sl], self._top_k[sl], self._top_p[sl], self._seeds[sl])
        return int(token)

    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               block_tables: Sequence[Sequence[int]]) -> list[int]:
        """One token for each row: `tokens[i]` sits at `positions[i]` of the request in `slots[i]`."""
        rows = len(slots)
        if not 0 < rows <= self.max_slots:
            raise ValueError(f"decode of {rows} rows: must be 1..{self.max_slots}")
        if max(positions) >= self.max_len:
            raise ValueError(f"decode position {max(positions)} passes max_len={self.max_len}")
        need = max(p // self.page_len + 1 for p in positions)
        width = next(w for w in self.widths if w >= need)
        pad = self.max_slots - rows
        tok = np.array([*tokens, *[0] * pad], np.int32)
        pos = np.array([*positions, *[-1] * pad], np.int32)
        idx = np.array([*slots, *[0] * pad])
        out, self._pages = self._decode_step(
            self._state, self._pages, self._table(block_tables, width, rows=self.max_slots), tok,
            pos, self._temperature[idx], self._top_k[idx], self._top_p[idx], self._seeds[idx])
        return np.asarray(out)[:rows].tolist()

    def warmup(self) -> None:
        """Compiles every prefill bucket and decode width (all-null tables: nothing is written)."""
        for bucket in self.buckets:
            self.prefill(0, [self.config.bos_id] * bucket, 0, [])
        for width in self.widths:
            self.decode([0], [self.config.bos_id], [(width - 1) * self.page_len], [[]])

    # ----- compiled steps -----

    def _table(self, tables: Sequence[Sequence[int]], width: int, rows: int | None = None):
        out = np.full((rows or len(tables), width), NULL_PAGE, np.int32)
        for i, table in enumerate(tables):
            table = table[:width]
            out[i, :len(table)] = table
        return out

    def _prefill_fn(self, state, pages, table, tokens, start, n_real, temperature, top_k, top_p,
                    seeds):
        """tokens i32[1, T] at positions start.. (padding at -1) -> (token i32[], pages)."""
        self._traces += 1  # Python runs only while tracing: one count per compilation
        model = nnx.merge(self._graphdef, state)
        idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # [1, T]
        positions = jnp.where(idx < n_real, start + idx, -1)
        cache = PagedKVCache(k_pages=pages[0], v_pages=pages[1], page_table=table)
        # Logits only where we sample: the chunk's last real token (not all T positions).
        logits, cache = model(tokens, positions, cache, logits_at=(n_real - 1)[None, None])
        last = logits[:, 0]  # [1, V]
        keys = row_keys(seeds, (start + n_real)[None])  # the sampled token's position
        return sample(last, temperature, top_k, top_p, keys)[0], (cache.k_pages, cache.v_pages)

    def _decode_fn(self, state, pages, table, tokens, positions, temperature, top_k, top_p, seeds):
        """tokens i32[B] at positions i32[B] (-1: unused row) -> (tokens i32[B], pages)."""
        self._traces += 1
        model = nnx.merge(self._graphdef, state)
        cache = PagedKVCache(k_pages=pages[0], v_pages=pages[1], page_table=table)
        logits, cache = model(tokens[:, None], positions[:, None], cache)  # [B, 1, V]
        keys = row_keys(seeds, positions + 1)  # the sampled token's position
        return (sample(logits[:, 0], temperature, top_k, top_p, keys),
                (cache.k_pages, cache.v_pages))
