"""Checkpoint IO: Hugging Face Llama / Qwen2 / Gemma / Gemma 3 directories and ringserve's own format.

ringserve's format is a directory with `ringserve_config.json` (ModelConfig.to_json) and
`model.safetensors` whose tensor names are the model's parameter paths joined by dots
('embedder.table', 'layers.0.attn.qkv_proj', ...), stored in the layouts of model/layers.py.
Two older layouts still load, converted on the way in: per-head 'attn.q_proj' [N, D, H] ... with
'mlp.gate' and 'mlp.up' (the first), and fused 2-D 'attn.qkv_proj' [D, (N + 2K) * H] with
'mlp.gate_up' [D, 2F] (before the tensor-parallel layout grouped query heads by kv head).
Media encoders (config.vision / config.audio) are ordinary parameters under 'vision.' and 'audio.'.
Hugging Face SigLIP vision and Whisper encoder weights come in through siglip_vision_params /
whisper_encoder_params and assign_params (into model.vision.tower / model.audio.tower).
A Gemma 3 multimodal directory (Gemma3ForConditionalGeneration) loads its decoder from the tensors
under `hf_decoder_prefix` and its SigLIP vision tower and projector into 'vision.'
(`_gemma3_vision_sources`; the tower's unused pooling head is not read).
A Qwen2-Audio directory (Qwen2AudioForConditionalGeneration) loads its decoder the same way and
its audio tower and projector into 'audio.' (`_qwen2_audio_sources`); a Qwen2.5-VL directory
(Qwen2_5_VLForConditionalGeneration) its decoder so and its vision tower into 'qwen_vision.'
(model/qwen2_5_vl.py, `vision_sources`).

Loading builds an abstract model (shapes only, no random init) and fills it one tensor at a time,
so at most one parameter (with the few source tensors a fused one is built from) exists twice
(host copy and device copy) at any moment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from model import sharding
from model.audio_encoder import AudioTower
from model.config import HF_MODEL_TYPES, AudioConfig, ModelConfig, VisionConfig
from model.layers import group_qkv
from model.transformer import Transformer
from model.vision import VisionTower

CONFIG_FILE = 'ringserve_config.json'
WEIGHTS_FILE = 'model.safetensors'
HF_CONFIG_FILE = 'config.json'

# HF torch_dtype -> ours. float16 weights are widened to float32 (exact) rather than narrowed to bfloat16.
_HF_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float32'}

Fetch = Callable[[str], np.ndarray]


def load_config(path: str | Path, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a ringserve checkpoint or a Hugging Face directory, without its weights
    (to build the mesh they load onto); `dtype` overrides the stored one."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        config = ModelConfig.from_json((path / CONFIG_FILE).read_text())
        return config if dtype is None else config.replace(dtype=dtype)
    if (path / HF_CONFIG_FILE).is_file():
        hf = _hf_config(path)
        if dtype is None:
            dtype = _HF_DTYPES.get(str(hf.get('torch_dtype') or hf.get('dtype') or 'float32'), 'float32')
        return ModelConfig.from_hf_config(hf, dtype=dtype)
    raise ValueError(
        f'{path} is not a checkpoint directory: expected {CONFIG_FILE} + {WEIGHTS_FILE} (ringserve) '
        f'or {HF_CONFIG_FILE} + *.safetensors (Hugging Face {"/".join(HF_MODEL_TYPES)}).'
    )


def load(path: str | Path, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[ModelConfig, Transformer]:
    """Load a ringserve checkpoint or a Hugging Face directory; `dtype` overrides the stored one.
    With a `mesh`, every parameter goes straight to its shards there (model/sharding.py's
    layout, as the engine wants it): tensors are read one at a time and no device ever holds a
    whole copy of the model."""
    path = Path(path)
    config = load_config(path, dtype)
    if (path / CONFIG_FILE).is_file():
        with _TensorFiles([path / WEIGHTS_FILE]) as files:
            if 'layers.0.attn.q_proj' in files.names:  # the unfused layout of the first versions
                sources = _legacy_sources(config)
                return config, from_params(config, lambda name: _fetch(files, sources, name), mesh)
            if len(files.shape('layers.0.attn.qkv_proj')) == 2:  # fused, ungrouped (before TP)
                sources = _fused_v1_sources(config)
                return config, from_params(config, lambda name: _fetch(files, sources, name), mesh)
            return config, from_params(config, files.get, mesh)
    return config, _load_hf(path, config, mesh)


def save(path: str | Path, config: ModelConfig, model: Transformer) -> Path:
    """Write ringserve's format into directory `path` (created if needed); returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # safetensors writes from one dict, so the host copy of all weights exists while saving.
    tensors = {name: np.asarray(value) for name, value in _flatten(nnx.state(model, nnx.Param).to_pure_dict())}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={'format': 'ringserve'})
    # Config last: its presence marks a complete checkpoint.
    (path / CONFIG_FILE).write_text(config.to_json() + '\n')
    return path


