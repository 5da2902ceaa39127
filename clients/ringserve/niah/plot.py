"""The heatmap PNG: context length (or media duration) across, depth down, mean score per cell,
colored red (0) to yellow (0.5) to green (1) as in gkamradt's plots, each cell labelled with its
score.

Drawn with Pillow, an optional extra (`pip install 'ringserve-client[niah]'`), imported only
here and only when a plot is asked for. The geometry is fixed (`Layout`), so a test can find a
cell's pixels.
"""

from __future__ import annotations

import dataclasses
import os

from ringserve.niah.results import Row, axis, format_depth, mean_scores

PILLOW_MISSING = ("the heatmap needs Pillow: pip install 'ringserve-client[niah]' "
                  "(or pip install pillow); results are plain JSON lines, so plot them later with "
                  "`ringserve niah --plot-only --out RESULTS.jsonl --heatmap PLOT.png`")

RED, YELLOW, GREEN = (0xF0, 0x49, 0x6E), (0xEB, 0xB8, 0x39), (0x0C, 0xD7, 0x9F)
EMPTY = (0xD9, 0xD9, 0xD9)  # a cell with no answers
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (255, 255, 255)


class PillowMissing(RuntimeError):
    def __init__(self) -> None:
        super().__init__(PILLOW_MISSING)


def available() -> bool:
    """Whether Pillow can be imported (checked before a run, so it fails before any work)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def color(score: float) -> tuple[int, int, int]:
    """The cell color of a score in [0, 1]: red, through yellow at 0.5, to green."""
    score = min(max(score, 0.0), 1.0)
    low, high, t = (RED, YELLOW, score * 2) if score <= 0.5 else (YELLOW, GREEN, score * 2 - 1)
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything goes, in pixels: margins around a grid of `columns` x `rows` cells."""

    columns: int  # context lengths or durations
    rows: int  # depths
    cell_width: int = 72
    cell_height: int = 34
    left: int = 64  # depth labels
    top: int = 44  # title, and the depth axis name
    bottom: int = 52  # length labels and axis name
    right: int = 76  # color bar and its labels

    @property
    def size(self) -> tuple[int, int]:
        return (self.left + self.columns * self.cell_width + self.right,
                self.top + self.rows * self.cell_height + self.bottom)

    def cell(self, column: int, row: int) -> tuple[int, int, int, int]:
        """The box (x0, y0, x1, y1) of a cell, x1 and y1 excluded."""
        x0 = self.left + column * self.cell_width
        y0 = self.top + row * self.cell_height
        return x0, y0, x0 + self.cell_width, y0 + self.cell_height


def heatmap(rows: list[Row], path: str | os.PathLike, title: str) -> Layout:
    """Writes the heatmap of `rows` (one task) to `path` as PNG; returns its layout."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise PillowMissing() from None
    means = mean_scores(rows)
    names = axis(rows)
    lengths = sorted({length for length, _ in means})
    depths = sorted({depth for _, depth in means})
    layout = Layout(len(lengths), len(depths))
    image = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()

    def text(x: float, y: float, label: str, fill=INK) -> None:
        """`label` centred on (x, y)."""
        x0, y0, x1, y1 = draw.textbbox((0, 0), label, font=font)
        draw.text((x - (x0 + x1) / 2, y - (y0 + y1) / 2), label, fill=fill, font=font)

    width, height = layout.size
    text(width / 2, 14, title)
    text(layout.left / 2, layout.top - 12, "depth %")
    for j, depth in enumerate(depths):
        _, y0, _, y1 = layout.cell(0, j)
        text(layout.left / 2, (y0 + y1) / 2, format_depth(depth))
        for i, length in enumerate(lengths):
            box = layout.cell(i, j)
            score = means.get((length, depth))
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1),
                           fill=EMPTY if score is None else color(score), outline=GRID)
            text((box[0] + box[2]) / 2, (box[1] + box[3]) / 2,
                 "-" if score is None else f"{score:.2f}")
    grid_bottom = layout.top + layout.rows * layout.cell_height
    for i, length in enumerate(lengths):
        x0, _, x1, _ = layout.cell(i, 0)
        text((x0 + x1) / 2, grid_bottom + 12, names.format(length))
    text(layout.left + layout.columns * layout.cell_width / 2, height - 14, names.name)
    _color_bar(draw, text, layout)
    image.save(path, format="PNG")
    return layout


def _color_bar(draw, text, layout: Layout) -> None:
    """A vertical gradient from 1 (top, green) to 0 (bottom, red), labelled at 0, 0.5 and 1."""
    x0 = layout.left + layout.columns * layout.cell_width + 16
    top, span = layout.top, max(layout.rows * layout.cell_height, 60)
    for y in range(span):
        draw.line((x0, top + y, x0 + 14, top + y), fill=color(1 - y / (span - 1)))
    for value in (1.0, 0.5, 0.0):
        text(x0 + 38, top + (1 - value) * (span - 1), f"{value:g}")
