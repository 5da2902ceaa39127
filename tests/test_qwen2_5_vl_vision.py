"""The Qwen2.5-VL vision encoder against transformers' (Qwen2_5_VLForConditionalGeneration.model.visual):
host layout equal to transformers' index helpers, embeddings of one non-square image, two images of
different sizes in one call and a two-frame video within 1e-4 in float32, for two tiny random towers
loaded from save_pretrained files; window attention shown to matter; every prefix found; a missing
tensor refused by name; grids with one patch count share one compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file
from transformers import vision_utils

from model import checkpoint
from model.qwen2_5_vl_vision import (Qwen25VLVision, Qwen25VLVisionConfig, padded_layout, patch_bucket,
                                     qwen25vl_vision_params, vision_layout)
from preprocess import qwen2_vl_image

torch.set_num_threads(2)

TOL = 1e-4

# Two towers: patch 8 with windows of 3 merged tokens (an 8 x 12 patch grid, 4 x 6 merged, leaves a
# partial window row) and patch 14 with windows of 2 (windows tile 4 x 6 exactly); different depth,
# width, heads and full-attention layers.
CASES = {
    'p8_w32_win3': dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=8,
                        window_size=48, out_hidden_size=24, fullatt_block_indexes=[1]),
    'p14_w48_win2': dict(depth=4, hidden_size=48, intermediate_size=64, num_heads=4, patch_size=14,
                         window_size=56, out_hidden_size=40, fullatt_block_indexes=[0, 3]),
}
TEXT = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64, bos_token_id=None, eos_token_id=None)


def _hf_model(vision: dict, seed: int) -> transformers.Qwen2_5_VLForConditionalGeneration:
    """A tiny model whose tower weights are all random at unit-ish scale (transformers' init leaves
    biases 0 and norms 1, which would not test their mapping)."""
    torch.manual_seed(seed)
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=TEXT)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_tower(model)
    return model


def randomize_tower(model) -> None:
    """Every tower weight random at unit-ish scale, biases and norms included."""
    with torch.no_grad():
        for name, p in model.model.visual.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif 'norm' in name or 'ln_q' in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)


@pytest.fixture(scope='module', params=list(CASES), ids=list(CASES))
def loaded(request, tmp_path_factory):
    vision = CASES[request.param]
    hf_model = _hf_model(vision, seed=len(request.param))
    path = tmp_path_factory.mktemp('qwen2_5_vl')
    hf_model.save_pretrained(path)
    cfg = Qwen25VLVisionConfig.from_hf(hf_model.config.vision_config.to_dict())
    state = load_file(path / 'model.safetensors')
    ours = Qwen25VLVision(cfg, jax.numpy.float32, nnx.Rngs(0))
    checkpoint.assign_params(ours, qwen25vl_vision_params(state, cfg))
    return hf_model, cfg, ours, state


@nnx.jit
def _run(model, patches, layout):
    return model(patches, layout)


def _encode(ours, cfg, patches: np.ndarray, grids: list[tuple[int, int, int]]) -> np.ndarray:
    return np.asarray(_run(ours, patches, vision_layout(grids, cfg)))


def _image(height: int, width: int, seed: int) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def _processor(cfg: Qwen25VLVisionConfig) -> qwen2_vl_image.Qwen2VLImageConfig:
    return qwen2_vl_image.Qwen2VLImageConfig(patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                                             temporal_patch_size=cfg.temporal_patch_size,
                                             min_pixels=cfg.patch_size ** 2, max_pixels=4096 * cfg.patch_size ** 2)


def _images(cfg, sizes_in_patches: list[tuple[int, int]]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Processor patches of random images whose resized grids are exactly these (rows, columns)."""
    items = [qwen2_vl_image.preprocess(_image(h * cfg.patch_size, w * cfg.patch_size, seed=h * 100 + w),
                                       _processor(cfg))
             for h, w in sizes_in_patches]
    assert [item.grid_thw for item in items] == [(1, h, w) for h, w in sizes_in_patches]
    return np.concatenate([item.pixel_values for item in items]), [item.grid_thw for item in items]


