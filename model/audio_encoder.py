"""Audio encoder: a Whisper encoder over one window of log-mel frames and a projector into D.

The encoder follows transformers' WhisperEncoder exactly, so real Whisper weights load through
checkpoint.whisper_encoder_params: conv1 (M -> W, kernel 3, pad 1) + GELU, conv2 (W -> W, kernel 3,
stride 2, pad 1) + GELU, plus sinusoidal positions (stored as a parameter, like HF's
embed_positions), pre-LayerNorm blocks (k_proj without bias), a final LayerNorm. GELUs are the exact
(erf) form. The projector average-pools `pool` positions into one token, then RMSNorm with (1 + w)
and a linear map W -> D without bias, as the image projector does.
Qwen2-Audio (model/qwen2_audio.py) differs in three settings of AudioConfig: the pool sits in the
tower, before its final LayerNorm (pool_site='tower'); the projector is one Linear with a bias
(projector='linear_bias'); and keys of padded frames are masked (mask_padding, with each window's
valid frame count passed in).

Letters beyond the shared alphabet: M mel bins, A mel frames per window, T encoder positions
(A // 2), W encoder width. Convolutions are written as shifted windows and one einsum each.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import AUDIO_CONV_STRIDE, AudioConfig
from model.layers import normal_param
from model.vision import Dense, EncoderBlock, LayerNorm, PooledProjector, replicated

_ModuleList = getattr(nnx, 'List', list)
KERNEL = 3  # both convolutions


def gelu_exact(x: jax.Array) -> jax.Array:
    """Whisper's "gelu" (torch's default, erf-based)."""
    return jax.nn.gelu(x, approximate=False)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """f32[length, channels]: Whisper's position table (sin half, then cos half), in float32 as torch."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp((-increment * np.arange(channels // 2)).astype(np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
    """torch Conv1d(kernel 3, padding 1) on channels-last x: [B, A, C] -> [B, ceil(A / stride), W].

    kernel: [3, C, W] (tap, in, out).
    """
    length = -(-x.shape[1] // stride)
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))  # [B, A + 2, C]
    taps = jnp.stack([padded[:, k:k + stride * (length - 1) + 1:stride] for k in range(KERNEL)], axis=2)
    return jnp.einsum('BTkC,kCW->BTW', taps, kernel) + bias  # taps: [B, T, 3, C]


