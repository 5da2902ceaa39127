"""Gemma 3's image preprocessing, equal to transformers' Gemma3ImageProcessor (PIL backend).

One image -> pixel_values float32 [3, height, width] (896 x 896 for the released checkpoints):
convert to RGB (transparency on white), stretch to the square with the configured Pillow filter
(bilinear in the released configs), x / 255, (x - 0.5) / 0.5. The vision tower then always makes
mm_tokens_per_image (256) tokens of it; that count lives in the model's config.json, not here.

Pan-and-scan (extra crops of very wide or tall images) is not implemented: a config that turns it
on is refused when loaded, so such a checkpoint fails at start-up instead of seeing fewer crops.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from preprocess import hf_config, hf_image

_HALF = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN and _STD, Gemma3ImageProcessor's defaults
# What a null means, as transformers runs it (see hf_config). do_convert_rgb is the exception: the
# released Gemma 3 config has it null, which in transformers turns conversion off, so any image that
# is not already RGB (L, RGBA, P, ...) makes the reference fail ("mean must have 1 elements"). We
# convert as do_convert_rgb=true does; that changes only inputs the reference refuses.
_NULLS = {"resample": int(Image.Resampling.BILINEAR), "do_convert_rgb": True}
# Pan-and-scan's settings: inert while do_pan_and_scan, refused below, is off.
_PAN_AND_SCAN_KEYS = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                      "pan_and_scan_min_ratio_to_activate")


@dataclasses.dataclass(frozen=True)
class Gemma3ImageConfig:
    """The preprocessor_config.json fields that change pixels; defaults are the class's (224, not 896)."""

    size: tuple[int, int] = (224, 224)   # (height, width); JSON {"height": .., "width": ..}
    resample: int = int(Image.Resampling.BILINEAR)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _HALF
    image_std: tuple[float, float, float] = _HALF
    do_convert_rgb: bool = True

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"Gemma3ImageConfig.size must be (height, width) >= 1, got {self.size}")
        if self.resample not in hf_image.RESAMPLE_NAMES:
            raise ValueError(f"Gemma3ImageConfig.resample must be one of {hf_image.RESAMPLE_NAMES}, "
                             f"got {self.resample}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ValueError(f"Gemma3ImageConfig needs 3 means and 3 nonzero stds, got "
                             f"{self.image_mean} / {self.image_std}")
        if not self.do_convert_rgb:
            raise ValueError("Gemma3ImageConfig.do_convert_rgb=false is not supported: the encoder takes "
                             "3-channel RGB, so images are always converted")

    @classmethod
    def from_dict(cls, raw: dict) -> Gemma3ImageConfig:
        """From a transformers Gemma3ImageProcessor dict; pan-and-scan must be off."""
        kwargs = hf_config.settings(cls, raw, extra=_PAN_AND_SCAN_KEYS, nulls=_NULLS,  # null size raises
                                    unsupported=("do_pan_and_scan",))
        if "size" in kwargs:
            size = kwargs["size"]
            if not isinstance(size, dict) or set(size) != {"height", "width"}:
                raise ValueError(f"Gemma3ImageConfig.size must be {{'height': H, 'width': W}}, got {size}")
            kwargs["size"] = (int(size["height"]), int(size["width"]))
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Gemma3ImageConfig:
        return cls.from_dict(hf_config.read_config(path, ("image_processor",), (hf_config.IMAGE_FILE,)))


def preprocess(image: Image.Image | np.ndarray, cfg: Gemma3ImageConfig) -> np.ndarray:
    """A Pillow image (any mode) or uint8 [H, W, 3] -> pixel_values float32 [3, height, width]."""
    rgb = hf_image.to_rgb(image)
    if cfg.do_resize:
        rgb = hf_image.resize(rgb, *cfg.size, cfg.resample)
    return hf_image.rescale_normalize(
        rgb, rescale_factor=cfg.rescale_factor if cfg.do_rescale else None,
        mean=cfg.image_mean if cfg.do_normalize else None, std=cfg.image_std)
