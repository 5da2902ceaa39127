"""The paged KV cache: one page pool shared by every sequence, and a page table per row.

Layout (alphabet of docs/design.md, plus P page and G page length):
- `k_pages, v_pages: [L, K, P, G, H]`: the pool. Page 0 is the reserved null page: `write` never
  stores into it, so it stays zero and is never read as valid data. Table entries that are not yet
  allocated hold 0.
- `page_table: i32[B, pages_per_seq]`: row b's pages in sequence order; the token at absolute position
  p of row b lives in page `page_table[b, p // G]` at offset `p % G`.

Same invariant as the dense `KVCache` (see model/kv_cache.py): nothing records a length; attention
masks by comparing absolute key positions with query positions, so `read(layer)` returns keys in
absolute-position order and the dense `attend` + `cache_mask` work on it unchanged.

Which pages a row owns (allocation, sharing, freeing) is the host-side cache manager's business; this
file only moves tensors. Invariant it relies on: a row's table entries for positions it will attend
are allocated before the step that writes them, and a page appears in at most one row's table while
rows write into it (a shared prefix page must be full and read-only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from model import attention
from model.config import ModelConfig
from model.paged_attention import paged_attend

NULL_PAGE = 0


def page_bytes(config: ModelConfig, page_len: int, dtype=None) -> int:
    """Bytes one page costs across all layers, keys and values together."""
    dtype = config.jnp_dtype if dtype is None else jnp.dtype(dtype)
    return 2 * config.n_layers * config.n_kv_heads * page_len * config.head_dim * dtype.itemsize


def pages_for_budget(config: ModelConfig, page_len: int, budget_bytes: int, dtype=None) -> int:
    """The pool size (`num_pages`, the null page included) that fits in `budget_bytes`."""
    if page_len <= 0:
        raise ValueError(f'pages_for_budget needs page_len > 0, got {page_len}.')
    num_pages = int(budget_bytes) // page_bytes(config, page_len, dtype)
    if num_pages < 2:
        raise ValueError(
            f'A budget of {budget_bytes} bytes holds {num_pages} page(s) of {page_len} tokens; the pool needs '
            f'at least 2 (the null page and one real page): raise the budget to '
            f'{2 * page_bytes(config, page_len, dtype)} bytes or use shorter pages.'
        )
    return num_pages


@struct.dataclass
class PagedKVCache:
    """k_pages, v_pages: [L, K, P, G, H] (page 0 = null page); page_table: i32[B, pages_per_seq]."""

    k_pages: jax.Array  # [L, K, P, G, H]
    v_pages: jax.Array  # [L, K, P, G, H]
    page_table: jax.Array  # i32[B, pages_per_seq]

    @classmethod
    def init(cls, config: ModelConfig, num_pages: int, page_len: int, batch: int, pages_per_seq: int,
             dtype=None) -> PagedKVCache:
        """A zero pool of `num_pages` pages (page 0 reserved) and an all-null page table."""
        if num_pages < 2:
            raise ValueError(f'PagedKVCache.init needs num_pages >= 2 (page 0 is the null page), got {num_pages}.')
        if page_len <= 0 or batch <= 0 or pages_per_seq <= 0:
            raise ValueError(
                f'PagedKVCache.init needs page_len, batch and pages_per_seq > 0, got {page_len}, {batch} '
                f'and {pages_per_seq}.'
            )
        shape = (config.n_layers, config.n_kv_heads, num_pages, page_len, config.head_dim)
        dtype = config.jnp_dtype if dtype is None else jnp.dtype(dtype)
        return cls(
            k_pages=jnp.zeros(shape, dtype),
            v_pages=jnp.zeros(shape, dtype),
            page_table=jnp.full((batch, pages_per_seq), NULL_PAGE, jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[2]

    @property
    def page_len(self) -> int:
        return self.k_pages.shape[3]

    @property
    def pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_len(self) -> int:
        """S of `read`: the longest sequence a row's table can address."""
        return self.pages_per_seq * self.page_len

    def with_page_table(self, table) -> PagedKVCache:
        """The same pool with a new i32[B', pages_per_seq'] table (the host's view after allocation)."""
        table = jnp.asarray(table, jnp.int32)
        if table.ndim != 2:
            raise ValueError(f'page_table must be i32[B, pages_per_seq], got shape {table.shape}.')
        return self.replace(page_table=table)

    def write(self, layer: int, positions: jax.Array, k: jax.Array, v: jax.Array) -> PagedKVCache:
        """Write k, v: [B, T, K, H] of `layer` at absolute positions[b, t] of each row b.

        Dropped, so padding never lands in the pool: positions < 0, positions >= max_len, and positions
        whose table entry is the null page (not allocated). Two equal positions in one row leave an
        unspecified winner, as in the dense cache.
        """
        g = self.page_len
        col = jnp.clip(positions // g, 0, self.pages_per_seq - 1)  # [B, T]
        page = jnp.take_along_axis(self.page_table, col, axis=1)  # [B, T]
        valid = (positions >= 0) & (positions < self.max_len) & (page != NULL_PAGE)
        page = jnp.where(valid, page, self.num_pages)  # out of range: dropped by the scatter
        offset = positions % g  # [B, T]
        # Advanced indices (layer, page, offset) split by the K slice: the update is laid out [B, T, K, H].
        return self.replace(
            k_pages=self.k_pages.at[layer, :, page, offset].set(k.astype(self.k_pages.dtype), mode='drop'),
            v_pages=self.v_pages.at[layer, :, page, offset].set(v.astype(self.v_pages.dtype), mode='drop'),
        )

    def read(self, layer: int, span: int | None = None) -> tuple[jax.Array, jax.Array]:
        """k, v: [B, span, K, H] of `layer` (span = max_len when None), index = absolute position.

        A gathered copy of the first ceil(span / G) pages of each row, like the dense cache's
        `k[layer, :, :span]`. Unallocated table entries read the (zero) null page; `cache_mask` hides
        them as it hides any index past a query's position.
        """
        span = self.max_len if span is None else span
        if not 0 < span <= self.max_len:
            raise ValueError(f'read: span={span} must be in [1, max_len={self.max_len}].')
        table = self.page_table[:, : -(-span // self.page_len)]  # i32[B, pages covering span]
        return _gather(self.k_pages[layer], table, span), _gather(self.v_pages[layer], table, span)


    @property
    def span_limit(self) -> int:
        return self.max_len

    def attend(self, layer: int, q, k, v, positions, scale: float, kv_span: int | None = None, *,
               window: int | None = None):
        """Write k, v into their pages, then attend; returns ([B, T, N, H], the updated cache).

        The query at position p sees keys at positions <= p (and > p - window for a sliding-window
        layer: `window`, static, per layer). With `kv_span` (a static bucket), gathers the first
        kv_span positions and attends densely: one fused pass, fastest for single-token decode on
        CPU. Without it, `paged_attend` walks only the table's blocks some query can see (up to the
        last page any query sees, from the first page inside any query's window), so a chunk near
        the start of a 1M-token table costs what its own prefix costs, and a window layer what its
        window costs.
        """
        cache = self.write(layer, positions, k, v)
        if kv_span is None:
            return paged_attend(q, cache.k_pages[layer], cache.v_pages[layer], cache.page_table,
                                positions, scale, window=window), cache
        k_all, v_all = cache.read(layer, kv_span)  # [B, S, K, H]
        mask = attention.cache_mask(positions, k_all.shape[1], window)  # [B, T, S]
        return attention.attend(q, k_all, v_all, mask, scale), cache


def _gather(pool: jax.Array, table: jax.Array, span: int) -> jax.Array:
    """[B, span, K, H] from pool [K, P, G, H] and table i32[B, C] (C * G >= span)."""
    kv_heads, _, g, h = pool.shape
    b, cols = table.shape
    x = jnp.take(pool, table, axis=1)  # [K, B, C, G, H]
    return jnp.moveaxis(x, 0, 3).reshape(b, cols * g, kv_heads, h)[:, :span]  # [B, S, K, H]
