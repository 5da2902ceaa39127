"""Image and audio encoders: SigLIP / Whisper parity with transformers through our converters,
projector pooling checked by hand, media embeddings in the decoder, checkpoints, configs, a mesh."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids as hf_sinusoids

from _model_helpers import tiny_config
from model import checkpoint, presets, sharding
from model.audio_encoder import AudioProjector, AudioTower, sinusoids
from model.config import AudioConfig, ModelConfig, VisionConfig
from model.transformer import Transformer
from model.vision import VisionProjector, VisionTower

torch.set_num_threads(2)

# The sizes the brief's parity checks name (also VisionConfig() / AudioConfig() defaults).
SIGLIP = dict(hidden_size=128, image_size=64, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=512, hidden_act='gelu_pytorch_tanh')
WHISPER = dict(d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512, num_mel_bins=80,
               max_source_positions=500)
# Small encoders for the model-level tests (compile in about a second each).
TINY_VISION = VisionConfig(image_size=16, patch_size=4, width=16, n_layers=1, n_heads=2, mlp_dim=32,
                           tokens_per_image=4)
TINY_AUDIO = AudioConfig(n_mels=8, window_frames=100, width=16, n_layers=1, n_heads=2, mlp_dim=32,
                         tokens_per_second=10)


def _jit_call(module: nnx.Module, method: str = '__call__'):
    graphdef, state = nnx.split(module)
    step = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))
    return lambda x: np.asarray(step(state, jnp.asarray(x)))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (HF zero-inits biases and sets LayerNorms to 1), so each one matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('.weight') and p.ndim == 1:  # LayerNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def _random_model(config: ModelConfig, seed: int) -> Transformer:
    """A model filled with NumPy randoms (norm scales and biases included); no per-shape init kernels."""
    rng = np.random.default_rng(seed)
    specs = dict(checkpoint.param_specs(config))

    def fetch(name):
        shape = specs[name].shape
        std = 0.3 if len(shape) == 1 else shape[-2] ** -0.5
        return rng.normal(0.0, std, shape).astype(np.float32)

    return checkpoint.from_params(config, fetch)


def _media_config(**changes) -> ModelConfig:
    return tiny_config(vision=TINY_VISION, audio=TINY_AUDIO, **changes)


# ---------------------------------------------------------------------------------------------
# Parity with transformers.
# ---------------------------------------------------------------------------------------------
def test_siglip_tower_matches_transformers():
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP)).eval()
    _randomise(hf, seed=0)
    cfg = VisionConfig()
    assert (cfg.width, cfg.image_size, cfg.patch_size, cfg.n_layers) == (128, 64, 8, 2)
    tower = VisionTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    checkpoint.assign_params(tower, checkpoint.siglip_vision_params(_numpy_state(hf), cfg))

    pixels = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)  # channels first
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()  # [B, P, W]
    got = _jit_call(tower)(pixels.transpose(0, 2, 3, 1))  # channels last
    assert got.shape == want.shape == (2, 64, 128)
    err = np.max(np.abs(got - want))
    assert err <= 1e-4, err


def test_whisper_encoder_matches_transformers():
    hf = WhisperEncoder(transformers.WhisperConfig(**WHISPER)).eval()
    _randomise(hf, seed=2)
    cfg = AudioConfig()
    assert (cfg.width, cfg.n_mels, cfg.positions, cfg.n_layers) == (128, 80, 500, 2)
    tower = AudioTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    checkpoint.assign_params(tower, checkpoint.whisper_encoder_params(_numpy_state(hf), cfg))

    mel = np.random.default_rng(3).normal(size=(2, 80, 1000)).astype(np.float32)
    with torch.no_grad():
        want = hf(torch.from_numpy(mel)).last_hidden_state.numpy()  # [B, 500, W]
    got = _jit_call(tower)(mel)
    assert got.shape == want.shape == (2, 500, 128)
    err = np.max(np.abs(got - want))
    assert err <= 1e-4, err


def test_whisper_positions_are_whispers_sinusoids():
    """Our init of the position table is Whisper's (what HF stores in embed_positions). Angles reach
    499 radians, where one float32 ulp is 3e-5, so exp/sin rounding differs by about that much."""
    ours, want = sinusoids(500, 128), hf_sinusoids(500, 128).numpy()
    np.testing.assert_allclose(ours, want, atol=5e-5)
    np.testing.assert_allclose(ours[:10], want[:10], atol=3e-7)  # small angles: a float32 ulp or two


def test_converters_find_prefixes_and_name_bad_input():
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**SIGLIP, 'num_hidden_layers': 1}))
    state = _numpy_state(hf)
    cfg = VisionConfig(n_layers=1)
    plain = checkpoint.siglip_vision_params(state, cfg)
    # Real SigLIP checkpoints (SiglipModel) keep the tower under 'vision_model.', beside a text model.
    prefixed = {f'vision_model.{k}': v for k, v in state.items()}
    prefixed['text_model.embeddings.token_embedding.weight'] = np.zeros((4, 128), np.float32)  # ignored
    again = checkpoint.siglip_vision_params(prefixed, cfg)
    np.testing.assert_array_equal(again['layers'][0]['attn']['q']['kernel'],
                                  state['encoder.layers.0.self_attn.q_proj.weight'].T)
    np.testing.assert_array_equal(again['patch_kernel'], plain['patch_kernel'])

    with pytest.raises(ValueError, match=r"lacks 16 tensors .*\['encoder\.layers\.1\.layer_norm1\.bias'.* and 12 more"):
        checkpoint.siglip_vision_params(state, VisionConfig(n_layers=2))
    with pytest.raises(ValueError, match=r"'embeddings\.position_embedding\.weight' gives 'positions' shape "
                       r"\(64, 128\), but the config expects \(256, 128\)"):
        checkpoint.siglip_vision_params(state, VisionConfig(n_layers=1, image_size=128, tokens_per_image=16))
    with pytest.raises(ValueError, match='is this a Whisper encoder state dict'):
        checkpoint.whisper_encoder_params(state, AudioConfig())
    tower = VisionTower(VisionConfig(n_layers=1), dtype=jnp.float32, rngs=nnx.Rngs(0))
    del plain['post_norm']['bias']
    with pytest.raises(ValueError, match=r"missing \['post_norm\.bias'\]"):
        checkpoint.assign_params(tower, plain)


# ---------------------------------------------------------------------------------------------
# Projectors, by hand.
# ---------------------------------------------------------------------------------------------
def test_vision_projector_pools_the_grid_then_norms_and_projects():
    cfg = VisionConfig(image_size=16, patch_size=4, width=2, n_layers=1, n_heads=1, mlp_dim=4, tokens_per_image=4)
    assert (cfg.grid, cfg.pool) == (4, 2)
    proj = VisionProjector(cfg, d_model=3, dtype=jnp.float32, rngs=nnx.Rngs(0))
    checkpoint.assign_params(proj, {'norm': {'scale': np.array([0.0, 1.0])},  # (1 + w) = [1, 2]
                                    'proj': np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])})
    y, x = np.divmod(np.arange(16), 4)  # patch p = 4 * y + x (row-major, as the tower emits them)
    patches = np.stack([4 * y + x, 100 * y + x], axis=-1).astype(np.float32)[None]  # [1, P, W]
    got = np.asarray(proj(jnp.asarray(patches)))
    assert got.shape == (1, 4, 3)
    # Token (i, j) averages patches y in {2i, 2i+1}, x in {2j, 2j+1}: channel 0 -> 8i + 2j + 2.5,
    # channel 1 -> 200i + 2j + 50.5. Token 1 is (0, 1): (4.5, 52.5).
    a, b = 4.5, 52.5
    rms = math.sqrt((a * a + b * b) / 2 + cfg.norm_eps)
    np.testing.assert_allclose(got[0, 1], [a / rms, 2 * b / rms, a / rms + 2 * b / rms], rtol=1e-6)
    for token, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        a, b = 8 * i + 2 * j + 2.5, 200 * i + 2 * j + 50.5
        rms = math.sqrt((a * a + b * b) / 2 + cfg.norm_eps)
        np.testing.assert_allclose(got[0, token, :2], [a / rms, 2 * b / rms], rtol=1e-6)


def test_audio_projector_pools_time_then_norms_and_projects():
    cfg = AudioConfig(n_mels=8, window_frames=200, width=4, n_layers=1, n_heads=1, mlp_dim=8, tokens_per_second=10)
    assert (cfg.positions, cfg.pool, cfg.tokens_per_window) == (100, 5, 20)
    proj = AudioProjector(cfg, d_model=4, dtype=jnp.float32, rngs=nnx.Rngs(0))
    checkpoint.assign_params(proj, {'norm': {'scale': np.array([0.0, 1.0, 0.0, 0.0])}, 'proj': np.eye(4)})
    t = np.arange(100, dtype=np.float32)
    x = (t[:, None] * np.arange(1, 5, dtype=np.float32)[None, :])[None]  # [1, T, W]: channel c holds t * (c + 1)
    got = np.asarray(proj(jnp.asarray(x)))
    assert got.shape == (1, 20, 4)
    # Token k averages t = 5k..5k+4, i.e. (5k + 2) * (c + 1); RMS-normalised that is (c + 1) / sqrt(7.5)
    # whatever k (mean of 1, 4, 9, 16 is 7.5); then (1 + w) doubles channel 1.
    want = np.array([1.0, 4.0, 3.0, 4.0]) / math.sqrt(7.5)
    np.testing.assert_allclose(got[0], np.broadcast_to(want, (20, 4)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Media embeddings in the decoder.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('changes', [{}, dict(embed_scale=True, norm_offset=1.0, mlp_activation='gelu_tanh')],
                         ids=['llama', 'gemma_scaled'])
def test_embeds_replace_masked_rows_only(changes):
    config = tiny_config(**changes)
    model = _random_model(config, seed=4)
    graphdef, state = nnx.split(model)
    plain = jax.jit(lambda s, tok, pos: nnx.merge(graphdef, s)(tok, pos)[0])
    media = jax.jit(lambda s, tok, pos, e, m: nnx.merge(graphdef, s)(tok, pos, embeds=e, embed_mask=m)[0])

    rng = np.random.default_rng(5)
    b, t, u = 2, 10, 96  # token u stands for the media vector below
    tokens = rng.integers(3, 90, (b, t)).astype(np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    mask = np.zeros((b, t), bool)
    mask[1, 3:6] = True  # row 0 has no media; row 1 three media positions
    vector = np.asarray(model.embedder.encode(jnp.array([[u]])))[0, 0]  # what the model embeds for u
    embeds = np.where(mask[:, :, None], vector, rng.normal(size=(b, t, config.d_model))).astype(np.float32)

    placeholders = np.where(mask, -1, tokens).astype(np.int32)  # ids under the mask are ignored
    got = np.asarray(media(state, placeholders, positions, embeds, mask))
    base = np.asarray(plain(state, tokens, positions))
    if config.embed_scale:
        # In the plain program XLA moves Gemma's scalar sqrt(D) multiply into its consumers (the
        # compiled HLO holds the constant three times); once rows are selected it cannot, so the
        # two programs round differently: equal to float32 rounding, not bit for bit.
        same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    else:
        same = np.testing.assert_array_equal
    same(got[0], base[0])  # no mask: the plain call
    same(got[1, :3], base[1, :3])  # causal: before the media, unchanged
    assert np.max(np.abs(got[1, 3:] - base[1, 3:])) > 1e-3
    swapped = np.where(mask, u, tokens).astype(np.int32)
    # The media row enters as given: with embed_scale, unscaled (u's scaled embedding is `vector`).
    same(got[1], np.asarray(plain(state, swapped, positions))[1])

    with pytest.raises(ValueError, match='pass both'):
        model(jnp.asarray(tokens), jnp.asarray(positions), embeds=jnp.asarray(embeds))
    with pytest.raises(ValueError, match=r'must be \[B, T, D\]'):
        model(jnp.asarray(tokens), jnp.asarray(positions), embeds=jnp.asarray(embeds[:, :4]),
              embed_mask=jnp.asarray(mask[:, :4]))


def test_encoders_in_the_model_feed_embeds():
    config = _media_config()
    model = _random_model(config, seed=6)
    images = np.random.default_rng(7).normal(size=(2, 16, 16, 3)).astype(np.float32)
    mel = np.random.default_rng(8).normal(size=(1, 8, 100)).astype(np.float32)
    image_rows = _jit_call(model, 'encode_images')(images)
    audio_rows = _jit_call(model, 'encode_audio')(mel)
    assert image_rows.shape == (2, 4, 32) and audio_rows.shape == (1, 10, 32)
    assert image_rows.dtype == audio_rows.dtype == np.float32
    # Tower then projector, and each image its own rows.
    by_hand = _jit_call(model.vision.projector)(_jit_call(model.vision.tower)(images))
    np.testing.assert_allclose(image_rows, by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(image_rows[1:], _jit_call(model, 'encode_images')(images[1:]), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(image_rows[0] - image_rows[1])) > 1e-2
    with pytest.raises(ValueError, match=r'takes \[B, 16, 16, 3\]'):
        model.encode_images(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match=r'takes \[B, 8, 100\]'):
        model.encode_audio(jnp.zeros((1, 8, 99)))
    text_only = _random_model(tiny_config(), seed=6)
    assert text_only.vision is None and text_only.audio is None
    with pytest.raises(ValueError, match='no image encoder'):
        text_only.encode_images(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match='no audio encoder'):
        text_only.encode_audio(jnp.zeros((1, 8, 100)))


def test_audio_context_frames_are_heard_but_not_handed_on():
    # A window with context: the tower runs over all of it, the decoder gets only the middle rows.
    config = _media_config()
    with_context = dataclasses.replace(config, audio=dataclasses.replace(TINY_AUDIO, context_frames=20))
    assert (with_context.audio.context_rows, with_context.audio.rows_per_window) == (2, 6)
    plain, model = _random_model(config, seed=9), _random_model(with_context, seed=9)  # the same weights
    mel = np.random.default_rng(10).normal(size=(2, 8, 100)).astype(np.float32)
    rows = _jit_call(model, 'encode_audio')(mel)
    assert rows.shape == (2, 6, 32)
    np.testing.assert_allclose(rows, _jit_call(plain, 'encode_audio')(mel)[:, 2:8], rtol=1e-5, atol=1e-5)
    heard = mel.copy()
    heard[:, :, :20] = 0.0  # change the left context only
    assert np.max(np.abs(_jit_call(model, 'encode_audio')(heard) - rows)) > 1e-3
    for bad in (5, 50, -10):  # not a whole token; no middle left; negative
        with pytest.raises(ValueError, match='context_frames'):
            dataclasses.replace(TINY_AUDIO, context_frames=bad)


def test_bfloat16_config_keeps_encoder_params_and_outputs_in_bfloat16():
    config = _media_config(dtype='bfloat16')
    specs = checkpoint.param_specs(config)
    encoder = [(name, s.dtype) for name, s in specs if name.startswith(('vision.', 'audio.'))]
    assert len(encoder) > 30 and {dtype for _, dtype in encoder} == {jnp.dtype('bfloat16')}
    rows = jax.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)).encode_images(jnp.zeros((1, 16, 16, 3))))
    assert rows.dtype == jnp.bfloat16 and rows.shape == (1, 4, 32)


# ---------------------------------------------------------------------------------------------
# Checkpoints and configs.
# ---------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_with_encoders(tmp_path):
    config = _media_config()
    model = _random_model(config, seed=9)
    checkpoint.save(tmp_path, config, model)
    loaded_config, loaded = checkpoint.load(tmp_path)
    assert loaded_config == config and loaded.vision is not None and loaded.audio is not None
    images = np.random.default_rng(10).normal(size=(1, 16, 16, 3)).astype(np.float32)
    mel = np.random.default_rng(11).normal(size=(1, 8, 100)).astype(np.float32)
    np.testing.assert_array_equal(_jit_call(loaded, 'encode_images')(images), _jit_call(model, 'encode_images')(images))
    np.testing.assert_array_equal(_jit_call(loaded, 'encode_audio')(mel), _jit_call(model, 'encode_audio')(mel))

    # A config that wants encoders cannot load weights without them: the missing tensor is named.
    text = tmp_path / 'text'
    checkpoint.save(text, tiny_config(), _random_model(tiny_config(), seed=9))
    (text / checkpoint.CONFIG_FILE).write_text(config.to_json())
    with pytest.raises(ValueError, match=r"Tensor 'audio\.projector\.norm\.scale' is missing"):
        checkpoint.load(text)


def test_old_checkpoint_without_encoder_keys_loads(tmp_path):
    config = tiny_config()
    model = _random_model(config, seed=12)
    checkpoint.save(tmp_path, config, model)
    stored = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
    del stored['vision'], stored['audio']  # as written before encoders existed
    (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(stored))
    loaded_config, loaded = checkpoint.load(tmp_path)
    assert loaded_config == config and loaded_config.vision is None and loaded.vision is None
    np.testing.assert_array_equal(loaded.embedder.table[...], model.embedder.table[...])


def test_config_json_round_trip_and_validation():
    config = _media_config()
    text = config.to_json()
    assert json.loads(text)['vision']['tokens_per_image'] == 4
    again = ModelConfig.from_json(text)
    assert again == config and isinstance(again.vision, VisionConfig) and isinstance(again.audio, AudioConfig)
    assert hash(again) == hash(config)
    assert ModelConfig.from_dict({**config.to_dict(), 'audio': None}).audio is None

    v, a = VisionConfig(), AudioConfig()
    assert (v.grid, v.pool, v.num_patches) == (8, 2, 64)
    assert (a.positions, a.pool, a.tokens_per_window) == (500, 5, 100)
    with pytest.raises(ValueError, match=r'use one of \[1, 4, 16, 64\]'):
        VisionConfig(tokens_per_image=9)
    with pytest.raises(ValueError, match='multiple of patch_size'):
        VisionConfig(image_size=60)
    with pytest.raises(ValueError, match=r'use one of \[1, 2, 5, 10, 25, 50\]'):
        AudioConfig(tokens_per_second=3)
    with pytest.raises(ValueError, match='multiple of 100'):
        AudioConfig(window_frames=1050)
    with pytest.raises(ValueError, match='multiple of n_heads'):
        AudioConfig(n_heads=3)
    with pytest.raises(ValueError, match=r"Unknown VisionConfig fields \['colour'\]"):
        tiny_config(vision={'colour': 1})
    with pytest.raises(ValueError, match='use a VisionConfig'):
        tiny_config(vision=3)


def test_default_config_has_both_encoders():
    config = presets.default_config()
    # audio windows that overlap by 1 s either side: a word cut by a window edge is heard whole
    assert config.vision == VisionConfig() and config.audio == AudioConfig(context_frames=100)


# ---------------------------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 devices (tests/conftest.py sets XLA_FLAGS)')
def test_model_with_encoders_shards_on_a_mesh():
    config = _media_config()
    model = _random_model(config, seed=13)
    mesh = sharding.make_mesh(sharding.MeshShape(sequence=4, tensor=2), jax.devices()[:8])
    graphdef, state = nnx.split(model)
    shardings = sharding.param_shardings(state, mesh)
    encoder = jax.tree.leaves(shardings['vision']) + jax.tree.leaves(shardings['audio'])
    assert len(encoder) > 30 and all(s.is_fully_replicated for s in encoder)  # small: one copy per device
    assert not shardings['layers'][0]['attn']['qkv_proj'].is_fully_replicated  # the decoder is split
    sharded = sharding.shard_state(state, mesh)

    @jax.jit
    def run(state, images, mel, tokens, positions, mask):
        m = nnx.merge(graphdef, state)
        rows = jnp.concatenate([m.encode_images(images), m.encode_audio(mel)], axis=1)  # [1, 14, D]
        embeds = jnp.zeros((1, tokens.shape[1], config.d_model)).at[:, 1:15].set(rows)
        return m(tokens, positions, embeds=embeds, embed_mask=mask)[0]

    images = np.random.default_rng(14).normal(size=(1, 16, 16, 3)).astype(np.float32)
    mel = np.random.default_rng(15).normal(size=(1, 8, 100)).astype(np.float32)
    tokens = np.arange(3, 19, dtype=np.int32)[None]
    positions = np.arange(16, dtype=np.int32)[None]
    mask = np.zeros((1, 16), bool)
    mask[0, 1:15] = True
    got = np.asarray(run(sharded, images, mel, tokens, positions, mask))
    want = np.asarray(run(state, images, mel, tokens, positions, mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
