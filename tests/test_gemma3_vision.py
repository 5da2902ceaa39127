"""Gemma 3 multimodal checkpoints (Gemma3ForConditionalGeneration) with their SigLIP vision tower and
projector, against transformers: image features, logits on prompts with one and two images in the
processor's layout (image tokens attend each other both ways, within the sliding window), 32 greedy
tokens through the paged engine (one device and a sequence-sharded mesh), the bidirectional mask
shown to matter, and a directory missing a vision tensor refused by name.
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

from model import checkpoint, sharding
from model.config import ModelConfig, VisionConfig
from model.kv_cache import KVCache
from model.paged_engine import PagedEngine
from test_gemma3_parity import VOCAB, _hf_gemma3

torch.set_num_threads(2)

# Token ids of the tiny vocabulary: '\n\n', <start_of_image>, <end_of_image> and the image token.
NL2, BOI, EOI, IMAGE = 108, 381, 382, 383
MM_IDS = dict(boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE)

# (id, vision_config, mm_tokens_per_image, text settings): two towers (widths 32 / 24, 2 / 3 heads,
# patches 4 / 7, images 32 / 28) pooled by 2 / 2; one window shorter than an image's 16 tokens (the
# window then cuts into an image's own span), one longer than the 4 tokens of its images.
CASES = [
    ('w32_patch4_window8',
     dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=2, image_size=32, patch_size=4),
     16,
     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
          head_dim=16, sliding_window=8, layer_types=['sliding_attention', 'full_attention'],
          query_pre_attn_scalar=16)),
    ('w24_patch7_window12_untied',
     dict(model_type='siglip_vision_model', hidden_size=24, intermediate_size=40, num_hidden_layers=1,
          num_attention_heads=3, image_size=28, patch_size=7, layer_norm_eps=1e-5),
     4,
     dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
          head_dim=12, sliding_window=12, sliding_window_pattern=3, query_pre_attn_scalar=12,
          tie_word_embeddings=False)),
]


@pytest.fixture(scope='module', params=CASES, ids=[c[0] for c in CASES])
def loaded(request, tmp_path_factory):
    case_id, vision, mm_tokens, text = request.param
    outer = dict(vision_config=vision, mm_tokens_per_image=mm_tokens, **MM_IDS,
                 tie_word_embeddings=text.get('tie_word_embeddings', True))
    hf_model = _hf_gemma3('conditional', seed=len(case_id), text=text, outer=outer)
    path = tmp_path_factory.mktemp('gemma3_vision')
    hf_model.save_pretrained(path, safe_serialization=True)
    config, ours = checkpoint.load(path)
    return hf_model, config, ours, path


# One jitted encoder and forward per model, so each shape compiles once across the tests.
_JITTED: dict[int, tuple] = {}


def _jitted(ours):
    if id(ours) not in _JITTED:
        graphdef, state = nnx.split(ours)

        def forward(state, tokens, positions, embeds, mask, spans, cache):
            kv = KVCache.init(ours.config, 1, tokens.shape[1]) if cache else None
            return nnx.merge(graphdef, state)(tokens, positions, kv, embeds=embeds, embed_mask=mask, spans=spans)[0]

        encode = jax.jit(lambda state, pixels: nnx.merge(graphdef, state).encode_images(pixels))
        _JITTED[id(ours)] = (ours, state, encode, jax.jit(forward, static_argnames='cache'))
    return _JITTED[id(ours)][1:]


def _prompt(images: int, n: int, seed: int) -> np.ndarray:
    """Text, then per image the processor's '\\n\\n<start_of_image>' + n image tokens +
    '<end_of_image>\\n\\n' (processing_gemma3.py's full_image_sequence), text between and after."""
    rng = np.random.default_rng(seed)
    text = lambda k: rng.integers(3, NL2, k).tolist()
    ids = text(5)
    for _ in range(images):
        ids += [NL2, BOI] + [IMAGE] * n + [EOI, NL2] + text(4)
    return np.array(ids, np.int64)


def _spans(ids: np.ndarray) -> np.ndarray:
    """i32[T]: 0 for text, k for the k-th run of image tokens."""
    image = ids == IMAGE
    starts = image & ~np.r_[False, image[:-1]]
    return np.where(image, np.cumsum(starts), 0).astype(np.int32)


def _pixels(images: int, size: int, seed: int) -> np.ndarray:
    """f32[B, 3, S, S] normalised pixels, transformers' layout."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (images, 3, size, size)).astype(np.float32)


def _hf_logits(hf_model, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    # token_type_ids as the processor writes them: 1 at image tokens.
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids)[None], pixel_values=torch.from_numpy(pixels),
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64))[None])
    return out.logits[0].float().numpy()


def _encode(ours, pixels: np.ndarray) -> np.ndarray:
    """Our image rows f32[B, tokens_per_image, D] from transformers-layout pixels."""
    state, encode, _ = _jitted(ours)
    return np.asarray(encode(state, pixels.transpose(0, 2, 3, 1)), np.float32)


def _media_inputs(ids: np.ndarray, rows: np.ndarray, d_model: int):
    """Tokens (placeholders zeroed), embeds [1, T, D] with the image rows in order, the mask, spans."""
    mask = ids == IMAGE
    embeds = np.zeros((len(ids), d_model), np.float32)
    embeds[mask] = rows.reshape(-1, d_model)
    return np.where(mask, 0, ids).astype(np.int32)[None], embeds[None], mask[None], _spans(ids)[None]


def _our_logits(ours, ids: np.ndarray, rows: np.ndarray, *, spans: bool = True, cache: bool = False) -> np.ndarray:
    tokens, embeds, mask, span = _media_inputs(ids, rows, ours.config.d_model)
    positions = np.arange(len(ids), dtype=np.int32)[None]
    state, _, forward = _jitted(ours)
    return np.asarray(forward(state, tokens, positions, embeds, mask, span if spans else None, cache=cache))[0]


def test_config_translation(loaded):
    hf_model, config, _, path = loaded
    vision = hf_model.config.vision_config
    assert config.vision == VisionConfig(
        image_size=vision.image_size, patch_size=vision.patch_size, width=vision.hidden_size,
        n_layers=vision.num_hidden_layers, n_heads=vision.num_attention_heads, mlp_dim=vision.intermediate_size,
        norm_eps=vision.layer_norm_eps, tokens_per_image=hf_model.config.mm_tokens_per_image)
    assert config.bidirectional_media
    assert ModelConfig.from_json(config.to_json()) == config
    # Keys a config.json may leave out take SiglipVisionConfig's and Gemma3Config's defaults.
    saved = json.loads((path / 'config.json').read_text())
    del saved['mm_tokens_per_image']
    bare = ModelConfig.from_hf_config({**saved, 'vision_config': {'image_size': 896, 'patch_size': 14}})
    defaults = transformers.SiglipVisionConfig()
    assert bare.vision == VisionConfig(
        image_size=896, patch_size=14, width=defaults.hidden_size,
        n_layers=defaults.num_hidden_layers, n_heads=defaults.num_attention_heads, mlp_dim=defaults.intermediate_size,
        norm_eps=defaults.layer_norm_eps, tokens_per_image=transformers.Gemma3Config().mm_tokens_per_image)


def test_image_features_match_transformers(loaded):
    hf_model, config, ours, _ = loaded
    pixels = _pixels(2, config.vision.image_size, seed=1)
    with torch.no_grad():
        want = hf_model.get_image_features(torch.from_numpy(pixels)).pooler_output.float().numpy()
    got = _encode(ours, pixels)
    assert got.shape == want.shape == (2, config.vision.tokens_per_image, config.d_model)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize('images', [1, 2])
def test_logits_match_transformers(loaded, images):
    hf_model, config, ours, _ = loaded
    ids = _prompt(images, config.vision.tokens_per_image, seed=images)
    pixels = _pixels(images, config.vision.image_size, seed=10 + images)
    want = _hf_logits(hf_model, ids, pixels)
    rows = _encode(ours, pixels)
    got = _our_logits(ours, ids, rows)
    assert np.abs(got - want).max() <= 1e-4
    if images == 1:
        return
    # The dense KV cache's prefill masks the same way.
    assert np.abs(_our_logits(ours, ids, rows, cache=True) - want).max() <= 1e-4
    # Bidirectional attention within an image matters: causal-only logits are far off (so the
    # comparisons above can fail), first at the image tokens themselves.
    causal = _our_logits(ours, ids, rows, spans=False)
    first_image = int(np.argmax(ids == IMAGE))
    assert np.abs(causal - want).max() > 1e-2
    assert np.abs(causal[first_image] - want[first_image]).max() > 1e-2
    assert np.abs(causal[:first_image] - want[:first_image]).max() <= 1e-4  # text before it: causal anyway
    # And the config decides: a model without bidirectional_media ignores spans.
    plain = nnx.merge(*nnx.split(ours))
    plain.config = config.replace(bidirectional_media=False)
    assert np.abs(_our_logits(plain, ids, rows) - causal).max() <= 1e-6
    del _JITTED[id(plain)]


def _hf_greedy(hf_model, ids: np.ndarray, pixels: np.ndarray, steps: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.from_numpy(ids)[None], pixel_values=torch.from_numpy(pixels),
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64))[None],
                                max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(ids):].tolist()


def _chunks(spans: np.ndarray, size: int) -> list[tuple[int, int]]:
    """[start, end) prefill chunks of at most `size` tokens that never cut a span (the scheduler's
    promise): a chunk that would end inside a span ends where that span starts instead."""
    out, start = [], 0
    while start < len(spans):
        end = min(start + size, len(spans))
        if end < len(spans) and spans[end] and spans[end] == spans[end - 1]:
            end = start + int(np.argmax(spans[start:] == spans[end]))  # the span's first token
        out.append((start, end))
        start = end
    return out


class _Pages:
    """Shuffled free pages of a pool of `per_device` pages on each of `s` devices; page j of a
    sequence comes from device j % s, as the block manager allocates."""

    def __init__(self, s: int, per_device: int):
        rng = np.random.default_rng(1)
        self.free = [list(r * per_device + rng.permutation(np.arange(1, per_device))) for r in range(s)]
        self.table: list[int] = []

    def cover(self, length: int, page_len: int) -> list[int]:
        while len(self.table) * page_len < length:
            self.table.append(int(self.free[len(self.table) % len(self.free)].pop()))
        return self.table


PAGE_LEN = 4  # pages far shorter than an image, so an image spans several pages (and devices)


def _engine(config, ours, mesh=None) -> tuple[PagedEngine, _Pages]:
    s = 1 if mesh is None else mesh.shape['sequence']
    engine = PagedEngine(config, ours, max_slots=2, num_pages=32 * s, page_len=PAGE_LEN, prefill_chunk=32,
                         max_len=128, mesh=mesh)
    return engine, _Pages(s, 32)


def _paged_logits(config, ours, ids: np.ndarray, rows: np.ndarray, mesh) -> np.ndarray:
    """f32[T, V]: every position's logits from chunked prefill through the engine's striped layout
    and page pool (the engine itself samples only the chunk's last token)."""
    engine, pages = _engine(config, ours, mesh)

    @jax.jit
    def run(state, k_v, tokens, positions, rows, tables, start, spans):
        net = nnx.merge(engine._graphdef, state)
        logits, cache = net(jnp.maximum(tokens, 0), positions, engine._cache(k_v, tables, start, prefill=True),
                            embeds=rows, embed_mask=tokens < 0, spans=spans)
        return logits, (cache.k_pages, cache.v_pages)

    _, embeds, mask, spans = _media_inputs(ids, rows, config.d_model)
    prompt = np.where(mask[0], -1, ids)
    seq = engine._sharding(jax.sharding.PartitionSpec(None, 'sequence'))
    out = np.zeros((len(ids), config.vocab_size), np.float32)
    chunks = _chunks(spans[0], 20)
    assert any(end - start < 20 for start, end in chunks[:-1])  # a chunk ended early, before an image
    for start, end in chunks:
        bucket = next(b for b in engine.buckets if b >= end - start)
        tokens, positions, _, layout = engine._stripe(prompt[start:end].tolist(), start, bucket, embeds[0, start:end])
        span_layout = engine._striped(spans[0, start:end], start, bucket, 0)
        logits, engine._pages = run(
            engine._state, engine._pages, engine._put(tokens, seq), engine._put(positions, seq),
            engine._put(layout, engine._sharding(jax.sharding.PartitionSpec(None, 'sequence', None))),
            engine._local_tables([pages.cover(end, PAGE_LEN)], engine.table_width), np.int32(start),
            engine._put(span_layout, seq))
        real = positions[0] >= 0
        out[positions[0][real]] = np.asarray(logits)[0][real]
    return out


def test_paged_prefill_logits_match_transformers(loaded):
    """Chunked prefill over a sequence-sharded pool (ring attention carries each key's span), every
    position's logits against transformers."""
    hf_model, config, ours, _ = loaded
    ids = _prompt(2, config.vision.tokens_per_image, seed=3)
    pixels = _pixels(2, config.vision.image_size, seed=4)
    want = _hf_logits(hf_model, ids, pixels)
    mesh = sharding.make_mesh(sharding.MeshShape(sequence=4), jax.devices()[:4])
    got = _paged_logits(config, ours, ids, _encode(ours, pixels), mesh)
    assert np.abs(got - want).max() <= 1e-4


def _paged_greedy(config, ours, ids: np.ndarray, rows: np.ndarray, steps: int) -> list[int]:
    """The serving engine's path: placeholder ids (< 0) with rows and spans per prefill chunk."""
    engine, pages = _engine(config, ours)
    _, embeds, mask, spans = _media_inputs(ids, rows, config.d_model)
    prompt = np.where(mask[0], -1, ids)
    for start, end in _chunks(spans[0], 24):
        token = engine.prefill(1, prompt[start:end].tolist(), start, pages.cover(end, PAGE_LEN),
                               embeds[0, start:end], spans[0, start:end])
    out, pos = [token], len(ids)
    while len(out) < steps:
        k = min(engine.max_steps, steps - len(out))
        out += engine.decode_steps([1], [out[-1]], [pos], [pages.cover(pos + k, PAGE_LEN)], k)[0]
        pos += k
    return out


def test_paged_greedy_matches_transformers(loaded):
    hf_model, config, ours, _ = loaded
    ids = _prompt(2, config.vision.tokens_per_image, seed=5)
    pixels = _pixels(2, config.vision.image_size, seed=6)
    steps = 32
    want = _hf_greedy(hf_model, ids, pixels, steps)
    assert len(set(want)) > 4  # a continuation that tells models apart, not one token repeated
    assert _paged_greedy(config, ours, ids, _encode(ours, pixels), steps) == want


def test_prefill_spans_checked(loaded):
    _, config, ours, _ = loaded
    engine = PagedEngine(config, ours, max_slots=1, num_pages=8, page_len=4, prefill_chunk=16, max_len=32)
    with pytest.raises(ValueError, match='one contiguous run'):
        engine.prefill(0, [5, -1, 5, -1], 0, [1], spans=[0, 1, 0, 1])
    with pytest.raises(ValueError, match='one int >= 0 per token'):
        engine.prefill(0, [5, 6], 0, [1], spans=[0])


def test_missing_vision_tensor_is_named(loaded, tmp_path):
    _, _, _, path = loaded
    from safetensors.numpy import load_file, save_file

    for name in ('config.json', 'model.safetensors'):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    tensors = load_file(str(tmp_path / 'model.safetensors'))
    gone = next(name for name in tensors if name.endswith('encoder.layers.0.mlp.fc2.bias'))
    del tensors[gone]
    save_file(tensors, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError, match=f'lacks tensors .*{gone}'):
        checkpoint.load(tmp_path)
