"""Model configuration: one frozen dataclass that every other model/ file reads.

Axis alphabet (see docs/design.md): B batch, T query length, S key length, N query heads,
K kv heads, H head dim, D model dim, F MLP hidden, V vocabulary, L layers.
VisionConfig and AudioConfig describe the optional media encoders (model/vision.py,
model/audio_encoder.py) whose outputs, projected to D, replace token embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from model.qwen2_5_vl_vision import Qwen25VLVisionConfig

MLP_ACTIVATIONS = ('silu', 'gelu_tanh')
DTYPES = ('float32', 'bfloat16')
ROPE_KINDS = ('linear', 'llama3')

# Hugging Face `hidden_act` names -> ours. Gemma's legacy "gelu" means the tanh approximation.
_HF_ACTIVATIONS = {
    'silu': 'silu',
    'swish': 'silu',
    'gelu_pytorch_tanh': 'gelu_tanh',
    'gelu_tanh': 'gelu_tanh',
    'gelu_new': 'gelu_tanh',
}
# `gemma3_text` is Gemma3ForCausalLM; `gemma3` is Gemma3ForConditionalGeneration: its decoder, and its
# SigLIP vision tower and projector as config.vision.
# `qwen2_audio` (Qwen2AudioForConditionalGeneration): a qwen2 decoder and an audio encoder (model/qwen2_audio.py).
# `qwen2_5_vl` (Qwen2_5_VLForConditionalGeneration): a qwen2 decoder with M-RoPE and a vision tower
# (model/qwen2_5_vl.py).
HF_MODEL_TYPES = ('llama', 'qwen2', 'gemma', 'gemma3_text', 'gemma3', 'qwen2_audio', 'qwen2_5_vl')
# Gemma3TextConfig's defaults: a Gemma 3 multimodal config.json writes only the text settings that
# differ from them (the 4B's text_config names hidden_size, layers, window and rope_scaling alone).
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation='gelu_pytorch_tanh', max_position_embeddings=131_072,
    rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
)
_GEMMA3_LAYER_TYPES = ('sliding_attention', 'full_attention')
# SiglipVisionConfig's defaults, for the keys a Gemma 3 config.json's vision_config leaves out.
_SIGLIP_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
)
_GEMMA3_MM_TOKENS_PER_IMAGE = 256  # Gemma3Config's default

# Whisper's log-mel features: 100 frames per second (hop 160 at 16 kHz); its conv2 halves that.
MEL_FRAMES_PER_SECOND = 100
AUDIO_CONV_STRIDE = 2
AUDIO_POOL_SITES = ('projector', 'tower')
AUDIO_PROJECTORS = ('rmsnorm_linear', 'linear_bias')


def _check_positive_ints(owner: object, fields: tuple[str, ...]) -> None:
    for field in fields:
        value = getattr(owner, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f'{type(owner).__name__}.{field}={value!r}: must be a positive int.')


def _positive_number(value: object) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and value > 0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision tower and a Gemma-3-style projector (average pool, RMSNorm, linear to D).

    Letters for the encoder (model/vision.py): S image side in pixels, P patches (grid * grid),
    W tower width.
    """

    image_size: int = 64  # S: input images are S x S x 3, channels last, already normalised
    patch_size: int = 8
    width: int = 128  # W
    n_layers: int = 2
    n_heads: int = 4
    mlp_dim: int = 512
    norm_eps: float = 1e-6  # LayerNorm in the tower; the projector's RMSNorm uses it too (as Gemma 3)
    tokens_per_image: int = 16  # decoder tokens per image after pooling: a square m * m

    def __post_init__(self):
        _check_positive_ints(self, ('image_size', 'patch_size', 'width', 'n_layers', 'n_heads', 'mlp_dim',
                                    'tokens_per_image'))
        if self.image_size % self.patch_size:
            raise ValueError(f'VisionConfig.image_size={self.image_size} is not a multiple of patch_size='
                             f'{self.patch_size}: patches must tile the image exactly.')
        if self.width % self.n_heads:
            raise ValueError(f'VisionConfig.width={self.width} is not a multiple of n_heads={self.n_heads}: '
                             'every head gets width // n_heads channels.')
        if not self.norm_eps > 0:
            raise ValueError(f'VisionConfig.norm_eps={self.norm_eps}: must be > 0.')
        side = math.isqrt(self.tokens_per_image)
        if side * side != self.tokens_per_image or self.grid % side:
            allowed = [d * d for d in _divisors(self.grid)]
            raise ValueError(
                f'VisionConfig.tokens_per_image={self.tokens_per_image}: must be a square m * m whose side m '
                f'divides the patch grid {self.grid} (image_size // patch_size); use one of {allowed}.')

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """P: tower positions per image."""
        return self.grid * self.grid

    @property
    def pool(self) -> int:
        """Side of the projector's average-pool window, in patches."""
        return self.grid // math.isqrt(self.tokens_per_image)

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """A Whisper encoder over fixed windows of log-mel frames and a projector (average pool over
    time, RMSNorm, linear to D).

    Mel frames come at MEL_FRAMES_PER_SECOND (100/s); conv2's stride 2 leaves 50 positions/s, which
    the projector pools by `pool` into `tokens_per_second`. Letters for the encoder (model/audio_encoder.py):
    M mel bins, A mel frames per window, W width.
    """

    n_mels: int = 80  # M
    window_frames: int = 1000  # A: mel frames per window (10 s); Whisper's own is 3000
    width: int = 128  # W
    n_layers: int = 2
    n_heads: int = 4
    mlp_dim: int = 512
    norm_eps: float = 1e-5  # LayerNorm (Whisper uses torch's default); the projector's RMSNorm too
    tokens_per_second: int = 10
    # Mel frames of neighbouring audio each window also sees, on each side, beyond the frames
    # whose rows it hands on (preprocess.audio.MelSpec.context_frames). 0: Whisper's plain cut.
    context_frames: int = 0
    # Where the average pool sits: 'projector' (ringserve's: after the tower's final LayerNorm) or
    # 'tower' (Qwen2-Audio's avg_pooler: between the last block and the final LayerNorm).
    pool_site: str = 'projector'
    # 'rmsnorm_linear': RMSNorm (1 + w) then W -> D without bias; 'linear_bias': one W -> D Linear
    # with a bias (Qwen2-Audio's multi_modal_projector).
    projector: str = 'rmsnorm_linear'
    # True: encoder keys past a window's valid (unpadded) frames are masked, as transformers'
    # Qwen2-Audio builds the mask from feature_attention_mask; the caller passes valid frames.
    mask_padding: bool = False

    def __post_init__(self):
        _check_positive_ints(self, ('n_mels', 'window_frames', 'width', 'n_layers', 'n_heads', 'mlp_dim',
                                    'tokens_per_second'))
        if self.pool_site not in AUDIO_POOL_SITES:
            raise ValueError(f'AudioConfig.pool_site={self.pool_site!r}: use one of {AUDIO_POOL_SITES}.')
        if self.projector not in AUDIO_PROJECTORS:
            raise ValueError(f'AudioConfig.projector={self.projector!r}: use one of {AUDIO_PROJECTORS}.')
        if not isinstance(self.mask_padding, (bool, np.bool_)):
            raise ValueError(f'AudioConfig.mask_padding={self.mask_padding!r}: must be True or False.')
        if self.mask_padding and self.context_frames:
            raise ValueError('AudioConfig.mask_padding with context_frames: padding is only at the end of a '
                             'clip, which context windows do not model; set one of them to its default.')
        if self.window_frames % MEL_FRAMES_PER_SECOND:
            raise ValueError(f'AudioConfig.window_frames={self.window_frames}: must be whole seconds, a multiple '
                             f'of {MEL_FRAMES_PER_SECOND} mel frames.')
        if self.width % self.n_heads:
            raise ValueError(f'AudioConfig.width={self.width} is not a multiple of n_heads={self.n_heads}: '
                             'every head gets width // n_heads channels.')
        if self.width % 2 or self.width < 4:
            raise ValueError(f'AudioConfig.width={self.width}: Whisper\'s sinusoidal positions need an even '
                             'width of at least 4.')
        if not self.norm_eps > 0:
            raise ValueError(f'AudioConfig.norm_eps={self.norm_eps}: must be > 0.')
        per_second = MEL_FRAMES_PER_SECOND // AUDIO_CONV_STRIDE
        if per_second % self.tokens_per_second:
            raise ValueError(f'AudioConfig.tokens_per_second={self.tokens_per_second}: must divide the encoder\'s '
                             f'{per_second} positions per second; use one of {_divisors(per_second)}.')
        per_token = MEL_FRAMES_PER_SECOND // self.tokens_per_second
        if self.context_frames < 0 or self.context_frames % per_token or 2 * self.context_frames >= self.window_frames:
            raise ValueError(f'AudioConfig.context_frames={self.context_frames}: must be >= 0, a multiple of the '
                             f'{per_token} frames behind one token, and under half of window_frames='
                             f'{self.window_frames}.')

    @property
    def positions(self) -> int:
        """Encoder positions per window (after conv2's stride)."""
        return self.window_frames // AUDIO_CONV_STRIDE

    @property
    def pool(self) -> int:
        """Encoder positions averaged into one decoder token."""
        return MEL_FRAMES_PER_SECOND // AUDIO_CONV_STRIDE // self.tokens_per_second

    @property
    def tokens_per_window(self) -> int:
        """Rows the encoder computes for one window (context included)."""
        return self.window_frames // MEL_FRAMES_PER_SECOND * self.tokens_per_second

    @property
    def context_rows(self) -> int:
        """Rows at each end of a window that are context, not handed on."""
        return self.context_frames * self.tokens_per_second // MEL_FRAMES_PER_SECOND

    @property
    def rows_per_window(self) -> int:
        """Rows one window hands to the decoder: its middle, tokens_per_window - 2 * context_rows."""
        return self.tokens_per_window - 2 * self.context_rows

    def encoder_positions(self, valid_frames: int) -> int:
        """Encoder positions (after conv2) that hold audio when the window's first `valid_frames`
        frames do: (valid_frames - 1) // 2 + 1, transformers' _get_feat_extract_output_lengths."""
        return (valid_frames - 1) // AUDIO_CONV_STRIDE + 1

    def valid_rows(self, valid_frames: int) -> int:
        """Rows of a window that come from audio, not padding, when its first `valid_frames` frames
        are audio: for mask_padding configs, the pool's floor over encoder_positions (Qwen2-Audio's
        ((L - 1) // 2 + 1 - 2) // 2 + 1, the processor's placeholder count); else every row."""
        if not self.mask_padding:
            return self.rows_per_window
        return max(0, (self.encoder_positions(valid_frames) - self.pool) // self.pool + 1)

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        # Fields added for Qwen2-Audio are written only when set, so earlier configs (the default
        # model's included) serialise byte-identically.
        d = dataclasses.asdict(self)
        for field in _QWEN2_AUDIO_FIELDS:
            if d[field] == _AUDIO_DEFAULTS[field]:
                del d[field]
        return d


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Context extension applied to RoPE inverse frequencies (as transformers does).

    kind 'linear': every inverse frequency divided by `factor`.
    kind 'llama3': low frequencies divided by `factor`, high ones kept, a smooth blend between,
    with the band edges set by `original_max_position_embeddings / {low,high}_freq_factor`.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f'RopeScaling.kind={self.kind!r}: use one of {ROPE_KINDS} (or rope_scaling=None).')
        if not self.factor > 0:
            raise ValueError(f'RopeScaling.factor={self.factor}: must be > 0 (1.0 means no scaling).')
        if self.kind == 'llama3':
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    f'llama3 RopeScaling needs high_freq_factor > low_freq_factor > 0, got '
                    f'{self.high_freq_factor} and {self.low_freq_factor}.'
                )
            if self.original_max_position_embeddings <= 0:
                raise ValueError('llama3 RopeScaling.original_max_position_embeddings must be a positive int.')

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one decoder layer attends. The default (global, RoPE, plain 1/sqrt(H)) is Llama's.

    - `window`: a sliding window of that many keys; the query at position p sees keys at positions
      p - window < s <= p (Mistral / Gemma 3 `sliding_window` semantics). None: every key s <= p.
    - `rope`: False gives a NoPE layer (Llama 4's), whose queries and keys carry no position at all.
    - `local_rope`: rotate by the model's local RoPE settings (ModelConfig.local_rope_theta and
      local_rope_scaling) rather than rope_theta and rope_scaling. Gemma 3's sliding-window layers
      use base 10,000 unscaled while its global layers use 1,000,000, scaled 8x in the 4B and up.
    - `log_scale`: a base length n0; queries at position p are multiplied by log(p + 1) / log(n0), so
      attention keeps its sharpness as the number of keys grows (scalable softmax, arXiv 2501.19399;
      Llama 4's attention temperature tuning is the same idea). None: no extra scale.
    Local RoPE layers plus global NoPE layers with the log scale is how the default model reaches
    contexts far longer than it was trained on (docs/model_card.md).
    """

    window: int | None = None
    rope: bool = True
    log_scale: int | None = None
    local_rope: bool = False

    def __post_init__(self):
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer))
                                        or self.window <= 0):
            raise ValueError(f'LayerKind.window={self.window!r}: use None (global) or a positive int.')
        if not isinstance(self.rope, (bool, np.bool_)):
            raise ValueError(f'LayerKind.rope={self.rope!r}: must be True or False.')
        if self.log_scale is not None and (isinstance(self.log_scale, bool)
                                           or not isinstance(self.log_scale, (int, np.integer)) or self.log_scale < 2):
            raise ValueError(f'LayerKind.log_scale={self.log_scale!r}: use None or a base length >= 2.')
        if not isinstance(self.local_rope, (bool, np.bool_)):
            raise ValueError(f'LayerKind.local_rope={self.local_rope!r}: must be True or False.')
        if self.local_rope and not self.rope:
            raise ValueError('LayerKind(rope=False, local_rope=True): a NoPE layer has no RoPE to take from the local '
                             'settings; set rope=True or drop local_rope.')

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.local_rope:
            del d['local_rope']  # kinds written before local RoPE existed read back equal
        return d

    @classmethod
    def parse(cls, text: str) -> LayerKind:
        """'rope' | 'rope:local' | 'nope', then optionally '@W' (a window of W keys) and '/logN' (log
        scale, base N): e.g. 'rope@64', 'rope:local@512', 'nope/log1024', 'rope'."""
        head, slash, log = text.strip().partition('/')
        base, at, window = head.partition('@')
        try:
            if (base not in ('rope', 'rope:local', 'nope') or (slash and not log.startswith('log'))
                    or (at and not window)):
                raise ValueError
            return cls(window=int(window) if at else None, rope=base != 'nope',
                       log_scale=int(log[3:]) if slash else None, local_rope=base == 'rope:local')
        except ValueError:
            raise ValueError(f'layer kind {text!r}: write rope|nope[@WINDOW][/logBASE] (rope:local for the local '
                             'RoPE settings), e.g. rope@64, rope:local@512 or nope/log1024.') from None

    def __str__(self) -> str:
        rope = ('rope:local' if self.local_rope else 'rope') if self.rope else 'nope'
        return (rope + (f'@{self.window}' if self.window else '')
                + (f'/log{self.log_scale}' if self.log_scale else ''))


def parse_layer_kinds(text: str) -> tuple[LayerKind, ...]:
    """Comma-separated `LayerKind.parse` specs, one per layer: 'rope@64,nope/log1024'."""
    return tuple(LayerKind.parse(part) for part in text.split(',') if part.strip())


GLOBAL_ROPE = LayerKind()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (Llama / Qwen2 / Gemma / Gemma 3 family).

    Fields after `layer_kinds` were added for Gemma 3; their defaults are the models before it, and
    `to_dict` leaves them out while they hold those defaults.
    """

    name: str
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    mlp_activation: str = 'silu'
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    embed_scale: bool = False  # Gemma multiplies token embeddings by sqrt(D).
    norm_offset: float = 0.0  # 1.0 for Gemma's RMSNorm, which scales by (1 + w).
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v (not on o).
    max_context: int = 8192
    dtype: str = 'float32'
    bos_id: int = 1
    eos_ids: tuple[int, ...] = (2,)
    vision: VisionConfig | None = None  # an image encoder feeding Transformer.encode_images
    audio: AudioConfig | None = None  # an audio encoder feeding Transformer.encode_audio
    # One LayerKind per layer (window, RoPE or not, log scale); None: every layer global with RoPE.
    layer_kinds: tuple[LayerKind, ...] | None = None
    qk_norm: bool = False  # RMSNorm over H of every query and key head, before RoPE (Gemma 3).
    post_norms: bool = False  # Also norm the attention and MLP outputs before each residual add (Gemma 2 / 3).
    query_pre_attn_scalar: float | None = None  # Attention scale is this ** -0.5; None: 1 / sqrt(H).
    # RoPE of layers whose LayerKind has local_rope (Gemma 3's sliding-window layers); None: no such layers.
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling | None = None
    # Tokens of one media span (Transformer's `spans`) see each other in both directions, not only
    # earlier ones: Gemma 3's image tokens do. False: spans are ignored, attention stays causal.
    bidirectional_media: bool = False
    # Multimodal RoPE (Qwen2-VL / Qwen2.5-VL): the H/2 rotary frequencies in three consecutive runs of
    # these sizes turn by a token's temporal, height and width position (model/rope.py, MRopeTables).
    # None: one position per token. Written to JSON only when set, as the encoder below.
    mrope_section: tuple[int, int, int] | None = None
    # Qwen2.5-VL's vision tower feeding Transformer.encode_qwen_vision (model/qwen2_5_vl_vision.py).
    qwen_vision: Qwen25VLVisionConfig | None = None

    def __post_init__(self):
        # JSON gives lists and dicts; normalise so equality and hashing behave.
        if isinstance(self.eos_ids, int):
            object.__setattr__(self, 'eos_ids', (self.eos_ids,))
        else:
            object.__setattr__(self, 'eos_ids', tuple(int(i) for i in self.eos_ids))
        for field in ('rope_scaling', 'local_rope_scaling'):
            if isinstance(getattr(self, field), dict):
                object.__setattr__(self, field, RopeScaling(**getattr(self, field)))
        for field, kind in (('vision', VisionConfig), ('audio', AudioConfig)):
            value = getattr(self, field)
            if isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(kind)}
                if set(value) - known:
                    raise ValueError(f'Unknown {kind.__name__} fields {sorted(set(value) - known)}; known fields '
                                     f'are {sorted(known)}.')
                object.__setattr__(self, field, kind(**value))
            elif value is not None and not isinstance(value, kind):
                raise ValueError(f'ModelConfig.{field}={value!r}: use a {kind.__name__}, a dict of its fields, '
                                 'or None (no encoder).')
        self._check_qwen_vl_fields()
        if self.layer_kinds is not None:
            kinds = tuple(LayerKind(**k) if isinstance(k, dict) else k for k in self.layer_kinds)
            if len(kinds) != self.n_layers or not all(isinstance(k, LayerKind) for k in kinds):
                raise ValueError(f'ModelConfig.layer_kinds: give one LayerKind (or dict of its fields) per layer, '
                                 f'{self.n_layers} in all; got {self.layer_kinds!r}.')
            object.__setattr__(self, 'layer_kinds', kinds)
        for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
                      'max_context'):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f'ModelConfig.{field}={value!r}: must be a positive int.')
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f'n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: '
                'each kv head must serve the same number of query heads (GQA).'
            )
        if self.head_dim % 2:
            raise ValueError(f'head_dim={self.head_dim}: RoPE rotates pairs, so head_dim must be even.')
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f'mlp_activation={self.mlp_activation!r}: use one of {MLP_ACTIVATIONS}.')
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype={self.dtype!r}: use one of {DTYPES}.')
        if not self.norm_eps > 0:
            raise ValueError(f'norm_eps={self.norm_eps}: must be > 0.')
        if not self.rope_theta > 0:
            raise ValueError(f'rope_theta={self.rope_theta}: must be > 0.')
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f'logit_softcap={self.logit_softcap}: use None for no capping, or a value > 0.')
        if self.norm_offset not in (0.0, 1.0):
            raise ValueError(f'norm_offset={self.norm_offset}: use 0.0 (Llama RMSNorm) or 1.0 (Gemma (1+w)).')
        if not 0 <= self.bos_id < self.vocab_size:
            raise ValueError(f'bos_id={self.bos_id} is outside the vocabulary [0, {self.vocab_size}).')
        if not self.eos_ids:
            raise ValueError('eos_ids is empty: give at least one end-of-sequence id.')
        for i in self.eos_ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f'eos id {i} is outside the vocabulary [0, {self.vocab_size}).')
        for field in ('qk_norm', 'post_norms', 'bidirectional_media'):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise ValueError(f'{field}={getattr(self, field)!r}: must be True or False.')
        if self.bidirectional_media and self.vision is None and self.audio is None:
            raise ValueError('bidirectional_media=True without a media encoder: set vision or audio, or leave it '
                             'False.')
        if self.query_pre_attn_scalar is not None and not _positive_number(self.query_pre_attn_scalar):
            raise ValueError(f'query_pre_attn_scalar={self.query_pre_attn_scalar}: use None (scale 1/sqrt(head_dim)) '
                             'or a value > 0 (scale value ** -0.5).')
        if self.local_rope_theta is None:
            if self.local_rope_scaling is not None:
                raise ValueError('local_rope_scaling is set but local_rope_theta is None: give the local RoPE base '
                                 'too, or drop the scaling.')
            local = [i for i in range(self.n_layers) if self.layer_kind(i).local_rope]
            if local:
                raise ValueError(f'layers {local} have LayerKind(local_rope=True) but local_rope_theta is None: set '
                                 'local_rope_theta (e.g. 10000.0) or drop local_rope from those layers.')
        elif not _positive_number(self.local_rope_theta):
            raise ValueError(f'local_rope_theta={self.local_rope_theta}: must be > 0 (or None: no local RoPE).')
        if self.local_rope_scaling is not None and not isinstance(self.local_rope_scaling, RopeScaling):
            raise ValueError(f'local_rope_scaling={self.local_rope_scaling!r}: use a RopeScaling, a dict of its '
                             'fields, or None.')

    def _check_qwen_vl_fields(self) -> None:
        """Normalise and check mrope_section and qwen_vision (JSON gives a list and a dict)."""
        if self.mrope_section is not None:
            section = tuple(self.mrope_section)
            if (len(section) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                             for v in section) or sum(section) != self.head_dim // 2):
                raise ValueError(f'mrope_section={self.mrope_section!r}: give three positive ints (temporal, height, '
                                 f'width frequencies) summing to head_dim // 2 = {self.head_dim // 2}, or None.')
            object.__setattr__(self, 'mrope_section', tuple(int(v) for v in section))
        if self.qwen_vision is not None:
            from model.qwen2_5_vl_vision import Qwen25VLVisionConfig  # imports model.checkpoint, hence here

            if isinstance(self.qwen_vision, dict):
                known = {f.name for f in dataclasses.fields(Qwen25VLVisionConfig)}
                if set(self.qwen_vision) - known:
                    raise ValueError(f'Unknown Qwen25VLVisionConfig fields {sorted(set(self.qwen_vision) - known)}; '
                                     f'known fields are {sorted(known)}.')
                object.__setattr__(self, 'qwen_vision', Qwen25VLVisionConfig(**self.qwen_vision))
            elif not isinstance(self.qwen_vision, Qwen25VLVisionConfig):
                raise ValueError(f'ModelConfig.qwen_vision={self.qwen_vision!r}: use a Qwen25VLVisionConfig, a dict '
                                 'of its fields, or None.')
            if self.qwen_vision.out_width != self.d_model:
                raise ValueError(f'qwen_vision.out_width={self.qwen_vision.out_width} must equal d_model='
                                 f'{self.d_model}: its rows replace token embeddings.')

    # Derived values.
    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one kv head (N // K)."""
        return self.n_heads // self.n_kv_heads

    def layer_kind(self, layer: int) -> LayerKind:
        return GLOBAL_ROPE if self.layer_kinds is None else self.layer_kinds[layer]

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is None:
            return 1.0 / math.sqrt(self.head_dim)
        return float(self.query_pre_attn_scalar) ** -0.5  # as transformers' Gemma 3 writes it

    def rope_inv_freq(self, kind: LayerKind = GLOBAL_ROPE) -> np.ndarray:
        """f32[H // 2] inverse frequencies of a layer of this `kind` (the local settings when it has
        local_rope, else rope_theta and rope_scaling), in float32 exactly as transformers computes them."""
        if kind.local_rope:
            return rope_inv_freq(self.head_dim, self.local_rope_theta, self.local_rope_scaling)
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['eos_ids'] = list(self.eos_ids)
        if self.layer_kinds is None:
            del d['layer_kinds']  # configs written before layer kinds existed read back equal
        else:
            d['layer_kinds'] = [kind.to_dict() for kind in self.layer_kinds]
        if self.audio is not None:
            d['audio'] = self.audio.to_dict()  # leaves out its Qwen2-Audio fields at their defaults
        # Fields added for Gemma 3 are written only when set, so every earlier config (and the engine
        # identity processes compare, server/runtime.py) stays byte-identical.
        for field in _GEMMA3_FIELDS + _QWEN_VL_FIELDS:
            if d[field] == _FIELD_DEFAULTS[field]:
                del d[field]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f'Unknown ModelConfig fields {sorted(unknown)}; known fields are {sorted(known)}.')
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, dtype: str = 'float32') -> ModelConfig:
        """Translate a Hugging Face `config.json` dict (llama, qwen2, gemma, gemma3_text, or gemma3,
        whose decoder settings sit under `text_config`; see `hf_text_config`)."""
        model_type = hf.get('model_type')
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f'Unsupported Hugging Face model_type {model_type!r}; supported: {HF_MODEL_TYPES}.')
        if model_type == 'qwen2_audio':
            from model import qwen2_audio  # imports this module, hence here

            return cls.from_hf_config(qwen2_audio.text_config(hf), dtype=dtype).replace(
                audio=qwen2_audio.audio_config(hf))
        if model_type == 'qwen2_5_vl':
            from model import qwen2_5_vl  # imports this module, hence here

            return qwen2_5_vl.model_config(hf, dtype=dtype)
        text = hf_text_config(hf)
        family = text['model_type']
        gemma = family in ('gemma', 'gemma3_text')
        d_model = text['hidden_size']
        n_heads = text['num_attention_heads']
        head_dim = text.get('head_dim') or d_model // n_heads
        act_name = (text.get('hidden_activation') or text.get('hidden_act')
                    or ('gelu_pytorch_tanh' if gemma else 'silu'))
        if gemma and act_name == 'gelu':
            act_name = 'gelu_pytorch_tanh'  # transformers does the same for legacy Gemma configs
        if act_name not in _HF_ACTIVATIONS:
            raise ValueError(f'Unsupported hidden_act {act_name!r}; supported: {sorted(_HF_ACTIVATIONS)}.')
        if text.get('mlp_bias'):
            raise ValueError('mlp_bias=True is not supported (ringserve MLPs have no biases).')
        if family != 'qwen2' and text.get('attention_bias'):
            raise ValueError(f'attention_bias=True {model_type} models are not supported (o_proj would need a bias).')
        eos = text.get('eos_token_id')
        eos_ids = (2,) if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        bos = text.get('bos_token_id')
        if family == 'gemma3_text':
            extra = _gemma3_fields(text)
            if model_type == 'gemma3':
                extra.update(vision=gemma3_vision_config(hf), bidirectional_media=True)
        else:
            theta, scaling = _hf_rope(text)
            extra = dict(rope_theta=theta, rope_scaling=scaling)
        return cls(
            name=hf.get('_name_or_path') or model_type,
            vocab_size=text['vocab_size'],
            d_model=d_model,
            n_layers=text['num_hidden_layers'],
            n_heads=n_heads,
            n_kv_heads=text.get('num_key_value_heads') or n_heads,
            head_dim=head_dim,
            mlp_dim=text['intermediate_size'],
            mlp_activation=_HF_ACTIVATIONS[act_name],
            norm_eps=text.get('rms_norm_eps', 1e-6),
            tie_embeddings=text.get('tie_word_embeddings', gemma),
            logit_softcap=text.get('final_logit_softcapping'),
            embed_scale=gemma,
            norm_offset=1.0 if gemma else 0.0,
            qkv_bias=family == 'qwen2',
            max_context=text.get('max_position_embeddings', 8192),
            dtype=dtype,
            bos_id=1 if bos is None else bos,
            eos_ids=eos_ids,
            **extra,
        )


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
_AUDIO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AudioConfig)}
_QWEN2_AUDIO_FIELDS = ('pool_site', 'projector', 'mask_padding')
_GEMMA3_FIELDS = ('qk_norm', 'post_norms', 'query_pre_attn_scalar', 'local_rope_theta', 'local_rope_scaling',
                  'bidirectional_media')
