"""Video files -> stream facts, sampled RGB frames and 16 kHz mono sound, through ffmpeg pipes.

probe_video() reads what `ffmpeg -i` prints (there is no ffprobe). sample_times() says which
frames a request gets before anything is decoded, so the server can count tokens up front; frames()
then yields exactly those frames, chunk by chunk, from one ffmpeg process, and sound() the sound
track. Nothing decoded is written to disk or held whole in memory: a one-hour video at 1 fps is at
most `chunk` frames (or one `block_seconds` block of sound) in this process at any time.

Frame i is the frame on screen at t_i = start + i / fps, as a player paused there shows it. ffmpeg
gets there with four choices, each checked by the tests against identifiable frames:
- `-noaccurate_seek -ss start` before `-i`: seek to the keyframe at or before `start` and pass every
  decoded frame on, those before `start` with negative timestamps. (Accurate seek would drop the
  frame that is still on screen at `start` because it began earlier.)
- `fps=F:start_time=0:round=up`: output slot i takes the last frame whose timestamp rounded *up*
  to the 1/F grid is <= i, that is the last frame with pts <= i / F, the one on screen at t_i;
  round=down would take the last frame before t_(i+1) instead. start_time=0 fills slot 0 when
  the first frame comes after `start`.
- `tpad=stop=-1:stop_mode=clone` before it: the last frame repeats past the end of the stream, so
  a slot after the last frame began (t = 6.0 s in a 6.01 s file of 10 fps) still gets that frame.
- `-frames:v n` with n = len(sample_times(...)): ffmpeg stops once the last needed frame is out.
  If it stops sooner (no frame rate for tpad), frames() repeats the last frame it got.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
import re
from collections.abc import Callable, Iterator

import ffmpeg as ffmpeg_python
import numpy as np

from preprocess import ffmpeg
from preprocess.errors import MediaError, MediaTooLarge

MIME_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/x-msvideo",
              "video/mpeg", "video/ogg")
DEFAULT_MAX_SECONDS = 4 * 3600
MAX_FPS = 24.0
SAMPLE_RATE = 16000

# ffmpeg demuxers that may carry each MIME type. One demuxer reads mp4 and QuickTime, one reads
# Matroska and WebM, so those pairs cannot be told apart and either name is accepted for both.
_DEMUXERS = {
    "video/mp4": ("mov", "mp4"),
    "video/quicktime": ("mov", "mp4"),
    "video/webm": ("matroska", "webm"),
    "video/x-matroska": ("matroska", "webm"),
    "video/x-msvideo": ("avi",),
    "video/mpeg": ("mpeg", "mpegts", "mpegvideo"),
    "video/ogg": ("ogg",),
}
# The only demuxers ffmpeg may open (-format_whitelist): playlists such as HLS or concat would make
# ffmpeg read other files or URLs named inside an upload. The audio ones are there so that a sound
# file sent as video is told "has no video stream" rather than "unsupported container".
_OPENABLE = sorted({d for names in _DEMUXERS.values() for d in names}
                   | {"wav", "mp3", "aac", "flac"})
_INPUT_OPTIONS = {"format_whitelist": ",".join(_OPENABLE), "protocol_whitelist": "file"}

_INPUT = re.compile(r"^Input #0, (.+?), from ", re.M)
_DURATION = re.compile(r"^\s*Duration: (?:N/A|(\d+):(\d\d):(\d\d(?:\.\d+)?))", re.M)
_STREAM = re.compile(r"^\s*Stream #0:\d+\S*: (Video|Audio): (\w+)(.*)$")
_SIZE = re.compile(r"\b([1-9]\d*)x([1-9]\d*)\b")
_RATE = re.compile(r"\b(\d+(?:\.\d+)?)(k?) (fps|tbr)\b")
_ROTATION = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees", re.I)
_OUT_TIME = re.compile(r"^out_time_us=(\d+)$", re.M)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What probe_video() found. width x height is the picture as displayed (after rotation)."""

    duration_s: float
    width: int
    height: int
    fps: float  # average frame rate as ffmpeg reports it (informational; sampling uses timestamps)
    video_codec: str
    has_audio: bool
    audio_codec: str | None
    container: str  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "matroska,webm"


