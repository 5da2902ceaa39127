"""Gemma 3 decoders (Gemma3ForCausalLM and the text decoder of Gemma3ForConditionalGeneration)
loaded from Hugging Face directories against transformers itself, on text prompts: same logits on prompts longer
than the sliding window, the same greedy continuations through the KV cache, and through the paged
engine. Also: config.json translation checked by hand, and the new config fields' round trip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from _model_helpers import jitted
from model import checkpoint
from model.config import GLOBAL_ROPE, LayerKind, ModelConfig, RopeScaling, parse_layer_kinds, rope_inv_freq
from model.paged_engine import PagedEngine
from test_checkpoint_parity import _ringserve_greedy

torch.set_num_threads(2)

VOCAB = 384
TEXT = dict(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1,
            pad_token_id=0, initializer_range=0.02)
# A SigLIP tower as small as it gets: 32 x 32 images of 8 x 8 patches, pooled to 4 tokens.
VISION = dict(model_type='siglip_vision_model', hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, image_size=32, patch_size=8)
LINEAR_8 = dict(rope_type='linear', factor=8.0)

# (id, wrapper, text settings, wrapper settings): widths, GQA / MQA / MHA, head_dim != D / N,
# windows, layer patterns, RoPE with and without scaling, capped and uncapped logits.
CASES = [
    ('causal_gqa_linear_rope', 'causal',
     dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
          head_dim=32, sliding_window=6, sliding_window_pattern=3, query_pre_attn_scalar=24,
          rope_local_base_freq=100.0, rope_theta=5e4, rope_scaling=LINEAR_8, final_logit_softcapping=30.0), {}),
    ('causal_mqa_untied', 'causal',
     dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
          head_dim=24, sliding_window=9, layer_types=['full_attention', 'sliding_attention', 'sliding_attention'],
          query_pre_attn_scalar=24, tie_word_embeddings=False), {}),
    ('conditional_tied', 'conditional',
     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
          head_dim=16, sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=16,
          rope_scaling=LINEAR_8), {}),
    ('conditional_untied_capped', 'conditional',
     dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
          head_dim=8, sliding_window=4, layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
          query_pre_attn_scalar=32, final_logit_softcapping=5.0),  # the wrapper never caps: neither may we
     dict(tie_word_embeddings=False)),
]


def _hf_gemma3(wrapper: str, seed: int, text: dict, outer: dict) -> transformers.PreTrainedModel:
    """A random tiny Gemma 3 whose norms are random too, and whose logits are sharp."""
    text_config = transformers.Gemma3TextConfig(**{**TEXT, **text})
    if wrapper == 'causal':
        config, model_cls = text_config, transformers.Gemma3ForCausalLM
    else:
        config = transformers.Gemma3Config(text_config=text_config.to_dict(),
                                           **{'vision_config': VISION, 'mm_tokens_per_image': 4, **outer})
        model_cls = transformers.Gemma3ForConditionalGeneration
    config._attn_implementation = 'eager'
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):  # input / post_attention / pre_ / post_feedforward, q_norm, k_norm
                p.add_(0.3 * torch.randn_like(p))
        # Sharp logits, so greedy argmax never hinges on rounding. A tied lm_head is the embedding
        # table, and a 5x table drowns every layer's output (greedy then repeats one token): there
        # the final norm's (1 + w) is multiplied instead.
        if model.lm_head.weight is model.get_input_embeddings().weight:
            final_norm = model.get_decoder().norm.weight
            final_norm.copy_(5.0 * (1.0 + final_norm) - 1.0)
        else:
            model.lm_head.weight.mul_(5.0)
    return model


def _tokens(shape, seed):
    return np.random.default_rng(seed).integers(3, VOCAB, shape).astype(np.int32)


def _logits_both(hf_model, ours, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    got, _ = jitted(ours)(tokens, positions)
    return np.asarray(got), want


def _hf_greedy(hf_model, prompt: np.ndarray, steps: int) -> list[int]:
    ids = torch.from_numpy(prompt).long()
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                do_sample=False)
    new = out[0, prompt.shape[1]:].tolist()
    assert len(new) == steps, 'the continuation hit eos early; pick another seed'
    return new


def _case(case_id):
    return next(c for c in CASES if c[0] == case_id)


@pytest.mark.parametrize('case_id, wrapper, text, outer', CASES, ids=[c[0] for c in CASES])
def test_logits_and_greedy_match_transformers(tmp_path, case_id, wrapper, text, outer):
    hf_model = _hf_gemma3(wrapper, seed=len(case_id), text=text, outer=outer)
    # One directory in shards, so the decoder's tensors are spread over files beside the vision tower's.
    shard = dict(max_shard_size='60KB') if case_id == 'conditional_untied_capped' else {}
    hf_model.save_pretrained(tmp_path, safe_serialization=True, **shard)
    if shard:
        assert len(list(tmp_path.glob('*.safetensors'))) > 1
    config, ours = checkpoint.load(tmp_path)

    window = text['sliding_window']
    kinds = hf_model.config.get_text_config().layer_types
    assert config.layer_kinds == tuple(LayerKind(window=window, local_rope=True) if kind == 'sliding_attention'
                                       else GLOBAL_ROPE for kind in kinds)
    assert config.qk_norm and config.post_norms and config.query_pre_attn_scalar == text['query_pre_attn_scalar']
    assert config.tie_embeddings == outer.get('tie_word_embeddings', text.get('tie_word_embeddings', True))
    assert (config.rope_scaling is not None) == ('rope_scaling' in text)
    # The multimodal wrapper's vision tower loads too (tests/test_gemma3_vision.py checks it).
    assert (config.vision is not None) == (wrapper == 'conditional') == config.bidirectional_media
    # Gemma3ForCausalLM caps its logits when told to; the multimodal wrapper's forward never does.
    assert config.logit_softcap == (text.get('final_logit_softcapping') if wrapper == 'causal' else None)

    # Prompts several windows long, so the window layers and their local RoPE matter.
    got, want = _logits_both(hf_model, ours, _tokens((2, 5 * window), seed=1))
    assert np.abs(got - want).max() <= 1e-4

    prompt = _tokens((1, 2 * window + 1), seed=2)
    assert _ringserve_greedy(ours, prompt, 32) == _hf_greedy(hf_model, prompt, 32)


def test_transformers5_tensor_names_load(tmp_path):
    """A multimodal directory written with the module names of transformers 5 ('model.language_model.',
    'model.vision_tower.', 'lm_head.weight') rather than the names save_pretrained writes."""
    _, wrapper, text, outer = _case('conditional_untied_capped')
    hf_model = _hf_gemma3(wrapper, seed=7, text=text, outer=outer)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    for old in tmp_path.glob('*.safetensors'):
        old.unlink()
    state = hf_model.state_dict()
    assert 'model.language_model.embed_tokens.weight' in state and 'lm_head.weight' in state
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(tmp_path / 'model.safetensors'))
    _, ours = checkpoint.load(tmp_path)
    got, want = _logits_both(hf_model, ours, _tokens((1, 20), seed=8))
    assert np.abs(got - want).max() <= 1e-4


def test_config_json_variants_against_transformers(tmp_path):
    """The same weights under the transformers 4 keys (rope_theta + rope_scaling for the global
    layers, rope_local_base_freq, sliding_window_pattern: Google's Hub configs) give the same
    logits. And the parity tests can fail: a window one key shorter or longer, or the global RoPE
    on the window layers, moves the logits far past the tolerance."""
    _, wrapper, text, outer = _case('causal_gqa_linear_rope')
    hf_model = _hf_gemma3(wrapper, seed=0, text=text, outer=outer)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    tokens = _tokens((1, 30), seed=3)
    config_path = tmp_path / 'config.json'
    saved = json.loads(config_path.read_text())

    legacy = {k: v for k, v in saved.items() if k not in ('rope_parameters', 'layer_types', '_sliding_window_pattern')}
    legacy.update({key: text[key] for key in ('rope_theta', 'rope_scaling', 'rope_local_base_freq',
                                               'sliding_window_pattern')})
    config_path.write_text(json.dumps(legacy))
    config, ours = checkpoint.load(tmp_path)
    assert config.layer_kinds[2] == GLOBAL_ROPE and config.layer_kinds[3].window == text['sliding_window']
    got, want = _logits_both(hf_model, ours, tokens)
    assert np.abs(got - want).max() <= 1e-4

    for window in (text['sliding_window'] - 1, text['sliding_window'] + 1):
        config_path.write_text(json.dumps({**saved, 'sliding_window': window}))
        got, want = _logits_both(hf_model, checkpoint.load(tmp_path)[1], tokens)
        assert np.abs(got - want).max() > 1e-2, window
    ropes = saved['rope_parameters']
    global_everywhere = {**ropes, 'sliding_attention': ropes['full_attention']}
    config_path.write_text(json.dumps({**saved, 'rope_parameters': global_everywhere}))
    config, ours = checkpoint.load(tmp_path)
    assert config.local_rope_theta == config.rope_theta and config.local_rope_scaling == config.rope_scaling
    got, want = _logits_both(hf_model, ours, tokens)
    assert np.abs(got - want).max() > 1e-2


def test_paged_engine_equals_dense_past_the_window(tmp_path):
    """Chunked prefill off page boundaries and decode through shuffled pages give the dense path's
    (and transformers') greedy tokens for a prompt four windows long."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
                layer_types=['sliding_attention', 'full_attention'])
    hf_model = _hf_gemma3('causal', seed=5, text=text, outer={})
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config, ours = checkpoint.load(tmp_path)
    prompt = _tokens((1, 4 * text['sliding_window']), seed=5)
    steps = 16
    dense = _ringserve_greedy(ours, prompt, steps)
    assert dense == _hf_greedy(hf_model, prompt, steps)

    page_len, chunk = 4, 7  # chunks end inside pages
    engine = PagedEngine(config, ours, max_slots=2, num_pages=32, page_len=page_len, prefill_chunk=8, max_len=64)
    free = list(np.random.default_rng(6).permutation(np.arange(1, 32)))
    table: list[int] = []

    def cover(length):
        while len(table) * page_len < length:
            table.append(int(free.pop()))

    ids = prompt[0].tolist()
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        cover(start + len(piece))
        token = engine.prefill(1, piece, start, table)
    out, pos = [token], len(ids)
    while len(out) < steps:
        cover(pos + 1)
        out.append(engine.decode([1], [out[-1]], [pos], [table])[0])
        pos += 1
    assert out == dense


# ------------------------------------------------------------------------------------------------
# config.json translation and the new fields, no model needed.
# ------------------------------------------------------------------------------------------------
# google/gemma-3-4b-it's config.json as transformers 4.50 wrote it, vision_config shortened: the
# text settings that equal Gemma3TextConfig's defaults are left out.
GEMMA3_4B = {
    'architectures': ['Gemma3ForConditionalGeneration'], 'boi_token_index': 255999, 'eoi_token_index': 256000,
    'eos_token_id': [1, 106], 'image_token_index': 262144, 'initializer_range': 0.02, 'mm_tokens_per_image': 256,
    'model_type': 'gemma3',
    'text_config': {'hidden_size': 2560, 'intermediate_size': 10240, 'model_type': 'gemma3_text',
                    'num_hidden_layers': 34, 'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
                    'sliding_window': 1024},
    'torch_dtype': 'bfloat16', 'vision_config': {'hidden_size': 1152, 'image_size': 896, 'patch_size': 14},
}


def test_gemma3_4b_config_by_hand():
    config = ModelConfig.from_hf_config(GEMMA3_4B, dtype='bfloat16')
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.mlp_dim) == (262208, 2560, 34, 8, 4, 256, 10240)
    local = LayerKind(window=1024, local_rope=True)
    assert config.layer_kinds == tuple(GLOBAL_ROPE if i % 6 == 5 else local for i in range(34))
    assert (config.rope_theta, config.rope_scaling) == (1e6, RopeScaling('linear', 8.0))
    assert (config.local_rope_theta, config.local_rope_scaling) == (1e4, None)
    assert config.attn_scale == 1 / 16 and config.qk_norm and config.post_norms
    assert config.tie_embeddings and config.embed_scale and config.norm_offset == 1.0
    assert config.mlp_activation == 'gelu_tanh' and config.logit_softcap is None
    assert (config.bos_id, config.eos_ids, config.max_context) == (2, (1, 106), 131072)
    np.testing.assert_array_equal(config.rope_inv_freq(local), rope_inv_freq(256, 1e4, None))
    np.testing.assert_array_equal(config.rope_inv_freq(GLOBAL_ROPE), rope_inv_freq(256, 1e6, None) / np.float32(8))