_QWEN_VL_FIELDS = ('mrope_section', 'qwen_vision')


def hf_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's settings in a Hugging Face config dict, as transformers runs them.

    For llama / qwen2 / gemma / gemma3_text that is the dict itself. For gemma3 (Gemma3ForConditional-
    Generation) it is `text_config` over Gemma3TextConfig's defaults, with the wrapper's own
    tie_word_embeddings (which decides whether lm_head is stored) and token ids, and no final logit
    soft-capping: the wrapper's forward never applies it (transformers 5.25), whatever text_config says.
    The wrapper's `vision_config` is for the vision tower (`gemma3_vision_config`).
    """
    if hf.get('model_type') == 'gemma3_text':
        return {**_GEMMA3_TEXT_DEFAULTS, **hf}
    if hf.get('model_type') != 'gemma3':
        return hf
    text = {**_GEMMA3_TEXT_DEFAULTS, **(hf.get('text_config') or {}), 'model_type': 'gemma3_text'}
    text['tie_word_embeddings'] = hf.get('tie_word_embeddings', True)
    for key in ('bos_token_id', 'eos_token_id'):
        if hf.get(key) is not None:
            text[key] = hf[key]
    text['final_logit_softcapping'] = None
    return text


def gemma3_vision_config(hf: dict[str, Any]) -> VisionConfig:
    """The VisionConfig of a Gemma 3 multimodal config dict: its `vision_config` (a SigLIP vision
    model) over SiglipVisionConfig's defaults, pooled to the wrapper's `mm_tokens_per_image`."""
    vision = {**_SIGLIP_VISION_DEFAULTS, **(hf.get('vision_config') or {})}
    if vision['hidden_act'] != 'gelu_pytorch_tanh' or vision['num_channels'] != 3:
        raise ValueError(f'Gemma 3 vision_config with hidden_act={vision["hidden_act"]!r} and num_channels='
                         f'{vision["num_channels"]}: only SigLIP\'s gelu_pytorch_tanh over 3 channels is supported.')
    sides = {}
    for key in ('image_size', 'patch_size'):
        value = vision[key]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f'Gemma 3 vision_config {key}={value!r}: only square images and patches are '
                                 'supported.')
            value = value[0]
        sides[key] = value
    return VisionConfig(
        **sides, width=vision['hidden_size'], n_layers=vision['num_hidden_layers'],
        n_heads=vision['num_attention_heads'], mlp_dim=vision['intermediate_size'],
        norm_eps=float(vision['layer_norm_eps']),
        tokens_per_image=hf.get('mm_tokens_per_image') or _GEMMA3_MM_TOKENS_PER_IMAGE)


def _gemma3_fields(text: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields particular to a Gemma 3 decoder (a `hf_text_config` dict).

    Sliding layers see keys p - sliding_window < s <= p, transformers' rule and LayerKind.window's,
    so the window is taken as is. `attn_logit_softcapping` is ignored because transformers' Gemma 3
    attention never applies it.
    """
    if text.get('use_bidirectional_attention'):
        raise ValueError('use_bidirectional_attention=True (EmbeddingGemma) is not supported: ringserve decoders '
                         'attend causally.')
    n_layers = text['num_hidden_layers']
    types = text.get('layer_types')
    if types is None:  # configs written before layer_types: every pattern-th layer is global
        pattern = text.get('sliding_window_pattern') or text.get('_sliding_window_pattern') or 6
        types = ['full_attention' if (i + 1) % pattern == 0 else 'sliding_attention' for i in range(n_layers)]
    if len(types) != n_layers or set(types) - set(_GEMMA3_LAYER_TYPES):
        raise ValueError(f'layer_types={types!r}: give one of {_GEMMA3_LAYER_TYPES} per layer, {n_layers} in all.')
    window = text.get('sliding_window')
    if 'sliding_attention' in types and not (isinstance(window, int) and window > 0):
        raise ValueError(f'sliding_window={window!r}: sliding_attention layers need a positive window size.')
    sliding = LayerKind(window=window, local_rope=True)
    kinds = tuple(sliding if t == 'sliding_attention' else GLOBAL_ROPE for t in types)
    # transformers 5 keeps one rope_parameters dict per layer type; older configs have rope_theta and
    # rope_scaling (global layers only) and rope_local_base_freq (sliding layers, never scaled).
    params = text.get('rope_parameters') or {}
    if set(params) - set(_GEMMA3_LAYER_TYPES):
        raise ValueError(f'Gemma 3 rope_parameters {params!r}: give one dict per layer type, keyed by '
                         f'{_GEMMA3_LAYER_TYPES}.')
    full = {**(params.get('full_attention') or {}), **(text.get('rope_scaling') or {})}
    theta, scaling = _rope_params(full, text['rope_theta'])
    local_theta, local_scaling = _rope_params(params.get('sliding_attention') or {}, text['rope_local_base_freq'])
    return dict(layer_kinds=kinds, rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta,
                local_rope_scaling=local_scaling, qk_norm=True, post_norms=True,
                query_pre_attn_scalar=float(text['query_pre_attn_scalar']))