def probe_video(path: str | os.PathLike, mime_type: str, *,
                max_seconds: float = DEFAULT_MAX_SECONDS, timeout: float = 30.0) -> VideoInfo:
    """Streams and duration of a video file, checked against its MIME type and `max_seconds`.

    Runs `ffmpeg -i path` with no output (it exits 1 by design) and parses the stream summary it
    prints. When the container states no duration (Duration: N/A, e.g. a live-recorded WebM),
    the duration is found by copying the streams to ffmpeg's null muxer, which reads every packet
    without decoding, and taking the end time it reports.
    """
    mime = mime_type.split(";")[0].strip().lower()
    if mime not in _DEMUXERS:
        raise MediaError(f"unsupported video MIME type {mime_type!r}; expected one of "
                         f"{', '.join(MIME_TYPES)}")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError(f"cannot read the video file: {e.strerror}") from None
    if size == 0:
        raise MediaError("empty file (0 bytes) where a video was expected")

    options = [a for k, v in _INPUT_OPTIONS.items() for a in (f"-{k}", v)]
    args = [ffmpeg.binary(), "-hide_banner", "-nostdin", *options, "-i", ffmpeg.input_url(path)]
    with ffmpeg.Process(args, timeout=timeout, stderr_tail=1 << 20, path=path) as proc:
        proc.wait()  # exit status 1 is expected: there is no output file
        text = proc.stderr

    container = _INPUT.search(text)
    if container is None and "not on whitelist" in text:
        raise MediaError(f"not a supported video container; expected one of "
                         f"{', '.join(MIME_TYPES)}")
    if container is None:
        raise MediaError(f"not a readable video file ({ffmpeg.reason(text, path)})")
    video, audio = _streams(text)
    if video is None:
        raise MediaError("the file has no video stream (audio only?); send it as audio, or send a "
                         "video with a picture track")
    container = container.group(1)
    names = set(container.split(","))
    if not names & set(_DEMUXERS[mime]):
        fits = [m for m in MIME_TYPES if names & set(_DEMUXERS[m])]
        raise MediaError(f"the file was sent as {mime} but its container is {container} "
                         f"(ffmpeg's name), which is {' or '.join(fits) or 'no video MIME type'}; "
                         f"send the MIME type of the file's real format")

    width, height, fps, rotation = _video_facts(video["rest"])
    if width == 0:
        raise MediaError(f"cannot read the picture size of the video stream ({video['line']})")
    if round(rotation) % 180 == 90:  # ffmpeg rotates decoded frames upright
        width, height = height, width

    duration = _DURATION.search(text)
    if duration is None:
        raise MediaError(f"ffmpeg printed no duration ({ffmpeg.reason(text, path)})")
    if duration.group(1) is not None:
        h, m, s = duration.groups()
        duration_s = int(h) * 3600 + int(m) * 60 + float(s)
    else:
        duration_s = _copied_duration(path, timeout)
    if not duration_s > 0:
        raise MediaError("the video has zero duration")
    if duration_s > max_seconds:
        raise MediaTooLarge(f"the video is {duration_s:.1f} s long; the limit is {max_seconds:g} s "
                            f"(send a shorter clip or set video_metadata.end_offset)")
    return VideoInfo(duration_s=duration_s, width=width, height=height, fps=fps,
                     video_codec=video["codec"], has_audio=audio is not None,
                     audio_codec=audio["codec"] if audio else None, container=container)


def sample_times(duration_s: float, *, fps: float = 1.0, start: float = 0.0,
                 end: float | None = None) -> np.ndarray:
    """Times (s, float64 [n]) of the frames frames() yields: start + i / fps, < min(end, duration).

    The count is exact (frames() pads or trims to it), so tokens can be counted before decoding.
    """
    fps, start, end = _span(duration_s, fps, start, end)
    n = math.ceil((end - start) * fps) + 1
    times = start + np.arange(n, dtype=np.float64) / fps  # [n], the last one or two may be >= end
    return times[times < end]