def from_params(config: ModelConfig, fetch: Fetch, mesh: Mesh | None = None) -> Transformer:
    """A Transformer whose parameters come from `fetch(name)`, called once per ringserve name.

    Each array is checked for shape, cast to the config dtype and released before the next fetch.
    With a `mesh`, each is placed by its logical axes there (each device gets its shard only);
    without, on the default device.
    """
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = state.to_pure_dict()
    where = dict(_flatten(sharding.param_shardings(state, mesh).to_pure_dict())) if mesh is not None else {}
    for name, spec in list(_flatten(pure)):
        array = fetch(name)
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(f'Tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(spec.shape)}.')
        if mesh is None:
            _set(pure, name, jnp.asarray(array, dtype=spec.dtype))
        else:
            host = np.asarray(array).astype(spec.dtype, copy=False)
            _set(pure, name, jax.make_array_from_callback(host.shape, where[name], lambda index: host[index]))
            del host
        del array
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)


def param_specs(config: ModelConfig) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    """(ringserve tensor name, shape and dtype) for every parameter of `config`, in a stable order."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return list(_flatten(nnx.state(abstract, nnx.Param).to_pure_dict()))


# ------------------------------------------------------------------------------------------------
# Hugging Face.
# ------------------------------------------------------------------------------------------------
def _hf_config(path: Path) -> dict:
    hf = json.loads((path / HF_CONFIG_FILE).read_text())
    if hf.get('model_type') not in HF_MODEL_TYPES:
        raise ValueError(
            f'{path / HF_CONFIG_FILE}: model_type {hf.get("model_type")!r} is not supported; '
            f'supported: {", ".join(HF_MODEL_TYPES)}.'
        )
    return hf


def _load_hf(path: Path, config: ModelConfig, mesh: Mesh | None) -> Transformer:
    hf = _hf_config(path)
    files = sorted(path.glob('*.safetensors'))
    if not files:
        raise ValueError(f'{path} has {HF_CONFIG_FILE} but no *.safetensors weights (.bin is not supported).')
    with _TensorFiles(files) as tensors:
        prefix = hf_decoder_prefix(tensors.names)
        # Gemma 3 multimodal directories as transformers saves them keep the head beside the decoder.
        lm_head = 'language_model.lm_head.weight' if prefix == 'language_model.model.' else 'lm_head.weight'
        if hf['model_type'] == 'qwen2_audio':
            sources = {**_hf_sources(config.replace(audio=None), prefix, lm_head),
                       **_qwen2_audio_sources(config, tensors.names)}
            _check_covers(config, sources)
        elif hf['model_type'] == 'gemma3':
            sources = {**_hf_sources(config.replace(vision=None, bidirectional_media=False), prefix, lm_head),
                       **_gemma3_vision_sources(config, tensors.names)}
        elif hf['model_type'] == 'qwen2_5_vl':
            from model import qwen2_5_vl  # imports this module, hence here

            sources = {**_hf_sources(config.replace(qwen_vision=None), prefix, lm_head),
                       **qwen2_5_vl.vision_sources(config, tensors.names)}
            _check_covers(config, sources)
        else:
            sources = _hf_sources(config, prefix, lm_head)
        needed = {name for names, _ in sources.values() for name in names}
        missing = sorted(name for name in needed if name not in tensors.names)
        if missing:
            raise ValueError(f'{path} lacks tensors {missing} needed by {hf["model_type"]} config.')
        return from_params(config, lambda name: _fetch(tensors, sources, name), mesh)


# Where a decoder's tensors sit: causal LMs under 'model.' (bare decoders at the root); Gemma 3's
# multimodal model under 'language_model.model.' as transformers saves it and as Google's checkpoints
# have it, or under 'model.language_model.' (its module names since transformers 5).
_HF_DECODER_PREFIXES = ('model.', 'language_model.model.', 'model.language_model.')


def hf_decoder_prefix(names) -> str:
    """The prefix of the decoder's tensors ('model.embed_tokens.weight' -> 'model.') among `names`;
    '' when none of the known prefixes holds an embedding table."""
    return next((p for p in _HF_DECODER_PREFIXES if f'{p}embed_tokens.weight' in names), '')


# ringserve name -> (source tensor names, conversion taking those tensors in that order).
Sources = dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]]


def _fetch(files: _TensorFiles, sources: Sources, name: str) -> np.ndarray:
    names, convert = sources[name]
    return convert(*(files.get(source) for source in names))


def _same(w):
    return w


def _columns(*ws):
    """torch Linear weights [out, in] -> one [in, sum(out)] matrix (ours is x @ w)."""
    return np.concatenate([w.T for w in ws], axis=1)


def _gate_up(gate, up):
    """Two [D, F] matrices -> our [D, 2, F]."""
    return np.stack([gate, up], axis=1)


def _qkv(config: ModelConfig) -> Callable[..., np.ndarray]:
    """(q [.., N*H], k [.., K*H], v [.., K*H]) columns or biases -> our grouped [.., K, R + 2, H]."""
    return lambda q, k, v: group_qkv(q, k, v, config.n_kv_heads)


def _hf_sources(config: ModelConfig, prefix: str, lm_head: str = 'lm_head.weight') -> Sources:
    """ringserve name -> HF tensor names and conversion. torch Linear weights are [out, in].

    HF norm names differ by family: Llama's `post_attention_layernorm` is the norm before the MLP,
    Gemma 2 / 3's (config.post_norms) is the norm of the attention output, with
    `pre_feedforward_layernorm` before the MLP and `post_feedforward_layernorm` after it.
    """
    sources = {
        'embedder.table': ((f'{prefix}embed_tokens.weight',), _same),
        'final_norm.scale': ((f'{prefix}norm.weight',), _same),
    }
    if not config.tie_embeddings:
        sources['unembed'] = ((lm_head,), _same)
    for i in range(config.n_layers):
        hf, ours = f'{prefix}layers.{i}.', f'layers.{i}.'
        qkv = tuple(f'{hf}self_attn.{x}_proj.weight' for x in 'qkv')
        if config.post_norms:
            sources.update({
                f'{ours}mlp_norm.scale': ((f'{hf}pre_feedforward_layernorm.weight',), _same),
                f'{ours}attn_post_norm.scale': ((f'{hf}post_attention_layernorm.weight',), _same),
                f'{ours}mlp_post_norm.scale': ((f'{hf}post_feedforward_layernorm.weight',), _same),
            })
        else:
            sources[f'{ours}mlp_norm.scale'] = ((f'{hf}post_attention_layernorm.weight',), _same)
        if config.qk_norm:
            sources[f'{ours}attn.q_norm.scale'] = ((f'{hf}self_attn.q_norm.weight',), _same)
            sources[f'{ours}attn.k_norm.scale'] = ((f'{hf}self_attn.k_norm.weight',), _same)
        sources.update({
            f'{ours}attn_norm.scale': ((f'{hf}input_layernorm.weight',), _same),
            f'{ours}attn.qkv_proj': (qkv, lambda q, k, v: _qkv(config)(q.T, k.T, v.T)),  # [D, K, R+2, H]
            f'{ours}attn.o_proj': ((f'{hf}self_attn.o_proj.weight',), _columns),  # [N * H, D]
            f'{ours}mlp.gate_up': ((f'{hf}mlp.gate_proj.weight', f'{hf}mlp.up_proj.weight'),
                                   lambda g, u: _gate_up(g.T, u.T)),  # [D, 2, F]
            f'{ours}mlp.down': ((f'{hf}mlp.down_proj.weight',), _columns),
        })
        if config.qkv_bias:
            sources[f'{ours}attn.qkv_bias'] = (tuple(f'{hf}self_attn.{x}_proj.bias' for x in 'qkv'), _qkv(config))
    _check_covers(config, sources)
    return sources


def _legacy_sources(config: ModelConfig) -> Sources:
    """ringserve name -> tensors of the unfused layout (q/k/v_proj [heads, D, H], o_proj [N, H, D],
    q/k/v_bias [heads, H], mlp.gate / mlp.up [D, F]) and conversion."""
    n, h, d = config.n_heads, config.head_dim, config.d_model

    def heads_to_columns(*ws):  # [heads, D, H] each -> our [D, K, R + 2, H]
        return _qkv(config)(*(w.transpose(1, 0, 2).reshape(d, -1) for w in ws))

    def flat_bias(*bs):  # [heads, H] each
        return _qkv(config)(*(b.reshape(-1) for b in bs))

    sources = {name: ((name,), _same) for name, _ in param_specs(config)}
    for i in range(config.n_layers):
        ours = f'layers.{i}.'
        sources[f'{ours}attn.qkv_proj'] = (tuple(f'{ours}attn.{x}_proj' for x in 'qkv'), heads_to_columns)
        sources[f'{ours}attn.o_proj'] = ((f'{ours}attn.o_proj',), lambda w: w.reshape(n * h, d))
        sources[f'{ours}mlp.gate_up'] = ((f'{ours}mlp.gate', f'{ours}mlp.up'), _gate_up)
        if config.qkv_bias:
            sources[f'{ours}attn.qkv_bias'] = (tuple(f'{ours}attn.{x}_bias' for x in 'qkv'), flat_bias)
    _check_covers(config, sources)
    return sources


def _fused_v1_sources(config: ModelConfig) -> Sources:
    """ringserve name -> tensors of the fused, ungrouped layout: qkv_proj [D, (N + 2K) * H] (all
    query heads, then keys, then values), qkv_bias [(N + 2K) * H], gate_up [D, 2F]."""
    cuts = [config.n_heads * config.head_dim, (config.n_heads + config.n_kv_heads) * config.head_dim]
    sources = {name: ((name,), _same) for name, _ in param_specs(config)}
    for i in range(config.n_layers):
        ours = f'layers.{i}.'
        sources[f'{ours}attn.qkv_proj'] = ((f'{ours}attn.qkv_proj',),
                                          lambda w: _qkv(config)(*np.split(w, cuts, axis=-1)))
        sources[f'{ours}mlp.gate_up'] = ((f'{ours}mlp.gate_up',), lambda w: _gate_up(*np.split(w, 2, axis=1)))
        if config.qkv_bias:
            sources[f'{ours}attn.qkv_bias'] = ((f'{ours}attn.qkv_bias',),
                                              lambda b: _qkv(config)(*np.split(b, cuts, axis=-1)))
    _check_covers(config, sources)
    return sources


def _check_covers(config: ModelConfig, sources: Sources) -> None:
    expected = {name for name, _ in param_specs(config)}
    assert set(sources) == expected, sorted(set(sources) ^ expected)  # the mapping covers every parameter


# ------------------------------------------------------------------------------------------------
# Hugging Face media encoders (SigLIP vision tower, Whisper encoder).
# ------------------------------------------------------------------------------------------------
def siglip_vision_params(hf_state: dict[str, np.ndarray], cfg: VisionConfig, prefix: str | None = None) -> dict:
    """Nested params for VisionTower(cfg) from a SigLIP state dict (SiglipVisionModel / SiglipModel /
    a VLM holding one): names '<prefix>embeddings.patch_embedding.weight', '<prefix>encoder.layers.N.
    self_attn.q_proj.weight', ... The prefix ('', 'vision_model.', ...) is found unless given; other
    tensors (the pooling head, a text model) are ignored. Put the result in with
    `assign_params(model.vision.tower, params)`."""
    if prefix is None:
        prefix = _find_prefix(hf_state, 'embeddings.patch_embedding.weight', 'SigLIP vision')
    specs = _module_specs(lambda: VisionTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return _convert_state(hf_state, _siglip_sources(cfg, prefix), specs, 'SigLIP vision')


def _siglip_sources(cfg: VisionConfig, prefix: str) -> Sources:
    """VisionTower parameter name -> SigLIP vision tensors under `prefix` and conversion."""
    sources: Sources = {
        'patch_kernel': ((f'{prefix}embeddings.patch_embedding.weight',), lambda w: w.transpose(2, 3, 1, 0)),
        'patch_bias': ((f'{prefix}embeddings.patch_embedding.bias',), _same),
        'positions': ((f'{prefix}embeddings.position_embedding.weight',), _same),
        **_layer_norm('post_norm', f'{prefix}post_layernorm'),
    }
    for i in range(cfg.n_layers):
        hf, ours = f'{prefix}encoder.layers.{i}.', f'layers.{i}.'
        sources.update({
            **_layer_norm(f'{ours}attn_norm', f'{hf}layer_norm1'),
            **_layer_norm(f'{ours}mlp_norm', f'{hf}layer_norm2'),
            **_dense(f'{ours}fc1', f'{hf}mlp.fc1'),
            **_dense(f'{ours}fc2', f'{hf}mlp.fc2'),
        })
        for ours_proj, hf_proj in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'), ('o', 'out_proj')):
            sources.update(_dense(f'{ours}attn.{ours_proj}', f'{hf}self_attn.{hf_proj}'))
    return sources


def whisper_encoder_params(hf_state: dict[str, np.ndarray], cfg: AudioConfig, prefix: str | None = None) -> dict:
    """Nested params for AudioTower(cfg) from a Whisper encoder state dict (WhisperEncoder, or
    WhisperModel / WhisperForConditionalGeneration, whose encoder sits under 'encoder.' /
    'model.encoder.'; found unless `prefix` is given). Decoder tensors are ignored. Real Whisper has
    1500 positions: use AudioConfig(window_frames=3000) for it. Put the result in with
    `assign_params(model.audio.tower, params)`."""
    if prefix is None:
        prefix = _find_prefix(hf_state, 'conv1.weight', 'Whisper encoder')
    specs = _module_specs(lambda: AudioTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return _convert_state(hf_state, _whisper_sources(cfg, prefix), specs, 'Whisper encoder')


def _whisper_sources(cfg: AudioConfig, prefix: str) -> Sources:
    """AudioTower parameter name -> Whisper encoder tensors under `prefix` (Qwen2AudioEncoder's too:
    its avg_pooler has no weights) and conversion."""

    def taps_first(w):  # torch Conv1d [W, C, 3] -> ours [3, C, W]
        return w.transpose(2, 1, 0)

    sources: Sources = {
        'conv1_kernel': ((f'{prefix}conv1.weight',), taps_first),
        'conv1_bias': ((f'{prefix}conv1.bias',), _same),
        'conv2_kernel': ((f'{prefix}conv2.weight',), taps_first),
        'conv2_bias': ((f'{prefix}conv2.bias',), _same),
        'positions': ((f'{prefix}embed_positions.weight',), _same),
        **_layer_norm('final_norm', f'{prefix}layer_norm'),
    }
    for i in range(cfg.n_layers):
        hf, ours = f'{prefix}layers.{i}.', f'layers.{i}.'
        sources.update({
            **_layer_norm(f'{ours}attn_norm', f'{hf}self_attn_layer_norm'),
            **_layer_norm(f'{ours}mlp_norm', f'{hf}final_layer_norm'),
            **_dense(f'{ours}fc1', f'{hf}fc1'),
            **_dense(f'{ours}fc2', f'{hf}fc2'),
            **_dense(f'{ours}attn.q', f'{hf}self_attn.q_proj'),
            **_dense(f'{ours}attn.k', f'{hf}self_attn.k_proj', bias=False),  # Whisper's keys have no bias
            **_dense(f'{ours}attn.v', f'{hf}self_attn.v_proj'),
            **_dense(f'{ours}attn.o', f'{hf}self_attn.out_proj'),
        })
    return sources


# Qwen2-Audio's audio tower and projector: at the root as its checkpoints (and transformers' save)
# have them, or under 'model.' (transformers 5's module names).
_QWEN2_AUDIO_PREFIXES = ('', 'model.')


def _qwen2_audio_sources(config: ModelConfig, names) -> Sources:
    """ringserve 'audio.*' name -> Qwen2-Audio tensors (audio_tower.*, multi_modal_projector.linear)
    and conversion (model/qwen2_audio.py describes the model)."""
    root = next((p for p in _QWEN2_AUDIO_PREFIXES if f'{p}audio_tower.conv1.weight' in names), '')
    tower = _whisper_sources(config.audio, f'{root}audio_tower.')
    return {**{f'audio.tower.{name}': source for name, source in tower.items()},
            **_dense('audio.projector.proj', f'{root}multi_modal_projector.linear')}


# Gemma 3's vision tower and projector: at the root as transformers 4 saves them (and Google's
# checkpoints have them), or under 'model.' (transformers 5's module names); the tower's own tensors
# under 'vision_model.' (transformers 4's SiglipVisionModel) or directly (transformers 5 saves them so).
_GEMMA3_VISION_ROOTS = ('', 'model.')
_GEMMA3_TOWER_PREFIXES = tuple(f'{root}vision_tower.{inner}' for root in _GEMMA3_VISION_ROOTS
                               for inner in ('vision_model.', ''))


def _gemma3_vision_sources(config: ModelConfig, names) -> Sources:
    """ringserve 'vision.*' name -> Gemma 3 tensors (vision_tower.*, multi_modal_projector.*) and
    conversion. The projector's weight is stored [W, D] (it multiplies on the right), as ours."""
    tower = next((p for p in _GEMMA3_TOWER_PREFIXES if f'{p}embeddings.patch_embedding.weight' in names),
                 _GEMMA3_TOWER_PREFIXES[0])
    root = next((r for r in _GEMMA3_VISION_ROOTS if f'{r}multi_modal_projector.mm_input_projection_weight' in names),
                '')
    projector = f'{root}multi_modal_projector.'
    return {**{f'vision.tower.{name}': source for name, source in _siglip_sources(config.vision, tower).items()},
            'vision.projector.norm.scale': ((f'{projector}mm_soft_emb_norm.weight',), _same),
            'vision.projector.proj': ((f'{projector}mm_input_projection_weight',), _same)}


