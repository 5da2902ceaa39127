"""The paged engine: runs a scheduler's step on one page pool shared by every request, on a mesh.

Design note.
1. Memory. One page pool [L, K, P, G, H] is allocated at start-up from a byte budget. Which pages a
   request owns is decided on the host (server/kv_manager.py) and arrives here as a block table of
   page ids per call: ids and numbers go in, sampled token ids come out.
2. Mesh. Everything runs on a `jax.sharding.Mesh` (model/sharding.py; one device by default).
   Parameters are split over `tensor` by their logical axes; the pool's pages over `sequence`
   (page j of a sequence on device j % S) and its kv heads over `tensor`. Attention is
   model/sharded_cache.py's: prefill chunks are striped over `sequence` by page and use ring
   attention; decode attends each device's pages in place and merges by log-sum-exp. With one
   device all of it degenerates to plain paged attention (no collectives do anything).
3. Two compiled steps, both over (params, pool, ...) with the pool donated so XLA updates it in place,
   each returning logits that a third program (one per row count) samples.
   `prefill` computes one chunk of one request: tokens [start, start + n) padded to a bucket
   (`prefill_sizes`: powers of two and, from 96, their 3/4 points, up to prefill_chunk) and laid
   out stripe by stripe (`_stripe`); padding gets position -1, so its K/V are dropped, never
   written. `decode` computes one token for up to `max_slots`
   requests at once, padded to a row bucket (1, 2, 4, ... max_slots); padding rows have no pages
   and position -1, so they write nothing. `decode_steps` runs up to `max_steps` such steps in
   one program (a device loop; each step samples on the device and feeds the next), so a window
   of k tokens costs one dispatch and one host round trip instead of k.
4. Shapes. Prefill reads earlier pages block by block up to the chunk's start only (so a chunk near
   the start of a 1M-token table costs what its own prefix costs). Decode is ragged while every
   row fits FLAT_MAX_KEYS keys a device: the host lists each row's own pages, row after row
   (`DecodePages`, a list length bucket per row bucket), so 16 rows of mixed lengths cost the sum
   of their lengths, not 16 x the longest. Longer rows walk a width bucket (powers of four pages,
   up to `pages_per_seq`) block by block. `warmup` compiles every bucket and (rows, list length)
   and (rows, width) pair; after it no prompt length, table or mix of requests compiles anything
   (`compile_count`).
5. Sampling parameters live in per-slot host arrays; a token's key comes from (seed, its absolute
   position) alone, so a request preempted and recomputed, or moved to another slot, samples the
   same tokens.
6. Multi-process meshes: every process must make the same calls in the same order (server/
   distributed.py mirrors them); inputs are built from host values on every process, outputs are
   read from this process's replica.
7. Not thread-safe: one thread (server/'s engine loop) drives it.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model.config import ModelConfig
from model import sharding
from model.kv_pages import NULL_PAGE
from model.sampling import SamplingParams, params_arrays, row_keys, sample
from model.sharded_cache import (FLAT_MAX_KEYS, POOL, SEQ, DecodePages, ShardedPagedCache,
                                 flat_chunk)

WIDTH_GROWTH = 4  # decode width buckets grow by this factor (in pages)
# Up to this width (in pages) a bucket at 3/4 of each power of four is added too: 12, 48, 192.
# Decode attention costs about its width, so a batch whose longest row needs 41 pages gathers 48
# instead of 64 (16 rows: 26 instead of 30 ms a step); past it, the block walk stops at the
# longest row anyway and more programs would only lengthen warmup.
FINE_WIDTH_MAX = 256
ROW_GROWTH = 2  # decode row buckets grow by this factor (in requests)
FLAT_GROWTH = 4  # ragged decode list lengths grow by this factor from one chunk
MIN_BUCKET = 16  # the smallest prefill bucket
# Prefill buckets: powers of two (`prefill_buckets`), plus 3/4 of each from here up (96, 192, 384,
# ...): a prompt of 300 tokens computes 384, not 512 (a 512-token chunk costs about 1.65x a
# 300-token one; the smaller ones cost mostly their fixed overhead).
FINE_PREFILL_MIN = 96


def width_buckets(pages_per_seq: int, multiple: int = 1) -> tuple[int, ...]:
    """Decode table widths in pages: 1, 4, 12, 16, 48, 64, 192, 256, 1024, 4096, ... (each rounded
    up to `multiple`), then the table."""
    widths, w = [], 1
    while w < pages_per_seq:
        widths.append(sharding.ceil_to(w, multiple))
        if w * WIDTH_GROWTH <= FINE_WIDTH_MAX and w >= WIDTH_GROWTH:
            widths.append(sharding.ceil_to(w * 3, multiple))  # 3/4 of the next power of four
        w *= WIDTH_GROWTH
    last = sharding.ceil_to(pages_per_seq, multiple)
    return tuple(sorted({*(x for x in widths if x < last), last}))


def prefill_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """Powers of two from MIN_BUCKET below prefill_chunk, then prefill_chunk itself."""
    buckets = []
    size = MIN_BUCKET
    while size < prefill_chunk:
        buckets.append(size)
        size *= 2
    return (*buckets, prefill_chunk)


def prefill_sizes(prefill_chunk: int) -> tuple[int, ...]:
    """Prefill chunk buckets: 16, 32, 64, 96, 128, 192, 256, 384, 512, ... up to prefill_chunk."""
    sizes, n = set(prefill_buckets(prefill_chunk)), FINE_PREFILL_MIN
    while n < prefill_chunk:
        sizes.add(n)
        n *= 2
    return tuple(sorted(sizes))


def flat_buckets(cap: int, chunk: int) -> tuple[int, ...]:
    """Ragged decode list lengths (page entries per device) up to `cap` entries: `chunk` times
    powers of FLAT_GROWTH, then `cap` rounded up to whole chunks. Coarse on purpose: decode reads
    a list chunk by chunk up to its last real entry, so a long bucket costs a few bytes of
    transfer, and fewer buckets compile faster."""
    if cap <= chunk:
        return (cap,)
    sizes, n = [], chunk
    while n < cap:
        sizes.append(n)
        n *= FLAT_GROWTH
    return (*sizes, -(-cap // chunk) * chunk)


def row_buckets(max_slots: int) -> tuple[int, ...]:
    """Decode batch sizes: 1, 2, 4, ... below max_slots, then max_slots. A step computes the
    smallest that holds its rows, so a few running requests do not pay for every slot."""
    rows, r = [], 1
    while r < max_slots:
        rows.append(r)
        r *= ROW_GROWTH
    return (*rows, max_slots)


class PagedEngine:
    """Prefill chunks and batched decode over a shared page pool. See the module note."""

    def __init__(self, config: ModelConfig, model: nnx.Module, *, max_slots: int, num_pages: int,
                 page_len: int = 16, max_len: int | None = None, prefill_chunk: int = 512,
                 mesh: Mesh | None = None, max_steps: int = 8):
        max_len = config.max_context if max_len is None else max_len
        if max_slots <= 0:
            raise ValueError(f"max_slots={max_slots}: must be >= 1")
        if max_len < 2:
            raise ValueError(f"max_len={max_len}: must be >= 2")
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps}: must be >= 1 (decode steps per call)")
        self.mesh = sharding.single_device_mesh() if mesh is None else mesh
        shape = sharding.MeshShape(**sharding.devices_per_axis(self.mesh))
        shape.check(config)
        self.seq_size = s = shape.sequence
        if num_pages % s or num_pages // s < 2:
            raise ValueError(f"num_pages={num_pages}: must be a multiple of the sequence axis ({s}) "
                             "with at least 2 pages per device (each device's page 0 is its null page)")
        self.config = config
        self.max_slots = max_slots
        self.max_len = max_len
        self.max_steps = max_steps
        self.page_len = page_len
        self.pages_per_seq = math.ceil(max_len / page_len)
        self.table_width = sharding.ceil_to(self.pages_per_seq, s)  # prefill's table, whole
        self.prefill_chunk = min(prefill_chunk, max_len)
        self.buckets = prefill_sizes(self.prefill_chunk)
        # Ragged decode up to this many pages per row and device; block walk above (self.widths).
        self.flat_pages = min(-(-self.pages_per_seq // s), FLAT_MAX_KEYS // page_len)
        self.widths = tuple(w for w in width_buckets(self.pages_per_seq, s) if w > self.flat_pages * s)
        self.row_buckets = row_buckets(max_slots)
        self.num_pages = num_pages
        self.pages_per_device = num_pages // s
        self._media = any(getattr(config, name, None) is not None
                          for name in ('vision', 'audio', 'qwen_vision'))
        # M-RoPE (Qwen2.5-VL): prefill always takes [3, n] rotary positions and decode turns each
        # row by position + its slot's delta, so text and media share one program a bucket.
        self._mrope = getattr(config, 'mrope_section', None) is not None
        # Such a model's prefill always takes a spans array (zeros for text): one program a bucket.
        self._spans = getattr(config, 'bidirectional_media', False)

        self._graphdef, state = nnx.split(model)
        self.param_count = int(sum(np.size(x) for x in jax.tree.leaves(
            nnx.state(model, nnx.Param))))
        self._state = sharding.shard_state(state, self.mesh)
        pool_shape = (config.n_layers, config.n_kv_heads, num_pages, page_len, config.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(pool_shape, config.jnp_dtype),
                        out_shardings=NamedSharding(self.mesh, POOL))
        self._pages = (zeros(), zeros())
        self._traces = 0
        self._prefill_step = jax.jit(self._prefill_fn, donate_argnums=(1,))
        self._decode_step = jax.jit(self._decode_fn, donate_argnums=(1,))
        self._steps_step = jax.jit(self._steps_fn, donate_argnums=(1,))
        # Sampling compiles once per row count, not once per (rows, width) and prefill bucket:
        # it is a third of a decode program's compile time (the top-k / top-p sort). Ragged
        # decode samples inside its program: its steps feed each other on the device.
        # Its tokens stay on the device to feed the next block-walking decode step, so they are
        # pinned replicated: decode then sees one input sharding (warm-up's) at every step.
        self._replicated = self._sharding(P())
        self._sample_step = jax.jit(self._sample_fn, out_shardings=self._replicated)
        greedy = [SamplingParams(temperature=0.0)] * max_slots
        self._temperature, self._top_k, self._top_p, self._seeds = params_arrays(greedy)
        self._rope_delta = np.zeros(max_slots, np.int32)

    @property
    def pool_bytes_per_device(self) -> int:
        """KV bytes each device of the sequence axis holds (its share of the pool, all layers)."""
        k = self._pages[0]
        return 2 * k.nbytes // self.seq_size // self.mesh.shape['tensor']

    @property
    def compile_count(self) -> int:
        return self._traces

    def set_params(self, slot: int, params: SamplingParams, rope_delta: int = 0) -> None:
        """Sampling parameters of the request that now holds `slot`. `rope_delta` (M-RoPE models):
        decode turns the token at position j by j + rope_delta on all three rotary rows (the
        delta of model/qwen2_5_vl.py's mrope_positions; 0 for a prompt without media)."""
        if rope_delta and not self._mrope:
            raise ValueError(f"rope_delta={rope_delta}, but {self.config.name} has no M-RoPE")
        t, k, p, s = params_arrays([params])
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = t[0], k[0], p[0]
        self._seeds[slot] = s[0]
        self._rope_delta[slot] = rope_delta

    def prefill(self, slot: int, token_ids: Sequence[int], start: int,
                block_table: Sequence[int], embeds: np.ndarray | None = None,
                spans: Sequence[int] | None = None,
                rope_positions: np.ndarray | None = None) -> int:
        """Computes tokens at positions [start, start + len(token_ids)) of one request.

        Returns the token sampled after the last of them (callers drop it when the chunk does not
        end the known tokens). `block_table` must cover every position up to the chunk's end.
        Media: ids < 0 are placeholders whose input is the same row of `embeds` (f32[T, D])
        instead of a token embedding (a model with encoders always gets an embeds array, zeros
        for text, so media need no program of their own).
        `spans` (one int per token, 0 = text, k = the k-th media span): with
        config.bidirectional_media the tokens of one span see each other both ways (Gemma 3's
        images); each nonzero span is one run of tokens, never cut across chunks (the caller's
        duty: a chunk cannot see its neighbours). None: all text. Ignored by other models.
        `rope_positions` (i32[3, n], M-RoPE models only): the tokens' rotary positions
        (temporal, height, width); None: each token's position on all three rows.
        """
        n = len(token_ids)
        if not 0 < n <= self.prefill_chunk:
            raise ValueError(f"prefill chunk of {n} tokens: must be 1..{self.prefill_chunk}")
        if start + n > self.max_len:
            raise ValueError(f"positions up to {start + n} pass max_len={self.max_len}")
        if spans is not None:
            spans = _check_spans(spans, n)  # before anything runs, for every model
        rope = self._rope_rows(rope_positions, start, n)
        bucket = next(b for b in self.buckets if b >= n)
        tokens, positions, last, rows = self._stripe(token_ids, start, bucket, embeds)
        span_rows = None
        if self._spans:
            span_rows = self._striped(np.zeros(n, np.int32) if spans is None else spans, start, bucket, 0)
        sl = slice(slot, slot + 1)
        seq = self._sharding(P(None, SEQ))
        rows = None if rows is None else self._put(rows, self._sharding(P(None, SEQ, None)))
        span_rows = None if span_rows is None else self._put(span_rows, seq)
        if rope is not None:  # [n, 3] striped like the tokens -> [3, 1, S * T_l]
            rope = self._put(np.moveaxis(self._striped(rope, start, bucket, 0), -1, 0),
                             self._sharding(P(None, None, SEQ)))
        logits, self._pages = self._prefill_step(
            self._state, self._pages, self._put(tokens, seq), self._put(positions, seq), rows,
            self._local_tables([block_table], self.table_width), np.int32(start), np.int32(last),
            span_rows, rope)
        token = self._sample_step(logits, np.array([start + n], np.int32), self._temperature[sl],
                                  self._top_k[sl], self._top_p[sl], self._seeds[sl])
        return int(_host(token)[0])

    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               block_tables: Sequence[Sequence[int]]) -> list[int]:
        """One token for each row: `tokens[i]` sits at `positions[i]` of the request in `slots[i]`,
        whose `block_tables[i]` covers every position up to it."""
        return [row[0] for row in self.decode_steps(slots, tokens, positions, block_tables, 1)]

    def decode_steps(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
                     block_tables: Sequence[Sequence[int]], steps: int = 1) -> list[list[int]]:
        """`steps` decode steps in one call: row i feeds `tokens[i]` at `positions[i]`, then each
        token it samples at the next position. Returns each row's `steps` sampled tokens, the
        same as `steps` calls of `decode` would (callers drop any after a stop). `block_tables[i]`
        must cover positions[i] + steps - 1; every step writes its row's K/V, so pages past a
        request's end must still be its own."""
        rows = len(slots)
        if not 0 < rows <= self.max_slots:
            raise ValueError(f"decode of {rows} rows: must be 1..{self.max_slots}")
        if not 0 < steps <= self.max_steps:
            raise ValueError(f"decode of {steps} steps: must be 1..{self.max_steps}")
        if max(positions) + steps > self.max_len:
            raise ValueError(f"decode positions up to {max(positions) + steps - 1} pass "
                             f"max_len={self.max_len}")
        padded = next(r for r in self.row_buckets if r >= rows)
        pad = padded - rows
        tok = np.array([*tokens, *[0] * pad], np.int32)
        pos = np.array([*positions, *[-1] * pad], np.int32)
        idx = np.array([*slots, *[0] * pad])
        params = (self._temperature[idx], self._top_k[idx], self._top_p[idx], self._seeds[idx])
        delta = self._rope_delta[idx] if self._mrope else None
        last = [p + steps - 1 for p in positions]
        need = max(p // self.page_len + 1 for p in last)
        if -(-need // self.seq_size) <= self.flat_pages:
            flat = self._decode_pages(block_tables, last, padded)
            out, self._pages = self._steps_step(self._state, self._pages, flat, tok, pos, delta,
                                                np.int32(steps), *params)
            return _host(out)[:steps, :rows].T.tolist()
        out = []  # rows past the ragged bound: one block-walking step at a time
        tok = self._put(tok, self._replicated)
        for i in range(steps):
            need = max((p + i) // self.page_len + 1 for p in positions)
            width = next(w for w in self.widths if w >= need)
            logits, self._pages = self._decode_step(
                self._state, self._pages, self._local_tables(block_tables, width, rows=padded), tok,
                pos, delta)
            tok = self._sample_step(logits, pos + 1, *params)
            out.append(tok)
            pos = np.where(pos >= 0, pos + 1, -1).astype(np.int32)
        return np.stack([_host(t) for t in out])[:, :rows].T.tolist()

    def flat_sizes(self, rows: int) -> tuple[int, ...]:
        """The ragged decode list lengths compiled for a row bucket."""
        return flat_buckets(rows * self.flat_pages, flat_chunk(rows))

    def warmup(self) -> None:
        """Compiles every prefill bucket and every decode (rows, list length) and (rows, width)
        pair (empty lists and all-null tables: nothing is written)."""
        for bucket in self.buckets:
            self.prefill(0, [self.config.bos_id] * bucket, 0, [])
        for rows in self.row_buckets:
            tok = np.full(rows, self.config.bos_id, np.int32)
            pos = np.zeros(rows, np.int32)  # position 0: same program, without reading anything
            params = tuple(a[:rows] for a in (self._temperature, self._top_k, self._top_p, self._seeds))
            delta = np.zeros(rows, np.int32) if self._mrope else None
            for size in self.flat_sizes(rows):
                flat = self._decode_pages([[]] * rows, [0] * rows, rows, size=size)
                _, self._pages = self._steps_step(self._state, self._pages, flat, tok, pos, delta,
                                                  np.int32(1), *params)
            placed = self._put(tok, self._replicated)  # as the block walk feeds decode
            for width in self.widths:
                logits, self._pages = self._decode_step(
                    self._state, self._pages, self._local_tables([[]] * rows, width), placed, pos,
                    delta)
            if self.widths:
                self._sample_step(logits, pos + 1, *params).block_until_ready()

    # ----- host-side layout -----

    def _stripe_len(self, bucket: int) -> int:
        """Tokens per device for a prefill bucket: the most any device can get (chunks need not
        start on a page boundary), whole pages, never more than the bucket."""
        s, g = self.seq_size, self.page_len
        if s == 1:
            return bucket
        pages = -(-(g - 1 + bucket) // g)  # pages a chunk of `bucket` tokens can touch
        return min(bucket, g * -(-pages // s))

    def _stripe(self, token_ids: Sequence[int], start: int, bucket: int,
                embeds: np.ndarray | None = None):
        """Lay a chunk out for the sequence axis: device r's stripe holds the chunk's tokens whose
        page is on r (page j on j % S), in order, padded with position -1. Returns (tokens, positions)
        i32[1, S * T_l], the index of the chunk's last token in that layout, and the embeddings in
        the same layout (f32[1, S * T_l, D]; None for a model without encoders)."""
        n = len(token_ids)
        if embeds is not None and not self._media:
            raise ValueError(f"{self.config.name} has no media encoders: it takes no embeddings")
        # Media placeholders are 64-bit ids (< 0); on device any negative id means "take the row".
        ids = np.asarray(token_ids, np.int64)
        ids = np.where(ids < 0, -1, ids).astype(np.int32)
        tokens = self._striped(ids, start, bucket, 0)
        positions = self._striped(np.arange(start, start + n, dtype=np.int32), start, bucket, -1)
        last = int(np.argmax(positions[0] == start + n - 1))
        rows = None
        if self._media:
            if embeds is None:
                embeds = np.zeros((n, self.config.d_model), np.float32)
            rows = self._striped(np.asarray(embeds), start, bucket, 0).astype(self.config.jnp_dtype)
        return tokens, positions, last, rows

    def _rope_rows(self, rope_positions: np.ndarray | None, start: int, n: int) -> np.ndarray | None:
        """A chunk's M-RoPE positions as i32[n, 3] (None for a model without M-RoPE)."""
        if not self._mrope:
            if rope_positions is not None:
                raise ValueError(f"rope_positions given, but {self.config.name} has no M-RoPE")
            return None
        if rope_positions is None:
            return np.repeat(np.arange(start, start + n, dtype=np.int32)[:, None], 3, axis=1)
        rope = np.asarray(rope_positions)
        if rope.shape != (3, n) or not np.issubdtype(rope.dtype, np.integer):
            raise ValueError(f"rope_positions: give int [3, {n}] (one column per token), got "
                             f"{rope.dtype}{list(rope.shape)}")
        if rope.min() < 0:
            raise ValueError("rope_positions: positions must be >= 0")
        return rope.T.astype(np.int32)

    def _striped(self, values: np.ndarray, start: int, bucket: int, fill) -> np.ndarray:
        """values [n, ...], one per token of a chunk at [start, start + n), in `_stripe`'s layout:
        [1, S * T_l, ...], padding `fill`."""
        s, g, n = self.seq_size, self.page_len, len(values)
        t_local = self._stripe_len(bucket)
        index = np.full((s, t_local), -1, np.int64)  # which token of the chunk each slot holds
        rank = ((start + np.arange(n)) // g) % s
        for r in range(s):
            mine = np.nonzero(rank == r)[0]
            if len(mine) > t_local:
                raise AssertionError(f"stripe of {len(mine)} tokens > {t_local}")  # _stripe_len's bound
            index[r, :len(mine)] = mine
        index = index.reshape(-1)
        out = values[np.maximum(index, 0)]
        real = (index >= 0).reshape(-1, *[1] * (out.ndim - 1))
        return np.where(real, out, np.asarray(fill, values.dtype))[None]

    def _local_tables(self, tables: Sequence[Sequence[int]], width: int, rows: int | None = None):
        """Global page ids, i32[B, width] -> per-device local ids i32[B, S, width / S], sharded over
        the sequence axis: row [b, r] holds pages r, r + S, ... of sequence b, as ids local to r."""
        s, per = self.seq_size, self.pages_per_device
        out = np.full((rows or len(tables), width), NULL_PAGE, np.int64)
        for i, table in enumerate(tables):
            table = table[:width]
            out[i, :len(table)] = table
        out = out.reshape(out.shape[0], width // s, s).transpose(0, 2, 1)  # [B, S, C/S]
        rank = np.arange(s)[None, :, None]
        local = np.where(out == NULL_PAGE, 0, out - rank * per)
        if np.any((local < 0) | (local >= per)):
            raise ValueError("a block table holds a page of the wrong device for its column "
                             "(page j of a sequence must be on device j % S)")
        return self._put(local.astype(np.int32), self._sharding(P(None, SEQ, None)))

    def _decode_pages(self, tables: Sequence[Sequence[int]], positions: Sequence[int], rows: int,
                      size: int | None = None) -> DecodePages:
        """The ragged page lists of a decode batch (see `DecodePages`): row b attends its pages
        0 .. positions[b] // G, each on device (page % S); lists padded to the smallest length
        bucket of this row bucket that holds every device's entries (or to `size`)."""
        s, per, g = self.seq_size, self.pages_per_device, self.page_len
        counts = np.array([min(p // g + 1, len(t)) for t, p in zip(tables, positions)], np.int64)
        pages = np.concatenate([np.asarray(t[:n], np.int64) for t, n in zip(tables, counts)] + [
            np.zeros(0, np.int64)])
        row = np.repeat(np.arange(len(counts)), counts)
        col = np.concatenate([np.arange(n) for n in counts] + [np.zeros(0, np.int64)])
        rank = col % s
        local = np.where(pages == NULL_PAGE, 0, pages - rank * per)
        if np.any((local < 0) | (local >= per)):
            raise ValueError("a block table holds a page of the wrong device for its column "
                             "(page j of a sequence must be on device j % S)")
        col = np.where(pages == NULL_PAGE, -1, col)  # an unallocated page: masked
        # Entries of row b on device r: its pages r, r + S, ... below counts[b].
        per_rank = np.zeros((rows, s), np.int64)
        per_rank[:len(counts)] = np.maximum(counts[:, None] - np.arange(s)[None, :] + s - 1, 0) // s
        starts = np.cumsum(per_rank, axis=0) - per_rank  # [B, S]
        size = size or next(n for n in self.flat_sizes(rows) if n >= per_rank.sum(0).max())
        out_pages = np.zeros((s, size), np.int32)
        out_rows = np.full((s, size), rows - 1, np.int32)  # padding after the last row: sorted
        out_cols = np.full((s, size), -1, np.int32)
        for r in range(s):
            mine = rank == r
            n = int(mine.sum())
            out_pages[r, :n], out_rows[r, :n], out_cols[r, :n] = local[mine], row[mine], col[mine]
        lists = self._sharding(P(SEQ, None))
        return DecodePages(pages=self._put(out_pages, lists), rows=self._put(out_rows, lists),
                           cols=self._put(out_cols, lists),
                           starts=self._put(starts.astype(np.int32), self._sharding(P(None, SEQ))))

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _put(self, host: np.ndarray, where: NamedSharding) -> jax.Array:
        """A global array from a host value every process holds in full."""
        return jax.make_array_from_callback(host.shape, where, lambda idx: host[idx])

    # ----- compiled steps -----

    def _cache(self, pages, tables, start, prefill: bool) -> ShardedPagedCache:
        return ShardedPagedCache(k_pages=pages[0], v_pages=pages[1], local_tables=tables,
                                 start=jnp.asarray(start, jnp.int32), mesh=self.mesh, prefill=prefill)

    def _prefill_fn(self, state, pages, tokens, positions, rows, tables, start, last, spans, rope):
        """tokens, positions i32[1, S * T_l] striped (padding at -1), rows f32[1, S * T_l, D] or
        None (media embeddings where tokens < 0), spans i32[1, S * T_l] or None (media spans),
        rope i32[3, 1, S * T_l] or None (M-RoPE positions) -> (logits f32[1, V] at the chunk's
        last token, pages)."""
        self._traces += 1  # Python runs only while tracing: one count per compilation
        model = nnx.merge(self._graphdef, state)
        cache = self._cache(pages, tables, start, prefill=True)
        media = {}
        if rows is not None:
            media = dict(embeds=rows, embed_mask=tokens < 0)
            tokens = jnp.maximum(tokens, 0)
        # Logits only where we sample: the chunk's last real token (not all T positions).
        logits, cache = model(tokens, positions, cache, logits_at=last[None, None], spans=spans,
                              rope_positions=rope, **media)
        return logits[:, 0], (cache.k_pages, cache.v_pages)

    def _decode_fn(self, state, pages, tables, tokens, positions, delta):
        """tokens i32[B] at positions i32[B] (-1: unused row), delta i32[B] or None (M-RoPE
        offsets) -> (logits f32[B, V], pages)."""
        self._traces += 1
        model = nnx.merge(self._graphdef, state)
        cache = self._cache(pages, tables, 0, prefill=False)
        logits, cache = model(tokens[:, None], positions[:, None], cache,
                              rope_positions=_turns(positions, delta))  # [B, 1, V]
        return logits[:, 0], (cache.k_pages, cache.v_pages)

    def _steps_fn(self, state, pages, flat: DecodePages, tokens, positions, delta, steps,
                  temperature, top_k, top_p, seeds):
        """`steps` (i32[], 1..max_steps) decode steps over ragged page lists: tokens i32[B] at
        positions i32[B] (-1: unused row); each step samples every row's next token (its key from
        the row's seed and the sampled position) and feeds it to the next -> (tokens
        i32[max_steps, B], zeros past `steps`; pages)."""
        self._traces += 1
        model = nnx.merge(self._graphdef, state)

        def step(i, carry):
            k_pages, v_pages, tok, pos, out = carry
            cache = ShardedPagedCache(k_pages=k_pages, v_pages=v_pages, local_tables=None,
                                      start=jnp.int32(0), mesh=self.mesh, prefill=False, flat=flat)
            logits, cache = model(tok[:, None], pos[:, None], cache,
                                  rope_positions=_turns(pos, delta))  # [B, 1, V]
            tok = sample(logits[:, 0], temperature, top_k, top_p, row_keys(seeds, pos + 1))
            pos = jnp.where(pos >= 0, pos + 1, -1)
            return cache.k_pages, cache.v_pages, tok, pos, out.at[i].set(tok)

        out = jnp.zeros((self.max_steps, tokens.shape[0]), jnp.int32)
        k_pages, v_pages, _, _, out = jax.lax.fori_loop(
            0, steps, step, (pages[0], pages[1], tokens, positions, out))
        return out, (k_pages, v_pages)

    def _sample_fn(self, logits, sampled_at, temperature, top_k, top_p, seeds):
        """logits f32[B, V] -> i32[B]; a row's key comes from its seed and sampled_at i32[B], the
        position of the token it samples."""
        self._traces += 1
        return sample(logits, temperature, top_k, top_p, row_keys(seeds, sampled_at))


def _turns(positions: jax.Array, delta: jax.Array | None) -> jax.Array | None:
    """M-RoPE rows of decode tokens: i32[B] positions (-1: unused row) plus each row's delta, the
    same on all three rows -> i32[3, B, 1]; None without M-RoPE (delta None)."""
    if delta is None:
        return None
    turn = jnp.where(positions >= 0, positions + delta, 0)
    return jnp.broadcast_to(turn[None, :, None], (3, positions.shape[0], 1))


def _check_spans(spans: Sequence[int], n: int) -> np.ndarray:
    """i32[n] spans of a prefill chunk; ValueError unless each nonzero span is one run of tokens."""
    spans = np.asarray(spans, np.int64)
    if spans.shape != (n,) or np.any(spans < 0):
        raise ValueError(f"spans: give one int >= 0 per token ({n}), got shape {spans.shape}")
    starts = spans[np.r_[True, spans[1:] != spans[:-1]]]  # the span of each run
    runs = starts[starts > 0]
    if len(np.unique(runs)) != len(runs):
        raise ValueError("spans: each nonzero span must be one contiguous run of tokens")
    return spans.astype(np.int32)


def _host(x: jax.Array) -> np.ndarray:
    """This process's copy of a replicated result (the whole array on one process)."""
    if getattr(x, 'is_fully_addressable', True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))
