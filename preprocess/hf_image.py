"""The pixel steps shared by transformers' PIL-backend image processors, reproduced bit for bit.

    to_rgb             image_transforms.convert_to_rgb: any Pillow mode -> uint8 [H, W, 3]
    resize             image_transforms.resize: Pillow's resize of the 8-bit RGB picture
    rescale_normalize  rescale (x.astype(float64) * factor -> float32), then (x - mean) / std in
                       float32, channels moved first: the layout every processor here returns

These are the numerics of Gemma3ImageProcessorPil and Qwen2VLImageProcessorPil (transformers 5.x, and
the 4.x "slow" processors, which were the same PIL code). They are not those of the torchvision
("fast") backends, whose uint8 resize kernel rounds differently from Pillow's; see qwen2_vl_video.py.

Why not image.py: load_image composites transparency on black and letterboxes to a square for
the built-in encoder, and its normalize divides by 255 in float32; transformers composites on
white, keeps the aspect ratio its processor picks, and rescales in float64. Same idea, other bits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# transformers' `resample` ints are Pillow's Resampling values (PILImageResampling).
RESAMPLE_NAMES = {int(r): r.name.lower() for r in Image.Resampling}


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]; a Pillow image of any mode is converted as convert_to_rgb does.

    Transparency (an alpha band, or a palette / colour-key "transparency") is composited onto
    white; every other mode goes through Pillow's convert("RGB"). An array must already be RGB.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an image array must be uint8 [H, W, 3] RGB, got {image.dtype} "
                             f"{list(image.shape)}; pass a PIL image for other modes")
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3] with Pillow filter `resample` (a transformers int)."""
    if resample not in RESAMPLE_NAMES:
        raise ValueError(f"resample must be one of {RESAMPLE_NAMES} (Pillow's filters), got {resample!r}")
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def rescale_normalize(rgb: np.ndarray, *, rescale_factor: float | None,
                      mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]; None skips a step (do_rescale / do_normalize)."""
    if rescale_factor is not None:
        # float64 product, then float32: what image_transforms.rescale does (x / 255 in float32
        # differs from it in the last bit for some x).
        x = (rgb.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        x = rgb.astype(np.float32)
    if mean is not None:
        x -= np.asarray(mean, np.float32)
        x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
