"""Pictures for the video haystack, drawn with Pillow: the needle frame and generated filler.

The needle frame is black text on white, "The secret word is:" over the word, each line as large
as fits: the default model's vision encoder sees frames scaled down to 64 x 64, where only big
letters survive. A filler frame is a seeded picture of its own (a two-colour gradient, coloured
shapes and a few distractor words, never the needle's word), drawn from the seed, the trial and
its second alone: the same second of two haystacks with one seed shows the same picture.
"""

from __future__ import annotations

import functools
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ringserve.niah.tasks import _NOUNS, _rng

CAPTION = ("The secret", "word is:")
MARGIN = 0.05  # of the frame's side, kept clear around the text
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only a fixed 11-pixel bitmap font
        raise RuntimeError("the video haystack draws scalable text, which needs Pillow >= 10.1: "
                           "pip install -U pillow") from None


def _fitting_font(draw: ImageDraw.ImageDraw, lines: tuple[str, ...], width: float,
                  height: float) -> ImageFont.ImageFont:
    """The largest font in which every line is at most `width` wide and all of them together at
    most `height` tall."""
    best = _font(4)
    lo, hi = 4, max(5, int(height))
    while lo <= hi:  # widths and heights grow with the font size: bisect it
        mid = (lo + hi) // 2
        font = _font(mid)
        boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
        if (max(b[2] - b[0] for b in boxes) <= width
                and sum(b[3] - b[1] for b in boxes) * 1.15 <= height):
            best, lo = font, mid + 1
        else:
            hi = mid - 1
    return best


def _centred(draw: ImageDraw.ImageDraw, text: str, font, cx: float, cy: float, fill) -> None:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    draw.text((cx - (x0 + x1) / 2, cy - (y0 + y1) / 2), text, font=font, fill=fill)


def needle_frame(word: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: "The secret word is:" in the upper 45% and `word` below, in black
    on white, each as large as fits the frame's width."""
    if not word.strip():
        raise ValueError("the needle word is empty; pass a word such as --needle-word lantern")
    image = Image.new("RGB", (size, size), WHITE)
    draw = ImageDraw.Draw(image)
    inner = size * (1 - 2 * MARGIN)
    top = size * MARGIN
    caption = _fitting_font(draw, CAPTION, inner, inner * 0.45)
    line = inner * 0.45 / len(CAPTION)
    for i, text in enumerate(CAPTION):
        _centred(draw, text, caption, size / 2, top + line * (i + 0.5), BLACK)
    answer = _fitting_font(draw, (word,), inner, inner * 0.5)
    _centred(draw, word, answer, size / 2, top + inner * 0.75, BLACK)
    return np.asarray(image)


def _color(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def filler_frame(seed: int, trial: int, second: int, size: int, avoid: str = "") -> np.ndarray:
    """uint8 [size, size, 3]: the generated haystack's picture for `second`.

    A gradient between two random colours in a random direction, 3 to 7 filled shapes and 1 or 2
    words from the key list (not `avoid`, the needle's word) in random colours and sizes.
    """
    return filler_frame_and_words(seed, trial, second, size, avoid)[0]


def filler_frame_and_words(seed: int, trial: int, second: int, size: int,
                           avoid: str = "") -> tuple[np.ndarray, tuple[str, ...]]:
    """`filler_frame` and the distractor words it shows (training keeps them off needle words)."""
    rng = _rng(seed, "video-frame", trial, second)
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)  # [size]
    ramp = np.cos(angle) * axis[None, :] + np.sin(angle) * axis[:, None] + 0.5  # [size, size]
    start, end = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
    pixels = start + np.clip(ramp, 0, 1)[..., None] * (end - start)  # [size, size, 3]
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.uniform(-0.2, 0.9) * size, rng.uniform(-0.2, 0.9) * size
        w, h = rng.uniform(0.1, 0.5) * size, rng.uniform(0.1, 0.5) * size
        box = (x0, y0, x0 + w, y0 + h)
        shape = rng.choice(("ellipse", "rectangle", "triangle"))
        if shape == "ellipse":
            draw.ellipse(box, fill=_color(rng))
        elif shape == "rectangle":
            draw.rectangle(box, fill=_color(rng))
        else:
            draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=_color(rng))
    words = [w for w in _NOUNS if w != avoid.strip().lower()]
    shown = []
    for _ in range(rng.randint(1, 2)):
        font = _font(max(6, round(size * rng.uniform(0.08, 0.2))))
        xy = (rng.uniform(0, 0.6) * size, rng.uniform(0, 0.85) * size)
        shown.append(rng.choice(words))
        draw.text(xy, shown[-1], font=font, fill=_color(rng))
    return np.asarray(image), tuple(shown)