def assign_params(module: nnx.Module, params: dict) -> None:
    """Copy nested `params` (a converter's result, or any dict shaped like the module's Param
    state) into `module` in place, each cast to its parameter's dtype. Every parameter must be
    given, with its exact shape; ValueError names what is missing, extra or mis-shaped."""
    pure = nnx.state(module, nnx.Param).to_pure_dict()
    expected = dict(_flatten(pure))
    given = dict(_flatten(params))
    if set(given) != set(expected):
        raise ValueError(f'params do not match {type(module).__name__}: missing {sorted(set(expected) - set(given))}, '
                         f'unexpected {sorted(set(given) - set(expected))}.')
    for name, value in given.items():
        if tuple(np.shape(value)) != tuple(expected[name].shape):
            raise ValueError(f'param {name!r} has shape {tuple(np.shape(value))}, expected '
                             f'{tuple(expected[name].shape)} for {type(module).__name__}.')
        _set(pure, name, jnp.asarray(value, dtype=expected[name].dtype))
    nnx.update(module, pure)


def _layer_norm(ours: str, hf: str) -> Sources:
    return {f'{ours}.scale': ((f'{hf}.weight',), _same), f'{ours}.bias': ((f'{hf}.bias',), _same)}


def _dense(ours: str, hf: str, bias: bool = True) -> Sources:
    """torch Linear weight [out, in] -> our kernel [in, out]; its bias as is."""
    sources = {f'{ours}.kernel': ((f'{hf}.weight',), _columns)}
    if bias:
        sources[f'{ours}.bias'] = ((f'{hf}.bias',), _same)
    return sources


