"""Image bytes -> a normalised float32 [size, size, 3] array for the vision encoder.

Two steps with different costs: `probe_image` reads only the header (format, size, EXIF
orientation), so a request can be rejected or budgeted before any pixel is decoded; `load_image`
decodes fully and strictly (a truncated file is an error, never a half-grey picture).
`decode_image` stops before colour conversion and resizing, for processors with their own rules
(the Hugging Face ones in hf_image.py composite transparency on white, not black).

Only the six formats in MIME_TYPES are ever parsed: Pillow is asked to identify the bytes among
those alone, so no other plugin (EPS, PSD, ...) runs on untrusted input. The pixel limit is checked
by us from the header, so Pillow's global MAX_IMAGE_PIXELS is left alone for other code. Pillow's
own bomb check still runs inside Image.open; its DecompressionBombError (above 2 x
MAX_IMAGE_PIXELS, about 179M pixels) becomes MediaTooLarge. Its DecompressionBombWarning fires only
above MAX_IMAGE_PIXELS (about 89M), which DEFAULT_MAX_PIXELS already rejects.

Colour: every mode ends as 8-bit RGB. Transparent pixels are composited on black, the same black
as the letterbox bars. 16-bit grey (I;16, I) is scaled from its 0..65535 range (Pillow's own
conversion would clip everything above 255 to white).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from preprocess.errors import MediaError, MediaTooLarge

MIME_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF",
              "image/bmp": "BMP", "image/tiff": "TIFF"}   # MIME -> Pillow format name
DEFAULT_MAX_PIXELS = 50_000_000

# Pillow reports a JPEG with a multi-picture extension (most camera photos) as "MPO".
_ALIASES = {"MPO": "JPEG"}
# The Pillow formats we let identify the bytes; nothing else is tried (MPO comes through JPEG's opener).
_FORMATS = tuple(MIME_TYPES.values())
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What the vision encoder takes: a square side, per-channel mean/std, how to reach the square."""

    size: int            # square side the encoder takes (e.g. 64 or 224)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)   # SigLIP normalisation
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    mode: str = "pad"    # "pad": keep aspect, letterbox with black; "resize": stretch (SigLIP's processor)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"ImageSpec.size must be >= 1, got {self.size}")
        if self.mode not in ("pad", "resize"):
            raise ValueError(f"ImageSpec.mode must be 'pad' or 'resize', got {self.mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError(f"ImageSpec mean/std need 3 values each and a nonzero std, "
                             f"got mean={self.mean} std={self.std}")


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """Header facts: format (a MIME_TYPES value), width and height as displayed (EXIF orientation applied)."""

    format: str
    width: int
    height: int