def average_pool(x: jax.Array, pool: int) -> jax.Array:
    """[B, T, W] -> [B, T // pool, W]: the mean of each run of `pool` positions, in float32
    (torch's AvgPool1d(pool, stride=pool), which drops a last partial run)."""
    b, t, w = x.shape
    runs = x[:, :t // pool * pool].astype(jnp.float32).reshape(b, t // pool, pool, w)
    return jnp.mean(runs, axis=2).astype(x.dtype)


class AudioTower(nnx.Module):
    """Whisper encoder: log-mel f32[B, M, A] (channels first, as Whisper's features) -> [B, T, W],
    or [B, T // pool, W] with pool_site='tower'."""

    def __init__(self, cfg: AudioConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        m, w = cfg.n_mels, cfg.width
        self.conv1_kernel = normal_param(rngs, (KERNEL, m, w), (KERNEL * m) ** -0.5, dtype, axes=replicated(3))
        self.conv1_bias = nnx.Param(jnp.zeros((w,), dtype), axes=replicated(1))
        self.conv2_kernel = normal_param(rngs, (KERNEL, w, w), (KERNEL * w) ** -0.5, dtype, axes=replicated(3))
        self.conv2_bias = nnx.Param(jnp.zeros((w,), dtype), axes=replicated(1))
        self.positions = nnx.Param(jnp.asarray(sinusoids(cfg.positions, w), dtype), axes=replicated(2))  # [T, W]
        self.layers = _ModuleList([
            EncoderBlock(w, cfg.n_heads, cfg.mlp_dim, eps=cfg.norm_eps, activation=gelu_exact, key_bias=False,
                         dtype=dtype, rngs=rngs)
            for _ in range(cfg.n_layers)
        ])
        self.final_norm = LayerNorm(w, eps=cfg.norm_eps, dtype=dtype)

    def __call__(self, mel: jax.Array, valid_frames: jax.Array | None = None) -> jax.Array:
        """valid_frames (i32[B], mask_padding configs only): each window's frames holding audio;
        keys at encoder positions from cfg.encoder_positions(valid_frames) on are masked."""
        kernel = self.conv1_kernel[...]
        x = mel.astype(kernel.dtype).transpose(0, 2, 1)  # [B, A, M]
        x = gelu_exact(conv1d(x, kernel, self.conv1_bias[...], stride=1))  # [B, A, W]
        x = gelu_exact(conv1d(x, self.conv2_kernel[...], self.conv2_bias[...], stride=2))  # [B, T, W]
        x = x + self.positions[...]
        mask = None
        if valid_frames is not None:
            audible = (jnp.asarray(valid_frames) - 1) // AUDIO_CONV_STRIDE + 1  # i32[B], encoder_positions
            mask = (jnp.arange(x.shape[1])[None, :] < audible[:, None])[:, None, :]  # bool[B, 1, T]: keys
            mask = jnp.broadcast_to(mask, (x.shape[0], x.shape[1], x.shape[1]))  # [B, T, T]
        for block in self.layers:
            x = block(x, mask)
        if self.cfg.pool_site == 'tower':
            x = average_pool(x, self.cfg.pool)  # [B, T // pool, W]
        return self.final_norm(x)


class AudioProjector(PooledProjector):
    """[B, T', W] -> average pool over `pool` positions -> [B, T' // pool, D]."""

    def __init__(self, cfg: AudioConfig, d_model: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        super().__init__(cfg.width, d_model, cfg.norm_eps, dtype=dtype, rngs=rngs)

    def pool(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.pool_site == 'tower':
            return x  # the tower has pooled already
        return jnp.mean(x.reshape(x.shape[0], x.shape[1] // cfg.pool, cfg.pool, cfg.width), axis=2)


class LinearProjector(nnx.Module):
    """[B, T', W] -> [B, T', D] by one Linear with a bias (Qwen2-Audio's multi_modal_projector)."""

    def __init__(self, cfg: AudioConfig, d_model: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.proj = Dense(cfg.width, d_model, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


_PROJECTORS = {'rmsnorm_linear': AudioProjector, 'linear_bias': LinearProjector}


class AudioEncoder(nnx.Module):
    """Tower + projector: log-mel windows f32[B, M, A] -> [B, rows_per_window, D]: the rows of each
    window's middle (all of them without context_frames). The context's rows are dropped after the
    tower, whose attention has already let the middle hear them."""

    def __init__(self, cfg: AudioConfig, d_model: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tower = AudioTower(cfg, dtype=dtype, rngs=rngs)
        self.projector = _PROJECTORS[cfg.projector](cfg, d_model, dtype=dtype, rngs=rngs)

    def __call__(self, mel: jax.Array, valid_frames: jax.Array | None = None) -> jax.Array:
        """valid_frames: i32[B] frames of each window holding audio, for mask_padding configs
        (None: all of them); rows past cfg.valid_rows(valid_frames) are computed but not audio."""
        m, a = self.cfg.n_mels, self.cfg.window_frames
        if mel.ndim != 3 or tuple(mel.shape[1:]) != (m, a):
            raise ValueError(f'mel features have shape {tuple(mel.shape)}; the audio encoder takes [B, {m}, {a}] '
                             '(n_mels bins x window_frames frames at 100 frames/s; pad or split to that window).')
        if valid_frames is not None and not self.cfg.mask_padding:
            raise ValueError('valid_frames given to an audio encoder without mask_padding: its windows have no '
                             'padding to mask.')
        x = self.tower(mel, valid_frames)  # [B, T, W] ([B, T // pool, W] with pool_site='tower')
        if self.cfg.context_rows:
            edge = self.cfg.context_rows * self.cfg.pool
            x = x[:, edge:x.shape[1] - edge]
        return self.projector(x)
