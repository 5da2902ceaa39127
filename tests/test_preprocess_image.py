"""preprocess/image.py on small images drawn here with Pillow: geometry, colour modes, bad input."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from preprocess import image
from preprocess.errors import MediaError, MediaTooLarge

RED, BLUE, BLACK, WHITE = (255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)
MIME_OF = {fmt: mime for mime, fmt in image.MIME_TYPES.items()}
LOSSY = {"JPEG"}


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    if fmt == "WEBP":
        kwargs.setdefault("lossless", True)
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    """RGB [height, width]: left half one colour, right half another."""
    im = Image.new("RGB", (width, height), right)
    ImageDraw.Draw(im).rectangle((0, 0, width // 2 - 1, height - 1), fill=left)
    return im


def pixels(arr: np.ndarray, spec: image.ImageSpec) -> np.ndarray:
    """Undo the normalisation: float32 [.., 3] -> 0..255."""
    return (arr * np.asarray(spec.std) + np.asarray(spec.mean)) * 255.0


@pytest.mark.parametrize("mime", list(image.MIME_TYPES))
def test_every_format_pads_to_a_letterbox(mime):
    fmt = image.MIME_TYPES[mime]
    im = halves(64, 32)
    if fmt == "GIF":  # a palette of exactly our colours, so GIF is lossless here
        im = im.quantize(colors=4)
    data = encode(im, fmt)
    assert image.probe_image(data, mime) == image.ImageInfo(fmt, 64, 32)

    spec = image.ImageSpec(size=32)
    arr = image.load_image(data, mime, spec)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.float32
    px = pixels(arr, spec)
    tol = 12 if fmt in LOSSY else 1
    # 64x32 scaled by 1/2 -> 32x16, centred: rows 8..23 hold the picture, rows 0..7 and 24..31 are bars.
    np.testing.assert_allclose(px[8:24, :12], np.broadcast_to(RED, (16, 12, 3)), atol=tol)
    np.testing.assert_allclose(px[8:24, 20:], np.broadcast_to(BLUE, (16, 12, 3)), atol=tol)
    np.testing.assert_allclose(px[:8], 0, atol=1e-4)
    np.testing.assert_allclose(px[24:], 0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_resize_mode_stretches_to_the_square(fmt):
    spec = image.ImageSpec(size=16, mode="resize")
    px = pixels(image.load_image(encode(halves(64, 32), fmt), MIME_OF[fmt], spec), spec)
    tol = 12 if fmt in LOSSY else 1
    np.testing.assert_allclose(px[:, :6], np.broadcast_to(RED, (16, 6, 3)), atol=tol)
    np.testing.assert_allclose(px[:, 10:], np.broadcast_to(BLUE, (16, 6, 3)), atol=tol)


def test_normalisation_formula_and_normalize_matches_load():
    spec = image.ImageSpec(size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), mode="resize")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    arr = image.load_image(encode(Image.fromarray(raw), "PNG"), "image/png", spec)
    expected = (raw / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
    np.testing.assert_allclose(arr, expected, atol=1e-5)  # same size: resize is the identity
    # Video frames: a batch [T, size, size, 3] through the same function.
    batch = np.stack([raw, 255 - raw])
    out = image.normalize(batch, spec)
    assert out.shape == batch.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[0], arr, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        image.normalize(batch.astype(np.float32), spec)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8, 8, 3\]"):
        image.normalize(np.zeros((4, 4, 3), np.uint8), spec)


def test_siglip_defaults_map_black_and_white_to_minus_one_and_one():
    spec = image.ImageSpec(size=4, mode="resize")
    assert image.load_image(encode(Image.new("RGB", (4, 4), WHITE), "PNG"), "image/png", spec).min() == 1.0
    assert image.load_image(encode(Image.new("RGB", (4, 4), BLACK), "PNG"), "image/png", spec).max() == -1.0


def test_exif_orientation_6_is_rotated_clockwise():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(halves(40, 20), "JPEG", exif=exif, quality=95)
    assert image.probe_image(data, "image/jpeg") == image.ImageInfo("JPEG", 20, 40)
    spec = image.ImageSpec(size=16, mode="resize")
    px = pixels(image.load_image(data, "image/jpeg", spec), spec)
    # Clockwise: the stored left (red) half becomes the top, the right (blue) half the bottom.
    np.testing.assert_allclose(px[:6], np.broadcast_to(RED, (6, 16, 3)), atol=12)
    np.testing.assert_allclose(px[10:], np.broadcast_to(BLUE, (6, 16, 3)), atol=12)


def test_alpha_is_composited_on_black():
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 128))  # half-transparent red
    ImageDraw.Draw(im).rectangle((4, 0, 7, 7), fill=(0, 0, 255, 0))  # fully transparent right half
    spec = image.ImageSpec(size=8, mode="resize")
    px = pixels(image.load_image(encode(im, "PNG"), "image/png", spec), spec)
    np.testing.assert_allclose(px[:, :4], np.broadcast_to((128, 0, 0), (8, 4, 3)), atol=1)
    np.testing.assert_allclose(px[:, 4:], 0, atol=1e-4)

    la = Image.new("LA", (8, 8), (200, 255))
    ImageDraw.Draw(la).rectangle((0, 0, 7, 3), fill=(200, 0))
    px = pixels(image.load_image(encode(la, "PNG"), "image/png", spec), spec)
    np.testing.assert_allclose(px[:4], 0, atol=1e-4)
    np.testing.assert_allclose(px[4:], 200, atol=1)


def test_palette_with_transparent_index():
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    ImageDraw.Draw(im).rectangle((0, 0, 3, 7), fill=0)
    data = encode(im, "GIF", transparency=0)  # index 0 (green) is transparent -> black
    spec = image.ImageSpec(size=8, mode="resize")
    px = pixels(image.load_image(data, "image/gif", spec), spec)
    np.testing.assert_allclose(px[:, :4], 0, atol=1e-4)
    np.testing.assert_allclose(px[:, 4:], np.broadcast_to(RED, (8, 4, 3)), atol=1)


def test_cmyk():
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    spec = image.ImageSpec(size=8, mode="resize")
    np.testing.assert_allclose(pixels(image.load_image(encode(im, "TIFF"), "image/tiff", spec), spec),
                               np.broadcast_to(RED, (8, 8, 3)), atol=1)
    np.testing.assert_allclose(pixels(image.load_image(encode(im, "JPEG"), "image/jpeg", spec), spec),
                               np.broadcast_to(RED, (8, 8, 3)), atol=12)


def test_16_bit_grey_is_scaled_not_clipped():
    grey = np.zeros((8, 8), np.uint16)
    grey[:, :4], grey[:, 4:] = 32768, 65535
    im = Image.fromarray(grey)
    assert im.mode == "I;16"
    spec = image.ImageSpec(size=8, mode="resize")
    for fmt in ("PNG", "TIFF"):
        px = pixels(image.load_image(encode(im, fmt), MIME_OF[fmt], spec), spec)
        np.testing.assert_allclose(px[:, :4], 128, atol=0.01)  # Pillow's convert would give 255
        np.testing.assert_allclose(px[:, 4:], 255, atol=0.01)


def test_one_bit_image():
    im = Image.new("1", (8, 8), 0)
    ImageDraw.Draw(im).rectangle((0, 0, 7, 3), fill=1)
    spec = image.ImageSpec(size=8, mode="resize")
    px = pixels(image.load_image(encode(im, "PNG"), "image/png", spec), spec)
    np.testing.assert_allclose(px[:4], 255, atol=1e-3)
    np.testing.assert_allclose(px[4:], 0, atol=1e-3)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c).quantize(colors=2) for c in (RED, BLUE, WHITE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    spec = image.ImageSpec(size=8)
    np.testing.assert_allclose(pixels(image.load_image(data, "image/gif", spec), spec),
                               np.broadcast_to(RED, (8, 8, 3)), atol=1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_an_error(fmt):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    assert len(data) > 2000  # noise compresses badly: the cut lands in the pixel data (headers < 1 KB)
    with pytest.raises(MediaError) as err:
        image.load_image(data[: len(data) // 2], MIME_OF[fmt], image.ImageSpec(size=16))
    assert not isinstance(err.value, MediaTooLarge)


def test_mime_mismatch_names_both_formats():
    data = encode(halves(8, 8), "PNG")
    with pytest.raises(MediaError, match=r"image/jpeg.*JPEG.*PNG"):
        image.probe_image(data, "image/jpeg")
    with pytest.raises(MediaError, match=r"JPEG.*PNG"):
        image.load_image(data, "image/jpeg", image.ImageSpec(size=8))


@pytest.mark.parametrize("data, mime, match", [
    (b"", "image/png", "empty"),
    (b"definitely not an image" * 10, "image/png", "not a readable PNG"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "not a readable PNG"),  # signature, no IHDR
    (b"<svg/>", "image/svg+xml", "unsupported image MIME type"),
])
def test_bad_input(data, mime, match):
    with pytest.raises(MediaError, match=match):
        image.probe_image(data, mime)
    with pytest.raises(MediaError, match=match):
        image.load_image(data, mime, image.ImageSpec(size=8))


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 1-bit PNG whose IHDR is patched to width x height, CRC recomputed (~70 bytes)."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_pixel_bomb_is_rejected_from_the_header():
    bomb = png_claiming(100_000, 100_000)  # 10^10 pixels: 30 GB as RGB
    assert len(bomb) < 100
    limit = Image.MAX_IMAGE_PIXELS
    for call in (lambda: image.probe_image(bomb, "image/png"),
                 lambda: image.load_image(bomb, "image/png", image.ImageSpec(size=8))):
        start = time.perf_counter()
        with pytest.raises(MediaTooLarge):
            call()
        assert time.perf_counter() - start < 0.5  # nothing was decoded or allocated
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global setting is untouched


def test_pixel_limit_is_ours_not_pillows():
    # 64M pixels: below Pillow's own threshold (~89M), above DEFAULT_MAX_PIXELS (50M).
    with pytest.raises(MediaTooLarge, match=r"8000x8000 = 64000000 pixels, over the limit of 50000000"):
        image.probe_image(png_claiming(8000, 8000), "image/png")
    assert image.probe_image(png_claiming(8000, 8000), "image/png", max_pixels=70_000_000) == \
        image.ImageInfo("PNG", 8000, 8000)
    small = encode(halves(64, 32), "PNG")
    with pytest.raises(MediaTooLarge, match="2048 pixels, over the limit of 2047"):
        image.load_image(small, "image/png", image.ImageSpec(size=8), max_pixels=2047)


def test_spec_validation():
    with pytest.raises(ValueError, match="mode"):
        image.ImageSpec(size=8, mode="crop")
    with pytest.raises(ValueError, match="size"):
        image.ImageSpec(size=0)


def test_large_jpeg_decoded_at_reduced_scale_keeps_geometry():
    # 800x400 for a 32 square: libjpeg decodes at 1/8 (100x50), then bicubic to 32x16.
    spec = image.ImageSpec(size=32)
    px = pixels(image.load_image(encode(halves(800, 400), "JPEG", quality=95), "image/jpeg", spec), spec)
    np.testing.assert_allclose(px[8:24, :12], np.broadcast_to(RED, (16, 12, 3)), atol=12)
    np.testing.assert_allclose(px[8:24, 20:], np.broadcast_to(BLUE, (16, 12, 3)), atol=12)
    np.testing.assert_allclose(px[:7], 0, atol=1e-4)


def test_multi_picture_jpeg_counts_as_jpeg():
    frames = [halves(16, 8), halves(16, 8, left=BLUE, right=RED)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"  # what Pillow calls most camera JPEGs
    assert image.probe_image(data, "image/jpeg") == image.ImageInfo("JPEG", 16, 8)
    spec = image.ImageSpec(size=16, mode="resize")
    px = pixels(image.load_image(data, "image/jpeg", spec), spec)
    np.testing.assert_allclose(px[:, :6], np.broadcast_to(RED, (16, 6, 3)), atol=20)
