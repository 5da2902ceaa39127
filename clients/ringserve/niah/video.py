"""The video haystack: one picture per second, with the needle frame at its depth's second.

Frames come from the user's video (decoded at 1 fps, looped when shorter than the duration,
scaled into a square with black bars) or from `frames.filler_frame`. Frame `needle_second` is
replaced by `frames.needle_frame`, and the whole is encoded as a 1 fps H.264 mp4: frame i is on
screen from i s to i + 1 s, so a server sampling at 1 fps sees exactly one picture per frame and
the needle at t = needle_second. Frames stream from the decoder (or Pillow) to the encoder one at
a time; a video of any length holds one frame in memory. The sound track is not kept: the needle
is visual, and sound would add the model's audio tokens to every second.
"""

from __future__ import annotations

import dataclasses
import os

from ringserve.niah import ffmpeg, frames

MIME_TYPE = "video/mp4"
SUFFIX = ".mp4"


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """One haystack video: what `build` writes, and what its cache file is keyed by."""

    duration_s: int  # frames, one a second
    needle_second: int  # the frame that is the needle, 0 <= needle_second < duration_s
    word: str  # the secret word the needle frame shows
    seed: int  # with `trial`, seeds the generated frames
    trial: int = 0
    frame_size: int = 256  # pixels on a side
    haystack: str | None = None  # the user's video; None: generated frames

    def __post_init__(self) -> None:
        if self.duration_s < 1:
            raise ValueError(f"a video haystack lasts at least 1 s, got {self.duration_s} s")
        if not 0 <= self.needle_second < self.duration_s:
            raise ValueError(f"needle_second must be in [0, {self.duration_s - 1}] for a "
                             f"{self.duration_s} s video, got {self.needle_second}")


def needle_second(duration_s: int, depth: float) -> int:
    """The second whose frame is the needle at `depth` percent: 0 at 0%, the last frame
    (duration_s - 1) at 100%, the nearest whole second between."""
    return round(depth / 100 * (duration_s - 1))


def build(spec: VideoSpec, path: str | os.PathLike) -> tuple[float, float]:
    """Writes `spec`'s haystack video to `path` (an mp4); returns when the needle frame starts
    and how long it lasts, in seconds."""
    needle = frames.needle_frame(spec.word, spec.frame_size)  # [S, S, 3]
    if spec.haystack is not None:
        source = ffmpeg.decode_frames(spec.haystack, size=spec.frame_size, count=spec.duration_s)
    else:
        source = (frames.filler_frame(spec.seed, spec.trial, second, spec.frame_size, spec.word)
                  for second in range(spec.duration_s))
    writer = ffmpeg.VideoWriter(path, spec.frame_size)
    try:
        for second, frame in enumerate(source):
            writer.write(needle if second == spec.needle_second else frame)
    except BaseException:
        writer.abort()
        close = getattr(source, "close", None)
        if close is not None:
            close()
        raise
    writer.close()
    return float(spec.needle_second), 1.0
