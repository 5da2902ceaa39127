"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) loaded by checkpoint.load against transformers:
M-RoPE positions equal to get_rope_index for text, images and videos; full logits of prompts with
an image and with a video; 16 greedy tokens through the dense KV cache equal to generate; a
text-only M-RoPE model equal to plain RoPE. Two tiny random models: GQA with global layers, and
MQA with a sliding-window layer, each with its own mrope_section, vision window and
tokens_per_second.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from _model_helpers import tiny_config
from model import checkpoint, qwen2_5_vl, sharding
from model.config import LayerKind, ModelConfig
from model.kv_cache import KVCache
from model.paged_engine import PagedEngine
from model.sampling import SamplingParams
from model.qwen2_5_vl import MediaSpan, mrope_positions, placeholder_spans
from model.qwen2_5_vl_vision import vision_layout
from test_qwen2_5_vl_vision import randomize_tower

torch.set_num_threads(2)

TOL = 1e-4
VOCAB = 128
IMAGE, VIDEO, VSTART, VEND = 124, 125, 126, 127
CASES = {
    'gqa_win3': dict(
        vision=dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=8, window_size=48,
                    fullatt_block_indexes=[1], tokens_per_second=2),
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters=dict(rope_type='default', rope_theta=10_000.0,
                                                              mrope_section=[2, 3, 3]))),
    'mqa_sliding_win2': dict(
        vision=dict(depth=2, hidden_size=48, intermediate_size=64, num_heads=4, patch_size=14, window_size=56,
                    fullatt_block_indexes=[0], tokens_per_second=4),
        text=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, use_sliding_window=True, sliding_window=12, max_window_layers=1,
                  rope_parameters=dict(rope_type='default', rope_theta=1e6, mrope_section=[1, 3, 2]))),
}


