"""The dense KV cache: one slab per layer, indexed by absolute position.

Invariant the engine relies on: cache index s holds the key/value of the token at absolute position s.
Nothing records a length; attention masks by comparing cache indices with query positions, so
entries past a row's real tokens (bucket padding, a previous request) are never read before being
overwritten.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from model import attention
from model.config import ModelConfig


@struct.dataclass
class KVCache:
    """k, v: [L, B, S, K, H] in the model dtype (or the dtype given to `init`)."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        if batch <= 0 or max_len <= 0:
            raise ValueError(f'KVCache.init needs batch > 0 and max_len > 0, got {batch} and {max_len}.')
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        dtype = config.jnp_dtype if dtype is None else jnp.dtype(dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, layer: int, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Write k, v: [B, T, K, H] of `layer` at cache index positions[b, t] of each row b.

        Positions >= max_len are dropped (JAX scatter semantics), so bucket padding past the end is
        harmless. Two equal positions in one row leave an unspecified winner: callers must not do that.
        """
        rows = jnp.arange(positions.shape[0])[:, None]  # [B, 1]
        return KVCache(
            k=self.k.at[layer, rows, positions].set(k.astype(self.k.dtype), mode='drop'),
            v=self.v.at[layer, rows, positions].set(v.astype(self.v.dtype), mode='drop'),
        )

    def read(self, layer: int, span: int | None = None) -> tuple[jax.Array, jax.Array]:
        """k, v: [B, span, K, H] of `layer` (all S when span is None), index = absolute position.

        The paged cache (model/kv_pages.py) has the same method, so the model takes either.
        """
        return self.k[layer, :, :span], self.v[layer, :, :span]

    @property
    def span_limit(self) -> int:
        return self.max_len

    def attend(self, layer: int, q, k, v, positions, scale: float, kv_span: int | None = None, *,
               window: int | None = None, spans: jax.Array | None = None):
        """Write k, v at `positions`, then attend q over cache indices < kv_span (all when None):
        the query at position p sees indices <= p (and > p - window for a sliding-window layer).
        spans (optional, i32[B, T]; 0 = text): a query also sees the new keys of its own nonzero
        span (`attention.cache_mask`); a span must lie wholly inside this call's tokens.
        Returns ([B, T, N, H], the updated cache)."""
        cache = self.write(layer, positions, k, v)
        k_all, v_all = cache.read(layer, kv_span)  # [B, S, K, H]
        mask = attention.cache_mask(positions, k_all.shape[1], window, spans)  # [B, T, S]
        return attention.attend(q, k_all, v_all, mask, scale), cache