def _hf_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from either transformers 5 `rope_parameters` or the older keys."""
    params = dict(hf.get('rope_parameters') or {})
    old = hf.get('rope_scaling') or {}
    return _rope_params({**old, **params}, hf.get('rope_theta', 10000.0))


def _rope_params(params: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from one transformers rope dict: rope_type (or type), rope_theta, factor, ..."""
    theta = float(params.get('rope_theta', default_theta))
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind in (None, 'default'):
        return theta, None
    if params.get('partial_rotary_factor', 1.0) != 1.0:
        raise ValueError('partial_rotary_factor != 1 is not supported.')
    if kind == 'linear':
        return theta, RopeScaling('linear', float(params['factor']))
    if kind == 'llama3':
        return theta, RopeScaling(
            'llama3',
            float(params['factor']),
            low_freq_factor=float(params['low_freq_factor']),
            high_freq_factor=float(params['high_freq_factor']),
            original_max_position_embeddings=int(params['original_max_position_embeddings']),
        )
    raise ValueError(f'Unsupported rope type {kind!r}; supported: default, {ROPE_KINDS}.')


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """f32[H // 2]: transformers' `_compute_{default,linear_scaling,llama3}_rope_parameters`, in float32."""
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
    inv_freq = (f32(1.0) / (f32(theta) ** exponents)).astype(f32)
    if scaling is None:
        return inv_freq
    factor = f32(scaling.factor)
    if scaling.kind == 'linear':
        return (inv_freq / factor).astype(f32)
    old_len = f32(scaling.original_max_position_embeddings)
    low, high = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(f32)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)