def frames(path: str | os.PathLike, info: VideoInfo, *, size: int | None, fps: float = 1.0,
           start: float = 0.0, end: float | None = None, chunk: int = 16,
           timeout: float | None = None,
           process_hook: Callable[[ffmpeg.Process], None] | None = None,
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (times f64[n], frames uint8[n, size, size, 3]) chunks, n <= chunk, in time order.

    Frames are scaled to fit size x size keeping their aspect ratio and padded with black bars,
    RGB; size=None keeps them as displayed (uint8[n, info.height, info.width, 3]), for
    processors that resize themselves. All chunks together hold exactly len(sample_times(...)) frames: if ffmpeg stops early
    (a truncated file), the last frame is repeated. timeout defaults to 30 s + 0.5 s per second of
    video; process_hook(proc) gets the running process so another thread can proc.cancel() it.
    """
    times = sample_times(info.duration_s, fps=fps, start=start, end=end)  # [N]
    if (size is not None and size < 1) or chunk < 1:
        raise ValueError(f"size and chunk must be >= 1, got size={size}, chunk={chunk}")
    span = float(times[-1] - times[0]) + 1.0 / fps
    rate = fractions.Fraction(fps).limit_denominator(1_000_000)  # exact grid for 1/3 fps etc.
    source = ffmpeg_python.input(ffmpeg.input_url(path), ss=f"{start:.6f}", noaccurate_seek=None,
                                 **_INPUT_OPTIONS)
    picture = source["V:0"]  # the first video stream that is not cover art
    if info.fps > 0:
        # Repeat the final frame past the stream's end, so the slot at a time after the last frame
        # begins still gets that frame (the fps filter alone stops at the end of the last frame).
        # tpad steps by the stream's frame rate, so it needs one.
        picture = picture.filter("tpad", stop=-1, stop_mode="clone")
    picture = picture.filter("fps", fps=f"{rate.numerator}/{rate.denominator}", start_time=0,
                             round="up")
    if size is None:
        height, width = info.height, info.width
        picture = picture.filter("format", "rgb24")
    else:
        height = width = size
        picture = (picture
                   .filter("scale", size, size, force_original_aspect_ratio="decrease")
                   .filter("format", "rgb24")  # pad in RGB: exact black, no chroma bleed at the bar
                   .filter("pad", size, size, "(ow-iw)/2", "(oh-ih)/2", color="black"))
    out = ffmpeg_python.output(picture, "pipe:", format="rawvideo", pix_fmt="rgb24",
                               **{"frames:v": len(times)})
    with ffmpeg.Process(ffmpeg.compile_args(out), timeout=_timeout(timeout, span),
                        path=path) as proc:
        if process_hook is not None:
            process_hook(proc)
        last = None  # [height, width, 3], the newest frame, to repeat if ffmpeg ends early
        ended = False
        for first in range(0, len(times), chunk):
            n = min(chunk, len(times) - first)
            block = np.empty((n, height, width, 3), np.uint8)
            got = 0
            while not ended and got < len(block):
                if proc.readinto(block[got]) == block[got].nbytes:
                    got += 1
                else:
                    _finished_early(proc, path, decoded=first + got, wanted=len(times))
                    ended = True
            if got:
                last = block[got - 1].copy()
            block[got:] = last
            yield times[first:first + len(block)], block


def sound(path: str | os.PathLike, info: VideoInfo, *, start: float = 0.0, end: float | None = None,
          block_seconds: float = 10.0, timeout: float | None = None,
          process_hook: Callable[[ffmpeg.Process], None] | None = None) -> Iterator[np.ndarray]:
    """Yields the sound track from start to end as float32 [n] mono 16 kHz blocks in [-1, 1).

    Blocks hold block_seconds of sound, the last one less; together exactly
    round((end - start) * 16000) samples (zeros where the track is shorter). Nothing if the video
    has no sound track.
    """
    _, start, end = _span(info.duration_s, 1.0, start, end)
    total = round((end - start) * SAMPLE_RATE)
    if not info.has_audio or total == 0:
        return
    block = max(1, round(block_seconds * SAMPLE_RATE))
    source = ffmpeg_python.input(ffmpeg.input_url(path), ss=f"{start:.6f}", **_INPUT_OPTIONS)
    # first_pts=0: silence in front if the track starts late, so sound stays aligned with frames.
    track = source["a:0"].filter("aresample", SAMPLE_RATE, first_pts=0)
    out = ffmpeg_python.output(track, "pipe:", format="s16le", acodec="pcm_s16le", ac=1,
                               ar=SAMPLE_RATE, t=f"{end - start:.6f}")
    with ffmpeg.Process(ffmpeg.compile_args(out), timeout=_timeout(timeout, end - start),
                        path=path) as proc:
        if process_hook is not None:
            process_hook(proc)
        sent = 0
        ended = False
        while sent < total:
            pcm = np.zeros(min(block, total - sent), np.int16)  # [n]; stays 0 past the track's end
            if not ended:
                got = proc.readinto(pcm) // 2
                if got < len(pcm):
                    proc.check()
                    ended = True
            sent += len(pcm)
            samples = pcm.astype(np.float32)  # [n]
            samples *= 1.0 / 32768.0  # in place: one float block alive, not two
            yield samples


def _span(duration_s: float, fps: float, start: float,
          end: float | None) -> tuple[float, float, float]:
    """Checked (fps, start, end) of a request; errors name the field of Gemini's videoMetadata."""
    if not 0 < fps <= MAX_FPS:
        raise MediaError(f"video_metadata.fps must be in (0, {MAX_FPS:g}], got {fps}")
    end = duration_s if end is None else end
    if not 0 <= start < duration_s:
        raise MediaError(f"video_metadata.start_offset must be >= 0 s and before the end of the "
                         f"video ({duration_s:g} s), got {start:g} s")
    if not start < end <= duration_s:
        raise MediaError(f"video_metadata.end_offset must be after start_offset ({start:g} s) and "
                         f"at most the video's duration ({duration_s:g} s), got {end:g} s")
    return float(fps), float(start), float(end)


def _timeout(timeout: float | None, seconds: float) -> float:
    return 30.0 + 0.5 * seconds if timeout is None else timeout


def _finished_early(proc: ffmpeg.Process, path, *, decoded: int, wanted: int) -> None:
    """ffmpeg's output ended after `decoded` of `wanted` frames: fine if it exited cleanly."""
    proc.check()  # raises on timeout, cancel or a failed ffmpeg
    if decoded == 0:
        raise MediaError(f"ffmpeg decoded no frames from the video (wanted {wanted}); the video "
                         f"stream may be empty or end before video_metadata.start_offset")


def _streams(text: str) -> tuple[dict | None, dict | None]:
    """The first real video stream (not cover art) and first audio stream of `ffmpeg -i` output.

    Each is {"codec", "rest" (the stream line after the codec plus its side data), "line"}.
    """
    video = audio = current = None
    for line in text.splitlines():
        match = _STREAM.match(line)
        if match is not None:
            kind, codec, rest = match.groups()
            current = {"codec": codec, "rest": rest, "line": line.strip()}
            if kind == "Video" and video is None and "(attached pic)" not in rest:
                video = current
            elif kind == "Audio" and audio is None:
                audio = current
        elif current is not None and line.startswith("    "):
            current["rest"] += "\n" + line.strip()  # metadata and side data of that stream
        else:
            current = None
    return video, audio


def _video_facts(rest: str) -> tuple[int, int, float, float]:
    """(width, height, fps, rotation degrees) from a video stream's line and side data."""
    size = _SIZE.search(rest.split("\n")[0])
    width, height = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
    rates = {unit: float(value) * (1000 if k else 1) for value, k, unit in _RATE.findall(rest)}
    # The average rate is what a viewer sees, but some muxers (AVI) store a bogus one; the average
    # of a real stream never exceeds its base rate (tbr).
    fps = min(rates.values()) if rates else 0.0
    rotation = _ROTATION.search(rest)
    return width, height, fps, float(rotation.group(1)) if rotation else 0.0


def _copied_duration(path, timeout: float) -> float:
    """Duration of a file whose header has none: stream-copy it to the null muxer (no decoding)
    and take the last end time ffmpeg reports on -progress."""
    source = ffmpeg_python.input(ffmpeg.input_url(path), **_INPUT_OPTIONS)
    out = ffmpeg_python.output(source, "-", format="null", c="copy", progress="pipe:1")
    report = b""
    with ffmpeg.Process(ffmpeg.compile_args(out), timeout=timeout, path=path) as proc:
        while piece := proc.read(1 << 16):
            report = report[-4096:] + piece  # a report is ~300 bytes; keep the newest ones
        proc.check()
    times = _OUT_TIME.findall(report.decode("ascii", "replace"))
    if not times:
        raise MediaError("the video states no duration and ffmpeg could not measure one")
    return int(times[-1]) / 1e6
