"""The audio haystack: a 16 kHz mono sound track with a spoken needle spliced in at its depth.

The haystack is the user's sound file (decoded by ffmpeg, looped or cut to the duration), the
speech haystack (`speech.track`: other voices reading prose, written to such a file first) or
synthesised noise: pink noise (Voss-McCartney: octave rows of held random values, summed) with
random tone bursts, drawn block by block from the seed, the trial and the block's index, so the
same seed gives the same sound at the same time whatever the duration.

The needle is a short clip: the user's (`--needle-audio`) or "The secret word is <word>" spoken
by espeak-ng: the `espeak-ng` binary when it is on PATH, else libespeak-ng from the
espeakng-loader wheel (`espeak.synthesise`). It is spliced in, not mixed: it replaces the
haystack's samples from its start for its length, so it is heard clean and the total length
stays the duration. It starts at depth * (duration - clip length): 0% at the very start, 100%
ending at the very end.

The track is written as 16-bit FLAC with soundfile, block by block; an hour of sound never sits
in memory whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import numpy as np
import soundfile as sf

from ringserve.niah import espeak as espeak_lib
from ringserve.niah import ffmpeg
from ringserve.niah.tasks import _rng

MIME_TYPE = "audio/flac"
SUFFIX = ".flac"
SAMPLE_RATE = ffmpeg.SAMPLE_RATE
BLOCK = 1 << 14  # samples per synthesised block (~1 s); a multiple of every row's hold
PINK_ROWS = 12  # Voss-McCartney rows: holds of 1 .. 2048 samples (flat down to ~8 Hz)
NOISE_RMS = 0.05
ESPEAK_MISSING = ("the audio needle is spoken by espeak-ng, which is not installed: pip install "
                  "espeakng-loader (its bundled libespeak-ng), or install it (e.g. apt-get "
                  "install espeak-ng) or pass --needle-audio CLIP --answer TEXT")
SPEECH_MISSING = ("the speech haystack (--haystack-audio speech) is read by espeak-ng, which is "
                  "not installed: pip install espeakng-loader (its bundled libespeak-ng), or "
                  "install it (e.g. apt-get install espeak-ng), or use --haystack-audio noise "
                  "or FILE")


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """One haystack sound track: what `build` writes, and what its cache file is keyed by."""

    duration_s: int
    depth: float  # percent: where the needle starts, between the start and duration - clip
    needle: str  # the needle clip: a sound file in any format ffmpeg reads
    seed: int  # with `trial`, seeds the synthesised haystack
    trial: int = 0
    haystack: str | None = None  # the user's sound file; None: synthesised

    def __post_init__(self) -> None:
        if self.duration_s < 1:
            raise ValueError(f"an audio haystack lasts at least 1 s, got {self.duration_s} s")
        if not 0 <= self.depth <= 100:
            raise ValueError(f"depth is a percentage from 0 to 100, got {self.depth}")


def needle_start(total: int, clip: int, depth: float) -> int:
    """The sample where a `clip`-sample needle starts in a `total`-sample track at `depth` %."""
    if clip > total:
        raise ValueError(f"the needle clip lasts {clip / SAMPLE_RATE:.2f} s, longer than the "
                         f"{total / SAMPLE_RATE:g} s haystack; use a longer --durations value or "
                         "a shorter clip")
    return round(depth / 100 * (total - clip))


def load_clip(path: str | os.PathLike) -> np.ndarray:
    """A needle clip as float32 [n] 16 kHz mono (any format ffmpeg reads, resampled)."""
    return np.concatenate(list(ffmpeg.decode_audio(path)))


def synthesise(seed: int, trial: int, samples: int) -> Iterator[np.ndarray]:
    """`samples` of the synthesised haystack as float32 blocks of at most BLOCK samples."""
    for index, first in enumerate(range(0, samples, BLOCK)):
        yield _noise_block(seed, trial, index)[:samples - first]


def _noise_block(seed: int, trial: int, index: int) -> np.ndarray:
    """Block `index` of the synthesised haystack: float32 [BLOCK]."""
    rng = _rng(seed, "audio-haystack", trial, index)
    gen = np.random.default_rng(rng.getrandbits(64))
    # Row k holds a new random value every 2**k samples; BLOCK is a multiple of every hold, so
    # blocks join without a seam in the rows' grid.
    pink = gen.standard_normal(BLOCK)  # [BLOCK], row 0: white
    for k in range(1, PINK_ROWS):
        pink += np.repeat(gen.standard_normal(BLOCK >> k), 1 << k)
    block = pink * (NOISE_RMS / np.sqrt(PINK_ROWS))  # [BLOCK]
    for _ in range(rng.randint(0, 2)):  # tone bursts, each inside its block
        length = int(rng.uniform(0.05, 0.4) * SAMPLE_RATE)
        start = rng.randrange(BLOCK - length)
        freq = float(np.exp(rng.uniform(np.log(150), np.log(3000))))
        t = np.arange(length) / SAMPLE_RATE  # [length]
        block[start:start + length] += (rng.uniform(0.05, 0.25) * np.hanning(length)
                                        * np.sin(2 * np.pi * freq * t))
    return block.astype(np.float32)


def build(spec: AudioSpec, path: str | os.PathLike) -> tuple[float, float]:
    """Writes `spec`'s sound track to `path` (16-bit FLAC, 16 kHz mono); returns when the needle
    starts and how long it lasts, in seconds (start * 16000 is its first sample)."""
    clip = load_clip(spec.needle)  # [c]
    total = spec.duration_s * SAMPLE_RATE
    start = needle_start(total, len(clip), spec.depth)
    if spec.haystack is not None:
        blocks = ffmpeg.decode_audio(spec.haystack, samples=total)
    else:
        blocks = synthesise(spec.seed, spec.trial, total)
    at = 0  # the first sample of the current block
    try:
        with sf.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=1, format="FLAC",
                          subtype="PCM_16") as out:
            for block in blocks:
                block = block.copy()  # [n]
                lo, hi = max(start, at), min(start + len(clip), at + len(block))
                if lo < hi:  # the clip overlaps this block: splice it in
                    block[lo - at:hi - at] = clip[lo - start:hi - start]
                out.write(np.clip(block, -1.0, 32767 / 32768))
                at += len(block)
    except BaseException:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
        raise
    return start / SAMPLE_RATE, len(clip) / SAMPLE_RATE


def can_speak() -> bool:
    """Whether `speak` can speak: the espeak-ng binary is on PATH or libespeak-ng loads."""
    return shutil.which("espeak-ng") is not None or espeak_lib.available()


def speak(text: str, cache_dir: str | os.PathLike) -> pathlib.Path:
    """`text` spoken by espeak-ng as a WAV file in `cache_dir` (made once per text): by the
    `espeak-ng` binary when it is on PATH, else by libespeak-ng through `espeak_lib` (16-bit PCM
    at espeak's 22050 Hz, like the binary's).

    Raises FileNotFoundError with ESPEAK_MISSING when there is neither.
    """
    espeak = shutil.which("espeak-ng")
    if espeak is None and not espeak_lib.available():
        raise FileNotFoundError(ESPEAK_MISSING)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = pathlib.Path(cache_dir) / f"needle-espeak-{digest}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".wav", delete=False) as tmp:
            pass
        try:
            if espeak is None:
                samples, rate = espeak_lib.synthesise(text)
                sf.write(tmp.name, samples, rate, format="WAV", subtype="PCM_16")
            else:
                subprocess.run([espeak, "-w", tmp.name, text], check=True, capture_output=True,
                               timeout=60)
            os.replace(tmp.name, path)
        except espeak_lib.EspeakError as e:
            raise ffmpeg.BuildError(f"libespeak-ng failed to speak {text!r}: {e}") from None
        except subprocess.CalledProcessError as e:
            raise ffmpeg.BuildError(f"espeak-ng failed to speak {text!r}: "
                                    f"{e.stderr.decode(errors='replace').strip()}") from None
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    return path
