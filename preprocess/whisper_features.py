"""Whisper log-mel input features, as transformers' WhisperFeatureExtractor makes them for Qwen2-Audio.

One clip -> input_features float32 [feature_size, nb_max_frames] (128 x 3000 for Qwen2-Audio) and
valid_frames, the count of ones in its attention mask:
1. Audio at another rate is resampled to 16 kHz with librosa.resample's default, soxr "HQ", and
   fixed to ceil(n * 16000 / rate) samples, as librosa does. Qwen2-Audio's processor takes only
   16 kHz and its model card resamples with librosa, so that is the reference; audio.stream_samples
   (the server's decoder) runs the same soxr HQ filter and yields the same samples, one fewer at
   the end for some lengths (librosa pads that one with a zero).
2. The samples, as float32, are padded with padding_value to n_samples (30 s), and audio.log_mel
   makes the features: periodic Hann, n_fft 400, hop 160, |STFT|^2, Slaney mel 0-8 kHz, log10
   clamped at 1e-10, last frame dropped, floor at max - 8, then (x + 4) / 4.
3. valid_frames = ceil(n / hop): the frames whose first sample is audio (mask[::hop] of the samples).

Float precision: log_mel works in float64 and equals the reference's numpy path to 1 float32 ulp.
When torch is installed the reference computes the STFT in float32 instead (_torch_extract_fbank_features),
which moves its own output by up to ~3e-5 from its numpy path; we stay with the exact values.

Longer than chunk_length seconds: the reference silently keeps the first 30 s (truncation=True).
Here `extract` refuses it unless truncate=True asks for the reference's behaviour; `extract_windows`
(an extension: transformers has no such path) cuts the 16 kHz samples into chunk_length pieces and
extracts each as its own clip, so every window is exactly what the reference makes of that piece.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from preprocess import hf_config
from preprocess.audio import SAMPLE_RATE, MelSpec, log_mel
from preprocess.errors import MediaError, MediaTooLarge

RESAMPLER = "soxr_hq"  # librosa.resample's default res_type since librosa 0.10


@dataclasses.dataclass(frozen=True)
class WhisperFeatureConfig:
    """preprocessor_config.json of a Whisper-style audio encoder; defaults are the extractor's (80 bins)."""

    feature_size: int = 80      # mel bins (Qwen2-Audio and Whisper large-v3: 128)
    sampling_rate: int = SAMPLE_RATE
    hop_length: int = 160
    chunk_length: int = 30      # seconds every clip is padded to
    n_fft: int = 400
    padding_value: float = 0.0
    dither: float = 0.0
    return_attention_mask: bool = False  # the processor's default; valid_frames is always returned here

    def __post_init__(self):
        if self.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"WhisperFeatureConfig.sampling_rate must be {SAMPLE_RATE} (the mel filters "
                             f"span 0-8 kHz of 16 kHz audio), got {self.sampling_rate}")
        if min(self.feature_size, self.hop_length, self.chunk_length, self.n_fft) < 1:
            raise ValueError(f"WhisperFeatureConfig sizes must be >= 1, got {self}")
        if self.dither != 0.0:
            raise ValueError(f"WhisperFeatureConfig.dither={self.dither} adds random noise, which no two "
                             f"runs share; set it to 0.0")

    @property
    def n_samples(self) -> int:
        """Samples every clip is padded to: chunk_length * sampling_rate (480000)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Feature frames per clip: n_samples // hop_length (3000)."""
        return self.n_samples // self.hop_length

    @property
    def mel_spec(self) -> MelSpec:
        return MelSpec(n_mels=self.feature_size, n_fft=self.n_fft, hop=self.hop_length)

    @classmethod
    def from_dict(cls, raw: dict) -> WhisperFeatureConfig:
        cfg = cls(**hf_config.settings(cls, raw, extra=("n_samples", "nb_max_frames", "padding_side")))
        # Derived values saved beside their inputs: they must agree, or the file was edited by hand.
        for key in ("n_samples", "nb_max_frames"):
            if raw.get(key) is not None and raw[key] != getattr(cfg, key):
                raise ValueError(f"WhisperFeatureConfig: {key}={raw[key]} disagrees with chunk_length, "
                                 f"sampling_rate and hop_length (which give {getattr(cfg, key)})")
        if raw.get("padding_side", "right") != "right":
            raise ValueError(f"WhisperFeatureConfig: padding_side={raw['padding_side']!r}; "
                             f"only 'right' is supported")
        return cfg

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> WhisperFeatureConfig:
        return cls.from_dict(hf_config.read_config(path, ("feature_extractor", "audio_processor"),
                                                   (hf_config.IMAGE_FILE,)))


