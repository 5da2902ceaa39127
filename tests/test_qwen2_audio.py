"""Qwen2-Audio (Qwen2AudioForConditionalGeneration) loaded by checkpoint.load against transformers:
the audio rows (tower, pool, LayerNorm, projector, padded frames masked) on clips of 3, 11 and 30 s,
the full model's logits with the processor's placeholder layout, and 32 greedy tokens through the
dense KV cache and through the paged engine. Features come from preprocess/whisper_features.py,
which equals transformers' WhisperFeatureExtractor (tests/test_preprocess_audio.py).
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

import _media
from model import checkpoint, presets
from model.config import AudioConfig, ModelConfig
from model.kv_cache import KVCache
from model.media_encoder import MediaEncoder
from model.paged_engine import PagedEngine
from preprocess import whisper_features as wf
from preprocess.tokenizer import Tokenizer
from ringserve.v1 import inference_pb2 as pb
from server.errors import InvalidArgument
from server.media import TEXT, MediaResolver
from server.media_store import MediaStore

torch.set_num_threads(2)

VOCAB = 160
AUDIO_BOS, AUDIO_EOS, AUDIO = 157, 158, 159  # <|audio_bos|>, <|audio_eos|>, <|AUDIO|> (audio_token_index)
# (id, audio_config, text_config): two encoders (128 and 80 mel bins; 2 and 1 layers) and two Qwen2
# decoders (GQA; MQA with a large RoPE base and tie_word_embeddings set). max_source_positions stays
# Qwen2-Audio's 1500.
CASES = [
    ('mel128_gqa',
     dict(num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128),
     dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          initializer_range=0.3)),
    ('mel80_mqa',
     dict(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=96),
     dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
          # tie_word_embeddings: transformers ties nothing for this class all the same
          rope_theta=1e6, tie_word_embeddings=True, initializer_range=0.2)),
]
SECONDS = (3.0, 11.0, 30.0)


def _hf_model(audio: dict, text: dict, seed: int) -> transformers.Qwen2AudioForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(max_source_positions=1500, **audio),
        # Each case's text config has a wide init (0.2 to 0.3): logits of a few units and greedy
        # continuations that do not settle into one repeated token, as they do at the default 0.02.
        text_config=dict(model_type='qwen2', vocab_size=VOCAB, max_position_embeddings=2048, **text),
        audio_token_index=AUDIO)
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    return model


def _clip(seconds: float, seed: int) -> np.ndarray:
    """Noise under a rising tone, at 16 kHz: a clip whose every frame differs."""
    t = np.arange(int(seconds * 16_000)) / 16_000
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 40 * t) * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)


def _features(seconds: float, n_mels: int, seed: int) -> wf.WhisperFeatures:
    return wf.extract(_clip(seconds, seed), 16_000, wf.WhisperFeatureConfig(feature_size=n_mels))


def _prompt(n: int) -> np.ndarray:
    """The processor's layout: text, <|audio_bos|>, n x <|AUDIO|>, <|audio_eos|>, text."""
    return np.array([5, 9, 14, AUDIO_BOS] + [AUDIO] * n + [AUDIO_EOS, 21, 33, 8], np.int64)


@pytest.fixture(scope='module', params=CASES, ids=[c[0] for c in CASES])
def loaded(request, tmp_path_factory):
    _, audio, text = request.param
    hf_model = _hf_model(audio, text, seed=len(request.param[0]))
    path = tmp_path_factory.mktemp('qwen2_audio')
    hf_model.save_pretrained(path, max_shard_size='300KB')
    assert len(list(path.glob('*.safetensors'))) > 1  # sharded
    config, ours = checkpoint.load(path)
    return hf_model, config, ours, audio


def _hf_forward(hf_model, ids: np.ndarray, feats: wf.WhisperFeatures):
    """(logits f32[T, V], projector output f32[750, D]) of transformers on one clip."""
    captured = []
    hook = hf_model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            out = hf_model(input_ids=torch.from_numpy(ids)[None],
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           input_features=torch.from_numpy(feats.input_features)[None],
                           feature_attention_mask=torch.from_numpy(feats.attention_mask)[None].long())
    finally:
        hook.remove()
    return out.logits[0].float().numpy(), captured[0][0].float().numpy()


