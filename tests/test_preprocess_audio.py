"""preprocess/audio.py on tones and noise made here: decoding, resampling, Whisper features, bad input."""

import io
import math
import subprocess
import tracemalloc

import librosa
import numpy as np
import pytest
import soundfile as sf
import soxr

from preprocess import audio
from preprocess.errors import MediaError, MediaTooLarge

MIME = {"WAV": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg", "MP3": "audio/mpeg"}


def tone(freq: float, rate: int, seconds: float, amps=(0.5,)) -> np.ndarray:
    """float32 [n, channels]: one sine, amplitude amps[c] on channel c."""
    t = np.arange(int(round(rate * seconds))) / rate
    return (np.sin(2 * np.pi * freq * t)[:, None] * np.asarray(amps)).astype(np.float32)


def encode(data: np.ndarray, rate: int, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, **kwargs)
    return buf.getvalue()


def decode_all(source, mime: str, **kwargs) -> np.ndarray:
    return np.concatenate(list(audio.stream_samples(source, mime, **kwargs)))


def peak_mel_bin(freq: float) -> int:
    """The mel filter (of Whisper's 80) that weighs freq most: its FFT bin is freq / 40 Hz."""
    filters = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, htk=False, norm="slaney")
    return int(filters[:, round(freq / 40)].argmax())


def test_parse_mime():
    assert audio.parse_mime("audio/pcm;rate=16000") == ("audio/pcm", {"rate": "16000"})
    assert audio.parse_mime(" Audio/PCM ; Rate = 8000 ; channels=1") == \
        ("audio/pcm", {"rate": "8000", "channels": "1"})
    assert audio.parse_mime("audio/wav") == ("audio/wav", {})
    with pytest.raises(MediaError, match="key=value"):
        audio.parse_mime("audio/pcm;16000")


