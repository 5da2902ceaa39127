"""Qwen2-VL / Qwen2.5-VL video preprocessing: transformers' Qwen2VLVideoProcessor with Pillow resizing.

Frames uint8 [T, H, W, 3] -> pixel_values_videos float32 [gt * gh * gw, 3 * tp * p * p],
video_grid_thw (gt, gh, gw) and second_per_grid_ts (Qwen2.5-VL's time per temporal patch):
1. one (H', W') for all frames from smart_resize, with the video defaults (128 to 768 merged
   patches per frame) and, if cap_pixels_per_frame, the reference's share of a whole-video budget;
2. each frame resized, rescaled and normalised as an image is (qwen2_vl_image.resize_normalize);
3. T padded to a multiple of temporal_patch_size by repeating the last frame, then cut into
   patches of temporal_patch_size consecutive frames (qwen2_vl_image.patchify).

sample_indices is the processor's frame choice when do_sample_frames is on (which frames of a
decoded video, given its frame rate); sampled_fps then gives the rate that second_per_grid_ts uses.

Resizing is Pillow's, as in transformers' image processor and its 4.x video path, not torch's.
transformers 5.x has only a torchvision video processor, and no Pillow code equals its resize:
measured against torchvision 0.28 on CPU (uint8 bicubic, antialias), frames that shrink or grow
on both sides differ by 1-2 levels of 255 in under 1% of values; frames whose height shrinks
while their width grows (640x480 -> 644x476 with the video defaults) differ by up to ~25 levels
in ~30% of values on noise-like content (~2 levels, ~5% on smooth content), a quirk of torch's
uint8 kernel. torch's float kernel (the path off the CPU) differs from both by as much, so there is
no single torchvision result to match. Frames already at smart_resize's size are resampled by
neither and match to 2.4e-7. Grids, token counts and the patch layout match exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from preprocess import hf_config
from preprocess.qwen2_vl_image import (Qwen2VLImageConfig, Qwen2VLPatches, patchify, resize_normalize,
                                       smart_resize)

# Qwen2VLVideoProcessor's own pixel defaults (per frame), used when the config names none.
VIDEO_PIXELS = (128 * 28 * 28, 768 * 28 * 28)
_DEFAULT_FPS = 24.0  # what transformers' VideoMetadata.sampled_fps assumes with no frame rate


@dataclasses.dataclass(frozen=True)
class Qwen2VLVideoConfig:
    """video_preprocessor_config.json (else preprocessor_config.json): pixel settings plus frame rules."""

    pixels: Qwen2VLImageConfig = Qwen2VLImageConfig(min_pixels=VIDEO_PIXELS[0], max_pixels=VIDEO_PIXELS[1])
    min_frames: int = 4
    max_frames: int = 768
    fps: float | None = None          # sampling rate for do_sample_frames (frames per second)
    num_frames: int | None = None     # or a fixed frame count; not both
    do_sample_frames: bool = False
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128_000   # the context the whole-video pixel cap assumes

    def __post_init__(self):
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("Qwen2VLVideoConfig: fps and num_frames are mutually exclusive; set one to null")
        if (self.fps is not None and self.fps <= 0) or (self.num_frames is not None and self.num_frames < 1):
            raise ValueError(f"fps must be > 0 and num_frames >= 1, got {self.fps} and {self.num_frames}")

    @classmethod
    def from_dict(cls, raw: dict) -> Qwen2VLVideoConfig:
        frame_keys = tuple(f.name for f in dataclasses.fields(cls) if f.name != "pixels")
        pixels = Qwen2VLImageConfig.from_dict(raw, extra=frame_keys, default_pixels=VIDEO_PIXELS)
        pixel_keys = tuple(f.name for f in dataclasses.fields(Qwen2VLImageConfig))
        # Null frame settings keep their defaults: the reference reads them only while sampling.
        nulls = dict.fromkeys(("fps", "num_frames", "min_frames", "max_frames", "max_video_tokens"),
                              hf_config.DEFAULT)
        kwargs = hf_config.settings(cls, raw, extra=(*pixel_keys, "size"), nulls=nulls)
        return cls(pixels=pixels, **kwargs)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Qwen2VLVideoConfig:
        return cls.from_dict(hf_config.read_config(
            path, ("video_processor",), (hf_config.VIDEO_FILE, hf_config.IMAGE_FILE)))


def sample_indices(total_num_frames: int, video_fps: float | None, cfg: Qwen2VLVideoConfig, *,
                   fps: float | None = None, num_frames: int | None = None) -> np.ndarray:
    """int64 [n]: which of a decoded video's frames the processor keeps (Qwen2VLVideoProcessor.sample_frames).

    fps / num_frames default to the config's (num_frames first). With fps, n = total / video_fps *
    fps clamped to [min_frames, min(max_frames, total)], all floored to a multiple of
    temporal_patch_size; with num_frames, n = round(num_frames / tp) * tp. Positions are then
    evenly spaced from frame 0; like the reference's arange, there can be n + 1 of them when
    total / (total / n) rounds above n.
    """
    if fps is not None and num_frames is not None:
        raise ValueError("fps and num_frames are mutually exclusive")
    # As the reference: each falls back to the config on its own, and num_frames wins.
    num_frames = cfg.num_frames if num_frames is None else num_frames
    fps = cfg.fps if fps is None else fps
    tp = cfg.pixels.temporal_patch_size
    if num_frames is not None:
        n = round(num_frames / tp) * tp
    elif fps is not None:
        if not video_fps:
            raise ValueError("sampling at an fps needs the video's own frame rate")
        most = math.floor(min(cfg.max_frames, total_num_frames) / tp) * tp
        n = min(max(total_num_frames / video_fps * fps, cfg.min_frames), most, total_num_frames)
        n = math.floor(n / tp) * tp
    else:
        return np.arange(total_num_frames, dtype=np.int64)
    if not 0 < n <= total_num_frames:
        raise ValueError(f"cannot sample {n} frames from a video of {total_num_frames} "
                         f"(temporal_patch_size {tp}, min_frames {cfg.min_frames}); lower fps / num_frames")
    # The reference builds torch.arange(0, total, total / n) in float32 and truncates: the positions
    # are computed in float64 and rounded to float32 before truncating, or e.g. 9.999999999999998
    # would become frame 9 where the reference (10.0 in float32) takes frame 10.
    step = total_num_frames / n
    count = math.ceil(total_num_frames / step)
    return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def sampled_fps(num_sampled: int, total_num_frames: int, video_fps: float) -> float:
    """Frame rate of the kept frames (VideoMetadata.sampled_fps): num_sampled / total * video_fps."""
    return num_sampled / total_num_frames * video_fps


def frame_size(num_frames: int, height: int, width: int, cfg: Qwen2VLVideoConfig) -> tuple[int, int]:
    """(H, W) every frame is resized to; num_frames counts the frames given (before padding)."""
    px = cfg.pixels
    max_pixels = px.max_pixels
    if cfg.cap_pixels_per_frame:
        # The reference's whole-video budget: 90% of max_video_tokens merged patches, shared evenly
        # per temporal patch, but never under 1.05 x min_pixels.
        total_pixels = int(cfg.max_video_tokens * px.factor * px.factor * 0.9)
        max_pixels = max(min(max_pixels, total_pixels * px.temporal_patch_size // num_frames),
                         int(px.min_pixels * 1.05))
    return smart_resize(height, width, factor=px.factor, min_pixels=px.min_pixels, max_pixels=max_pixels)


def video_grid(num_frames: int, height: int, width: int, cfg: Qwen2VLVideoConfig) -> tuple[int, int, int]:
    """video_grid_thw for num_frames frames of this size, without decoding (to count tokens up front)."""
    h, w = frame_size(num_frames, height, width, cfg)
    tp, p = cfg.pixels.temporal_patch_size, cfg.pixels.patch_size
    return -(-num_frames // tp), h // p, w // p


def preprocess(frames: np.ndarray, cfg: Qwen2VLVideoConfig, *, fps: float | None) -> Qwen2VLPatches:
    """uint8 [T, H, W, 3] RGB frames, shown at `fps` per second -> the video's patches.

    second_per_grid_ts = temporal_patch_size / fps; fps=None takes transformers' fallback of 24.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T >= 1, H, W, 3] RGB, got {frames.dtype} "
                         f"{list(frames.shape)}")
    px = cfg.pixels
    t = len(frames)
    height, width = frame_size(t, frames.shape[1], frames.shape[2], cfg)
    out = np.empty((t + -t % px.temporal_patch_size, 3, height, width), np.float32)  # [T', 3, H, W]
    for i, frame in enumerate(frames):
        out[i] = resize_normalize(frame, height, width, px)
    out[t:] = out[t - 1]  # the reference pads with copies of the last frame
    pixel_values, grid = patchify(out, px)
    return Qwen2VLPatches(pixel_values=pixel_values, grid_thw=grid, merge_size=px.merge_size,
                          second_per_grid_ts=px.temporal_patch_size / (fps or _DEFAULT_FPS))