def _ours_rows(ours, feats: wf.WhisperFeatures) -> np.ndarray:
    rows = ours.encode_audio(jnp.asarray(feats.input_features)[None], jnp.array([feats.valid_frames]))
    return np.asarray(rows[0], np.float32)


def _media_inputs(ids: np.ndarray, rows: np.ndarray, d_model: int):
    """Placeholder-masked tokens, embeds [1, T, D] (rows at <|AUDIO|>) and the mask."""
    mask = ids == AUDIO
    embeds = np.zeros((len(ids), d_model), np.float32)
    embeds[mask] = rows
    tokens = np.where(mask, 0, ids).astype(np.int32)
    return tokens[None], embeds[None], mask[None]


def test_config_translation(loaded):
    hf_model, config, _, audio = loaded
    a = config.audio
    assert (a.n_mels, a.width, a.n_layers, a.n_heads, a.mlp_dim) == (
        audio['num_mel_bins'], audio['d_model'], audio['encoder_layers'], audio['encoder_attention_heads'],
        audio['encoder_ffn_dim'])
    assert (a.window_frames, a.positions, a.pool, a.rows_per_window) == (3000, 1500, 2, 750)
    assert (a.pool_site, a.projector, a.mask_padding) == ('tower', 'linear_bias', True)
    assert config.qkv_bias and not config.tie_embeddings and config.vocab_size == VOCAB
    # The serialised config round-trips (Qwen2-Audio's fields are written because they are set).
    assert ModelConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())['audio']['pool_site'] == 'tower'


@pytest.mark.parametrize('seconds', SECONDS)
def test_audio_rows_and_logits_match_transformers(loaded, seconds):
    hf_model, config, ours, audio = loaded
    feats = _features(seconds, audio['num_mel_bins'], seed=int(seconds))
    n = config.audio.valid_rows(feats.valid_frames)
    assert n == wf.qwen2_audio_tokens(feats.valid_frames)  # the processor's placeholder count
    assert n == (750 if seconds == 30.0 else int(seconds * 25))
    ids = _prompt(n)
    want_logits, want_rows = _hf_forward(hf_model, ids, feats)
    rows = _ours_rows(ours, feats)
    assert np.abs(rows[:n] - want_rows[:n]).max() <= 1e-4

    tokens, embeds, mask = _media_inputs(ids, rows[:n], config.d_model)
    positions = np.arange(len(ids), dtype=np.int32)[None]
    got, _ = ours(jnp.asarray(tokens), jnp.asarray(positions), embeds=jnp.asarray(embeds),
                  embed_mask=jnp.asarray(mask))
    assert np.abs(np.asarray(got[0]) - want_logits).max() <= 1e-4
    assert np.abs(want_logits).max() > 2.0  # logits large enough for 1e-4 to mean something
    silent, _ = ours(jnp.asarray(tokens), jnp.asarray(positions), embeds=jnp.zeros_like(embeds),
                     embed_mask=jnp.asarray(mask))
    assert np.abs(np.asarray(silent[0, -1]) - want_logits[-1]).max() > 1e-2  # the audio rows matter


# The windowing is common code: checked once, on the released checkpoints' 128 mel bins.
@pytest.mark.parametrize('loaded', [c for c in CASES if c[1]['num_mel_bins'] == 128], indirect=True,
                         ids=lambda c: c[0])
