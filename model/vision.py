"""Image encoder: a SigLIP vision tower and a Gemma-3-style projector into the decoder's width.

The tower follows SiglipVisionModel's math exactly, so real SigLIP weights load through
checkpoint.siglip_vision_params: patch embedding (a stride-p convolution, done here as a reshape to
patches and one einsum), learned positions, pre-LayerNorm encoder blocks, a final LayerNorm. The
projector follows Gemma 3's: average-pool the patch grid to tokens_per_image, RMSNorm with (1 + w),
a linear map W -> D without bias.

The pre-LN encoder pieces (Dense, LayerNorm, EncoderBlock) are shared with the Whisper encoder in
model/audio_encoder.py. Letters beyond the shared alphabet: S image side in pixels, p patch side,
Y and X patch rows and columns, P patches (Y * X), W encoder width, I encoder MLP hidden.

Parameters are stored in the decoder's dtype; LayerNorm, RMSNorm and attention softmax run in
float32. Every parameter carries `axes=` metadata; all are None (replicated on a mesh): the encoders
are small next to the decoder and run once per media item.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention
from model.config import VisionConfig
from model.layers import RMSNorm, normal_param

# flax >= 0.12 wants lists of submodules wrapped so it can see their state; 0.11 takes a plain list.
_ModuleList = getattr(nnx, 'List', list)


def replicated(ndim: int) -> tuple[None, ...]:
    """Logical axes for an encoder parameter: every dimension replicated (model/sharding.py)."""
    return (None,) * ndim


class Dense(nnx.Module):
    """x @ kernel (+ bias): a torch Linear whose weight [out, in] is stored transposed as [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (d_in, d_out), d_in**-0.5, dtype, axes=replicated(2))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype), axes=replicated(1)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: (x - mean) / sqrt(biased var + eps) * scale + bias, computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), axes=replicated(1))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=replicated(1))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        out = centred * jax.lax.rsqrt(var + self.eps)
        out = out * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with separate q, k, v, o projections (scale H**-0.5)."""

    def __init__(self, width: int, n_heads: int, *, key_bias: bool, dtype, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = n_heads, width // n_heads
        self.q = Dense(width, width, bias=True, dtype=dtype, rngs=rngs)
        self.k = Dense(width, width, bias=key_bias, dtype=dtype, rngs=rngs)  # Whisper's k_proj has no bias
        self.v = Dense(width, width, bias=True, dtype=dtype, rngs=rngs)
        self.o = Dense(width, width, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """mask: bool[B or 1, T, T] of the keys each query sees; None: every position (no padding)."""
        b, t, w = x.shape  # [B, T, W]
        q, k, v = (proj(x).reshape(b, t, self.n_heads, self.head_dim) for proj in (self.q, self.k, self.v))
        if mask is None:
            mask = jnp.ones((1, t, t), bool)
        out = attention.attend(q, k, v, mask, self.head_dim**-0.5)  # [B, T, N, H]
        return self.o(out.reshape(b, t, w))


class EncoderBlock(nnx.Module):
    """Pre-LN encoder block: x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x))))."""

    def __init__(self, width: int, n_heads: int, mlp_dim: int, *, eps: float, activation: Callable,
                 key_bias: bool, dtype, rngs: nnx.Rngs):
        self.activation = activation
        self.attn_norm = LayerNorm(width, eps=eps, dtype=dtype)
        self.attn = SelfAttention(width, n_heads, key_bias=key_bias, dtype=dtype, rngs=rngs)
        self.mlp_norm = LayerNorm(width, eps=eps, dtype=dtype)
        self.fc1 = Dense(width, mlp_dim, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(mlp_dim, width, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.fc2(self.activation(self.fc1(self.mlp_norm(x))))


def gelu_tanh(x: jax.Array) -> jax.Array:
    """SigLIP's gelu_pytorch_tanh."""
    return jax.nn.gelu(x, approximate=True)


class VisionTower(nnx.Module):
    """SigLIP vision transformer: f32[B, S, S, 3] (channels last, normalised) -> [B, P, W]."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        p, w = cfg.patch_size, cfg.width
        # Conv2d(3, W, kernel=stride=p) weight as [p, p, 3, W]: (row, column, channel) within a patch.
        self.patch_kernel = normal_param(rngs, (p, p, 3, w), (3 * p * p) ** -0.5, dtype, axes=replicated(4))
        self.patch_bias = nnx.Param(jnp.zeros((w,), dtype), axes=replicated(1))
        self.positions = normal_param(rngs, (cfg.num_patches, w), w**-0.5, dtype, axes=replicated(2))  # [P, W]
        self.layers = _ModuleList([
            EncoderBlock(w, cfg.n_heads, cfg.mlp_dim, eps=cfg.norm_eps, activation=gelu_tanh, key_bias=True,
                         dtype=dtype, rngs=rngs)
            for _ in range(cfg.n_layers)
        ])
        self.post_norm = LayerNorm(w, eps=cfg.norm_eps, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, g, p = pixels.shape[0], cfg.grid, cfg.patch_size
        kernel = self.patch_kernel[...]
        patches = pixels.astype(kernel.dtype).reshape(b, g, p, g, p, 3)  # [B, Y, p, X, p, 3]
        x = jnp.einsum('BYpXqc,pqcW->BYXW', patches, kernel) + self.patch_bias[...]  # the strided conv
        x = x.reshape(b, cfg.num_patches, cfg.width) + self.positions[...]  # [B, P, W], row-major patches
        for block in self.layers:
            x = block(x)
        return self.post_norm(x)


class PooledProjector(nnx.Module):
    """Gemma 3's multimodal projector shape: average pool (`pool`, per modality) -> RMSNorm
    (1 + w) over W -> linear W -> D. Subclasses say how to pool."""

    def __init__(self, width: int, d_model: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(width, eps=eps, offset=1.0, dtype=dtype)
        self.norm.scale.set_metadata(axes=replicated(1))  # W, not the decoder's D ('embed')
        self.proj = normal_param(rngs, (width, d_model), width**-0.5, dtype, axes=replicated(2))  # [W, D]

    def pool(self, x: jax.Array) -> jax.Array:
        """f32[B, positions, W] -> f32[B, tokens, W]."""
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = self.pool(x.astype(jnp.float32)).astype(x.dtype)  # [B, tokens, W]
        return self.norm(pooled) @ self.proj[...]  # [B, tokens, D]


class VisionProjector(PooledProjector):
    """[B, P, W] -> average pool over pool x pool patches -> [B, tokens_per_image, D]."""

    def __init__(self, cfg: VisionConfig, d_model: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        super().__init__(cfg.width, d_model, cfg.norm_eps, dtype=dtype, rngs=rngs)

    def pool(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, g, k, w = x.shape[0], cfg.grid, cfg.pool, cfg.width
        m = g // k  # tokens per side
        grid = x.reshape(b, m, k, m, k, w)  # [B, Y/k, k, X/k, k, W]
        return jnp.mean(grid, axis=(2, 4)).reshape(b, m * m, w)


class VisionEncoder(nnx.Module):
    """Tower + projector: images f32[B, S, S, 3] -> [B, tokens_per_image, D]."""

    def __init__(self, cfg: VisionConfig, d_model: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tower = VisionTower(cfg, dtype=dtype, rngs=rngs)
        self.projector = VisionProjector(cfg, d_model, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        s = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s, s, 3):
            raise ValueError(f'images have shape {tuple(pixels.shape)}; the vision encoder takes [B, {s}, {s}, 3] '
                             '(channels last, resized to VisionConfig.image_size and normalised).')
        return self.projector(self.tower(pixels))
