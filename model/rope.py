"""RoPE angles that stay exact at millions of positions.

The naive angle `float32(p) * inv_freq` loses precision as p grows: at p = 1e6 float32 spacing is
0.06 and at 1e7 it is 1.0, so cos/sin of the fastest frequencies become noise (see ANCHORS.md,
numerics). Here every angle is split as p = hi * M + lo (M a power of two) and

    cos(p w) = cos(hi M w) cos(lo w) - sin(hi M w) sin(lo w)     (sin likewise)

with cos/sin of `hi * M * w` and `lo * w` tabulated in float64 on the host (reduced mod 2 pi there)
and rounded once to float32. The error is a few float32 ulps of cos/sin at any position the tables
cover, instead of growing with p. Tables are trace-time constants of (M + max_pos / M) x H/2 entries,
about 2 x sqrt(max_pos) rows: 4K + 2.5K rows for 10M positions.

The frequencies are the model's float32 `inv_freq` (exactly transformers' values), taken as exact
numbers: angles match transformers' float32 maths wherever that is itself accurate (short positions),
and stay right where it is not.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class RopeTables:
    """cos/sin tables for positions [0, max_positions); build with `rope_tables`."""

    shift: int  # M = 2**shift
    lo_cos: np.ndarray  # f32[M, H/2]: cos(lo * w)
    lo_sin: np.ndarray
    hi_cos: np.ndarray  # f32[max_positions / M + 1, H/2]: cos(hi * M * w)
    hi_sin: np.ndarray

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """f32[..., H/2] cos and sin of positions * inv_freq. Negative positions (padding) give
        the values of position 0; positions past the table clamp to its last row."""
        p = jnp.maximum(positions.astype(jnp.int32), 0)
        hi = jnp.minimum(p >> self.shift, self.hi_cos.shape[0] - 1)
        lo = p & ((1 << self.shift) - 1)
        hc, hs = jnp.asarray(self.hi_cos)[hi], jnp.asarray(self.hi_sin)[hi]  # [..., H/2]
        lc, ls = jnp.asarray(self.lo_cos)[lo], jnp.asarray(self.lo_sin)[lo]
        return hc * lc - hs * ls, hs * lc + hc * ls


@functools.lru_cache(maxsize=16)
def _tables(inv_freq: tuple[float, ...], max_positions: int) -> RopeTables:
    shift = max(4, math.ceil(math.log2(max(max_positions, 2)) / 2))  # M ~ sqrt(max_positions)
    m = 1 << shift
    w = np.asarray(inv_freq, np.float64)  # [H/2], the float32 values, exactly
    lo = np.arange(m, dtype=np.float64)[:, None] * w  # exact enough: lo * w < M, float64
    hi_rows = max_positions // m + 1
    # hi * M * w reduced mod 2 pi in float64: (hi * M) is an exact integer; the product's relative
    # error (1e-16) times angles up to 1e7 * w stays far below float32 resolution of cos/sin.
    hi = np.mod(np.arange(hi_rows, dtype=np.float64)[:, None] * m * w, 2 * math.pi)
    f32 = np.float32
    return RopeTables(shift, np.cos(lo).astype(f32), np.sin(lo).astype(f32),
                      np.cos(hi).astype(f32), np.sin(hi).astype(f32))


def rope_tables(inv_freq: np.ndarray, max_positions: int) -> RopeTables:
    """Tables for `inv_freq` (f32[H/2]) covering positions [0, max_positions)."""
    if max_positions <= 0:
        raise ValueError(f'rope_tables: max_positions={max_positions} must be > 0.')
    return _tables(tuple(float(x) for x in np.asarray(inv_freq, np.float32)), int(max_positions))


@dataclasses.dataclass(frozen=True, eq=False)
class MRopeTables:
    """Multimodal RoPE (Qwen2-VL / Qwen2.5-VL, transformers' apply_multimodal_rotary_pos_emb): every
    token has three positions (temporal, height, width); the H/2 frequencies fall into three
    consecutive runs of `section` sizes, and run i turns by position row i. Text tokens carry three
    equal positions, where this is plain RoPE exactly. Build with `mrope_tables`."""

    tables: RopeTables
    section: tuple[int, int, int]

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """positions i32[3, ...] -> f32[..., H/2] cos and sin, each frequency from its section's row."""
        if positions.shape[0] != 3:
            raise ValueError(f'M-RoPE positions have shape {tuple(positions.shape)}: the first axis must be 3 '
                             '(temporal, height, width).')
        cos, sin = self.tables.cos_sin(positions)  # [3, ..., H/2]
        row = np.repeat(np.arange(3), self.section)  # [H/2]: which position row turns frequency f

        def pick(x):  # exact: a selection, no arithmetic
            return jnp.where(row == 0, x[0], jnp.where(row == 1, x[1], x[2]))

        return pick(cos), pick(sin)


def mrope_tables(inv_freq: np.ndarray, max_positions: int, section: tuple[int, int, int]) -> MRopeTables:
    """M-RoPE over `rope_tables(inv_freq, max_positions)`; `section` sums to len(inv_freq)."""
    if len(section) != 3 or sum(section) != len(inv_freq):
        raise ValueError(f'mrope section {tuple(section)} must be three sizes summing to H/2 = {len(inv_freq)}.')
    return MRopeTables(rope_tables(inv_freq, max_positions), tuple(int(s) for s in section))
