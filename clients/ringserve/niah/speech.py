"""The speech haystack: other voices reading prose, so that the spoken needle hides "inside other
speech" (the Gemini 1.5 report's audio haystack is speech too) rather than in noise.

The words: the plain sentences of the default text haystack (`haystack.stdlib()`, the running
interpreter's docstrings): letters, spaces and , ; ' - only, 6 to 30 words, none saying one of
the key nouns the needle words are drawn from, nor "secret", so the track's one secret word is the
needle's. That is about 2,600 sentences, three hours of speech read once each.

The voices: utterance i is drawn from (seed, trial, i): one to three sentences that follow one
another in the text, from a random start; one of the 33 SPEECH_VOICES (espeak-ng's English
accents and variants other than the needle's plain "en", without the breathy ones, whose noise is
seeded by the clock); 135 to 245 words a minute; a pitch from 25 to 75. Each utterance is
scaled to SPEECH_RMS, about the needle's own level, and followed by a 0.15 to 0.8 s pause. Under
all of it runs the noise haystack (`audio.synthesise`) at a quarter of its level, so that pauses
are not digital silence.

Utterances follow one another from the track's start and the noise is drawn block by block, so a
track is the first part of any longer one of the same seed and trial. `track` writes one as FLAC
in a cache directory; the runner then splices the needle into it as into a user's haystack file.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import soundfile as sf

from ringserve.niah import audio
from ringserve.niah import espeak as espeak_lib
from ringserve.niah import ffmpeg
from ringserve.niah import haystack as haystack_lib
from ringserve.niah.tasks import _NOUNS, _rng

SPEECH_VOICES = tuple(v for v in espeak_lib.ENGLISH_VOICES if v != "en" and not any(
    v.endswith("+" + breathy) for breathy in espeak_lib.BREATHY_VARIANTS))
SPEECH_RMS = 0.08  # each utterance's level; espeak says the needle at about 0.09
PEAK = 0.85  # no utterance louder than this at its peak
NOISE_UNDER = 0.25  # the noise haystack's level under the speech, as a fraction of its own
RATES = (135, 245)  # words per minute, uniform
PITCHES = (25, 75)
PAUSE_S = (0.15, 0.8)
WORDS = (6, 30)  # words per sentence
_PLAIN = re.compile(r"[A-Z][A-Za-z ,;'\-]+\.")
_FORBIDDEN = frozenset(_NOUNS) | {"secret"}
VERSION = 1  # bump when the same seed would give other sound: it keys the cached tracks


def sentences(units: Sequence[str]) -> list[str]:
    """The sentences of `units` (haystack units) fit to be read aloud: plain prose without the key
    nouns or "secret", WORDS[0] to WORDS[1] words."""
    out = []
    for unit in units:
        text = unit.strip()
        words = set(re.findall(r"[a-z]+", text.lower()))
        if (_PLAIN.fullmatch(text) and WORDS[0] <= len(text.split()) <= WORDS[1]
                and not words & _FORBIDDEN):
            out.append(text)
    return out


@functools.cache
def default_lines() -> tuple[str, ...]:
    """The sentences the speech haystack reads: `sentences` of the default text haystack."""
    return tuple(sentences(haystack_lib.stdlib().units))


def say(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """`text` spoken by espeak-ng: float32 [n] at 16 kHz. libespeak-ng when it loads (repeatable
    and fast: ~100x real time), else the espeak-ng binary."""
    if espeak_lib.available():
        try:
            return espeak_lib.synthesise_16k(text, voice=voice, rate=rate, pitch=pitch)
        except espeak_lib.EspeakError as e:
            raise ffmpeg.BuildError(f"libespeak-ng failed to speak {text!r}: {e}") from None
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise FileNotFoundError(audio.ESPEAK_MISSING)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "say.wav")
        try:
            subprocess.run([binary, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", wav,
                            text], check=True, capture_output=True, timeout=60)
        except subprocess.CalledProcessError as e:
            raise ffmpeg.BuildError(f"espeak-ng failed to speak {text!r} as {voice}: "
                                    f"{e.stderr.decode(errors='replace').strip()}") from None
        samples, rate_hz = sf.read(wav, dtype="float32")
    return espeak_lib.resample(samples, rate_hz)


def utterances(lines: Sequence[str], seed: int, trial: int) -> Iterator[np.ndarray]:
    """The track's utterances in order, each float32 [n] at 16 kHz with its pause after it."""
    if not lines:
        raise ValueError("the speech haystack has no sentences to read")
    for index in itertools.count():
        rng = _rng(seed, "audio-speech", trial, index)
        first = rng.randrange(len(lines))
        text = " ".join(lines[(first + k) % len(lines)] for k in range(rng.randint(1, 3)))
        voice = rng.choice(SPEECH_VOICES)
        rate, pitch = rng.randint(*RATES), rng.randint(*PITCHES)
        pause = int(rng.uniform(*PAUSE_S) * audio.SAMPLE_RATE)
        speech = say(text, voice, rate, pitch)  # [n]
        rms = float(np.sqrt(np.mean(np.square(speech, dtype=np.float64)))) if len(speech) else 0.0
        if rms > 0:  # to SPEECH_RMS, unless that would clip a peak
            speech = speech * min(SPEECH_RMS / rms, PEAK / float(np.abs(speech).max()))
        yield np.concatenate([speech, np.zeros(pause, np.float32)]).astype(np.float32)


def synthesise(lines: Sequence[str], seed: int, trial: int, samples: int) -> Iterator[np.ndarray]:
    """`samples` of the speech haystack as float32 blocks of at most audio.BLOCK samples."""
    speech = utterances(lines, seed, trial)
    pending: list[np.ndarray] = []
    held = 0  # samples in `pending`
    for noise in audio.synthesise(seed, trial, samples):  # [b] each
        while held < len(noise):
            said = next(speech)
            pending.append(said)
            held += len(said)
        flat = np.concatenate(pending)  # [held]
        block, rest = flat[:len(noise)], flat[len(noise):]
        pending, held = [rest], len(rest)
        yield np.clip(block + NOISE_UNDER * noise, -1.0, 32767 / 32768).astype(np.float32)


def track(seed: int, trial: int, duration_s: int, cache_dir: str | os.PathLike,
          lines: Sequence[str] | None = None) -> pathlib.Path:
    """The speech haystack for (seed, trial) lasting `duration_s`, as a 16-bit FLAC file in
    `cache_dir`, made once (lines: the sentences; default: `sentences(haystack.stdlib().units)`)."""
    if duration_s < 1:
        raise ValueError(f"an audio haystack lasts at least 1 s, got {duration_s} s")
    if lines is None:
        lines = default_lines()
    digest = hashlib.sha256("\n".join([str(VERSION), *lines]).encode()).hexdigest()[:12]
    path = pathlib.Path(cache_dir) / f"speech-haystack-seed{seed}-t{trial}-{duration_s}s-{digest}.flac"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".flac", delete=False) as tmp:
        pass
    try:
        with sf.SoundFile(tmp.name, "w", samplerate=audio.SAMPLE_RATE, channels=1, format="FLAC",
                          subtype="PCM_16") as out:
            for block in synthesise(lines, seed, trial, duration_s * audio.SAMPLE_RATE):
                out.write(block)
        os.replace(tmp.name, path)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return path
