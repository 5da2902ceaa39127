"""Qwen2.5-VL vision encoder: transformers' Qwen2_5_VisionTransformerPretrainedModel in Flax NNX.

Input is what the processor gives (preprocess/qwen2_vl_image.py): flattened patches, one row per
patch in the processor's order (frame, merge block, patch inside its block), and grid_thw per image
or video. The math, in order:

1. Patch embedding: the reference's Conv3d over (temporal_patch_size, p, p) with stride equal to its
   kernel sees each flattened patch exactly once, so it is one linear map (no bias) C*T*p*p -> W.
2. Window order: merged tokens (merge x merge patch blocks) are regrouped so each attention window
   (window_size pixels a side) is contiguous. With dense masks the order does not change the result,
   but contiguous windows make every mask block-diagonal, which a block-sparse kernel can exploit;
   it also keeps the merger's groups of merge**2 consecutive rows intact.
3. Blocks: x + attn(rms1(x)), x + down(silu(gate(rms2(x))) * up(rms2(x))), biases everywhere. Attention
   uses 2-D rotary embeddings over each patch's (row, column) and a segment mask: window blocks see
   their own window, `full_attention_layers` see their whole frame (the reference's cu_seqlens run
   per frame, so video frames never attend to each other).
4. Merger: RMSNorm, merge**2 consecutive rows concatenated, Linear -> GELU (exact) -> Linear to the
   decoder width; then the inverse window order, so output row j is the processor's token j.

All index work (positions, window permutation, segment ids) is numpy on the host (`vision_layout`),
so the device graph depends only on the patch count. Letters beyond the shared alphabet: P patches,
W encoder width, I MLP hidden, M merged tokens (P / merge**2), C*T*p*p the flattened patch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Module import, not names: checkpoint may import this module when it wires the tower in.
from model import attention, checkpoint
from model.layers import RMSNorm
from model.vision import Dense, replicated

# flax >= 0.12 wants lists of submodules wrapped so it can see their state; 0.11 takes a plain list.
_ModuleList = getattr(nnx, 'List', list)

# The reference hard-codes eps 1e-6 for every RMSNorm in the tower and the merger.
NORM_EPS = 1e-6

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': jax.nn.silu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class Qwen25VLVisionConfig:
    """The tower's shape. Defaults are transformers' Qwen2_5_VLVisionConfig defaults (real
    checkpoints override several: the 3B/7B/72B towers have width 1280)."""

    n_layers: int = 32  # HF depth
    width: int = 3584  # W, HF hidden_size
    mlp_dim: int = 3420  # I, HF intermediate_size
    n_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14  # p, pixels
    temporal_patch_size: int = 2  # T, frames per patch
    merge_size: int = 2  # HF spatial_merge_size: merge x merge patches become one decoder token
    window_size: int = 112  # window side in pixels
    out_width: int = 3584  # decoder width D, HF out_hidden_size
    full_attention_layers: tuple[int, ...] = (7, 15, 23, 31)  # HF fullatt_block_indexes
    activation: str = 'silu'  # HF hidden_act, of the blocks' gated MLP
    rope_theta: float = 10000.0
    # Temporal M-RoPE positions per second of video (HF tokens_per_second; the released checkpoints
    # say 2). Only the decoder's positions use it (model/qwen2_5_vl.py, mrope_positions).
    tokens_per_second: float = 4

    def __post_init__(self):
        object.__setattr__(self, 'full_attention_layers', tuple(self.full_attention_layers))  # JSON gives a list
        for name in ('n_layers', 'width', 'mlp_dim', 'n_heads', 'in_channels', 'patch_size',
                     'temporal_patch_size', 'merge_size', 'window_size', 'out_width'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'Qwen25VLVisionConfig.{name}={value!r}: must be a positive int.')
        if self.width % self.n_heads or self.head_dim % 4:
            raise ValueError(f'Qwen25VLVisionConfig.width={self.width} / n_heads={self.n_heads} must be a whole '
                             'head_dim divisible by 4: the 2-D rotary embedding splits it into row and column halves.')
        if self.window_size < self.patch_size * self.merge_size:
            raise ValueError(f'Qwen25VLVisionConfig.window_size={self.window_size} is under one merged patch '
                             f'({self.patch_size * self.merge_size} pixels): windows must hold at least one token.')
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f'Qwen25VLVisionConfig.full_attention_layers has {bad} outside 0..{self.n_layers - 1}.')
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f'Qwen25VLVisionConfig.activation={self.activation!r}: use one of {sorted(_ACTIVATIONS)}.')
        if not self.rope_theta > 0:
            raise ValueError(f'Qwen25VLVisionConfig.rope_theta={self.rope_theta}: must be > 0.')
        if not self.tokens_per_second > 0:
            raise ValueError(f'Qwen25VLVisionConfig.tokens_per_second={self.tokens_per_second}: must be > 0.')

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_tokens(self) -> int:
        """Window side in merged tokens (the reference floors window_size / (p * merge))."""
        return self.window_size // self.merge_size // self.patch_size

    @classmethod
    def from_hf(cls, vision_config: Mapping[str, Any]) -> Qwen25VLVisionConfig:
        """From the `vision_config` dict of a Qwen2.5-VL config.json; absent keys take
        transformers' defaults. Older files name the channels `in_chans`; the rotary base sits in
        `rope_parameters` (transformers 5) or `rope_theta`, else is 10000."""
        raw = dict(vision_config)
        rope = raw.get('rope_parameters') or {}
        names = {'n_layers': 'depth', 'width': 'hidden_size', 'mlp_dim': 'intermediate_size', 'n_heads': 'num_heads',
                 'patch_size': 'patch_size', 'temporal_patch_size': 'temporal_patch_size',
                 'merge_size': 'spatial_merge_size', 'window_size': 'window_size', 'out_width': 'out_hidden_size',
                 'activation': 'hidden_act', 'tokens_per_second': 'tokens_per_second'}
        kwargs: dict[str, Any] = {ours: raw[hf] for ours, hf in names.items() if hf in raw}
        if 'in_channels' in raw or 'in_chans' in raw:
            kwargs['in_channels'] = raw.get('in_channels', raw.get('in_chans'))
        if 'fullatt_block_indexes' in raw:
            kwargs['full_attention_layers'] = tuple(raw['fullatt_block_indexes'])
        theta = rope.get('rope_theta', raw.get('rope_theta'))
        if theta is not None:
            kwargs['rope_theta'] = float(theta)
        return cls(**kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class VisionLayout:
    """Host-computed indices for one encoder call over concatenated images / videos (a pytree of
    arrays, so it can go through jit: only the patch count P shapes the compiled graph).
    Build with `vision_layout`. "Window order" is the order the blocks run in."""

    order: np.ndarray  # i32[P]: row i in window order is processor patch order[i]
    restore: np.ndarray  # i32[M]: output token j is merged row restore[j] in window order
    positions: np.ndarray  # i32[P, 2]: (row, column) of each patch in its frame, window order
    window_segments: np.ndarray  # i32[P]: window id, window order (one id per window per frame)
    full_segments: np.ndarray  # i32[P]: frame id, window order (one id per frame of each item)

    @property
    def num_patches(self) -> int:
        return int(self.order.shape[0])

    @property
    def num_tokens(self) -> int:
        """M: decoder tokens the call produces."""
        return int(self.restore.shape[0])


def vision_layout(grid_thw: Sequence[tuple[int, int, int]], cfg: Qwen25VLVisionConfig) -> VisionLayout:
    """Indices for patches of the items with these grids, concatenated in this order (as transformers
    takes pixel_values with several image_grid_thw rows)."""
    if not grid_thw:
        raise ValueError('vision_layout needs at least one grid_thw row.')
    m, ws = cfg.merge_size, cfg.window_tokens
    merged_order, positions, window_ids, frame_ids = [], [], [], []
    merged_base = windows = frames = 0
    for item in grid_thw:
        t, h, w = (int(v) for v in item)
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(f'grid_thw {tuple(item)}: need t, h, w >= 1 with h and w multiples of merge_size={m}.')
        mh, mw = h // m, w // m  # merged grid of one frame
        # Patch (row, column) in the processor's order: merge blocks row-major, patches inside a block row-major.
        rows = np.arange(h).reshape(mh, m, 1, 1).repeat(mw, 2).repeat(m, 3)  # [mh, m, mw, m]
        cols = np.arange(w).reshape(1, 1, mw, m).repeat(mh, 0).repeat(m, 1)
        frame_pos = np.stack([rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)], -1)
        positions.append(np.tile(frame_pos, (t, 1)))
        frame_ids.append(np.repeat(np.arange(frames, frames + t), h * w))
        frames += t
        # Window order of merged tokens: by (frame, window row, window column, row, column).
        tt, rr, cc = np.meshgrid(np.arange(t), np.arange(mh), np.arange(mw), indexing='ij')
        tt, rr, cc = tt.reshape(-1), rr.reshape(-1), cc.reshape(-1)
        key = (tt * (mh // ws + 1) + rr // ws) * (mw // ws + 1) + cc // ws  # window id, distinct across this item's frames
        perm = np.lexsort((cc, rr, key))
        merged_order.append(perm + merged_base)
        _, window_of = np.unique(key[perm], return_inverse=True)  # consecutive ids, ascending with key
        window_ids.append(window_of + windows)
        windows += int(window_of.max()) + 1
        merged_base += t * mh * mw
    merged = np.concatenate(merged_order)  # [M]: window-order row r is merged token merged[r]
    unit = np.arange(m * m)
    order = (merged[:, None] * (m * m) + unit).reshape(-1)
    return VisionLayout(
        order=order.astype(np.int32),
        restore=np.argsort(merged).astype(np.int32),
        positions=np.concatenate(positions)[order].astype(np.int32),
        window_segments=np.repeat(np.concatenate(window_ids), m * m).astype(np.int32),
        full_segments=np.concatenate(frame_ids)[order].astype(np.int32),
    )


def patch_bucket(num_patches: int, merge_size: int) -> int:
    """The patch count an encoder call of `num_patches` is padded to: the next power of two or
    3/4 of one (from 64), a multiple of merge_size**2. Images of many sizes then share a few
    compiled programs, at most 4/3 of the patches each."""
    size = 64
    while size < num_patches:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3  # 64, 96, 128, 192, ...
    unit = merge_size ** 2
    return -(-size // unit) * unit


def padded_layout(layout: VisionLayout, num_patches: int, merge_size: int) -> VisionLayout:
    """`layout` grown to `num_patches` rows: padding patches (zeros, appended to the processor's
    rows) in segments of their own, so they attend only to each other and real patches never
    see them; they come out as rows after the real M, which callers drop."""
    extra = num_patches - layout.num_patches
    if extra < 0 or extra % merge_size ** 2:
        raise ValueError(f'padding {layout.num_patches} patches to {num_patches}: need more, by a multiple of '
                         f'merge_size**2={merge_size ** 2}.')
    p, m = layout.num_patches, layout.num_tokens
    pad = np.full(extra, -1, np.int32)
    return VisionLayout(
        order=np.concatenate([layout.order, np.arange(p, num_patches, dtype=np.int32)]),
        restore=np.concatenate([layout.restore, np.arange(m, m + extra // merge_size ** 2, dtype=np.int32)]),
        positions=np.concatenate([layout.positions, np.zeros((extra, 2), np.int32)]),
        window_segments=np.concatenate([layout.window_segments, pad]),
        full_segments=np.concatenate([layout.full_segments, pad]),
    )


def _inv_freq(cfg: Qwen25VLVisionConfig) -> np.ndarray:
    """f32[H/4]: one frequency table shared by rows and columns, in float32 as the reference has it."""
    half = np.float32(cfg.head_dim // 2)
    exponents = np.arange(0, cfg.head_dim // 2, 2, dtype=np.float32) / half
    return (1.0 / np.float32(cfg.rope_theta) ** exponents).astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [P, N, H] rotated by half-split pairs (i, i + H/2); cos, sin f32[P, H/2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional attention with a fused qkv projection ([W, 3W]: q, k, v, each head-major)."""

    def __init__(self, cfg: Qwen25VLVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = Dense(cfg.width, 3 * cfg.width, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Dense(cfg.width, cfg.width, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [P, W]; mask bool[P, P] of the keys each query sees."""
        p, w = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.n_heads, self.head_dim), 1, 0)  # 3 x [P, N, H]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = attention.attend(q[None], k[None], v[None], mask[None], self.head_dim**-0.5)  # [1, P, N, H]
        return self.proj(out.reshape(p, w))


class VisionBlock(nnx.Module):
    """Pre-RMSNorm block with a gated MLP (gate, up, down, all with bias)."""

    def __init__(self, cfg: Qwen25VLVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.activation = _ACTIVATIONS[cfg.activation]
        self.norm1 = RMSNorm(cfg.width, eps=NORM_EPS, offset=0.0, dtype=dtype, axes=replicated(1))
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(cfg.width, eps=NORM_EPS, offset=0.0, dtype=dtype, axes=replicated(1))
        self.gate = Dense(cfg.width, cfg.mlp_dim, bias=True, dtype=dtype, rngs=rngs)
        self.up = Dense(cfg.width, cfg.mlp_dim, bias=True, dtype=dtype, rngs=rngs)
        self.down = Dense(cfg.mlp_dim, cfg.width, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        h = self.norm2(x)
        return x + self.down(self.activation(self.gate(h)) * self.up(h))


class PatchMerger(nnx.Module):
    """RMSNorm, then each merge**2 consecutive rows as one vector -> Linear -> GELU -> Linear to D."""

    def __init__(self, cfg: Qwen25VLVisionConfig, *, dtype, rngs: nnx.Rngs):
        merged = cfg.width * cfg.merge_size**2
        self.norm = RMSNorm(cfg.width, eps=NORM_EPS, offset=0.0, dtype=dtype, axes=replicated(1))
        self.fc1 = Dense(merged, merged, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(merged, cfg.out_width, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [P, W] in window order -> [M, D] in window order."""
        h = self.norm(x).reshape(-1, self.fc1.kernel.shape[0])  # [M, W * merge**2]
        return self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))


class Qwen25VLVision(nnx.Module):
    """Patches f32[P, C*T*p*p] (processor order) + VisionLayout -> [M, D] decoder embeddings in
    processor token order, in the parameters' dtype. Softmax and norms run in float32."""

    def __init__(self, cfg: Qwen25VLVisionConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = Dense(cfg.patch_dim, cfg.width, bias=False, dtype=dtype, rngs=rngs)
        self.blocks = _ModuleList([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, patches: jax.Array, layout: VisionLayout) -> jax.Array:
        cfg = self.cfg
        if patches.ndim != 2 or patches.shape != (layout.order.shape[0], cfg.patch_dim):
            raise ValueError(f'patches have shape {tuple(patches.shape)}; the layout expects '
                             f'[{layout.order.shape[0]}, {cfg.patch_dim}] (patches x C*T*p*p).')
        x = self.patch_embed(patches.astype(self.patch_embed.kernel.dtype))  # [P, W], processor order
        x = x[layout.order]  # window order from here on
        angles = layout.positions.astype(jnp.float32)[:, :, None] * _inv_freq(cfg)  # [P, 2, H/4]
        angles = angles.reshape(angles.shape[0], -1)  # [P, H/2]: row angles, then column angles
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        window = layout.window_segments[:, None] == layout.window_segments[None, :]  # [P, P]
        full = layout.full_segments[:, None] == layout.full_segments[None, :]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in cfg.full_attention_layers else window)
        return self.merger(x)[layout.restore]  # [M, D], processor order


def qwen25vl_vision_params(hf_state: Mapping[str, np.ndarray], cfg: Qwen25VLVisionConfig,
                           prefix: str | None = None) -> dict:
    """Nested params for Qwen25VLVision(cfg) from a transformers state dict holding the tower:
    'model.visual.' (transformers 5 Qwen2_5_VLForConditionalGeneration), 'visual.' (4.x), or ''
    (the bare Qwen2_5_VisionTransformerPretrainedModel); found unless `prefix` is given. Other
    tensors (the decoder) are ignored. Put the result in with
    `checkpoint.assign_params(model, params)`."""
    what = 'Qwen2.5-VL vision'
    if prefix is None:
        prefix = checkpoint._find_prefix(hf_state, 'patch_embed.proj.weight', what)
    specs = checkpoint._module_specs(lambda: Qwen25VLVision(cfg, jnp.float32, nnx.Rngs(0)))
    return checkpoint._convert_state(hf_state, tower_sources(cfg, prefix), specs, what)


def tower_sources(cfg: Qwen25VLVisionConfig, prefix: str) -> checkpoint.Sources:
    """Qwen25VLVision parameter name -> transformers tensors under `prefix` and conversion."""

    def rms(ours: str, hf: str) -> checkpoint.Sources:
        return {f'{ours}.scale': ((f'{hf}.weight',), checkpoint._same)}

    def conv_as_dense(w):  # Conv3d [W, C, T, p, p] -> [C*T*p*p, W], the processor's patch layout
        return w.reshape(w.shape[0], -1).T

    sources: checkpoint.Sources = {
        'patch_embed.kernel': ((f'{prefix}patch_embed.proj.weight',), conv_as_dense),
        **rms('merger.norm', f'{prefix}merger.ln_q'),
        **checkpoint._dense('merger.fc1', f'{prefix}merger.mlp.0'),
        **checkpoint._dense('merger.fc2', f'{prefix}merger.mlp.2'),
    }
    for i in range(cfg.n_layers):
        hf, ours = f'{prefix}blocks.{i}.', f'blocks.{i}.'
        sources.update({
            **rms(f'{ours}norm1', f'{hf}norm1'),
            **rms(f'{ours}norm2', f'{hf}norm2'),
            **checkpoint._dense(f'{ours}attn.qkv', f'{hf}attn.qkv'),
            **checkpoint._dense(f'{ours}attn.proj', f'{hf}attn.proj'),
            **checkpoint._dense(f'{ours}gate', f'{hf}mlp.gate_proj'),
            **checkpoint._dense(f'{ours}up', f'{hf}mlp.up_proj'),
            **checkpoint._dense(f'{ours}down', f'{hf}mlp.down_proj'),
        })
    return sources