def _find_prefix(hf_state: dict, anchor: str, what: str) -> str:
    prefixes = sorted({name[:-len(anchor)] for name in hf_state
                       if name.endswith(anchor) and (name == anchor or name[-len(anchor) - 1] == '.')})
    if len(prefixes) != 1:
        found = f'several ({prefixes}): pass prefix=' if prefixes else 'none: is this a ' + what + ' state dict?'
        raise ValueError(f'Looking for the {what} tensors by a name ending in {anchor!r}, found {found}.')
    return prefixes[0]


def _module_specs(build: Callable[[], nnx.Module]) -> dict[str, jax.ShapeDtypeStruct]:
    return dict(_flatten(nnx.state(nnx.eval_shape(build), nnx.Param).to_pure_dict()))


def _convert_state(hf_state: dict, sources: Sources, specs: dict, what: str) -> dict:
    """Nested dict (integer keys for layer lists, as nnx's pure state) of converted numpy arrays."""
    assert set(sources) == set(specs), sorted(set(sources) ^ set(specs))  # the mapping covers every parameter
    missing = sorted(name for names, _ in sources.values() for name in names if name not in hf_state)
    if missing:
        more = f' and {len(missing) - 4} more' if len(missing) > 4 else ''
        raise ValueError(f'{what} state dict lacks {len(missing)} tensors the config expects: {missing[:4]}{more} '
                         '(check n_layers and the prefix).')
    out: dict = {}
    for ours, (names, convert) in sources.items():
        array = convert(*(np.asarray(hf_state[name]) for name in names))
        if tuple(array.shape) != tuple(specs[ours].shape):
            raise ValueError(f'{what} tensor {names[0]!r} gives {ours!r} shape {tuple(array.shape)}, but the config '
                             f'expects {tuple(specs[ours].shape)}: match the config to the checkpoint.')
        node = out
        *parents, leaf = (int(part) if part.isdigit() else part for part in ours.split('.'))
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array
    return out


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------
class _TensorFiles:
    """Name -> tensor across one or more safetensors files, read one tensor at a time as numpy."""

    def __init__(self, files: list[Path]):
        self._paths = files
        self._handles = []
        self._where: dict[str, int] = {}

    def __enter__(self) -> _TensorFiles:
        for index, file in enumerate(self._paths):
            if not file.is_file():
                raise ValueError(f'Missing weights file {file}.')
            handle = safe_open(str(file), framework='np')
            self._handles.append(handle)
            for name in handle.keys():
                self._where[name] = index
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()

    @property
    def names(self) -> dict[str, int]:
        """Tensor name -> index of the file holding it (a dict, so `in` is O(1))."""
        return self._where

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._where:
            raise ValueError(f'Tensor {name!r} is missing from {[str(p) for p in self._paths]}.')
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ValueError(f'Tensor {name!r} is missing from {[str(p) for p in self._paths]}.')
        return self._handles[self._where[name]].get_tensor(name)


def _flatten(tree: dict, prefix: str = '') -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            yield from _flatten(value, name + '.')
        else:
            yield name, value


def _set(tree: dict, name: str, value: jax.Array) -> None:
    *parents, leaf = name.split('.')
    for part in parents:
        tree = tree[int(part) if part.isdigit() and int(part) in tree else part]
    tree[int(leaf) if leaf.isdigit() and int(leaf) in tree else leaf] = value