def test_long_clip_is_30s_windows_each_its_own_audio(loaded):
    """The extension past transformers' 30 s: a 34 s clip is cut into windows of 30 and 4 s, each
    encoded alone and laid out as its own <|audio_bos|> ... <|audio_eos|>; that equals transformers
    given the two pieces as two audios of one prompt."""
    hf_model, config, ours, audio = loaded
    samples = _clip(34.0, seed=34)
    windows = wf.extract_windows(samples, 16_000, wf.WhisperFeatureConfig(feature_size=audio['num_mel_bins']))
    assert [w.valid_frames for w in windows] == [3000, 400]
    last = wf.extract(samples[480_000:], 16_000, wf.WhisperFeatureConfig(feature_size=audio['num_mel_bins']))
    np.testing.assert_array_equal(windows[1].input_features, last.input_features)  # a piece as its own clip

    counts = [config.audio.valid_rows(w.valid_frames) for w in windows]
    assert counts == [750, 100]
    ids = np.concatenate([[5, 9]] + [[AUDIO_BOS] + [AUDIO] * n + [AUDIO_EOS, 21] for n in counts]).astype(np.int64)
    mel = np.stack([w.input_features for w in windows])
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(ids)[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        input_features=torch.from_numpy(mel),
                        feature_attention_mask=torch.from_numpy(np.stack([w.attention_mask for w in windows])).long(),
                        ).logits[0].numpy()
    encoded = np.asarray(ours.encode_audio(jnp.asarray(mel), jnp.array([w.valid_frames for w in windows])))
    rows = np.concatenate([encoded[i, :n] for i, n in enumerate(counts)])
    tokens, embeds, mask = _media_inputs(ids, rows, config.d_model)
    got, _ = ours(jnp.asarray(tokens), jnp.arange(len(ids), dtype=jnp.int32)[None], embeds=jnp.asarray(embeds),
                  embed_mask=jnp.asarray(mask))
    assert np.abs(np.asarray(got[0]) - want).max() <= 1e-4


def test_media_encoder_passes_valid_frames(loaded):
    """The server's encoder (batch buckets, padded rows) gives the rows encode_audio gives."""
    _, config, ours, audio = loaded
    feats = [_features(s, audio['num_mel_bins'], seed=20 + i) for i, s in enumerate((3.0, 7.0))]
    encoder = MediaEncoder(config, ours)
    got = encoder.audio(np.stack([f.input_features for f in feats]), [f.valid_frames for f in feats])
    for f, rows in zip(feats, got):
        n = config.audio.valid_rows(f.valid_frames)
        np.testing.assert_allclose(rows[:n], _ours_rows(ours, f)[:n], atol=1e-5)


def test_padding_is_masked_not_encoded(loaded):
    """Padded frames do not reach the valid rows: a 3 s clip's rows are the same whatever the
    padding holds, while without the mask (valid_frames = the whole window) they change."""
    _, config, ours, audio = loaded
    feats = _features(3.0, audio['num_mel_bins'], seed=3)
    n = config.audio.valid_rows(feats.valid_frames)
    noisy = feats.input_features.copy()
    noisy[:, feats.valid_frames + 2:] += np.random.default_rng(0).normal(size=noisy[:, feats.valid_frames + 2:].shape)
    base = _ours_rows(ours, feats)[:n]
    # The last valid encoder positions' convolutions see 2 frames of padding: keep those as they were.
    again = _ours_rows(ours, wf.WhisperFeatures(noisy.astype(np.float32), feats.valid_frames))[:n]
    np.testing.assert_allclose(again, base, atol=1e-5)
    unmasked = np.asarray(ours.encode_audio(jnp.asarray(feats.input_features)[None], jnp.array([3000]))[0, :n])
    assert np.abs(unmasked - base).max() > 1e-3


def _hf_greedy(hf_model, ids: np.ndarray, feats: wf.WhisperFeatures, steps: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.from_numpy(ids)[None],
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                input_features=torch.from_numpy(feats.input_features)[None],
                                feature_attention_mask=torch.from_numpy(feats.attention_mask)[None].long(),
                                max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(ids):].tolist()


def _dense_greedy(ours, tokens, embeds, mask, steps: int) -> list[int]:
    """Prefill with the audio rows, then token-by-token decode through the dense KV cache."""
    graphdef, state = nnx.split(ours)
    prefill = jax.jit(lambda s, t, p, c, e, m: nnx.merge(graphdef, s)(t, p, c, embeds=e, embed_mask=m))
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, c))
    length = tokens.shape[1]
    cache = KVCache.init(ours.config, 1, length + steps)
    logits, cache = prefill(state, tokens, np.arange(length, dtype=np.int32)[None], cache, embeds, mask)
    out = [int(np.argmax(logits[0, -1]))]
    for pos in range(length, length + steps - 1):
        logits, cache = decode(state, np.array([[out[-1]]], np.int32), np.array([[pos]], np.int32), cache)
        out.append(int(np.argmax(logits[0, 0])))
    return out


