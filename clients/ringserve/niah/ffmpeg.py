"""The bundled ffmpeg (imageio-ffmpeg) as pipes: raw frames or samples in or out, one at a time.

Each process has one pipe to this process (stdin or stdout) and writes its log to a temporary
file, so no pipe can fill up and stall it; the log's tail goes into the error when it fails.
Decoders loop their input (`-stream_loop -1`) and stop themselves after the frames or seconds
asked for, so a haystack file shorter than the duration repeats from its start.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

import imageio_ffmpeg
import numpy as np

SAMPLE_RATE = 16_000
_LOG_TAIL = 2000  # characters of ffmpeg's log quoted in an error


class BuildError(RuntimeError):
    """ffmpeg failed to read a haystack or write a built one; the message quotes its log."""


def binary() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


class _Process:
    """ffmpeg with `args`, stdin or stdout piped; `close()` waits and raises BuildError on
    failure (`what` says what was being done, for the message)."""

    def __init__(self, args: Sequence[str], what: str, *, reads: bool):
        self.what = what
        self._log = tempfile.TemporaryFile()
        pipe = dict(stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) if reads else dict(
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.proc = subprocess.Popen([binary(), "-hide_banner", "-nostdin" if reads else "-y",
                                      "-loglevel", "error", *args], stderr=self._log, **pipe)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace").strip()[-_LOG_TAIL:]

    def fail(self, reason: str) -> BuildError:
        """The error for `reason`, quoting the log (once ffmpeg is done writing it: a pipe at its
        end means the process is exiting)."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return BuildError(f"{self.what}: {reason}; ffmpeg said: {self.log() or '(nothing)'}")

    def close(self, *, check: bool = True) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass
        code = self.proc.wait()
        try:
            if check and code != 0:
                raise self.fail(f"ffmpeg exited with status {code}")
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close(check=False)


def _read_exactly(stream, size: int) -> bytes:
    """Up to `size` bytes: fewer only at the end of the stream."""
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def decode_frames(path: str | os.PathLike, *, size: int, count: int) -> Iterator[np.ndarray]:
    """`count` frames of a video file at 1 fps, looped from its start when shorter, each
    uint8 [size, size, 3] RGB: scaled to fit keeping the aspect ratio, black bars around."""
    args = ["-stream_loop", "-1", "-i", os.fspath(path), "-map", "0:V:0", "-an",
            "-vf", f"fps=1,scale={size}:{size}:force_original_aspect_ratio=decrease,"
                   f"format=rgb24,pad={size}:{size}:(ow-iw)/2:(oh-ih)/2:color=black",
            "-frames:v", str(count), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    proc = _Process(args, f"reading the haystack video {os.fspath(path)!r}", reads=True)
    nbytes = size * size * 3
    last = None
    try:
        for _ in range(count):
            data = _read_exactly(proc.proc.stdout, nbytes)
            if len(data) == nbytes:
                last = np.frombuffer(data, np.uint8).reshape(size, size, 3)  # [size, size, 3]
            elif last is None:
                raise proc.fail("no video frame could be decoded (is it a video file?)")
            yield last  # a stream that ends early repeats its last frame
    except BaseException:
        proc.kill()
        raise
    proc.close()


def decode_audio(path: str | os.PathLike, *, samples: int | None = None,
                 block: int = 10 * SAMPLE_RATE, loop: bool = True) -> Iterator[np.ndarray]:
    """A sound file as float32 [n] blocks of 16 kHz mono in [-1, 1), `block` samples each (the
    last one shorter): `samples` in all, looped from the start when the file is shorter; with
    samples=None, the whole file once."""
    args = (["-stream_loop", "-1"] if loop and samples is not None else []) + [
        "-i", os.fspath(path), "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE)]
    if samples is not None:
        args += ["-t", f"{samples / SAMPLE_RATE:.6f}"]
    args += ["-f", "s16le", "-acodec", "pcm_s16le", "pipe:"]
    proc = _Process(args, f"reading the audio {os.fspath(path)!r}", reads=True)
    sent = 0
    try:
        while samples is None or sent < samples:
            want = block if samples is None else min(block, samples - sent)
            data = _read_exactly(proc.proc.stdout, 2 * want)
            pcm = np.frombuffer(data[:len(data) // 2 * 2], np.int16)  # [n]
            if samples is not None and len(pcm) < want:
                if sent + len(pcm) == 0:
                    raise proc.fail("no sound could be decoded (is it an audio file?)")
                pcm = np.concatenate([pcm, np.zeros(want - len(pcm), np.int16)])  # pad silence
            if len(pcm):
                sent += len(pcm)
                yield pcm.astype(np.float32) / 32768.0
            if samples is None and len(pcm) < want:
                break
    except BaseException:
        proc.kill()
        raise
    if samples is None and sent == 0:
        proc.close(check=False)
        raise BuildError(f"reading the audio {os.fspath(path)!r}: no sound could be decoded (is "
                         "it an audio file?)")
    proc.close()


class VideoWriter:
    """Writes uint8 [size, size, 3] RGB frames, one per second, to an H.264 mp4 at `path`."""

    def __init__(self, path: str | os.PathLike, size: int):
        if size < 16 or size % 2:
            raise ValueError(f"the frame size must be an even number of pixels >= 16 (H.264 "
                             f"with 4:2:0 chroma), got {size}")
        self.size = size
        # A 1 fps source: every frame is shown for one whole second, so a server sampling at
        # 1 fps gets frame i at t = i s. Near-lossless (crf 18) keeps the needle's text sharp.
        args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}", "-framerate", "1",
                "-i", "pipe:", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
                "-pix_fmt", "yuv420p", "-movflags", "+faststart", os.fspath(path)]
        self._proc = _Process(args, f"writing the video {os.fspath(path)!r}", reads=False)
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.size, self.size, 3) or frame.dtype != np.uint8:
            raise ValueError(f"a frame must be uint8 [{self.size}, {self.size}, 3], got "
                             f"{frame.dtype} {list(frame.shape)}")
        try:
            self._proc.proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            raise self._proc.fail("the encoder stopped taking frames") from None
        self.frames += 1

    def close(self) -> None:
        self._proc.close()

    def abort(self) -> None:
        self._proc.kill()
