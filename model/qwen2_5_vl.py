"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration) as a ringserve ModelConfig, and
its multimodal RoPE positions.

The checkpoint is a Qwen2 decoder (tensors under 'model.', or 'model.language_model.' in
transformers 5's module names; `lm_head` at the root unless tied) whose RoPE is M-RoPE
(ModelConfig.mrope_section), and a vision tower with its patch merger (tensors under 'visual.' or
'model.visual.'; model/qwen2_5_vl_vision.py). The decoder's settings sit at the top level of
config.json in the released checkpoints and under `text_config` as transformers 5 saves them.

Positions. Every prompt token gets three positions (temporal, height, width). Text tokens get the
same number on all three, one more than the previous token's largest. An image or video of
grid (t, h, w) patches becomes t * (h/m) * (w/m) placeholder tokens (m = merge_size), in the order
frame, merged row, merged column; the token at (i, r, c) gets (s + T_i, s + r, s + c), where s is
the position the next text token would have had and T_i = i for images, floor(i * seconds_per_grid
* tokens_per_second) for videos. After the media, text resumes at one more than the largest
position used so far. Generated tokens continue from the prompt: the token at sequence index j
gets j + delta on all three rows, delta = (largest prompt position + 1) - prompt length.

That is the rule of Qwen's own code, of transformers up to 5.2 and of vLLM. transformers 5.3 to at
least 5.25 resumes text after a medium at s + max(h/m, w/m) instead: the same whenever a video's
last temporal position s + T_{t-1} stays below that, which holds for every image and for videos
shorter than max(h/m, w/m) / tokens_per_second seconds; longer videos differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from model import checkpoint
from model.config import LayerKind, ModelConfig
from model.qwen2_5_vl_vision import Qwen25VLVisionConfig, tower_sources

MODEL_TYPE = 'qwen2_5_vl'
# Qwen2_5_VLTextConfig's defaults (transformers 5.25): a config may write only what differs from them.
TEXT_DEFAULTS = dict(
    vocab_size=152_064, hidden_size=8192, intermediate_size=29_568, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, hidden_act='silu', max_position_embeddings=32_768, rms_norm_eps=1e-5,
    use_sliding_window=False, sliding_window=4096, max_window_layers=80, bos_token_id=151_643,
    eos_token_id=151_645,
)
TEXT_KEYS = (*TEXT_DEFAULTS, 'layer_types', 'rope_parameters', 'rope_scaling', 'rope_theta', 'tie_word_embeddings')
DEFAULT_ROPE_THETA = 1_000_000.0
DEFAULT_MROPE_SECTION = (16, 24, 24)
# Placeholder ids of Qwen2_5_VLConfig's defaults (those of the released checkpoints).
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151_655, 151_656
# Where the vision tower's tensors sit: as the released checkpoints and transformers' save have them,
# or under transformers 5's module names.
_VISUAL_PREFIXES = ('visual.', 'model.visual.')


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's settings (top level or `text_config`) over Qwen2_5_VLTextConfig's defaults."""
    nested = hf.get('text_config')
    own = nested if nested is not None else {k: hf[k] for k in TEXT_KEYS if k in hf}
    text = {**TEXT_DEFAULTS, **own}
    # The head is tied when either level says so (transformers 5 forwards text_config's flag up).
    text['tie_word_embeddings'] = bool(hf.get('tie_word_embeddings') or own.get('tie_word_embeddings'))
    return text


def model_config(hf: dict[str, Any], *, dtype: str = 'float32') -> ModelConfig:
    """ModelConfig of a Qwen2.5-VL config.json: a qwen2 decoder (head_dim = hidden_size / heads,
    as transformers computes it whatever head_dim says) with mrope_section and qwen_vision set,
    and sliding-window layers where the config enables them."""
    text = text_config(hf)
    rope = dict(text.get('rope_parameters') or text.get('rope_scaling') or {})
    kind = rope.get('rope_type', rope.get('type', 'default'))
    if kind not in ('default', 'mrope'):
        raise ValueError(f'Qwen2.5-VL rope type {kind!r} is not supported (only M-RoPE without scaling).')
    theta = float(rope.get('rope_theta', text.get('rope_theta', DEFAULT_ROPE_THETA)))
    qwen2 = {key: text[key] for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                                        'num_attention_heads', 'num_key_value_heads', 'hidden_act',
                                        'max_position_embeddings', 'rms_norm_eps', 'tie_word_embeddings',
                                        'bos_token_id', 'eos_token_id')}
    qwen2.update(model_type='qwen2', rope_theta=theta, _name_or_path=hf.get('_name_or_path') or MODEL_TYPE)
    config = ModelConfig.from_hf_config(qwen2, dtype=dtype)
    return config.replace(
        mrope_section=tuple(rope.get('mrope_section') or DEFAULT_MROPE_SECTION),
        layer_kinds=_layer_kinds(text),
        qwen_vision=Qwen25VLVisionConfig.from_hf(hf.get('vision_config') or {}),
    )


def _layer_kinds(text: dict[str, Any]) -> tuple[LayerKind, ...] | None:
    """Sliding-window layers as transformers builds them: layer_types if given, else layers from
    max_window_layers on when use_sliding_window. None when every layer is global."""
    n = text['num_hidden_layers']
    window = text['sliding_window'] if text['use_sliding_window'] else None
    types = text.get('layer_types') or ['sliding_attention' if window is not None and i >= text['max_window_layers']
                                        else 'full_attention' for i in range(n)]
    if len(types) != n or set(types) - {'full_attention', 'sliding_attention'}:
        raise ValueError(f'layer_types={types!r}: give full_attention or sliding_attention per layer, {n} in all.')
    if 'sliding_attention' not in types:
        return None
    if not (isinstance(window, int) and window > 0):
        raise ValueError(f'sliding_window={text["sliding_window"]!r} with use_sliding_window='
                         f'{text["use_sliding_window"]!r}: sliding_attention layers need a positive window.')
    return tuple(LayerKind(window=window) if t == 'sliding_attention' else LayerKind() for t in types)


def image_token_id(hf: dict[str, Any]) -> int:
    """The <|image_pad|> placeholder id."""
    return int(hf.get('image_token_id', IMAGE_TOKEN_ID))


def video_token_id(hf: dict[str, Any]) -> int:
    """The <|video_pad|> placeholder id."""
    return int(hf.get('video_token_id', VIDEO_TOKEN_ID))


def vision_sources(config: ModelConfig, names) -> checkpoint.Sources:
    """ringserve 'qwen_vision.*' name -> the tower's tensors among `names` and conversion."""
    root = next((p for p in _VISUAL_PREFIXES if f'{p}patch_embed.proj.weight' in names), _VISUAL_PREFIXES[0])
    return {f'qwen_vision.{name}': source for name, source in tower_sources(config.qwen_vision, root).items()}


# ------------------------------------------------------------------------------------------------
# M-RoPE positions (host side).
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MediaSpan:
    """One image or video in a prompt: its placeholder tokens are the `tokens(merge_size)`
    consecutive tokens from index `start`."""

    start: int  # sequence index of the first placeholder token
    grid_thw: tuple[int, int, int]  # the processor's grid in patches (temporal, height, width), before merging
    # Videos: seconds between consecutive temporal patches (transformers' second_per_grid_ts, i.e.
    # temporal_patch_size / fps). None: an image, whose temporal positions step by 1.
    seconds_per_grid: float | None = None

    def tokens(self, merge_size: int) -> int:
        t, h, w = self.grid_thw
        return t * (h // merge_size) * (w // merge_size)


def mrope_positions(length: int, media: Sequence[MediaSpan], cfg: ModelConfig) -> tuple[np.ndarray, int]:
    """(i32[3, length] positions of a prompt of `length` tokens holding `media` (in prompt order),
    delta): the rule in this module's docstring. A token generated at sequence index j >= length
    has position j + delta on all three rows. Only the spans matter, not the token ids, so the
    server can pass its placeholder runs directly."""
    if cfg.qwen_vision is None or cfg.mrope_section is None:
        raise ValueError(f'model {cfg.name!r} is not a Qwen2.5-VL model (qwen_vision and mrope_section unset).')
    merge, per_second = cfg.qwen_vision.merge_size, cfg.qwen_vision.tokens_per_second
    out = np.empty((3, length), np.int64)
    index = next_pos = 0  # next sequence index to fill; position of the next text token
    for span in media:
        t, h, w = (int(v) for v in span.grid_thw)
        n = span.tokens(merge)
        if span.start < index or span.start + n > length or min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f'media span {span} (of {n} tokens) must follow the previous one, fit in {length} tokens, '
                             f'and have a grid of positive sizes with h and w multiples of merge_size={merge}.')
        text = span.start - index
        out[:, index:span.start] = next_pos + np.arange(text)
        next_pos += text
        if span.seconds_per_grid is None:
            temporal = np.arange(t)
        else:  # float32 as transformers computes it, then truncated
            step = np.float32(per_second) * np.float32(span.seconds_per_grid)
            temporal = (np.arange(t, dtype=np.float32) * step).astype(np.int64)
        grid = np.meshgrid(temporal, np.arange(h // merge), np.arange(w // merge), indexing='ij')
        block = np.stack([g.reshape(-1) for g in grid]) + next_pos  # [3, n]
        out[:, span.start:span.start + n] = block
        next_pos = int(block.max()) + 1
        index = span.start + n
    out[:, index:] = next_pos + np.arange(length - index)
    next_pos += length - index
    return out.astype(np.int32), next_pos - length


def placeholder_spans(token_ids: Sequence[int], image_grids: Sequence[tuple[int, int, int]],
                      video_grids: Sequence[tuple[int, int, int]], seconds_per_grid: Sequence[float],
                      cfg: ModelConfig, image_id: int, video_id: int) -> list[MediaSpan]:
    """MediaSpans of a processor-style prompt: images and videos in order of appearance, each a
    run of its placeholder id as long as its grid says (grids and seconds in the order the
    processor lists them, as transformers' image_grid_thw, video_grid_thw, second_per_grid_ts)."""
    ids = np.asarray(token_ids)
    merge = cfg.qwen_vision.merge_size
    images, videos, seconds = iter(image_grids), iter(video_grids), iter(seconds_per_grid)
    spans, i = [], 0
    while i < len(ids):
        if ids[i] not in (image_id, video_id):
            i += 1
            continue
        video = ids[i] == video_id
        try:
            span = MediaSpan(i, tuple(next(videos if video else images)), float(next(seconds)) if video else None)
        except StopIteration:
            raise ValueError(f'the prompt has more {"videos" if video else "images"} than grids (or seconds) '
                             'were given.') from None
        n = span.tokens(merge)
        if not np.all(ids[i:i + n] == ids[i]) or i + n > len(ids):
            raise ValueError(f'placeholder run at {i} is shorter than its grid {span.grid_thw} ({n} tokens).')
        spans.append(span)
        i += n
    return spans
