"""RoPE angles at long-context positions: model/rope.py against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import rope_inv_freq
from model.rope import rope_tables

MAX = 10_000_000


@pytest.mark.parametrize('theta', [1e4, 1e7, 5e7])
def test_angles_exact_up_to_ten_million_positions(theta):
    inv_freq = rope_inv_freq(128, theta, None)
    positions = np.array([0, 1, 4095, 4096, 65_537, 999_999, 1_048_575, 5_123_457, MAX - 1], np.int32)
    cos, sin = jax.jit(rope_tables(inv_freq, MAX).cos_sin)(jnp.asarray(positions))
    angles = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)
    assert np.max(np.abs(np.asarray(cos) - np.cos(angles))) < 2e-6
    assert np.max(np.abs(np.asarray(sin) - np.sin(angles))) < 2e-6
    # The naive float32 product is what this replaces: far off at these positions.
    naive = np.cos(positions.astype(np.float32)[:, None] * inv_freq)
    assert np.max(np.abs(naive - np.cos(angles))) > 1e-2


def test_padding_positions_read_position_zero():
    cos, sin = rope_tables(rope_inv_freq(8, 1e4, None), 1024).cos_sin(jnp.array([-1, 0]))
    np.testing.assert_array_equal(np.asarray(cos[0]), np.asarray(cos[1]))
    np.testing.assert_array_equal(np.asarray(sin[0]), np.ones(4) * 0)
