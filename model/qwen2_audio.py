"""Qwen2-Audio (transformers' Qwen2AudioForConditionalGeneration) as a ringserve ModelConfig.

The checkpoint is a Qwen2 decoder (`text_config`, tensors under `language_model.`), a Whisper
encoder whose avg_pooler (kernel 2, stride 2) sits between its last block and its final LayerNorm
(`audio_config`, tensors under `audio_tower.`), and one Linear with a bias into the decoder width
(`multi_modal_projector.linear`). In AudioConfig terms: pool_site='tower', tokens_per_second=25
(50 encoder positions/s pooled by 2), projector='linear_bias', mask_padding=True, windows of
max_source_positions * 2 mel frames (3000: 30 s).

Padding: the processor pads every clip to 30 s; transformers 5.25 masks the encoder's keys past
(valid_frames - 1) // 2 + 1 (an attention mask built from feature_attention_mask) and keeps only
the first ((valid_frames - 1) // 2 + 1 - 2) // 2 + 1 output rows, which is also how many
<|AUDIO|> tokens the processor writes between <|audio_bos|> and <|audio_eos|>
(AudioConfig.valid_rows, preprocess.whisper_features.qwen2_audio_tokens).

The weights are read by model.checkpoint (its `_qwen2_audio_sources`).
"""

from __future__ import annotations

from typing import Any

from model.config import AUDIO_CONV_STRIDE, MEL_FRAMES_PER_SECOND, AudioConfig

MODEL_TYPE = 'qwen2_audio'
# Qwen2Config's defaults (transformers 5.25): a text_config may write only what differs from them.
QWEN2_TEXT_DEFAULTS = dict(
    model_type='qwen2', vocab_size=151_936, hidden_size=4096, intermediate_size=22_016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act='silu', max_position_embeddings=32_768,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10_000.0,
)
# Qwen2AudioConfig's audio_config defaults (those of Qwen2-Audio-7B's encoder).
ENCODER_DEFAULTS = dict(
    num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
    max_source_positions=1500, activation_function='gelu', scale_embedding=False,
)
AUDIO_POOL = 2  # Qwen2AudioEncoder.avg_pooler: AvgPool1d(2, stride=2)


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's settings as a plain `qwen2` config dict: text_config over Qwen2Config's
    defaults, with the wrapper's token ids where it gives them and its name. The head is never tied:
    Qwen2AudioForConditionalGeneration declares no tied weights, so transformers 5.25 stores and uses
    its own lm_head whatever tie_word_embeddings says."""
    text = {**QWEN2_TEXT_DEFAULTS, **(hf.get('text_config') or {}), 'model_type': 'qwen2'}
    text['tie_word_embeddings'] = False
    for key in ('bos_token_id', 'eos_token_id'):
        if hf.get(key) is not None:
            text[key] = hf[key]
    text['_name_or_path'] = hf.get('_name_or_path') or MODEL_TYPE
    return text


def audio_config(hf: dict[str, Any]) -> AudioConfig:
    """AudioConfig of the checkpoint's audio tower and projector. Refuses encoder settings that
    transformers would run differently from ringserve's Whisper tower."""
    enc = {**ENCODER_DEFAULTS, **(hf.get('audio_config') or {})}
    if enc['activation_function'] != 'gelu':
        raise ValueError(f'Qwen2-Audio audio_config.activation_function={enc["activation_function"]!r}: only '
                         "'gelu' (exact, erf) is supported.")
    if enc['scale_embedding']:
        raise ValueError('Qwen2-Audio audio_config.scale_embedding=true is not supported (the tower scales nothing).')
    positions = enc['max_source_positions']
    return AudioConfig(
        n_mels=enc['num_mel_bins'],
        window_frames=positions * AUDIO_CONV_STRIDE,  # transformers refuses features of any other length
        width=enc['d_model'],
        n_layers=enc['encoder_layers'],
        n_heads=enc['encoder_attention_heads'],
        mlp_dim=enc['encoder_ffn_dim'],
        norm_eps=1e-5,  # torch.nn.LayerNorm's default, which every LayerNorm of the tower uses
        tokens_per_second=MEL_FRAMES_PER_SECOND // AUDIO_CONV_STRIDE // AUDIO_POOL,
        pool_site='tower',
        projector='linear_bias',
        mask_padding=True,
    )


def audio_token_id(hf: dict[str, Any]) -> int:
    """The <|AUDIO|> placeholder id (audio_token_index; 151646 in Qwen2-Audio-7B)."""
    return int(hf.get('audio_token_index', hf.get('audio_token_id', 151_646)))