@pytest.mark.parametrize("rate, fmt, freq", [
    (8000, "WAV", 1000.0), (44100, "FLAC", 3000.0), (48000, "OGG", 1000.0), (44100, "MP3", 3000.0),
    (16000, "WAV", 3000.0),
])
def test_stereo_input_becomes_16k_mono_with_its_tone(rate, fmt, freq):
    seconds = 1.5
    data = encode(tone(freq, rate, seconds, amps=(0.6, 0.2)), rate, fmt)
    info = audio.probe_audio(data, MIME[fmt])
    assert (info.format, info.sample_rate, info.channels) == (fmt, rate, 2)
    assert info.duration_s == pytest.approx(seconds, abs=1e-3)

    mono = decode_all(data, MIME[fmt])
    assert mono.dtype == np.float32 and mono.ndim == 1
    assert abs(len(mono) - seconds * audio.SAMPLE_RATE) <= 1
    # Downmix is the mean: (0.6 + 0.2) / 2 = 0.4 amplitude, RMS 0.4 / sqrt(2) (lossy codecs: a few %).
    middle = mono[4000:-4000]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.4 / math.sqrt(2), rel=0.05)
    mel = audio.log_mel(mono)  # [80, 150]
    assert mel.shape == (80, 150)
    assert mel[:, 20:-20].mean(axis=1).argmax() == peak_mel_bin(freq)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_whisper_feature_extractor(n_mels):
    transformers = pytest.importorskip("transformers")
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)  # pads to 30 s
    rng = np.random.default_rng(0)
    t = np.arange(4 * 16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    expected = extractor(x, sampling_rate=16000, return_tensors="np").input_features[0]  # [n_mels, 3000]

    spec = audio.MelSpec(n_mels=n_mels, window_frames=3000)
    got = audio.log_mel(np.pad(x, (0, spec.window_samples - x.size)), spec)
    assert got.shape == expected.shape == (n_mels, 3000)
    # The zero padding sits at the -8 (log10) clamp, so this also checks the dynamic-range floor.
    assert got[:, -100:].max() == pytest.approx(got.max() - 2.0, abs=1e-6)  # (max - 8 + 4) / 4
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # mel_windows pads its last window the same way Whisper pads to 30 s.
    (window,) = list(audio.mel_windows([x], spec))
    np.testing.assert_array_equal(window, got)


@pytest.mark.parametrize("length", [2.7, 3.0])
def test_streamed_windows_equal_windows_of_the_whole_signal(length):
    spec = audio.MelSpec(window_frames=100)  # 1 s windows keep the test quick
    w = spec.window_samples
    x = np.random.default_rng(1).standard_normal(int(length * w)).astype(np.float32) * 0.1
    rng = np.random.default_rng(2)
    cuts = np.cumsum(rng.integers(1, 9000, size=200))
    chunks = np.split(x, cuts[cuts < x.size])  # sizes 1..9000 samples, some spanning two windows
    frames = audio.mel_windows(chunks, spec)
    windows = list(frames)
    assert frames.total_samples == x.size and frames.duration_s == pytest.approx(x.size / 16000)
    assert len(windows) == math.ceil(x.size / w)
    padded = np.pad(x, (0, len(windows) * w - x.size))
    for k, window in enumerate(windows):
        assert window.shape == (80, 100) and window.dtype == np.float32
        np.testing.assert_array_equal(window, audio.log_mel(padded[k * w:(k + 1) * w], spec))
    # One chunk holding everything gives the same windows.
    for a, b in zip(audio.mel_windows([x], spec), windows, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("length", [0.0, 0.3, 0.6, 0.61, 1.0, 2.45, 3.0])
def test_windows_with_context_overlap_and_every_sample_is_in_one_middle(length):
    # 1 s windows holding 0.2 s of each neighbour: they start every 0.6 s, from 0.2 s before the start.
    spec = audio.MelSpec(window_frames=100, context_frames=20)
    assert (spec.stride_samples, spec.context_samples) == (9600, 3200)
    x = np.random.default_rng(3).standard_normal(int(length * 16000)).astype(np.float32) * 0.1
    chunks = np.split(x, [x.size // 3, x.size // 3 + 1])
    windows = list(audio.mel_windows(chunks, spec))
    # Middles [0.6k, 0.6k + 0.6) s: as many as cover every sample, none that covers none.
    assert len(windows) == spec.window_count(x.size) == math.ceil(length / 0.6 - 1e-9)
    padded = np.concatenate([np.zeros(3200, np.float32), x, np.zeros(16000, np.float32)])
    for k, window in enumerate(windows):
        np.testing.assert_array_equal(window, audio.log_mel(padded[k * 9600:k * 9600 + 16000], spec))
    with pytest.raises(ValueError, match="context_frames"):
        audio.MelSpec(window_frames=100, context_frames=50)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_chunked_resampling_equals_resampling_the_whole(rate):
    x = (np.random.default_rng(rate).standard_normal((int(2.3 * rate), 2)) * 0.1).astype(np.float32)
    data = encode(x, rate, "WAV", subtype="FLOAT")  # float WAV: decoding is exact
    whole = soxr.resample(x.mean(axis=1, dtype=np.float32), rate, 16000, quality="HQ")
    for block_seconds in (0.0371, 10.0):  # many odd-sized blocks vs one block
        chunks = list(audio.stream_samples(data, "audio/wav", block_seconds=block_seconds))
        if block_seconds < 1:  # really streamed: many small chunks (soxr batches a few blocks' output)
            assert len(chunks) > 20 and max(len(c) for c in chunks) < 2000
        streamed = np.concatenate(chunks)
        # One soxr stream keeps its filter state across blocks: identical everywhere, edges included.
        assert streamed.shape == whole.shape
        np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)


def test_pcm():
    rate = 8000
    samples = (tone(1000.0, rate, 0.5)[:, 0] * 32767).astype("<i2")
    info = audio.probe_audio(samples.tobytes(), f"audio/pcm;rate={rate}")
    assert info == audio.AudioInfo("PCM", 0.5, rate, 1)
    mono = decode_all(samples.tobytes(), f"audio/pcm;rate={rate}")
    np.testing.assert_allclose(mono, soxr.resample(samples / 32768.0, rate, 16000, quality="HQ"), atol=1e-5)
    # At 16 kHz nothing is resampled: the samples come back as int16 / 32768, exactly.
    same = decode_all(samples.tobytes(), "audio/pcm; rate=16000")
    np.testing.assert_array_equal(same, samples.astype(np.float32) / 32768)


def wav_without_length(data: bytes) -> bytes:
    """The WAV with its data chunk size set to 0xFFFFFFFF, as streaming writers leave it."""
    pos = data.index(b"data")
    return data[:pos + 4] + b"\xff\xff\xff\xff" + data[pos + 8:]


@pytest.mark.parametrize("source, mime, error, match", [
    (b"", "audio/wav", MediaError, "empty audio"),
    (b"this is not audio" * 20, "audio/wav", MediaError, "unreadable audio.*WAV.*not recognised"),
    (encode(tone(440, 16000, 0.2), 16000, "FLAC"), "audio/wav", MediaError, "audio/wav says WAV.*FLAC"),
    (encode(tone(440, 16000, 0.2), 16000, "WAV"), "audio/mpeg", MediaError, "audio/mpeg says MP3.*WAV"),
    (encode(tone(440, 16000, 0.2), 16000, "WAV"), "audio/aac", MediaError, "unsupported audio MIME type"),
    (b"\x00\x01" * 100, "audio/pcm", MediaError, "needs its sample rate.*rate=16000"),
    (b"\x00\x01" * 100, "audio/pcm;rate=fast", MediaError, "needs its sample rate"),
    (b"\x00\x01" * 100, "audio/pcm;rate=100", MediaError, "outside 1000..384000"),
    (b"\x00\x01" * 100, "audio/pcm;rate=16000;channels=2", MediaError, "mono"),
    (b"\x00\x01" * 100 + b"\x00", "audio/pcm;rate=16000", MediaError, "odd byte count"),
    (encode(np.zeros((0, 1), np.float32), 16000, "WAV"), "audio/wav", MediaError, "no audio frames"),
    (encode(tone(440, 8000, 1.5), 8000, "FLAC"), "audio/flac", MediaTooLarge, r"1\.5 s long.*limit of 1 s"),
    (b"\x00\x01" * 8001, "audio/pcm;rate=8000", MediaTooLarge, "limit of 1 s"),
])
def test_bad_input(source, mime, error, match):
    with pytest.raises(error, match=match):
        audio.probe_audio(source, mime, max_seconds=1.0)
    with pytest.raises(error, match=match):
        list(audio.load_windows(source, mime, max_seconds=1.0))


def _with_rate(wav: bytes, rate: int) -> bytes:
    """The WAV with its fmt chunk's sample rate (and byte rate) replaced."""
    pos = wav.index(b"fmt ") + 8
    block_align = int.from_bytes(wav[pos + 12:pos + 14], "little")
    return (wav[:pos + 4] + rate.to_bytes(4, "little") + (rate * block_align).to_bytes(4, "little")
            + wav[pos + 12:])


@pytest.mark.parametrize("rate", [2_000_000_000, 400_000, 10])
def test_absurd_header_sample_rate_is_refused_before_decoding(rate):
    forged = _with_rate(encode(tone(440, 16000, 0.5), 16000, "WAV"), rate)
    with pytest.raises(MediaError, match=f"sample rate {rate} Hz is outside 1000..384000"):
        audio.probe_audio(forged, "audio/wav")
    with pytest.raises(MediaError, match="sample rate"):
        audio.stream_samples(forged, "audio/wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_samples_are_refused(bad):
    data = tone(440, 16000, 1.0)
    data[12000] = bad
    wav = encode(data, 16000, "WAV", subtype="FLOAT")
    assert audio.probe_audio(wav, "audio/wav").duration_s == pytest.approx(1.0)
    with pytest.raises(MediaError, match="NaN or infinite samples past 0.00 s"):
        decode_all(wav, "audio/wav")


def test_float_samples_past_full_scale_are_clipped():
    data = tone(440, 16000, 1.0) * 1e30
    samples = decode_all(encode(data, 16000, "WAV", subtype="FLOAT"), "audio/wav")
    assert np.abs(samples).max() == 1.0
    mel = audio.log_mel(samples)
    assert np.isfinite(mel).all()


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match="cannot read audio file"):
        audio.probe_audio(tmp_path / "nope.wav", "audio/wav")


def test_truncated_wav_is_an_error_before_decoding():
    data = encode(tone(440, 16000, 2.0), 16000, "WAV")
    half = data[: len(data) // 2]
    with pytest.raises(MediaError, match=r"truncated WAV.*declares 64000 bytes.*only 31978"):
        audio.probe_audio(half, "audio/wav")
    with pytest.raises(MediaError, match="truncated WAV"):
        audio.stream_samples(half, "audio/wav")
    # A data chunk of unknown length (0xFFFFFFFF) is not truncation: the real length is read.
    info = audio.probe_audio(wav_without_length(data), "audio/wav")
    assert info.duration_s == pytest.approx(2.0)
    assert len(decode_all(wav_without_length(data), "audio/wav")) == 32000


def test_truncated_flac_is_an_error_while_decoding():
    x = np.random.default_rng(0).standard_normal((3 * 16000, 1)).astype(np.float32) * 0.1
    half = encode(x, 16000, "FLAC")
    half = half[: len(half) // 2]
    # The STREAMINFO header still says 3 s; the missing frames show up when decoding reaches them.
    assert audio.probe_audio(half, "audio/flac").duration_s == pytest.approx(3.0)
    with pytest.raises(MediaError, match="FLAC audio is corrupt or truncated"):
        list(audio.load_windows(half, "audio/flac"))


def test_truncated_mp3_is_a_clean_shorter_read():
    data = encode(tone(1000.0, 16000, 3.0), 16000, "MP3")
    half = data[: len(data) // 2]
    frames = audio.load_windows(half, "audio/mpeg", audio.MelSpec(window_frames=100))
    windows = list(frames)
    # The decoded part is real audio (the tone), and total_samples says how long it really is.
    assert 1.0 < frames.duration_s < 2.0
    assert len(windows) == math.ceil(frames.total_samples / 16000)
    assert windows[0][:, 10:-10].mean(axis=1).argmax() == peak_mel_bin(1000.0)


@pytest.mark.parametrize("xing", [True, False])
def test_mp3_from_ffmpeg(tmp_path, xing):
    ffmpeg = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe()
    wav, mp3 = tmp_path / "in.wav", tmp_path / "out.mp3"
    sf.write(wav, tone(3000.0, 44100, 2.0, amps=(0.5, 0.5)), 44100)
    subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(wav), "-c:a", "libmp3lame", "-b:a", "64k",
                    "-write_xing", str(int(xing)), str(mp3)], check=True, timeout=60)
    info = audio.probe_audio(mp3, "audio/mpeg")
    assert (info.format, info.sample_rate, info.channels) == ("MP3", 44100, 2)
    # Without a Xing/Info header libsndfile estimates the length from the bitrate.
    assert info.duration_s == pytest.approx(2.0, rel=0.01 if xing else 0.05)
    mono = decode_all(str(mp3), "audio/mp3")
    assert len(mono) == pytest.approx(32000, rel=0.01 if xing else 0.05)
    assert audio.log_mel(mono)[:, 20:-20].mean(axis=1).argmax() == peak_mel_bin(3000.0)


def test_long_file_streams_in_bounded_memory(tmp_path):
    """10 minutes at 8 kHz from a file: ~38 MB as 16 kHz float32, but windows come one at a time."""
    path, rate, seconds = tmp_path / "long.flac", 8000, 600
    with sf.SoundFile(path, "w", rate, 1, format="FLAC") as f:
        for start in range(0, seconds, 60):  # written a minute at a time
            f.write(tone(440.0 + start, rate, 60.0)[:, 0])
    tracemalloc.start()
    try:
        frames = audio.load_windows(path, "audio/flac")
        count = sum(1 for _ in frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 60
    assert abs(frames.total_samples - seconds * 16000) <= 1
    assert peak < 16e6, f"peak traced memory {peak / 1e6:.1f} MB"


def test_load_windows_from_path(tmp_path):
    path = tmp_path / "a.ogg"
    sf.write(path, tone(1000.0, 48000, 2.5, amps=(0.3, 0.3)), 48000, format="OGG")
    frames = audio.load_windows(str(path), "audio/ogg", audio.MelSpec(window_frames=100))
    windows = list(frames)
    assert len(windows) == 3 and abs(frames.total_samples - 40000) <= 1
    assert all(w.shape == (80, 100) for w in windows)
    # The last window is half tone, half zero padding: the padding sits at the clamp floor.
    assert windows[2][:, 60:].max() == pytest.approx(windows[2].max() - 2.0, abs=1e-6)


def test_token_count():
    assert audio.token_count(0.3, 10) == 3  # not 4: 0.3 * 10 is 3.0000000000000004 in floats
    assert audio.token_count(0.0, 25) == 1
    assert audio.token_count(1.01, 25) == 26
    assert audio.token_count(10.0, 25) == 250
    with pytest.raises(ValueError):
        audio.token_count(1.0, 0)


def test_flac_without_a_stated_length_is_refused_clearly(tmp_path):
    ffmpeg = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe()
    wav = tmp_path / "in.wav"
    sf.write(wav, tone(440.0, 16000, 1.0), 16000)
    # Written to a pipe, the encoder cannot seek back to fill in STREAMINFO's total sample count.
    flac = subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(wav), "-f", "flac", "pipe:1"],
                          capture_output=True, check=True, timeout=60).stdout
    with pytest.raises(MediaError, match="does not state the audio length"):
        audio.probe_audio(flac, "audio/flac")


def test_close_stops_early_and_closes_the_decoder():
    data = encode(tone(440.0, 16000, 3.0), 16000, "FLAC")
    chunks = audio.stream_samples(data, "audio/flac", block_seconds=0.5)
    frames = audio.mel_windows(chunks, audio.MelSpec(window_frames=100))
    assert next(frames).shape == (80, 100)
    frames.close()
    assert list(frames) == []
    assert chunks.gi_frame is None  # the decoding generator (and its SoundFile) has finished