def test_transformers5_rope_parameters_and_pattern():
    text = dict(model_type='gemma3_text', hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=8,
                sliding_window_pattern=2, query_pre_attn_scalar=16,
                rope_parameters={'sliding_attention': {'rope_type': 'default', 'rope_theta': 500.0},
                                 'full_attention': {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 2e5}})
    config = ModelConfig.from_hf_config(text)
    assert [str(k) for k in config.layer_kinds] == ['rope:local@8', 'rope', 'rope:local@8', 'rope', 'rope:local@8']
    assert (config.rope_theta, config.rope_scaling, config.local_rope_theta) == (2e5, RopeScaling('linear', 4.0), 500.0)
    assert ModelConfig.from_json(config.to_json()) == config

    with pytest.raises(ValueError, match='sliding_window=None'):
        ModelConfig.from_hf_config({**text, 'sliding_window': None})
    with pytest.raises(ValueError, match='use_bidirectional_attention'):
        ModelConfig.from_hf_config({**text, 'use_bidirectional_attention': True})
    with pytest.raises(ValueError, match='one dict per layer type'):
        ModelConfig.from_hf_config({**text, 'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4}})
    with pytest.raises(ValueError, match='5 in all'):
        ModelConfig.from_hf_config({**text, 'layer_types': ['full_attention'] * 4})


def test_new_fields_round_trip_and_default_to_before():
    base = dict(name='t', vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
    plain = ModelConfig(**base, layer_kinds=(LayerKind(window=4), GLOBAL_ROPE))
    d = plain.to_dict()
    for field in ('qk_norm', 'post_norms', 'query_pre_attn_scalar', 'local_rope_theta', 'local_rope_scaling'):
        assert field not in d  # configs written before Gemma 3 read back byte-identical
    assert d['layer_kinds'][0] == {'window': 4, 'rope': True, 'log_scale': None}
    assert plain.attn_scale == 1 / 4 and np.array_equal(plain.rope_inv_freq(plain.layer_kind(0)),
                                                        plain.rope_inv_freq())

    gemma = ModelConfig(**base, layer_kinds=parse_layer_kinds('rope:local@4/log64,rope'), qk_norm=True,
                        post_norms=True, query_pre_attn_scalar=8.0, local_rope_theta=100.0,
                        local_rope_scaling={'kind': 'linear', 'factor': 2.0})
    again = ModelConfig.from_json(gemma.to_json())
    assert again == gemma and isinstance(again.local_rope_scaling, RopeScaling)
    assert str(again.layer_kinds[0]) == 'rope:local@4/log64'
    assert gemma.attn_scale == 8.0 ** -0.5


@pytest.mark.parametrize('changes, words', [
    (dict(layer_kinds=(LayerKind(local_rope=True), GLOBAL_ROPE)), 'set local_rope_theta'),
    (dict(local_rope_scaling=RopeScaling('linear', 2.0)), 'give the local RoPE base'),
    (dict(local_rope_theta=0.0), 'local_rope_theta=0.0: must be > 0'),
    (dict(query_pre_attn_scalar=-1.0), 'query_pre_attn_scalar=-1.0: use None'),
    (dict(qk_norm=1), 'qk_norm=1: must be True or False'),
])
def test_validation_says_how_to_fix(changes, words):
    base = dict(name='t', vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
    with pytest.raises(ValueError, match=words):
        ModelConfig(**{**base, **changes})
    with pytest.raises(ValueError, match='set rope=True or drop local_rope'):
        LayerKind(rope=False, local_rope=True)