@dataclasses.dataclass(frozen=True)
class WhisperFeatures:
    """One clip's encoder input."""

    input_features: np.ndarray  # float32 [feature_size, nb_max_frames]
    valid_frames: int           # frames holding audio; the rest is padding

    @property
    def attention_mask(self) -> np.ndarray:
        """int32 [nb_max_frames]: 1 for the first valid_frames frames (feature_attention_mask)."""
        mask = np.zeros(self.input_features.shape[1], np.int32)
        mask[:self.valid_frames] = 1
        return mask


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono samples at `rate` -> at `target`, with librosa.resample's default resampler (soxr HQ)."""
    if rate == target:
        return samples
    import librosa  # slow to import; only resampling pays for it

    return librosa.resample(samples, orig_sr=rate, target_sr=target, res_type=RESAMPLER)


def extract(samples: np.ndarray, sampling_rate: int, cfg: WhisperFeatureConfig, *,
            truncate: bool = False) -> WhisperFeatures:
    """Mono float samples [n] at any rate -> features, as the reference given librosa-resampled audio.

    More than chunk_length seconds raises MediaTooLarge unless truncate=True (then only the first
    chunk_length seconds are used, as the reference does).
    """
    samples = np.asarray(samples)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"extract takes mono float samples [n], got {samples.dtype} {list(samples.shape)}")
    if samples.size == 0:
        raise MediaError("no audio samples")
    audio = resample(samples, sampling_rate, cfg.sampling_rate).astype(np.float32)  # the reference's dtype
    if audio.size > cfg.n_samples and not truncate:
        raise MediaTooLarge(f"audio is {audio.size / cfg.sampling_rate:.2f} s long; this encoder takes at "
                            f"most {cfg.chunk_length} s per clip (the reference would drop the rest): "
                            f"send shorter clips")
    n = min(audio.size, cfg.n_samples)
    padded = np.full(cfg.n_samples, cfg.padding_value, np.float32)
    padded[:n] = audio[:n]
    features = log_mel(padded, cfg.mel_spec)  # [feature_size, nb_max_frames]
    return WhisperFeatures(input_features=features, valid_frames=math.ceil(n / cfg.hop_length))


def extract_windows(samples: np.ndarray, sampling_rate: int, cfg: WhisperFeatureConfig) -> list[WhisperFeatures]:
    """Mono float samples [n] of any length -> one WhisperFeatures per chunk_length seconds (the last
    one partial), each `extract` of its piece of the 16 kHz samples. Resampling runs once, over the
    whole clip, before the cut."""
    samples = np.asarray(samples)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"extract_windows takes mono float samples [n], got {samples.dtype} {list(samples.shape)}")
    if samples.size == 0:
        raise MediaError("no audio samples")
    audio = resample(samples, sampling_rate, cfg.sampling_rate).astype(np.float32)
    return [extract(audio[start:start + cfg.n_samples], cfg.sampling_rate, cfg)
            for start in range(0, audio.size, cfg.n_samples)]


def qwen2_audio_tokens(valid_frames: int) -> int:
    """Audio placeholder tokens Qwen2-Audio's processor puts in the prompt for this many valid frames.

    The encoder's stride-2 conv halves the frames ((L - 1) // 2 + 1), then its stride-2 pooling
    halves them again; the processor writes the same arithmetic.
    """
    return (((valid_frames - 1) // 2 + 1) - 2) // 2 + 1