def _hf_image_features(hf_model, patches: np.ndarray, grids) -> np.ndarray:
    with torch.no_grad():
        out = hf_model.model.get_image_features(torch.from_numpy(patches), torch.tensor(grids))
    return torch.cat(out.pooler_output).numpy()


def test_config_defaults_and_translation(loaded):
    hf_model, cfg, _, _ = loaded
    vision = hf_model.config.vision_config
    assert (cfg.n_layers, cfg.width, cfg.mlp_dim, cfg.n_heads, cfg.patch_size, cfg.window_size, cfg.out_width,
            cfg.full_attention_layers) == (vision.depth, vision.hidden_size, vision.intermediate_size,
                                           vision.num_heads, vision.patch_size, vision.window_size,
                                           vision.out_hidden_size, tuple(vision.fullatt_block_indexes))
    defaults = transformers.Qwen2_5_VLVisionConfig()
    ours = Qwen25VLVisionConfig.from_hf({})
    assert ours == Qwen25VLVisionConfig.from_hf(defaults.to_dict())
    assert (ours.n_layers, ours.width, ours.mlp_dim, ours.n_heads, ours.in_channels, ours.merge_size,
            ours.temporal_patch_size, ours.activation, ours.rope_theta) == (
        defaults.depth, defaults.hidden_size, defaults.intermediate_size, defaults.num_heads, defaults.in_channels,
        defaults.spatial_merge_size, defaults.temporal_patch_size, defaults.hidden_act,
        defaults.rope_parameters['rope_theta'])


@pytest.mark.parametrize('grids', [[(1, 8, 12)], [(1, 6, 4), (2, 8, 12), (1, 2, 2)], [(3, 10, 14)]])
@pytest.mark.parametrize('patch, window', [(8, 48), (14, 56), (14, 112)])
def test_layout_matches_transformers(grids, patch, window):
    cfg = Qwen25VLVisionConfig(n_layers=1, width=32, mlp_dim=8, n_heads=2, patch_size=patch, window_size=window,
                               full_attention_layers=())
    layout = vision_layout(grids, cfg)
    grid_thw = torch.tensor(grids)
    window_index, cu_windows = vision_utils.get_vision_window_index(grid_thw, 2, window, patch)
    order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()
    np.testing.assert_array_equal(layout.order, order)
    np.testing.assert_array_equal(layout.restore, torch.argsort(window_index).numpy())
    np.testing.assert_array_equal(layout.positions, vision_utils.get_vision_position_ids(grid_thw, 2).numpy()[order])
    # Segment ids: the same boundaries as the reference's cu_seqlens, per window and per frame.
    np.testing.assert_array_equal(np.flatnonzero(np.diff(layout.window_segments)) + 1, cu_windows.numpy()[1:-1])
    frames = vision_utils.get_vision_cu_seqlens(grid_thw).numpy()
    np.testing.assert_array_equal(np.flatnonzero(np.diff(layout.full_segments)) + 1, frames[1:-1])


def test_one_image_matches_transformers(loaded):
    hf_model, cfg, ours, _ = loaded
    patches, grids = _images(cfg, [(8, 12)])
    expected = _hf_image_features(hf_model, patches, grids)
    assert expected.shape == (24, cfg.out_width)
    np.testing.assert_allclose(_encode(ours, cfg, patches, grids), expected, atol=TOL, rtol=0)


def test_two_images_in_one_call_match_transformers(loaded):
    hf_model, cfg, ours, _ = loaded
    patches, grids = _images(cfg, [(6, 10), (8, 4)])
    expected = _hf_image_features(hf_model, patches, grids)
    got = _encode(ours, cfg, patches, grids)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # Each image alone gives its own rows: nothing crosses between items.
    alone = _encode(ours, cfg, patches[:60], grids[:1])
    np.testing.assert_allclose(got[:15], alone, atol=TOL, rtol=0)


def test_video_matches_transformers(loaded):
    hf_model, cfg, ours, _ = loaded
    p = cfg.patch_size
    frames = np.random.default_rng(7).standard_normal((4, 3, 6 * p, 8 * p)).astype(np.float32)
    patches, grid = qwen2_vl_image.patchify(frames, _processor(cfg))
    assert grid == (2, 6, 8)
    with torch.no_grad():
        out = hf_model.model.get_video_features(torch.from_numpy(patches), torch.tensor([grid]))
    expected = torch.cat(out.pooler_output).numpy()
    np.testing.assert_allclose(_encode(ours, cfg, patches, [grid]), expected, atol=TOL, rtol=0)


