"""The model's image and audio encoders, compiled for a few batch sizes, on one local device.

The serving engine shards the decoder over the mesh; the encoders are small and run where the
media are decoded (process 0), so they get their own copy of just their weights on one device,
and their outputs travel to the engine as host arrays (rows of the prompt's embeddings).
Batches are padded up to a bucket so a new batch size never compiles again after warm-up.
Qwen2.5-VL's tower takes one image of any size: its patches are padded to a size bucket
(model/qwen2_5_vl_vision.py's patch_bucket), each compiled when first needed.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import qwen2_5_vl_vision

IMAGE_BATCHES = (1, 4, 16)
AUDIO_BATCHES = (1, 4)


class MediaEncoder:
    """`images(f32[B, S, S, 3]) -> f32[B, tokens_per_image, D]` and
    `audio(f32[B, n_mels, frames], valid_frames) -> f32[B, rows_per_window, D]`, thread-safe.
    valid_frames (i32[B], for audio configs with mask_padding, Qwen2-Audio's): the frames of each
    window holding audio; the encoder masks the rest, and rows past audio.valid_rows(valid_frames)
    are not audio."""

    def __init__(self, config, model, device: jax.Device | None = None):
        self.config = config
        self.width = config.d_model
        device = device or jax.local_devices()[0]
        self._lock = threading.Lock()  # one encoder call at a time: they share the device
        self._traces = 0
        self._vision = self._audio = self._qwen_vision = None
        if config.vision is not None:
            self.image_size = config.vision.image_size
            self.tokens_per_image = config.vision.tokens_per_image
            self._vision = self._compile(model.vision, device)
        if config.audio is not None:
            self.n_mels, self.window_frames = config.audio.n_mels, config.audio.window_frames
            self.context_frames = config.audio.context_frames
            self.rows_per_window = config.audio.rows_per_window
            self.mask_padding = config.audio.mask_padding
            self.valid_rows = config.audio.valid_rows  # rows of a window from its audio frames
            self._audio = self._compile(model.audio, device)
        if getattr(config, "qwen_vision", None) is not None:
            self.qwen_vision = config.qwen_vision
            self._qwen_vision = self._compile(model.qwen_vision, device)

    @property
    def compile_count(self) -> int:
        return self._traces

    def _compile(self, module, device):
        graphdef, state = nnx.split(module)
        state = jax.device_put(state, device)

        def run(state, *inputs):
            self._traces += 1
            out = nnx.merge(graphdef, state)(*inputs)
            return out.astype(jnp.float32)

        step = jax.jit(run)
        return lambda *inputs: step(state, *(jax.device_put(x, device) for x in inputs))

    @staticmethod
    def _batched(fn, x: np.ndarray, buckets: tuple[int, ...], frames: np.ndarray | None = None,
                 pad_frames: int = 0) -> np.ndarray:
        """fn over x in bucket-sized batches (zero padding); `frames` (i32[B]), when given, is
        passed beside x, padded with `pad_frames`."""
        out = []
        for i in range(0, len(x), buckets[-1]):
            part = x[i:i + buckets[-1]]
            size = next(b for b in buckets if b >= len(part))
            padded = np.zeros((size, *part.shape[1:]), np.float32)
            padded[:len(part)] = part
            inputs = [padded]
            if frames is not None:
                inputs.append(np.full(size, pad_frames, np.int32))
                inputs[1][:len(part)] = frames[i:i + len(part)]
            out.append(np.asarray(fn(*inputs))[:len(part)])
        return np.concatenate(out)

    def images(self, pixels: np.ndarray) -> np.ndarray:
        if self._vision is None:
            raise ValueError(f"{self.config.name} has no image encoder")
        with self._lock:
            return self._batched(self._vision, pixels, IMAGE_BATCHES)

    def qwen_image(self, pixel_values: np.ndarray, grid_thw: tuple[int, int, int]) -> np.ndarray:
        """Qwen2.5-VL: one image's (or video's) processor patches f32[P, C*T*p*p] and grid ->
        f32[M, D], one row per placeholder token."""
        if self._qwen_vision is None:
            raise ValueError(f"{self.config.name} has no Qwen2.5-VL vision tower")
        cfg = self.qwen_vision
        layout = qwen2_5_vl_vision.vision_layout([grid_thw], cfg)
        if len(pixel_values) != layout.num_patches:
            raise ValueError(f"{len(pixel_values)} patches for grid {tuple(grid_thw)}: expected "
                             f"{layout.num_patches}")
        size = qwen2_5_vl_vision.patch_bucket(layout.num_patches, cfg.merge_size)
        patches = np.zeros((size, pixel_values.shape[1]), np.float32)
        patches[:len(pixel_values)] = pixel_values
        with self._lock:
            out = self._qwen_vision(patches, qwen2_5_vl_vision.padded_layout(layout, size, cfg.merge_size))
            return np.asarray(out)[:layout.num_tokens]

    def audio(self, mel: np.ndarray, valid_frames: np.ndarray | None = None) -> np.ndarray:
        if self._audio is None:
            raise ValueError(f"{self.config.name} has no audio encoder")
        frames = None
        if self.mask_padding:  # None: every frame of every window is audio
            frames = np.full(len(mel), self.window_frames, np.int32) if valid_frames is None else (
                np.asarray(valid_frames, np.int32))
        elif valid_frames is not None:
            raise ValueError(f"{self.config.name}'s audio encoder masks no padding: it takes no valid_frames")
        with self._lock:
            return self._batched(self._audio, mel, AUDIO_BATCHES, frames, self.window_frames)

    def warmup(self) -> None:
        """Compiles every batch bucket of both encoders."""
        if self._vision is not None:
            side = self.image_size
            for b in IMAGE_BATCHES:
                self.images(np.zeros((b, side, side, 3), np.float32))
        if self._audio is not None:
            for b in AUDIO_BATCHES:
                self.audio(np.zeros((b, self.n_mels, self.window_frames), np.float32))
