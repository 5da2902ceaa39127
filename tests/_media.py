"""Media the end-to-end tests make themselves: Pillow drawings, NumPy tones, ffmpeg-built videos."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from preprocess import ffmpeg


def png(width: int = 96, height: int = 64, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A drawing that differs with `seed`."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        draw.rectangle([x0, y0, x0 + 8 + int(rng.integers(0, 24)), y0 + 8 + int(rng.integers(0, 24))],
                       fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def wav(seconds: float, rate: int = 16000, freq: float = 440.0, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate,
                    format=fmt, subtype="PCM_16")
    return out.getvalue()


def video(path: Path, seconds: float, *, fps: int = 4, size: str = "64x48",
          audio: bool = True, codec: str = "libx264") -> Path:
    """A test-pattern video (lavfi testsrc) with a sine sound track, made by the bundled ffmpeg."""
    cmd = [ffmpeg.binary(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=16000:duration={seconds}"]
    cmd += ["-c:v", codec, "-pix_fmt", "yuv420p"]
    if audio:
        cmd += ["-c:a", "aac", "-shortest"]
    subprocess.run([*cmd, str(path)], check=True, timeout=120)
    return path