def _paged_greedy(config, ours, ids: np.ndarray, rows: np.ndarray, steps: int) -> list[int]:
    """The serving engine's path: placeholder ids (< 0) whose rows come with each prefill chunk."""
    page_len, chunk = 8, 56  # chunks end inside pages and inside the audio
    engine = PagedEngine(config, ours, max_slots=2, num_pages=160, page_len=page_len, prefill_chunk=64,
                         max_len=1024)
    free = list(np.random.default_rng(1).permutation(np.arange(1, 160)))
    table: list[int] = []

    def cover(length):
        while len(table) * page_len < length:
            table.append(int(free.pop()))

    mask = ids == AUDIO
    prompt = np.where(mask, -1 - np.cumsum(mask), ids)  # any negative id: "take this position's row"
    embeds = np.zeros((len(ids), config.d_model), np.float32)
    embeds[mask] = rows
    for start in range(0, len(ids), chunk):
        cover(min(start + chunk, len(ids)))
        token = engine.prefill(1, prompt[start:start + chunk].tolist(), start, table, embeds[start:start + chunk])
    out, pos = [token], len(ids)
    while len(out) < steps:
        cover(pos + 1)
        out.append(engine.decode([1], [out[-1]], [pos], [table])[0])
        pos += 1
    return out


def test_greedy_matches_transformers_dense_and_paged(loaded):
    hf_model, config, ours, audio = loaded
    seconds = 3.0 if audio['num_mel_bins'] == 128 else 5.0  # one clip length per config keeps this short
    feats = _features(seconds, audio['num_mel_bins'], seed=10 + int(seconds))
    n = config.audio.valid_rows(feats.valid_frames)
    ids = _prompt(n)
    rows = _ours_rows(ours, feats)[:n]
    steps = 32
    want = _hf_greedy(hf_model, ids, feats, steps)
    assert len(set(want)) > 8  # a continuation that tells models apart, not one token repeated
    tokens, embeds, mask = _media_inputs(ids, rows, config.d_model)
    assert _dense_greedy(ours, tokens, embeds, mask, steps) == want
    assert _paged_greedy(config, ours, ids, rows, steps) == want


def test_audio_config_defaults_keep_old_configs():
    """The new AudioConfig fields default to the built-in model's encoder and are left out of its
    JSON, so ringserve_config.json files written before them load equal and serialise unchanged."""
    old = dict(n_mels=80, window_frames=1000, width=128, n_layers=2, n_heads=4, mlp_dim=512, norm_eps=1e-5,
               tokens_per_second=10, context_frames=0)
    cfg = AudioConfig(**old)
    assert cfg.to_dict() == old
    assert (cfg.pool_site, cfg.projector, cfg.mask_padding) == ('projector', 'rmsnorm_linear', False)
    assert cfg.valid_rows(1) == cfg.rows_per_window  # no masking: every row is used
    with pytest.raises(ValueError, match='pool_site'):
        AudioConfig(pool_site='middle')
    with pytest.raises(ValueError, match='projector'):
        AudioConfig(projector='mlp')
    with pytest.raises(ValueError, match='mask_padding with context_frames'):
        AudioConfig(mask_padding=True, context_frames=100)


def test_server_lays_audio_out_in_encoder_windows(loaded, tmp_path):
    """server/media.py counts a mask_padding encoder's rows per window as the processor does
    (1 s: 100 valid frames -> 25 rows; 31 s: a full window's 750 and 1 s more) and takes no
    video (its layout interleaves frames with sound the built-in way)."""
    _, config, _, _ = loaded
    directory = presets.ensure_default_checkpoint()
    resolver = MediaResolver(config, Tokenizer(directory / presets.TOKENIZER_FILE), MediaStore(tmp_path))
    assert resolver.modalities == (TEXT, 'AUDIO')
    one = resolver.resolve(pb.Part(inline_data=pb.Blob(mime_type='audio/wav', data=_media.wav(1.0))), 'p')
    assert (one.rows, one.audio_windows) == (wf.qwen2_audio_tokens(100), (16_000,))
    longer = resolver.resolve(pb.Part(inline_data=pb.Blob(mime_type='audio/wav', data=_media.wav(31.0))), 'p')
    assert (longer.rows, longer.audio_windows) == (750 + 25, (480_000, 16_000))
    with pytest.raises(InvalidArgument, match='takes no video input'):
        resolver.resolve(pb.Part(inline_data=pb.Blob(mime_type='video/mp4', data=b'0' * 16)), 'p')

