"""Per-layer attention kinds (model/config.py LayerKind): config handling, and what each kind means
for the model's outputs, checked as properties of the whole forward pass:

- a NoPE model without the log scale is blind to positions: spreading the tokens 7 positions apart
  changes no logit (a RoPE model's do change, as distances change: the test can fail);
- a model whose every layer has a window W sees at most L * (W - 1) tokens back: changing a token
  further back than that changes nothing at the last position, changing one inside it does;
- the log scale multiplies a query at position p by log(p + 1) / log(base).
Paged, sharded and ring paths against the dense reference live in tests/test_attention_window.py.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from _model_helpers import jitted, tiny_config, tiny_model
from model.config import LayerKind, ModelConfig, parse_layer_kinds
from model.layers import log_length_scale


def test_parse_and_print_round_trip():
    kinds = parse_layer_kinds('rope@32,nope/log256, rope ,nope@8/log16')
    assert kinds == (LayerKind(window=32), LayerKind(rope=False, log_scale=256), LayerKind(),
                     LayerKind(window=8, rope=False, log_scale=16))
    assert ','.join(map(str, kinds)) == 'rope@32,nope/log256,rope,nope@8/log16'


@pytest.mark.parametrize('text', ['alibi', 'rope@', 'rope@-3', 'nope/ln256', 'nope/log1', 'rope@0'])
def test_bad_specs_say_how_to_write_them(text):
    with pytest.raises(ValueError, match=r'rope\|nope\[@WINDOW\]\[/logBASE\]|must be|use None'):
        parse_layer_kinds(text)


def test_config_round_trips_and_checks_the_count():
    config = tiny_config(layer_kinds=[{'window': 4}, {'rope': False, 'log_scale': 64}])
    assert config.layer_kinds == (LayerKind(window=4), LayerKind(rope=False, log_scale=64))
    assert ModelConfig.from_json(config.to_json()) == config
    assert 'layer_kinds' not in tiny_config().to_dict()  # older configs read back equal
    assert tiny_config().layer_kind(1) == LayerKind()
    with pytest.raises(ValueError, match='one LayerKind .* per layer, 2 in all'):
        tiny_config(layer_kinds=[LayerKind()])


def test_log_length_scale_values():
    got = np.asarray(log_length_scale(jnp.array([[-1, 0, 255, 65535]]), 256))[0, :, 0, 0]
    np.testing.assert_allclose(got, [0.0, 0.0, 1.0, 2.0], rtol=1e-6)


def _logits(config, tokens, positions, seed=3):
    model = tiny_model(config, seed)
    return np.asarray(jitted(model)(jnp.asarray(tokens), jnp.asarray(positions))[0])


def test_nope_layers_ignore_positions_and_rope_layers_do_not():
    tokens = np.random.default_rng(0).integers(3, 97, (1, 12)).astype(np.int32)
    at = np.arange(12, dtype=np.int32)[None]
    nope = tiny_config(layer_kinds=[LayerKind(rope=False)] * 2, max_context=4096)
    np.testing.assert_allclose(_logits(nope, tokens, at), _logits(nope, tokens, at * 7), atol=1e-5)
    rope = tiny_config(max_context=4096)
    assert np.abs(_logits(rope, tokens, at) - _logits(rope, tokens, at * 7)).max() > 1e-3
    # The log scale does depend on position, by design.
    scaled = tiny_config(layer_kinds=[LayerKind(rope=False, log_scale=16)] * 2, max_context=4096)
    assert np.abs(_logits(scaled, tokens, at) - _logits(scaled, tokens, at * 7)).max() > 1e-3


def test_windowed_layers_bound_the_receptive_field():
    window, layers, t = 3, 2, 16
    config = tiny_config(layer_kinds=[LayerKind(window=window)] * layers)
    reach = layers * (window - 1)  # the last token sees positions t-1-reach .. t-1
    tokens = np.random.default_rng(1).integers(3, 97, (1, t)).astype(np.int32)
    at = np.arange(t, dtype=np.int32)[None]
    base = _logits(config, tokens, at)[0, -1]
    outside, inside = tokens.copy(), tokens.copy()
    outside[0, t - 2 - reach] = (outside[0, t - 2 - reach] + 1) % 97
    inside[0, t - 1 - reach] = (inside[0, t - 1 - reach] + 1) % 97
    np.testing.assert_array_equal(_logits(config, outside, at)[0, -1], base)
    assert np.abs(_logits(config, inside, at)[0, -1] - base).max() > 1e-4
    # The same change is seen by a global model: the window is what hides it.
    glob = tiny_config()
    assert np.abs(_logits(glob, outside, at)[0, -1] - _logits(glob, tokens, at)[0, -1]).max() > 1e-4


def test_log_scale_is_exactly_a_query_scale():
    """A NoPE layer with log scale equals the same layer without it whose queries are pre-scaled:
    with one layer and positions where the factor is 1 (p = base - 1), outputs are identical."""
    tokens = np.random.default_rng(2).integers(3, 97, (1, 1)).astype(np.int32)
    base = 64
    at = np.array([[base - 1]], np.int32)
    scaled = tiny_config(n_layers=1, layer_kinds=[LayerKind(rope=False, log_scale=base)], max_context=4096)
    plain = tiny_config(n_layers=1, layer_kinds=[LayerKind(rope=False)], max_context=4096)
    np.testing.assert_allclose(_logits(scaled, tokens, at), _logits(plain, tokens, at), atol=1e-6)
    assert math.isclose(float(log_length_scale(jnp.array([[base - 1]]), base)[0, 0, 0, 0]), 1.0, rel_tol=1e-6)