def _hf_model(case: dict, seed: int) -> transformers.Qwen2_5_VLForConditionalGeneration:
    """Random weights at scales that give logits of a few units and greedy runs that move: the
    text init widened to 0.2, the tower's biases and norms drawn too (its init leaves them 0 and 1)."""
    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, initializer_range=0.2, **case['text'])
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(out_hidden_size=text['hidden_size'], **case['vision']), text_config=text,
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_tower(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    return model


@pytest.fixture(scope='module', params=list(CASES), ids=list(CASES))
def loaded(request, tmp_path_factory):
    hf_model = _hf_model(CASES[request.param], seed=len(request.param))
    path = tmp_path_factory.mktemp('qwen2_5_vl')
    hf_model.save_pretrained(path)
    config, ours = checkpoint.load(path)
    return hf_model, config, ours, path


# ------------------------------------------------------------------------------------------------
# Prompts.
# ------------------------------------------------------------------------------------------------
def _prompt(media: list[tuple[int, int]]) -> np.ndarray:
    """Text, then per medium <|vision_start|>, its placeholder id n times, <|vision_end|>, text."""
    ids = [5, 9, 14]
    for token, n in media:
        ids += [VSTART] + [token] * n + [VEND, 21, 33]
    return np.array(ids + [8, 40], np.int64)


def _tokens(grid, merge: int = 2) -> int:
    return grid[0] * (grid[1] // merge) * (grid[2] // merge)


def _hf_rope_index(hf_model, ids: np.ndarray, images=(), videos=(), seconds=()):
    kwargs = {}
    if images:
        kwargs['image_grid_thw'] = torch.tensor(images)
    if videos:
        kwargs['video_grid_thw'] = torch.tensor(videos)
        kwargs['second_per_grid_ts'] = torch.tensor(seconds, dtype=torch.float32)
    types = torch.from_numpy((ids == IMAGE) * 1 + (ids == VIDEO) * 2)[None].int()
    positions, delta = hf_model.model.get_rope_index(torch.from_numpy(ids)[None], types, **kwargs)
    return positions[:, 0].numpy(), int(delta[0, 0])


def _ours_rope_index(config, ids, images=(), videos=(), seconds=()):
    spans = placeholder_spans(ids, images, videos, seconds, config, IMAGE, VIDEO)
    return mrope_positions(len(ids), spans, config)


# (images, videos, seconds per grid): every medium's temporal positions stay below max(h, w) / merge,
# where transformers 5.25 and Qwen's rule agree (model/qwen2_5_vl.py).
POSITION_CASES = {
    'text_only': ((), (), ()),
    'one_image': (((1, 6, 10),), (), ()),
    'two_images': (((1, 6, 10), (1, 8, 4)), (), ()),
    'one_video': ((), ((2, 6, 8),), (0.5,)),
    'fractional_video': ((), ((3, 8, 8),), (0.375,)),
    'image_and_video': (((1, 4, 6),), ((2, 6, 8),), (0.7,)),
}


@pytest.mark.parametrize('name', list(POSITION_CASES))
def test_positions_match_get_rope_index(loaded, name):
    hf_model, config, _, _ = loaded
    images, videos, seconds = POSITION_CASES[name]
    order = [(IMAGE, _tokens(g)) for g in images] + [(VIDEO, _tokens(g)) for g in videos]
    ids = _prompt(order)
    want, want_delta = _hf_rope_index(hf_model, ids, images, videos, seconds)
    got, delta = _ours_rope_index(config, ids, images, videos, seconds)
    assert got.dtype == np.int32 and got.shape == (3, len(ids))
    np.testing.assert_array_equal(got, want)
    assert delta == want_delta
    if videos:  # temporal positions step by tokens_per_second * seconds, truncated
        temporal = np.unique(got[0][ids == VIDEO])
        step = config.qwen_vision.tokens_per_second * seconds[0]
        np.testing.assert_array_equal(temporal - temporal[0], np.unique(np.floor(np.arange(videos[0][0]) * step)))


def test_long_video_resumes_text_after_its_last_temporal_position(loaded):
    """Qwen's rule for text after a video whose temporal positions pass its height and width ones
    (transformers 5.3 to 5.25 resume at start + max(h, w) / merge there instead)."""
    hf_model, config, _, _ = loaded
    grid, seconds = (4, 4, 6), 2.0
    ids = _prompt([(VIDEO, _tokens(grid))])
    got, delta = _ours_rope_index(config, ids, (), (grid,), (seconds,))
    step = int(config.qwen_vision.tokens_per_second * seconds)
    start = 4  # three text tokens and <|vision_start|>
    video = got[:, start:start + _tokens(grid)]
    np.testing.assert_array_equal(np.unique(video[0]), start + step * np.arange(4))
    np.testing.assert_array_equal(video[1:, :6], [[start] * 3 + [start + 1] * 3, [start, start + 1, start + 2] * 2])
    after = start + 3 * step + 1
    np.testing.assert_array_equal(got[:, start + _tokens(grid):], np.broadcast_to(after + np.arange(5), (3, 5)))
    assert delta == after + 5 - len(ids)
    want, _ = _hf_rope_index(hf_model, ids, (), (grid,), (seconds,))
    np.testing.assert_array_equal(got[:, :start + _tokens(grid)], want[:, :start + _tokens(grid)])


def test_spans_are_checked(loaded):
    _, config, _, _ = loaded
    with pytest.raises(ValueError, match='must follow the previous one'):
        mrope_positions(40, [MediaSpan(4, (1, 4, 4)), MediaSpan(6, (1, 4, 4))], config)
    with pytest.raises(ValueError, match='fit in 10 tokens'):
        mrope_positions(10, [MediaSpan(4, (1, 6, 6))], config)
    with pytest.raises(ValueError, match='not a Qwen2.5-VL model'):
        mrope_positions(10, [], tiny_config())
    ids = _prompt([(IMAGE, 6)])
    with pytest.raises(ValueError, match='more images than grids'):
        placeholder_spans(ids, [], [], [], config, IMAGE, VIDEO)
    with pytest.raises(ValueError, match='shorter than its grid'):
        placeholder_spans(ids, [(1, 4, 8)], [], [], config, IMAGE, VIDEO)


# ------------------------------------------------------------------------------------------------
# Config and loading.
# ------------------------------------------------------------------------------------------------
def test_config_translation_and_round_trip(loaded):
    hf_model, config, _, path = loaded
    text, vision = hf_model.config.text_config, hf_model.config.vision_config
    assert config.mrope_section == tuple(text.rope_parameters['mrope_section'])
    assert config.rope_theta == text.rope_parameters['rope_theta']
    assert (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps) == (
        text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
        text.hidden_size // text.num_attention_heads, text.rms_norm_eps)
    assert config.qkv_bias and not config.tie_embeddings
    windows = [config.layer_kind(i).window for i in range(config.n_layers)]
    assert windows == [text.sliding_window if t == 'sliding_attention' else None for t in text.layer_types]
    q = config.qwen_vision
    assert (q.n_layers, q.width, q.window_size, q.tokens_per_second, q.out_width) == (
        vision.depth, vision.hidden_size, vision.window_size, vision.tokens_per_second, config.d_model)
    assert ModelConfig.from_json(config.to_json()) == config
    written = json.loads(config.to_json())
    assert written['mrope_section'] == list(config.mrope_section)
    assert written['qwen_vision']['window_size'] == q.window_size
    plain = json.loads(tiny_config().to_json())  # configs without them are written as before
    assert 'mrope_section' not in plain and 'qwen_vision' not in plain

    # The released checkpoints' layout: text settings at the top level, rope_scaling of type 'mrope'.
    hf = json.loads((path / 'config.json').read_text())
    flat = {**{k: v for k, v in hf.items() if k != 'text_config'}, **hf['text_config']}
    flat['rope_scaling'] = {'type': 'mrope', 'mrope_section': flat.pop('rope_parameters')['mrope_section']}
    flat['rope_theta'] = config.rope_theta
    assert ModelConfig.from_hf_config({**flat, 'model_type': 'qwen2_5_vl'}, dtype=config.dtype) == config
    assert qwen2_5_vl.image_token_id(hf) == IMAGE and qwen2_5_vl.video_token_id(hf) == VIDEO


def test_transformers5_module_names_load_the_same(loaded, tmp_path):
    """Tensors under 'model.language_model.' and 'model.visual.' (transformers 5's module names)."""
    hf_model, config, ours, path = loaded
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert 'model.language_model.embed_tokens.weight' in state and 'model.visual.patch_embed.proj.weight' in state
    save_file(state, str(tmp_path / 'model.safetensors'))
    (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
    again_config, again = checkpoint.load(tmp_path)
    assert again_config == config
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param).to_pure_dict(),
                 nnx.state(ours, nnx.Param).to_pure_dict())


# ------------------------------------------------------------------------------------------------
# Logits and greedy decoding.
# ------------------------------------------------------------------------------------------------
def _patches(config, grid, seed: int) -> np.ndarray:
    """Random processor patches for one medium of this grid."""
    return np.random.default_rng(seed).standard_normal((int(np.prod(grid)), config.qwen_vision.patch_dim),
                                                       dtype=np.float32)


def _media_case(config, kind: str):
    """(ids, patches, grid, seconds or None) of a prompt with one image or one two-grid video."""
    if kind == 'image':
        grid, seconds = (1, 6, 10), None
    else:
        grid, seconds = (2, 6, 8), 0.5
    ids = _prompt([(IMAGE if kind == 'image' else VIDEO, _tokens(grid))])
    return ids, _patches(config, grid, seed=len(kind)), grid, seconds


def _hf_inputs(ids, patches, grid, seconds) -> dict:
    inputs = dict(input_ids=torch.from_numpy(ids)[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                  mm_token_type_ids=torch.from_numpy((ids == IMAGE) * 1 + (ids == VIDEO) * 2)[None].int())
    if seconds is None:
        inputs.update(pixel_values=torch.from_numpy(patches), image_grid_thw=torch.tensor([grid]))
    else:
        inputs.update(pixel_values_videos=torch.from_numpy(patches), video_grid_thw=torch.tensor([grid]),
                      second_per_grid_ts=torch.tensor([seconds]))
    return inputs


@nnx.jit
def _encode(model, patches, layout):
    return model.encode_qwen_vision(patches, layout)


@nnx.jit
def _forward(model, tokens, positions, embeds=None, mask=None, rope_positions=None):
    return model(tokens, positions, embeds=embeds, embed_mask=mask, rope_positions=rope_positions)[0]


def _ours_inputs(config, ours, ids, patches, grid, seconds):
    """(tokens, embeds, mask, rope positions, delta) for our model: the tower's rows at the placeholders."""
    rows = np.asarray(_encode(ours, jnp.asarray(patches), vision_layout([grid], config.qwen_vision)))
    mask = (ids == IMAGE) | (ids == VIDEO)
    embeds = np.zeros((len(ids), config.d_model), np.float32)
    embeds[mask] = rows
    spans = [MediaSpan(int(np.argmax(mask)), grid, seconds)]
    rope_positions, delta = mrope_positions(len(ids), spans, config)
    tokens = np.where(mask, 0, ids).astype(np.int32)
    return tokens[None], embeds[None], mask[None], rope_positions[:, None], delta


@pytest.mark.parametrize('kind', ['image', 'video'])
def test_logits_match_transformers(loaded, kind):
    hf_model, config, ours, _ = loaded
    ids, patches, grid, seconds = _media_case(config, kind)
    with torch.no_grad():
        want = hf_model(**_hf_inputs(ids, patches, grid, seconds)).logits[0].numpy()
    tokens, embeds, mask, rope_positions, _ = _ours_inputs(config, ours, ids, patches, grid, seconds)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    got = _forward(ours, jnp.asarray(tokens), positions, jnp.asarray(embeds), jnp.asarray(mask),
                   jnp.asarray(rope_positions))
    assert np.abs(np.asarray(got[0]) - want).max() <= TOL
    assert np.abs(want).max() > 2.0  # logits large enough for the tolerance to mean something
    # M-RoPE matters: one position per token (plain RoPE over the sequence) gives other logits.
    flat = _forward(ours, jnp.asarray(tokens), positions, jnp.asarray(embeds), jnp.asarray(mask))
    assert np.abs(np.asarray(flat[0, -1]) - want[-1]).max() > 1e-2


def _generate(hf_model, ids, patches, grid, seconds, steps: int) -> list[int]:
    """transformers' greedy tokens, past any stop token."""
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(**_hf_inputs(ids, patches, grid, seconds), max_new_tokens=steps,
                                min_new_tokens=steps, do_sample=False)
    return out[0, len(ids):].tolist()


def _dense_greedy(ours, tokens, embeds, mask, rope_positions, delta: int, steps: int) -> list[int]:
    """Prefill with the media rows and M-RoPE positions, then decode through the dense KV cache:
    the token at sequence index j sits at cache index j and turns by j + delta on all three rows."""
    graphdef, state = nnx.split(ours)
    prefill = jax.jit(lambda s, t, p, c, e, m, r: nnx.merge(graphdef, s)(t, p, c, embeds=e, embed_mask=m,
                                                                          rope_positions=r))
    decode = jax.jit(lambda s, t, p, c, r: nnx.merge(graphdef, s)(t, p, c, rope_positions=r))
    length = tokens.shape[1]
    cache = KVCache.init(ours.config, 1, length + steps)
    logits, cache = prefill(state, tokens, np.arange(length, dtype=np.int32)[None], cache, embeds, mask,
                            rope_positions)
    out = [int(np.argmax(logits[0, -1]))]
    for index in range(length, length + steps - 1):
        turn = np.full((3, 1, 1), index + delta, np.int32)
        logits, cache = decode(state, np.array([[out[-1]]], np.int32), np.array([[index]], np.int32), cache, turn)
        out.append(int(np.argmax(logits[0, 0])))
    return out


@pytest.mark.parametrize('kind', ['image', 'video'])
def test_greedy_matches_transformers_generate(loaded, kind):
    hf_model, config, ours, _ = loaded
    steps = 16
    ids, patches, grid, seconds = _media_case(config, kind)
    want = _generate(hf_model, ids, patches, grid, seconds, steps)
    tokens, embeds, mask, rope_positions, delta = _ours_inputs(config, ours, ids, patches, grid, seconds)
    assert delta != 0  # the media really shift later positions
    assert _dense_greedy(ours, tokens, embeds, mask, rope_positions, delta, steps) == want
    assert len(set(want)) > 2  # a run that moves, not one repeated token


def _paged_greedy(config, ours, tokens, embeds, rope_positions, delta: int, steps: int, mesh=None) -> list[int]:
    """The paged engine, as the server drives it: prefill in chunks that cut the medium (each with
    its M-RoPE columns), then decode windows that turn by position + delta."""
    page, chunk = 4, 16
    engine = PagedEngine(config, ours, max_slots=2, num_pages=2 * 32, page_len=page, prefill_chunk=chunk,
                         max_len=96, mesh=mesh, max_steps=4)
    s, per = engine.seq_size, engine.pages_per_device
    table = [(j % s) * per + 1 + j // s for j in range(engine.pages_per_seq)]  # page j on device j % S
    slot = 1
    engine.set_params(slot, SamplingParams(temperature=0.0), rope_delta=delta)
    ids = [int(t) for t in tokens]
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        token = engine.prefill(slot, ids[start:end], start, table, embeds=embeds[start:end],
                               rope_positions=rope_positions[:, start:end])
    out = [token]
    while len(out) < steps:
        n = min(4, steps - len(out))
        out += engine.decode_steps([slot], [out[-1]], [len(ids) + len(out) - 1], [table], n)[0]
    return out


@pytest.mark.parametrize('kind', ['image', 'video'])
def test_paged_engine_matches_transformers_generate(loaded, kind):
    """The engine's prefill (chunks cut across the medium) and decode windows give generate's
    tokens: images on one device, videos with the sequence striped over two."""
    hf_model, config, ours, _ = loaded
    steps = 12
    ids, patches, grid, seconds = _media_case(config, kind)
    want = _generate(hf_model, ids, patches, grid, seconds, steps)
    tokens, embeds, mask, rope_positions, delta = _ours_inputs(config, ours, ids, patches, grid, seconds)
    # Placeholders are negative ids on the engine's path (their rows come from embeds).
    placed = np.where(mask[0], -1, tokens[0])
    mesh = None
    if kind == 'video':  # the striped layout once per model: M-RoPE columns follow their tokens
        mesh = sharding.make_mesh(sharding.MeshShape(sequence=2), jax.devices()[:2])
    assert _paged_greedy(config, ours, placed, embeds[0], rope_positions[:, 0], delta, steps, mesh) == want


def test_paged_engine_checks_rope_positions(loaded):
    _, config, ours, _ = loaded
    engine = PagedEngine(config, ours, max_slots=1, num_pages=8, page_len=4, prefill_chunk=16, max_len=16)
    with pytest.raises(ValueError, match=r'rope_positions: give int \[3, 4\]'):
        engine.prefill(0, [5, 6, 7, 8], 0, [1], rope_positions=np.zeros((3, 5), np.int32))
    with pytest.raises(ValueError, match='must be >= 0'):
        engine.prefill(0, [5, 6, 7, 8], 0, [1], rope_positions=np.full((3, 4), -2, np.int32))


def test_text_only_mrope_is_plain_rope(loaded):
    """Three equal position rows are plain RoPE: the same weights without mrope_section give the
    same logits (the sliding-window model included), and both equal transformers on text."""
    hf_model, config, ours, _ = loaded
    ids = np.array([5, 9, 14, 60, 3, 77, 21, 33, 8, 40, 11, 90, 17, 4, 66, 12], np.int64)
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    mrope = _forward(ours, tokens, positions)
    explicit = _forward(ours, tokens, positions, rope_positions=jnp.broadcast_to(positions, (3, 1, len(ids))))
    plain_config = config.replace(mrope_section=None, qwen_vision=None)
    params = {k: v for k, v in nnx.state(ours, nnx.Param).to_pure_dict().items() if k != 'qwen_vision'}
    plain = checkpoint.from_params(plain_config, lambda name: _leaf(params, name))
    plain_logits = _forward(plain, tokens, positions)
    np.testing.assert_array_equal(np.asarray(mrope), np.asarray(plain_logits))
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(plain_logits))
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(np.asarray(mrope[0]) - want).max() <= TOL
    with pytest.raises(ValueError, match='has no M-RoPE'):
        plain(tokens, positions, rope_positions=jnp.zeros((3, 1, len(ids)), jnp.int32))


def _leaf(tree: dict, name: str):
    for part in name.split('.'):
        tree = tree[int(part) if part.isdigit() and int(part) in tree else part]
    return np.asarray(tree)


def test_mrope_section_is_checked():
    with pytest.raises(ValueError, match='summing to head_dim // 2 = 4'):
        tiny_config(mrope_section=(1, 1, 1))
    config = tiny_config(mrope_section=[1, 2, 1], layer_kinds=[LayerKind(), LayerKind(window=4)])
    assert config.mrope_section == (1, 2, 1) and ModelConfig.from_json(config.to_json()) == config
