"""Qwen2-VL / Qwen2.5-VL image preprocessing, equal to transformers' Qwen2VLImageProcessor (PIL backend).

One image -> pixel_values float32 [gh * gw, 3 * temporal_patch_size * patch_size**2] and
grid_thw (1, gh, gw):
1. smart_resize picks (H, W), both multiples of factor = patch_size * merge_size, with
   min_pixels <= H * W <= max_pixels and the aspect ratio kept as far as those allow;
2. bicubic resize to it, x / 255, (x - CLIP mean) / CLIP std;
3. the frame is repeated temporal_patch_size times (the vision tower's patches are 3-D) and cut into
   patches, rows ordered so that each merge_size x merge_size block of neighbouring patches is
   consecutive (the merger folds each block into one token): num_tokens = gh * gw / merge_size**2.

patchify and the config are shared with qwen2_vl_video.py, which cuts real temporal patches.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from PIL import Image

from preprocess import hf_config, hf_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)   # OPENAI_CLIP_STD
_MAX_ASPECT = 200  # smart_resize refuses anything more elongated
# What a null means, as transformers runs it (see hf_config): null min/max_pixels leave size alone;
# do_convert_rgb as in gemma3_image.py (null turns conversion off there, and non-RGB input fails).
NULLS = {"resample": int(Image.Resampling.BILINEAR), "do_convert_rgb": True,
         "min_pixels": hf_config.DEFAULT, "max_pixels": hf_config.DEFAULT}


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageConfig:
    """Pixel settings from preprocessor_config.json; defaults are Qwen2VLImageProcessor's.

    min_pixels / max_pixels are JSON's top-level keys of those names or, in newer files,
    size {"shortest_edge", "longest_edge"} (the names are historical: both count pixels).
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True

    def __post_init__(self):
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1:
            raise ValueError(f"patch_size, temporal_patch_size and merge_size must be >= 1, got {self}")
        if not 1 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {self.min_pixels} and "
                             f"{self.max_pixels}")
        if self.max_pixels < self.factor ** 2:
            raise ValueError(f"max_pixels={self.max_pixels} is under one merged patch "
                             f"({self.factor}^2 = {self.factor ** 2} pixels)")
        if self.resample not in hf_image.RESAMPLE_NAMES:
            raise ValueError(f"resample must be one of {hf_image.RESAMPLE_NAMES}, got {self.resample}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ValueError(f"need 3 means and 3 nonzero stds, got {self.image_mean} / {self.image_std}")
        if not self.do_resize:
            # The patch grid needs sides that are multiples of factor; only smart_resize makes them.
            raise ValueError("do_resize=false is not supported: the patch grid needs smart_resize's sizes")
        if not self.do_convert_rgb:
            raise ValueError("do_convert_rgb=false is not supported: the vision tower takes 3-channel RGB")

    @property
    def factor(self) -> int:
        """Side of one merged patch in pixels: patch_size * merge_size (28)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, raw: dict, *, extra: tuple[str, ...] = (),
                  default_pixels: tuple[int, int] | None = None) -> Qwen2VLImageConfig:
        """From a transformers processor dict. `extra` keys are tolerated (the video config's own);
        `default_pixels` replaces the (min, max) used when the dict names neither (videos differ)."""
        kwargs = hf_config.settings(cls, raw, extra=("size", *extra), nulls=NULLS)
        # transformers: `size` if given (else the class default), then top-level min/max_pixels win.
        lo, hi = default_pixels or (cls.min_pixels, cls.max_pixels)
        size = raw.get("size")
        if size is not None:
            if not set(size) <= {"shortest_edge", "longest_edge"}:
                raise ValueError(f"Qwen2-VL size must hold shortest_edge and longest_edge (pixel counts), "
                                 f"got {size}")
            lo, hi = size.get("shortest_edge"), size.get("longest_edge")
        kwargs.setdefault("min_pixels", lo)
        kwargs.setdefault("max_pixels", hi)
        if kwargs["min_pixels"] is None or kwargs["max_pixels"] is None:
            raise ValueError(f"Qwen2-VL size needs both shortest_edge and longest_edge, got {size}")
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Qwen2VLImageConfig:
        return cls.from_dict(hf_config.read_config(path, ("image_processor",), (hf_config.IMAGE_FILE,)))


@dataclasses.dataclass(frozen=True)
class Qwen2VLPatches:
    """What the vision tower takes for one image or video, and how many LLM tokens it becomes."""

    pixel_values: np.ndarray        # float32 [gt * gh * gw, 3 * temporal_patch_size * patch_size**2]
    grid_thw: tuple[int, int, int]  # (gt, gh, gw): image_grid_thw / video_grid_thw
    merge_size: int
    second_per_grid_ts: float | None = None  # videos only: temporal_patch_size / fps of the frames

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens in the prompt: gt * gh * gw / merge_size**2."""
        gt, gh, gw = self.grid_thw
        return gt * gh * gw // self.merge_size ** 2


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """(H, W) multiples of factor, min_pixels <= H * W <= max_pixels, aspect kept: transformers' rule.

    Python's round (half to even) on purpose: it is what the reference uses.
    """
    if max(height, width) / min(height, width) > _MAX_ASPECT:
        raise ValueError(f"image is {width}x{height}; Qwen2-VL takes aspect ratios up to {_MAX_ASPECT}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(height: int, width: int, cfg: Qwen2VLImageConfig) -> tuple[int, int, int]:
    """grid_thw of an image of this size, without decoding it (for counting tokens up front)."""
    h, w = smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels,
                        max_pixels=cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def patchify(frames: np.ndarray, cfg: Qwen2VLImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [T, 3, H, W] (T a multiple of temporal_patch_size) -> ([gt*gh*gw, 3*tp*p*p], (gt, gh, gw)).

    Row order: temporal patch, then merge block (row-major over the grid of blocks), then the
    patch inside its block (row-major); columns: channel, frame in the temporal patch, pixel row, pixel
    column. The same order as the reference's view + permute.
    """
    t, c, h, w = frames.shape
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if t % tp or h % (p * m) or w % (p * m):
        raise ValueError(f"patchify needs T % {tp} == 0 and H, W multiples of {p * m}, "
                         f"got {list(frames.shape)}")
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, c, tp, p, p]
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def resize_normalize(rgb: np.ndarray, height: int, width: int, cfg: Qwen2VLImageConfig) -> np.ndarray:
    """uint8 [H0, W0, 3] -> float32 [3, height, width]: resize, rescale and normalise as configured."""
    resized = hf_image.resize(rgb, height, width, cfg.resample)
    return hf_image.rescale_normalize(
        resized, rescale_factor=cfg.rescale_factor if cfg.do_rescale else None,
        mean=cfg.image_mean if cfg.do_normalize else None, std=cfg.image_std)


def preprocess(image: Image.Image | np.ndarray, cfg: Qwen2VLImageConfig) -> Qwen2VLPatches:
    """A Pillow image (any mode) or uint8 [H, W, 3] -> the patches of one image, grid_thw (1, gh, gw)."""
    rgb = hf_image.to_rgb(image)
    height, width = smart_resize(rgb.shape[0], rgb.shape[1], factor=cfg.factor,
                                 min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    frame = resize_normalize(rgb, height, width, cfg)  # [3, H, W]
    frames = np.broadcast_to(frame, (cfg.temporal_patch_size, *frame.shape))  # a still: same frame
    pixel_values, grid = patchify(frames, cfg)
    return Qwen2VLPatches(pixel_values=pixel_values, grid_thw=grid, merge_size=cfg.merge_size)
