"""The results file (JSON lines, one row per task, column, depth and trial) and its summary table.

A row's grid column is its prompt length in tokens (`length`, text tasks) or its media's duration
in seconds (`duration_s`, the video and audio tasks); `column` reads either. Rows are appended
and flushed one at a time, so a run that stops (Ctrl-C, a lost server) keeps every answer it got,
and the next run with the same file skips those cells.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterable

Row = dict
Key = tuple[str, int, float, int]  # task, column (tokens or seconds), depth (percent), trial


def column(row: Row) -> int:
    """The row's grid column: its media's duration in seconds, else its length in tokens."""
    return int(row["duration_s"] if "duration_s" in row else row["length"])


def key(row: Row) -> Key:
    return (row["task"], column(row), float(row["depth"]), int(row["trial"]))


def read_rows(path: str | os.PathLike) -> list[Row]:
    """The rows saved in `path` ([] when it does not exist). A line that does not parse (a run
    killed mid-write leaves a torn last line) is skipped with a warning."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                print(f"niah: {path}:{number}: not a JSON row, skipped", file=sys.stderr)
    return rows


def append_row(path: str | os.PathLike, row: Row) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        if f.tell() and not _ends_with_newline(path):
            f.write("\n")  # after a torn line, start clean
        f.write(json.dumps(row) + "\n")


def _ends_with_newline(path: pathlib.Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def format_length(tokens: int) -> str:
    """1024 -> "1k", 1048576 -> "1M", 1000 -> "1000": the way lengths are written on the CLI."""
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def format_duration(seconds: int) -> str:
    """3600 -> "1h", 90 -> "1m30s", 20 -> "20s": the way durations are written on the CLI."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return text or "0s"


def format_depth(depth: float) -> str:
    return f"{depth:g}"


@dataclasses.dataclass(frozen=True)
class Axis:
    """How the grid's columns are named: context lengths in tokens, or media durations."""

    name: str  # e.g. "context length (tokens)"
    short: str  # the same in the summary's heading
    format: Callable[[int], str]


LENGTHS = Axis("context length (tokens)", "context length", format_length)
DURATIONS = Axis("duration", "duration", format_duration)


def axis(rows: Iterable[Row]) -> Axis:
    """DURATIONS for media rows (they hold `duration_s`), LENGTHS for text rows."""
    return DURATIONS if any("duration_s" in row for row in rows) else LENGTHS


def mean_scores(rows: Iterable[Row]) -> dict[tuple[int, float], float]:
    """Mean score per (column, depth) cell, over trials."""
    cells: dict[tuple[int, float], list[float]] = {}
    for row in rows:
        cells.setdefault((column(row), float(row["depth"])), []).append(row["score"])
    return {cell: math.fsum(scores) / len(scores) for cell, scores in cells.items()}


def summary_table(rows: list[Row], title: str) -> str:
    """Mean score per cell: depths down, lengths (or durations) across, with each column's mean
    at the bottom and the overall mean last."""
    if not rows:
        return f"{title}: no results"
    means = mean_scores(rows)
    names = axis(rows)
    lengths = sorted({length for length, _ in means})
    depths = sorted({depth for _, depth in means})
    width = max(6, *(len(names.format(n)) + 1 for n in lengths))
    lines = [f"{title}: mean score (depth % down, {names.short} across)",
             "depth".rjust(7) + "".join(names.format(n).rjust(width) for n in lengths)]
    for depth in depths:
        cells = (means.get((n, depth)) for n in lengths)
        lines.append(format_depth(depth).rjust(7)
                     + "".join(("-" if m is None else f"{m:.2f}").rjust(width) for m in cells))
    column_means = []
    for n in lengths:
        scores = [r["score"] for r in rows if column(r) == n]
        column_means.append(math.fsum(scores) / len(scores))
    lines.append("mean".rjust(7) + "".join(f"{m:.2f}".rjust(width) for m in column_means))
    overall = math.fsum(r["score"] for r in rows) / len(rows)
    lines.append(f"overall {overall:.3f} over {len(rows)} answers")
    return "\n".join(lines)