def test_window_attention_matters(loaded):
    hf_model, cfg, ours, _ = loaded
    patches, grids = _images(cfg, [(8, 12)])
    layout = vision_layout(grids, cfg)
    assert len(np.unique(layout.window_segments)) > 1
    everywhere = dataclasses.replace(layout, window_segments=layout.full_segments)
    windowed, full = np.asarray(_run(ours, patches, layout)), np.asarray(_run(ours, patches, everywhere))
    assert np.abs(windowed - full).max() > 100 * TOL


def test_prefixes_found(loaded):
    hf_model, cfg, _, state = loaded
    from_file = qwen25vl_vision_params(state, cfg)  # save_pretrained writes 'visual.'
    for tensors in (hf_model.state_dict(), hf_model.model.visual.state_dict()):  # 'model.visual.', ''
        converted = qwen25vl_vision_params({k: v.numpy() for k, v in tensors.items()}, cfg)
        jax.tree.map(np.testing.assert_array_equal, converted, from_file)


def test_missing_tensor_is_named(loaded):
    _, cfg, _, state = loaded
    name = 'visual.blocks.1.mlp.up_proj.bias'
    partial = {k: v for k, v in state.items() if k != name}
    with pytest.raises(ValueError, match=name.replace('.', r'\.')):
        qwen25vl_vision_params(partial, cfg)


def test_one_compilation_per_patch_count(loaded):
    """The layout is traced, not static: grids with the same patch count share one program."""
    _, cfg, ours, _ = loaded
    traces = []

    @nnx.jit
    def run(model, patches, layout):
        traces.append(patches.shape)
        return model(patches, layout)

    wide, grids_wide = _images(cfg, [(8, 12)])
    tall, grids_tall = _images(cfg, [(12, 8)])
    two, grids_two = _images(cfg, [(4, 12), (8, 6)])
    for patches, grids in ((wide, grids_wide), (tall, grids_tall), (two, grids_two)):
        np.testing.assert_allclose(run(ours, patches, vision_layout(grids, cfg)),
                                   _encode(ours, cfg, patches, grids), atol=TOL, rtol=0)
    assert traces == [(96, cfg.patch_dim)]


def test_padded_layout_changes_no_row(loaded):
    """Padding patches to a size bucket (as the server's encoder does) leaves every real row as
    transformers has it: padding sits in segments of its own."""
    hf_model, cfg, ours, _ = loaded
    patches, grids = _images(cfg, [(6, 10)])  # 60 patches, 15 tokens
    size = patch_bucket(len(patches), cfg.merge_size)
    assert size == 64
    padded = np.zeros((size, patches.shape[1]), np.float32)
    padded[:len(patches)] = patches
    out = np.asarray(_run(ours, padded, padded_layout(vision_layout(grids, cfg), size, cfg.merge_size)))
    assert out.shape == (size // cfg.merge_size ** 2, cfg.out_width)
    np.testing.assert_allclose(out[:15], _hf_image_features(hf_model, patches, grids), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match='multiple of merge_size'):
        padded_layout(vision_layout(grids, cfg), 63, cfg.merge_size)


def test_patch_buckets():
    assert [patch_bucket(n, 2) for n in (1, 64, 65, 97, 129, 1000)] == [64, 64, 96, 128, 192, 1024]
    assert patch_bucket(100, 3) % 9 == 0


def test_temporal_patches_encode_alone(loaded):
    """A video's temporal patches never attend to each other: encoding them a few at a time (as
    the server streams a long video) gives the rows of one call over the whole video."""
    _, cfg, ours, _ = loaded
    grid = (3, 4, 6)
    per = grid[1] * grid[2]
    patches = np.random.default_rng(7).standard_normal((3 * per, cfg.patch_dim), dtype=np.float32)
    whole = _encode(ours, cfg, patches, [grid])
    parts = [_encode(ours, cfg, patches[:2 * per], [(2, 4, 6)]), _encode(ours, cfg, patches[2 * per:], [(1, 4, 6)])]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5, rtol=0)
