"""Model math against a float64 NumPy reference, and cache equivalences (prefill + decode == full)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _model_helpers import jitted, params_numpy, tiny_config, tiny_model
from model import attention
from model.config import ModelConfig, RopeScaling, rope_inv_freq
from model.kv_cache import KVCache
from model.transformer import Transformer


# ---------------------------------------------------------------------------------------------
# NumPy reference: one sequence, positions 0..T-1, written from the maths, float64 throughout.
# ---------------------------------------------------------------------------------------------
def _ref_norm(x, w, cfg):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * (cfg.norm_offset + w)


def _ref_rope(x, inv_freq):  # x: [T, heads, H]
    angles = np.arange(x.shape[0])[:, None] * inv_freq[None, :]  # [T, H/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _ref_act(x, kind):
    if kind == 'silu':
        return x / (1 + np.exp(-x))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_forward(p: dict, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    """f64[T, V] logits for one sequence."""
    t = len(tokens)
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    if cfg.rope_scaling is not None:
        assert cfg.rope_scaling.kind == 'linear'
        inv_freq = inv_freq / cfg.rope_scaling.factor
    x = p['embedder']['table'][tokens]
    if cfg.embed_scale:
        x = x * math.sqrt(cfg.d_model)
    rep = cfg.n_heads // cfg.n_kv_heads
    future = np.triu(np.ones((t, t), bool), k=1)
    for i in range(cfg.n_layers):
        lp = p['layers'][i]
        a = lp['attn']
        h = _ref_norm(x, lp['attn_norm']['scale'], cfg)
        qkv = np.einsum('td,dkjh->tkjh', h, a['qkv_proj'])  # [T, K, R + 2, H]: per kv head, R queries, k, v
        if cfg.qkv_bias:
            qkv = qkv + a['qkv_bias']
        q = qkv[:, :, :-2].reshape(t, cfg.n_heads, cfg.head_dim)  # query head n = k * R + r
        k, v = qkv[:, :, -2], qkv[:, :, -1]  # [T, K, H]
        q, k = _ref_rope(q, inv_freq), _ref_rope(k, inv_freq)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # query head n uses kv head n // rep
        scores = np.einsum('tnh,snh->nts', q, k) / math.sqrt(cfg.head_dim)
        scores = np.where(future[None], -np.inf, scores)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        o = np.einsum('nts,snh->tnh', w, v)
        x = x + o.reshape(t, -1) @ a['o_proj']
        h = _ref_norm(x, lp['mlp_norm']['scale'], cfg)
        gate, up = h @ lp['mlp']['gate_up'][:, 0], h @ lp['mlp']['gate_up'][:, 1]  # [T, F] each
        x = x + (_ref_act(gate, cfg.mlp_activation) * up) @ lp['mlp']['down']
    x = _ref_norm(x, p['final_norm']['scale'], cfg)
    table = p['embedder']['table'] if cfg.tie_embeddings else p['unembed']
    logits = x @ table.T
    if cfg.logit_softcap is not None:
        logits = cfg.logit_softcap * np.tanh(logits / cfg.logit_softcap)
    return logits


VARIANTS = {
    'gqa_untied': dict(),
    'mha_tied': dict(n_kv_heads=4, tie_embeddings=True),
    'mqa': dict(n_kv_heads=1),
    'softcap': dict(logit_softcap=3.0),
    'gemma_style': dict(mlp_activation='gelu_tanh', embed_scale=True, norm_offset=1.0, tie_embeddings=True,
                        head_dim=16),
    'qwen2_style': dict(qkv_bias=True, rope_theta=1e6),
    'linear_rope': dict(rope_scaling=RopeScaling('linear', 4.0)),
}


def _tokens(cfg, shape, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


def _positions(batch, length, start=0):
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int32), (batch, length))


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_forward_matches_numpy_reference(variant):
    cfg = tiny_config(**VARIANTS[variant])
    model = tiny_model(cfg, seed=1)
    tokens = _tokens(cfg, (2, 9))
    logits, cache = jitted(model)(tokens, _positions(2, 9))
    assert cache is None
    assert logits.dtype == jnp.float32 and logits.shape == (2, 9, cfg.vocab_size)
    p = params_numpy(model)
    for b in range(2):
        want = reference_forward(p, cfg, tokens[b])
        np.testing.assert_allclose(np.asarray(logits[b]), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('variant', ['gqa_untied', 'gemma_style', 'qwen2_style'])
def test_padded_prefill_then_decode_matches_full_forward(variant):
    """Rows with different prompt lengths, a prefill padded to a bucket with garbage tokens, then
    batched decode at per-row positions that overwrites the garbage: logits equal a full forward."""
    cfg = tiny_config(**VARIANTS[variant])
    model = tiny_model(cfg, seed=3)
    total, bucket, max_len = 12, 8, 16
    seqs = _tokens(cfg, (2, total), seed=5)
    prompt_lens = [3, 6]
    run = jitted(model)
    full, _ = run(seqs, _positions(2, total))  # [B, T, V]

    garbage = _tokens(cfg, (2, bucket), seed=6)
    prefill = np.where(np.arange(bucket)[None] < np.array(prompt_lens)[:, None], seqs[:, :bucket], garbage)
    cache = KVCache.init(cfg, 2, max_len)
    logits, cache = run(prefill, _positions(2, bucket), cache)
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), np.asarray(full[b, :n]), atol=1e-5, rtol=0)

    # Decode: row b feeds token at its own position, one per step.
    pos = np.array(prompt_lens)
    for _ in range(total - max(prompt_lens)):
        step_tokens = seqs[np.arange(2), pos][:, None]
        logits, cache = run(step_tokens, pos[:, None].astype(np.int32), cache)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(logits[b, 0]), np.asarray(full[b, pos[b]]), atol=1e-5, rtol=0)
        pos = pos + 1


def test_chunked_prefill_matches_full_forward():
    """Two prefill chunks of 5 then 4 tokens through the cache equal one pass over 9."""
    cfg = tiny_config()
    model = tiny_model(cfg, seed=7)
    tokens = _tokens(cfg, (1, 9), seed=8)
    run = jitted(model)
    full, _ = run(tokens, _positions(1, 9))
    cache = KVCache.init(cfg, 1, 9)
    a, cache = run(tokens[:, :5], _positions(1, 5), cache)
    b, cache = run(tokens[:, 5:], _positions(1, 4, start=5), cache)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), np.asarray(full), atol=1e-5, rtol=0)


def test_jit_over_split_state_matches_eager_and_compiles_once():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=9)
    graphdef, state = nnx.split(model)
    traces = []

    def step(state, tokens, positions, cache):
        traces.append(tokens.shape)
        return nnx.merge(graphdef, state)(tokens, positions, cache)

    step = jax.jit(step, donate_argnums=3)
    tokens = _tokens(cfg, (2, 4), seed=10)
    eager, _ = model(jnp.asarray(tokens), jnp.asarray(_positions(2, 4)), KVCache.init(cfg, 2, 8))
    cache = KVCache.init(cfg, 2, 8)
    jitted, cache = step(state, jnp.asarray(tokens), jnp.asarray(_positions(2, 4)), cache)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=0)
    for t in range(4, 7):
        _, cache = step(state, jnp.asarray(tokens[:, :1]), jnp.asarray(_positions(2, 1, start=t)), cache)
    assert traces == [(2, 4), (2, 1)]  # one trace per shape: decode steps reuse the compilation


def test_constructor_init_is_seeded_and_runs_under_nnx_jit():
    cfg = tiny_config(tie_embeddings=True)
    model = Transformer(cfg, rngs=nnx.Rngs(11))
    same = jax.tree.map(np.array_equal, params_numpy(model), params_numpy(Transformer(cfg, rngs=nnx.Rngs(11))))
    assert all(jax.tree.leaves(same))
    tokens = jnp.asarray(_tokens(cfg, (1, 3)))
    logits, _ = nnx.jit(lambda m, t, p: m(t, p, None))(model, tokens, jnp.asarray(_positions(1, 3)))
    eager, _ = model(tokens, jnp.asarray(_positions(1, 3)), None)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(eager), atol=1e-5, rtol=0)


def test_bfloat16_stays_close_to_float32():
    # Same seed gives the same weights, rounded to bfloat16.
    cfg32 = tiny_config(tie_embeddings=True)
    cfg16 = cfg32.replace(dtype='bfloat16')
    m32, m16 = tiny_model(cfg32, seed=12), tiny_model(cfg16, seed=12)
    assert nnx.state(m16, nnx.Param)['embedder']['table'][...].dtype == jnp.bfloat16
    tokens = jnp.asarray(_tokens(cfg32, (2, 10), seed=13))
    l32, _ = jitted(m32)(tokens, _positions(2, 10))
    cache = KVCache.init(cfg16, 2, 16)
    assert cache.k.dtype == jnp.bfloat16
    l16, cache = jitted(m16)(tokens, _positions(2, 10), cache)
    assert cache.k.dtype == jnp.bfloat16
    assert l16.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(l16)))
    scale = float(jnp.std(l32))
    # bfloat16 keeps 8 bits of mantissa: typical errors are ~1% of the logits' spread, the worst of
    # 2 x 10 x 97 logits ~5-10% depending on the random draw (checked equal to the pre-TP layout on
    # identical weights).
    assert float(jnp.mean(jnp.abs(l16 - l32))) < 0.03 * scale
    assert float(jnp.max(jnp.abs(l16 - l32))) < 0.15 * scale
    assert float(jnp.mean(jnp.argmax(l16, -1) == jnp.argmax(l32, -1))) >= 0.9


# ---------------------------------------------------------------------------------------------
# Masks and cache writes, checked against literal expectations.
# ---------------------------------------------------------------------------------------------
def test_causal_mask_literal():
    want = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(attention.causal_mask(3))[0], want)


def test_cache_mask_literal():
    got = np.asarray(attention.cache_mask(jnp.array([[1, 2], [3, 4]]), 5))
    want = np.array([
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]],
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
    ], bool)
    np.testing.assert_array_equal(got, want)


def test_fully_masked_row_is_finite():
    q = jnp.ones((1, 1, 2, 4))
    kv = jnp.ones((1, 3, 1, 4))
    out = attention.attend(q, kv, kv, jnp.zeros((1, 1, 3), bool), 0.5)
    assert np.all(np.isfinite(np.asarray(out)))


def test_cache_write_per_row_positions_and_drops_out_of_range():
    cfg = tiny_config(n_layers=2, n_kv_heads=1, head_dim=2)
    cache = KVCache.init(cfg, 2, 4)
    new = jnp.arange(1, 5, dtype=jnp.float32).reshape(2, 2, 1, 1) * jnp.ones((1, 1, 1, 2))  # [B, T, K, H]
    cache = cache.write(1, jnp.array([[0, 1], [3, 4]]), new, -new)
    got = np.asarray(cache.k[1, :, :, 0, 0])
    np.testing.assert_array_equal(got, [[1, 2, 0, 0], [0, 0, 0, 3]])  # position 4 >= max_len: dropped
    np.testing.assert_array_equal(np.asarray(cache.v[1, :, :, 0, 0]), -got)
    assert not np.any(np.asarray(cache.k[0]))


# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------
def test_config_json_round_trip():
    cfg = tiny_config(rope_scaling=RopeScaling('llama3', 8.0, 1.0, 4.0, 64), eos_ids=(2, 5), logit_softcap=30.0)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.eos_ids, tuple) and isinstance(again.rope_scaling, RopeScaling)


@pytest.mark.parametrize('changes, words', [
    (dict(n_heads=4, n_kv_heads=3), 'multiple of n_kv_heads'),
    (dict(head_dim=7), 'even'),
    (dict(mlp_activation='relu'), 'mlp_activation'),
    (dict(dtype='float16'), 'dtype'),
    (dict(vocab_size=0), 'vocab_size'),
    (dict(eos_ids=(500,)), 'outside the vocabulary'),
    (dict(logit_softcap=0.0), 'logit_softcap'),
])
def test_config_validation_says_how_to_fix(changes, words):
    with pytest.raises(ValueError, match=words):
        tiny_config(**changes)


def test_rope_inv_freq_plain_and_linear():
    want = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(rope_inv_freq(8, 10000.0, None), want, rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(8, 10000.0, RopeScaling('linear', 2.0)), want / 2, rtol=1e-6)


def test_rope_llama3_bands():
    # original length 64 with factors (1, 4): wavelengths < 16 kept, > 64 divided by 8, blended between.
    inv = rope_inv_freq(16, 10000.0, None).astype(np.float64)
    got = rope_inv_freq(16, 10000.0, RopeScaling('llama3', 8.0, 1.0, 4.0, 64)).astype(np.float64)
    wavelen = 2 * np.pi / inv
    high, low = wavelen < 16, wavelen > 64
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(got[high], inv[high], rtol=1e-6)
    np.testing.assert_allclose(got[low], inv[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    smooth = (64 / wavelen[mid] - 1) / 3
    np.testing.assert_allclose(got[mid], (1 - smooth) * inv[mid] / 8 + smooth * inv[mid], rtol=1e-5)


def test_from_hf_config_variants():
    llama = dict(model_type='llama', hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, intermediate_size=128, vocab_size=512, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, hidden_act='silu', tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=[2, 7],
                 rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=64))
    cfg = ModelConfig.from_hf_config(llama)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.max_context, cfg.eos_ids) == (16, 2, 2048, (2, 7))
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == RopeScaling('llama3', 8.0, 1.0, 4.0, 64)
    assert not cfg.tie_embeddings and not cfg.qkv_bias and not cfg.embed_scale

    # Pre-5.0 transformers spelling: rope_theta at the top level, rope_scaling with "type".
    old = {**llama, 'rope_parameters': None, 'rope_theta': 1e4, 'rope_scaling': dict(type='linear', factor=2.0)}
    cfg = ModelConfig.from_hf_config(old)
    assert cfg.rope_theta == 1e4 and cfg.rope_scaling == RopeScaling('linear', 2.0)

    qwen = {**llama, 'model_type': 'qwen2', 'rope_parameters': dict(rope_type='default', rope_theta=1e6)}
    cfg = ModelConfig.from_hf_config(qwen)
    assert cfg.qkv_bias and cfg.rope_scaling is None and cfg.rope_theta == 1e6

    gemma = dict(model_type='gemma', hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                 num_hidden_layers=2, intermediate_size=128, vocab_size=512, hidden_act='gelu',
                 bos_token_id=2, eos_token_id=1, max_position_embeddings=8192)
    cfg = ModelConfig.from_hf_config(gemma, dtype='bfloat16')
    assert (cfg.head_dim, cfg.mlp_activation, cfg.norm_offset, cfg.embed_scale, cfg.tie_embeddings) == (
        32, 'gelu_tanh', 1.0, True, True)
    assert cfg.dtype == 'bfloat16' and cfg.bos_id == 2 and cfg.eos_ids == (1,)

    with pytest.raises(ValueError, match='mistral'):
        ModelConfig.from_hf_config({**llama, 'model_type': 'mistral'})


# ---------------------------------------------------------------------------------------------
# Speed-only options of Transformer.__call__: they must not change a number that is used.
# ---------------------------------------------------------------------------------------------
def test_kv_span_equals_full_cache_attention():
    """Attending only the first kv_span cache indices equals attending the whole cache, for prefill
    and decode, whenever every query position is below the span; the cache written is the same."""
    cfg = tiny_config()
    model = tiny_model(cfg, seed=14)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, t, p, c, span: nnx.merge(graphdef, st)(t, p, c, kv_span=span), static_argnums=4)
    tokens = _tokens(cfg, (2, 12), seed=15)
    full_cache = span_cache = KVCache.init(cfg, 2, 32)
    full, full_cache = step(state, tokens[:, :8], _positions(2, 8), full_cache, None)
    spanned, span_cache = step(state, tokens[:, :8], _positions(2, 8), span_cache, 8)
    np.testing.assert_allclose(np.asarray(spanned), np.asarray(full), atol=1e-5, rtol=0)  # sums differ in order only
    for t in range(8, 12):  # decode, rows at different positions, spans 16 (> every position)
        pos = np.array([[t], [t - 3]], np.int32)
        full, full_cache = step(state, tokens[:, t:t + 1], pos, full_cache, None)
        spanned, span_cache = step(state, tokens[:, t:t + 1], pos, span_cache, 16)
        np.testing.assert_allclose(np.asarray(spanned), np.asarray(full), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(span_cache.k), np.asarray(full_cache.k), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='kv_span'):
        model(jnp.asarray(tokens[:, :1]), jnp.asarray(_positions(2, 1)), KVCache.init(cfg, 2, 8), kv_span=9)


def test_logits_at_equals_full_logits_gathered():
    cfg = tiny_config(logit_softcap=3.0)
    model = tiny_model(cfg, seed=16)
    tokens, positions = _tokens(cfg, (2, 9), seed=17), _positions(2, 9)
    full, _ = jitted(model)(tokens, positions)
    at = np.array([[8, 0], [3, 3]], np.int32)
    for cache in (None, KVCache.init(cfg, 2, 16)):
        got, _ = jax.jit(lambda t, p, c, i: model(t, p, c, logits_at=i))(tokens, positions, cache, at)
        assert got.shape == (2, 2, cfg.vocab_size)
        want = np.take_along_axis(np.asarray(full), at[:, :, None], axis=1)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('t', [1, 5])
def test_attend_matches_reference_einsum(t):
    """Both paths of attend (decode T=1 and the batch-leading dots) against a plain repeat-kv einsum."""
    rng = np.random.default_rng(18)
    b, s, n, k, h = 2, 7, 6, 2, 4
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    kv = rng.normal(size=(2, b, s, k, h)).astype(np.float32)
    positions = np.array([[3 + i for i in range(t)], [1 + i for i in range(t)]], np.int32)
    mask = np.asarray(attention.cache_mask(jnp.asarray(positions), s))
    got = np.asarray(attention.attend(jnp.asarray(q), jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.asarray(mask), 0.5))
    keys, values = np.repeat(kv[0], n // k, axis=2), np.repeat(kv[1], n // k, axis=2)  # [B, S, N, H]
    scores = np.where(mask[:, None], np.einsum('btnh,bsnh->bnts', q, keys) * 0.5, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum('bnts,bsnh->btnh', w / w.sum(-1, keepdims=True), values)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