def probe_image(data: bytes, mime_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format and displayed size from the header alone; MediaError / MediaTooLarge as `_open` says."""
    im, fmt = _open(data, mime_type, max_pixels)
    with im:
        width, height = im.size
        try:
            orientation = im.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block: load_image will fail or ignore it the same way
            orientation = 1
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return ImageInfo(format=fmt, width=width, height=height)


def load_image(data: bytes, mime_type: str, spec: ImageSpec, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, orient, convert to RGB, pad or stretch to the square, normalise: float32 [size, size, 3]."""
    rgb = _decode(data, mime_type, max_pixels, draft=(spec.size, spec.size), convert=_to_rgb)
    square = _fit(rgb, spec)
    return normalize(np.asarray(square, dtype=np.uint8), spec)  # [size, size, 3]


def decode_image(data: bytes, mime_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully and strictly at full resolution, EXIF orientation applied; the mode is left as
    decoded (RGBA, P, L, I;16, ...), for processors with their own colour rules (hf_image.to_rgb)."""
    return _decode(data, mime_type, max_pixels, draft=None, convert=lambda im: im)


def _decode(data: bytes, mime_type: str, max_pixels: int, *, draft: tuple[int, int] | None,
            convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """_open, load, exif_transpose, convert(image); every Pillow failure becomes MediaError."""
    im, fmt = _open(data, mime_type, max_pixels)
    with im:
        if fmt == "JPEG" and draft is not None:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= draft on both sides
            # (what Image.thumbnail does): a 24 MP photo for a 224 encoder decodes in a fraction.
            im.draft(im.mode, draft)
        try:
            im.load()  # ImageFile.LOAD_TRUNCATED_IMAGES stays False: truncation raises here
            # Pillow's plugins raise many types (OSError, SyntaxError, ValueError, struct.error, ...)
            # on corrupt data; every one of them means the same thing to the user.
            # exif_transpose returns a new image (a copy when upright), so it outlives the file.
            return convert(ImageOps.exif_transpose(im))
        except Image.DecompressionBombError as e:  # a GIF frame or TIFF tile larger than the header
            raise MediaTooLarge(f"image too large: {e} (limit {max_pixels} pixels)") from e
        except Exception as e:
            raise MediaError(f"corrupt or truncated {fmt} image: {e}") from e


def normalize(frames_uint8: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 [..., size, size, 3] -> float32 of the same shape, (x / 255 - mean) / std."""
    if frames_uint8.dtype != np.uint8 or frames_uint8.shape[-3:] != (spec.size, spec.size, 3):
        raise ValueError(f"normalize takes uint8 [..., {spec.size}, {spec.size}, 3], "
                         f"got {frames_uint8.dtype} {list(frames_uint8.shape)}")
    out = frames_uint8.astype(np.float32)
    np.divide(out, 255.0, out=out)  # in place: video batches are large
    out -= np.asarray(spec.mean, np.float32)
    out /= np.asarray(spec.std, np.float32)
    return out


def _open(data: bytes, mime_type: str, max_pixels: int) -> tuple[Image.Image, str]:
    """Pillow's lazy open (header only) after checking MIME, format and pixel count."""
    expected = MIME_TYPES.get(mime_type.split(";")[0].strip().lower())
    if expected is None:
        raise MediaError(f"unsupported image MIME type {mime_type!r}; "
                         f"supported: {', '.join(MIME_TYPES)}")
    if not data:
        raise MediaError(f"empty image data (MIME type {mime_type})")
    try:
        im = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        raise MediaTooLarge(f"image too large: {e} (limit {max_pixels} pixels)") from e
    except Image.UnidentifiedImageError as e:  # its message names only the BytesIO object
        raise MediaError(f"not a readable {expected} image (MIME type {mime_type}): the bytes are "
                         f"not {'/'.join(_FORMATS)} or the header is corrupt") from e
    except Exception as e:  # a header that breaks one plugin's parser
        raise MediaError(f"not a readable {expected} image (MIME type {mime_type}): {e}") from e
    fmt = _ALIASES.get(im.format, im.format)
    if fmt != expected:
        im.close()
        raise MediaError(f"MIME type {mime_type} says {expected} but the data is a {fmt} image")
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise MediaTooLarge(f"image is {width}x{height} = {width * height} pixels, "
                            f"over the limit of {max_pixels} pixels")
    return im, fmt


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha composited on black."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.clip(np.asarray(im).astype(np.int64), 0, 65535)  # [H, W]
        im = Image.fromarray(((grey + 128) // 257).astype(np.uint8), "L")  # 65535 -> 255
    if not im.has_transparency_data:  # alpha modes, or a transparent palette/colour key
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    black = Image.new("RGB", rgba.size, (0, 0, 0))
    black.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return black


def _fit(im: Image.Image, spec: ImageSpec) -> Image.Image:
    """RGB [H, W] -> RGB [size, size]: stretched, or scaled to fit and centred on black."""
    size = spec.size
    if spec.mode == "resize":
        return im.resize((size, size), Image.Resampling.BICUBIC)
    width, height = im.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    # Resize, then pad: the same picture as padding first, without allocating a max(W, H)^2
    # canvas at full resolution (only the pixels at the image/bar edge can differ).
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(im.resize((new_w, new_h), Image.Resampling.BICUBIC),
                 ((size - new_w) // 2, (size - new_h) // 2))
    return canvas
