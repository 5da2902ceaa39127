"""Audio bytes or files -> Whisper log-mel windows, streamed so memory does not grow with duration.

    probe_audio     header only: format, duration, rate, channels; rejects bad or too-long input
    stream_samples  decode in blocks (libsndfile), downmix, resample to 16 kHz with one soxr stream
    mel_windows     re-cut any chunk sizes into 10 s slices; each slice -> log_mel, as Whisper does
                    (with context_frames, slices overlap: each also holds its neighbours' edges)
    load_windows    the three above, for a request's audio part

Container lengths: WAV, FLAC and Ogg state their length exactly, so decoding fewer frames than
the header says (a cut-off upload) is a MediaError; libsndfile itself shortens a WAV whose data
chunk runs past the end of the file, so that case is caught from the RIFF header. MP3 without a
Xing/Info header has only an estimated length (from the bitrate), so for MP3 a short read simply
ends the stream: the audio decoded is real, and MelFrames.total_samples gives its exact length.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from collections.abc import Iterable, Iterator

import numpy as np
import soundfile as sf
import soxr

from preprocess.errors import MediaError, MediaTooLarge

SAMPLE_RATE = 16_000
MIME_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/flac", "audio/x-flac", "audio/mpeg", "audio/mp3",
              "audio/ogg", "audio/pcm")   # audio/pcm: raw little-endian int16 mono; rate from a parameter
DEFAULT_MAX_SECONDS = 4 * 3600

# MIME type -> the container it promises, and the libsndfile formats that keep the promise.
_CONTAINER = {"audio/wav": "WAV", "audio/x-wav": "WAV", "audio/wave": "WAV", "audio/flac": "FLAC",
              "audio/x-flac": "FLAC", "audio/mpeg": "MP3", "audio/mp3": "MP3", "audio/ogg": "OGG",
              "audio/pcm": "PCM"}
_SF_FORMATS = {"WAV": ("WAV", "WAVEX", "RF64"), "FLAC": ("FLAC",), "MP3": ("MP3",), "OGG": ("OGG",)}
_EXACT_LENGTH = frozenset({"WAV", "FLAC", "OGG", "PCM"})  # see the module docstring on MP3
# libsndfile reports SF_COUNT_MAX frames when a FLAC header leaves the length out (streamed FLAC).
_UNKNOWN_FRAMES = 2**62
_PCM_RATES = (1_000, 384_000)
_HEAD_BYTES = 65_536  # enough for the RIFF chunks before "data" in any ordinary WAV


@dataclasses.dataclass(frozen=True)
class MelSpec:
    """Whisper's front end: 25 ms windows, 10 ms hop at 16 kHz -> 100 frames/s."""

    n_mels: int = 80
    n_fft: int = 400
    hop: int = 160
    window_frames: int = 1000  # frames per encoder window (10 s)
    # Frames of the neighbouring audio a window also holds on each side (0: Whisper's plain cut).
    # Windows then start every stride_frames = window_frames - 2 * context_frames, and the encoder
    # hands on only the rows of their middle stride_frames, so a sound cut by a stride edge is
    # still heard whole by the window whose middle it starts in (if it is under context long).
    context_frames: int = 0

    def __post_init__(self):
        if min(self.n_mels, self.n_fft, self.hop, self.window_frames) < 1 or self.context_frames < 0:
            raise ValueError(f"MelSpec fields must all be >= 1 (context_frames >= 0), got {self}")
        if self.stride_frames < 1:
            raise ValueError(f"MelSpec.context_frames={self.context_frames} leaves no middle in a window of "
                             f"{self.window_frames} frames; it must be under window_frames / 2")

    @property
    def stride_frames(self) -> int:
        """Frames from one window's start to the next's: window_frames - 2 * context_frames."""
        return self.window_frames - 2 * self.context_frames

    @property
    def window_samples(self) -> int:
        """16 kHz samples behind one window: window_frames * hop (160000 = 10 s)."""
        return self.window_frames * self.hop

    @property
    def stride_samples(self) -> int:
        """16 kHz samples whose rows one window hands on: stride_frames * hop."""
        return self.stride_frames * self.hop

    @property
    def context_samples(self) -> int:
        return self.context_frames * self.hop

    def window_count(self, samples: int) -> int:
        """How many windows MelFrames makes of `samples` samples: ceil(samples / stride_samples)."""
        return -(-samples // self.stride_samples)


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """Header facts. format: WAV, FLAC, MP3, OGG or PCM; duration_s is an estimate for MP3 only."""

    format: str
    duration_s: float
    sample_rate: int
    channels: int
    frames: int = dataclasses.field(default=0, compare=False)  # samples per channel, as declared


def parse_mime(mime_type: str) -> tuple[str, dict[str, str]]:
    """"audio/pcm;rate=16000" -> ("audio/pcm", {"rate": "16000"}); type and keys lower-cased."""
    base, *items = mime_type.split(";")
    params = {}
    for item in items:
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise MediaError(f"malformed MIME parameter {item.strip()!r} in {mime_type!r}; expected key=value")
        params[key.strip().lower()] = value.strip().strip('"')
    return base.strip().lower(), params


def probe_audio(source: bytes | str | os.PathLike, mime_type: str, *,
                max_seconds: float = DEFAULT_MAX_SECONDS) -> AudioInfo:
    """Format, duration, rate and channels from the header; MediaError / MediaTooLarge on bad input."""
    f, fmt = _open(source, mime_type)
    with f:
        frames, rate, channels = f.frames, f.samplerate, f.channels
    if frames >= _UNKNOWN_FRAMES:
        raise MediaError(f"{fmt} header does not state the audio length (written by a streaming "
                         f"encoder); re-encode it to a file, or send WAV")
    if frames == 0:
        raise MediaError(f"no audio frames in the {fmt} data (empty or cut-off stream)")
    duration = frames / rate
    if duration > max_seconds:
        raise MediaTooLarge(f"audio is {duration:.1f} s long, over the limit of {max_seconds:g} s")
    return AudioInfo(format=fmt, duration_s=duration, sample_rate=rate, channels=channels,
                     frames=frames)


def stream_samples(source: bytes | str | os.PathLike, mime_type: str, *,
                   block_seconds: float = 10.0) -> Iterator[np.ndarray]:
    """float32 [n] chunks of mono 16 kHz audio; concatenated they equal resampling the whole at once.

    The file is opened (and MIME/format checked) now; decoding happens as the iterator is consumed.
    """
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be > 0, got {block_seconds}")
    f, fmt = _open(source, mime_type)
    return _decode(f, fmt, block_seconds)


def log_mel(samples: np.ndarray, spec: MelSpec = MelSpec()) -> np.ndarray:
    """float32 [n_mels, len // hop]: WhisperFeatureExtractor's log-mel of 16 kHz samples [len]."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"log_mel takes 1-D samples (at least 2), got shape {list(x.shape)}")
    padded = np.pad(x, spec.n_fft // 2, mode="reflect")  # center=True
    frames = np.lib.stride_tricks.sliding_window_view(padded, spec.n_fft)[:: spec.hop]  # [F, n_fft]
    power = np.abs(np.fft.rfft(frames * _hann(spec.n_fft), axis=-1)) ** 2  # [F, n_fft // 2 + 1]
    mel = _mel_filters(spec.n_mels, spec.n_fft) @ power.T  # [n_mels, F]
    log = np.log10(np.maximum(mel, 1e-10))[:, :-1]  # Whisper drops the last STFT frame
    log = np.maximum(log, log.max() - 8.0)  # 80 dB dynamic range below the loudest bin
    return ((log + 4.0) / 4.0).astype(np.float32)


class MelFrames:
    """Iterator of float32 [n_mels, window_frames] windows from a stream of 16 kHz chunks.

    Window k is log_mel of samples [k * S - C, k * S - C + W) of the whole stream, W =
    spec.window_samples, S = spec.stride_samples, C = spec.context_samples (with no context: [k * W,
    (k + 1) * W)); samples before the start or past the end are zeros (Whisper pads to 30 s the same
    way). Windows come until every sample has been in a window's middle [k * S, (k + 1) * S):
    spec.window_count(total_samples) of them. At most W samples are buffered. total_samples counts
    the samples consumed so far: exact once iteration ends.
    """

    def __init__(self, chunks: Iterable[np.ndarray], spec: MelSpec = MelSpec()):
        self.spec = spec
        self.total_samples = 0
        self._chunks = iter(chunks)
        self._windows = self._generate(self._chunks)

    def __iter__(self) -> MelFrames:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._windows)

    @property
    def duration_s(self) -> float:
        return self.total_samples / SAMPLE_RATE

    def close(self) -> None:
        """Stop early: ends the iteration and closes the chunk source if it can be (a decoder's file)."""
        self._windows.close()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def _generate(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        size, keep = self.spec.window_samples, 2 * self.spec.context_samples
        buf = np.zeros(size, np.float32)  # [W]; log_mel copies it, so it is reused
        filled = keep // 2  # the first window's left context: before the start, silence
        for chunk in chunks:
            chunk = np.asarray(chunk, dtype=np.float32)
            if chunk.ndim != 1:
                raise ValueError(f"MelFrames takes 1-D 16 kHz chunks, got shape {list(chunk.shape)}")
            self.total_samples += chunk.size
            pos = 0
            while pos < chunk.size:
                take = min(size - filled, chunk.size - pos)
                buf[filled:filled + take] = chunk[pos:pos + take]
                filled += take
                pos += take
                if filled == size:
                    yield log_mel(buf, self.spec)
                    buf[:keep] = buf[size - keep:]  # the next window's left context and its start
                    filled = keep
        while filled > keep // 2:  # samples that no window's middle has held yet
            buf[filled:] = 0.0
            yield log_mel(buf, self.spec)
            buf[:keep] = buf[size - keep:]
            filled -= size - keep


def mel_windows(chunks: Iterable[np.ndarray], spec: MelSpec = MelSpec()) -> MelFrames:
    """MelFrames(chunks, spec): windows of log-mel from 16 kHz chunks of any sizes."""
    return MelFrames(chunks, spec)


def load_windows(source: bytes | str | os.PathLike, mime_type: str, spec: MelSpec = MelSpec(), *,
                 max_seconds: float = DEFAULT_MAX_SECONDS) -> MelFrames:
    """Probe (raising now on bad or too-long input), then stream the log-mel windows."""
    probe_audio(source, mime_type, max_seconds=max_seconds)
    return MelFrames(stream_samples(source, mime_type), spec)


def token_count(duration_s: float, tokens_per_second: int) -> int:
    """ceil(duration_s * tokens_per_second), at least 1."""
    if duration_s < 0 or tokens_per_second <= 0:
        raise ValueError(f"need duration_s >= 0 and tokens_per_second > 0, "
                         f"got {duration_s} and {tokens_per_second}")
    # Round off float noise first: 0.3 s * 10 = 3.0000000000000004 must stay 3 tokens.
    return max(1, math.ceil(round(duration_s * tokens_per_second, 6)))


def _open(source, mime_type: str) -> tuple[sf.SoundFile, str]:
    """An open SoundFile whose container matches the MIME type, and that container's name."""
    base, params = parse_mime(mime_type)
    fmt = _CONTAINER.get(base)
    if fmt is None:
        raise MediaError(f"unsupported audio MIME type {base!r}; supported: {', '.join(MIME_TYPES)}")
    size = _byte_size(source)
    if size == 0:
        raise MediaError(f"empty audio data (MIME type {base})")
    if fmt == "PCM":
        rate = _pcm_rate(params, mime_type)
        if size % 2:
            raise MediaError(f"audio/pcm holds 16-bit samples, but the data has an odd byte count ({size})")
        return _soundfile(source, fmt, samplerate=rate, channels=1, format="RAW", subtype="PCM_16",
                          endian="LITTLE"), fmt
    f = _soundfile(source, fmt)
    if f.format not in _SF_FORMATS[fmt]:
        actual = f.format
        f.close()
        raise MediaError(f"MIME type {base} says {fmt} but the data is {actual}")
    lo, hi = _PCM_RATES
    if not lo <= f.samplerate <= hi:
        # A forged header rate would make one decode block the whole file and the resampler's
        # work absurd; no real recording is outside this range.
        rate = f.samplerate
        f.close()
        raise MediaError(f"{fmt} sample rate {rate} Hz is outside {lo}..{hi} Hz")
    if fmt == "WAV":
        declared, present = _wav_data_bytes(_head(source), size)
        if declared > present:
            f.close()
            raise MediaError(f"truncated WAV: its header declares {declared} bytes of audio, "
                             f"only {present} are present")
    return f, fmt


def _decode(f: sf.SoundFile, fmt: str, block_seconds: float) -> Iterator[np.ndarray]:
    with f:
        rate, declared = f.samplerate, f.frames
        block = max(1, int(block_seconds * rate))
        # One resampler for the whole stream keeps its filter state across blocks: no seams.
        resampler = (None if rate == SAMPLE_RATE else
                     soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"))
        decoded = 0
        while True:
            try:
                block_data = f.read(block, dtype="float32", always_2d=True)  # [n, channels]
            except sf.LibsndfileError as e:
                raise MediaError(f"{fmt} audio is corrupt or truncated: decoding failed past "
                                 f"{decoded / rate:.2f} s: {e.error_string}") from e
            if len(block_data) == 0:
                break
            decoded += len(block_data)
            if not np.isfinite(block_data).all():  # float WAV/FLAC can hold NaN or inf
                raise MediaError(f"{fmt} audio holds NaN or infinite samples past "
                                 f"{(decoded - len(block_data)) / rate:.2f} s")
            # Float formats may exceed full scale; any player clips there, and so do we, so
            # one loud sample cannot blow up the log-mel features.
            block_data = np.clip(block_data, -1.0, 1.0)
            mono = np.ascontiguousarray(block_data.mean(axis=1, dtype=np.float32))  # [n]
            out = mono if resampler is None else resampler.resample_chunk(mono)
            if out.size:
                yield out
        if fmt in _EXACT_LENGTH and decoded < declared:
            raise MediaError(f"truncated {fmt}: header declares {declared} frames ({declared / rate:.2f} s), "
                             f"only {decoded} ({decoded / rate:.2f} s) decode")
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if tail.size:
                yield tail


def _soundfile(source, fmt: str, **raw) -> sf.SoundFile:
    try:
        return sf.SoundFile(_readable(source), **raw)
    except sf.LibsndfileError as e:
        raise MediaError(f"unreadable audio (expected {fmt}): {e.error_string}") from e


def _readable(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    return os.fspath(source)


def _byte_size(source) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    try:
        return os.path.getsize(source)
    except OSError as e:
        raise MediaError(f"cannot read audio file {os.fspath(source)!r}: {e.strerror}") from e


def _head(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:_HEAD_BYTES])
    with open(source, "rb") as fh:
        return fh.read(_HEAD_BYTES)


def _pcm_rate(params: dict[str, str], mime_type: str) -> int:
    if params.get("channels", "1") != "1":
        raise MediaError(f"audio/pcm must be mono (channels=1), got {mime_type!r}")
    lo, hi = _PCM_RATES
    try:
        rate = int(params["rate"])
    except (KeyError, ValueError):
        raise MediaError(f"audio/pcm needs its sample rate as a parameter, e.g. "
                         f"'audio/pcm;rate=16000'; got {mime_type!r}") from None
    if not lo <= rate <= hi:
        raise MediaError(f"audio/pcm rate {rate} Hz is outside {lo}..{hi} Hz")
    return rate


def _wav_data_bytes(head: bytes, size: int) -> tuple[int, int]:
    """(declared, present) bytes of the RIFF "data" chunk; (0, 0) when not found or length unknown."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return 0, 0  # RF64 / RIFX: leave it to libsndfile
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, length = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk_id == b"data":
            if length in (0, 0xFFFFFFFF):  # what streaming writers put when the length is unknown
                return 0, 0
            return length, size - pos - 8
        pos += 8 + length + (length & 1)  # chunks are padded to even sizes
    return 0, 0


@functools.cache
def _hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window [n_fft] (torch.hann_window / transformers' window_function default)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)


@functools.cache
def _mel_filters(n_mels: int, n_fft: int) -> np.ndarray:
    """Slaney mel filterbank [n_mels, n_fft // 2 + 1], 0..8 kHz, as Whisper's mel_filters.npz."""
    import librosa  # slow to import; only the first log_mel pays for it

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=n_fft, n_mels=n_mels, htk=False, norm="slaney",
                               dtype=np.float64)
