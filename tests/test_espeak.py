"""Speech from libespeak-ng through ctypes (clients/ringserve/niah/espeak.py), and the audio
needle spoken through it when the espeak-ng binary is missing.

The clips are checked by their length and energy, not listened to: "The secret word is lantern"
lasts about 1.5 s at espeak's default 175 words per minute.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import soundfile

from ringserve.niah import audio, espeak

NEEDLE = "The secret word is lantern"


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def test_speaks_the_needle_as_float_audio():
    samples, rate = espeak.synthesise(NEEDLE)
    assert rate == espeak.SAMPLE_RATE == 22_050
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert 1.0 < len(samples) / rate < 4.0
    assert np.abs(samples).max() <= 1.0
    assert rms(samples) > 0.02  # speech, not silence
    # silence at the ends, louder in the middle: the words are inside the clip
    tenth = len(samples) // 10
    assert rms(samples[4 * tenth:6 * tenth]) > 3 * rms(samples[-tenth // 4:])


def test_same_input_gives_the_same_samples():
    # Not a breathy variant: those seed their breath noise from the clock (espeak.BREATHY_VARIANTS).
    first, _ = espeak.synthesise(NEEDLE, voice="en-us+m3", rate=150, pitch=60)
    espeak.synthesise("Something else entirely, said in between.", voice="en+whisper")
    espeak.synthesise(NEEDLE)
    again, _ = espeak.synthesise(NEEDLE, voice="en-us+m3", rate=150, pitch=60)
    np.testing.assert_array_equal(first, again)


def test_rate_pitch_and_voice_change_the_clip():
    slow, rate = espeak.synthesise(NEEDLE, rate=100)
    normal, _ = espeak.synthesise(NEEDLE)
    fast, _ = espeak.synthesise(NEEDLE, rate=350)
    assert len(slow) > 1.4 * len(normal) > 1.4 * 1.4 * len(fast)
    high, _ = espeak.synthesise(NEEDLE, pitch=90)
    assert len(high) != len(normal) or not np.array_equal(high, normal)
    other, _ = espeak.synthesise(NEEDLE, voice="en-us+m3")
    assert len(other) != len(normal) or not np.array_equal(other, normal)


@pytest.mark.parametrize("voice", espeak.ENGLISH_VOICES)
def test_every_listed_voice_speaks(voice):
    samples, rate = espeak.synthesise(NEEDLE, voice=voice)
    assert 1.0 < len(samples) / rate < 4.0 and rms(samples) > 0.01
    base, _, variant = voice.partition("+")
    if variant:  # the variant is applied, not silently dropped
        plain, _ = espeak.synthesise(NEEDLE, voice=base)
        assert len(plain) != len(samples) or not np.array_equal(plain, samples)


def test_voices_and_variants_are_listed():
    assert espeak.voices() == list(espeak.ENGLISH_VOICES)
    assert {"f3", "m3", "croak", "klatt", "whisper"} <= set(espeak.variants())


def test_16k_version_has_the_resampled_length():
    samples, rate = espeak.synthesise(NEEDLE, voice="en-gb-x-rp")
    resampled = espeak.synthesise_16k(NEEDLE, voice="en-gb-x-rp")
    assert resampled.dtype == np.float32
    assert len(resampled) == math.ceil(len(samples) * 16_000 / rate)
    assert rms(resampled) == pytest.approx(rms(samples), rel=0.1)
    # the NumPy-only resampler (no SciPy) agrees with SciPy's polyphase filter
    fft = espeak._resample_fft(samples, 320, 441)
    assert len(fft) == len(resampled)
    assert rms(fft - resampled) < 0.05 * rms(resampled)


def test_numpy_resampler_keeps_a_tone():
    t = np.arange(22_050) / 22_050
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = espeak._resample_fft(tone, 320, 441)
    expected = np.sin(2 * np.pi * 440 * np.arange(len(out)) / 16_000)
    assert np.abs(out - expected)[1000:-1000].max() < 1e-3


@pytest.mark.parametrize("voice, words", [
    ("bogus", "unknown espeak-ng voice 'bogus'"),
    ("en+bogus", "unknown espeak-ng voice variant 'bogus' in 'en+bogus'"),
    ("+f3", "unknown espeak-ng voice '+f3'"),
])
def test_unknown_voice_is_named(voice, words):
    with pytest.raises(espeak.EspeakError, match=words.replace("+", r"\+")):
        espeak.synthesise(NEEDLE, voice=voice)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rate is 80 to 450"):
        espeak.synthesise(NEEDLE, rate=20)
    with pytest.raises(ValueError, match="pitch is 0 to 100"):
        espeak.synthesise(NEEDLE, pitch=101)
    with pytest.raises(ValueError, match="empty"):
        espeak.synthesise("  ")


def test_missing_library_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import espeakng_loader fails
    assert not espeak.available()
    with pytest.raises(espeak.EspeakError, match="pip install espeakng-loader"):
        espeak.synthesise(NEEDLE)
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    assert not audio.can_speak()
    with pytest.raises(FileNotFoundError, match="pip install espeakng-loader"):
        audio.speak(NEEDLE, tmp_path)


def test_speak_uses_the_library_without_the_binary(monkeypatch, tmp_path):
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)  # no espeak-ng on PATH
    assert audio.can_speak()
    path = audio.speak(NEEDLE, tmp_path)
    info = soundfile.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == \
        ("WAV", "PCM_16", espeak.SAMPLE_RATE, 1)
    written, _ = soundfile.read(path, dtype="float32")
    expected, _ = espeak.synthesise(NEEDLE)
    np.testing.assert_allclose(written, expected, atol=1 / 32768)
    mtime = path.stat().st_mtime_ns
    assert audio.speak(NEEDLE, tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
    clip = audio.load_clip(path)  # what the haystack splices in: 16 kHz via ffmpeg
    assert abs(len(clip) - len(expected) * 16_000 / espeak.SAMPLE_RATE) < 0.02 * 16_000
