"""Speech from libespeak-ng through ctypes: no `espeak-ng` binary needed.

The library and its data (espeak-ng-data) come from the `espeakng-loader` wheel
(`pip install espeakng-loader`). `synthesise` speaks a text with one voice, rate and pitch and
returns float32 mono samples at espeak's own rate (22050 Hz); `synthesise_16k` resamples them to
16 kHz.

Determinism: libespeak-ng keeps state between utterances that neither espeak_Terminate nor a
second espeak_Initialize resets (static variables inside its wave generator: the pitch flutter's
phase, the gain control, the cycle counter), so the same text spoken twice in one process comes
out a few samples apart. Each call therefore loads the library afresh, initialises it, speaks
and unloads it (dlclose): about a millisecond, and the same input gives the same samples, except
with the breathy variants (BREATHY_VARIANTS: "+f2", "+f3", "+f5", "+whisper"), whose breath noise
the library seeds from the clock: they change from one second to the next (about -22 dB).

The library is not thread-safe and has one global state: every call holds a process-wide lock.
Note that espeak_Initialize ends the whole process when its data directory is unusable, so the
data directory is checked before it is called.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import threading

import numpy as np

SAMPLE_RATE = 22_050  # what espeak_Initialize returns for espeak-ng's voices
TARGET_RATE = 16_000  # synthesise_16k's rate
RATE_RANGE = (80, 450)  # words per minute espeak-ng accepts (without sonic speed-up)
PITCH_RANGE = (0, 100)
INSTALL = "pip install espeakng-loader"

# Verified to produce speech (tests/test_espeak.py checks each): base voices, then variants
# ("voice+variant", a file under espeak-ng-data/voices/!v) of the British and American voices.
ENGLISH_BASE_VOICES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
                       "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
ENGLISH_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                    "croak", "klatt", "klatt2", "klatt3", "whisper")
BREATHY_VARIANTS = ("f2", "f3", "f5", "whisper")  # not repeatable: breath noise seeded by the clock
ENGLISH_VOICES = ENGLISH_BASE_VOICES + tuple(
    f"{base}+{variant}" for base in ("en", "en-us") for variant in ENGLISH_VARIANTS)

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_EE_OK, _EE_NOT_FOUND = 0, 2
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)  # t_espeak_callback(short*, int, espeak_EVENT*)

_LOCK = threading.Lock()


class EspeakError(RuntimeError):
    """libespeak-ng cannot be loaded or used, or it refused a voice; the message says why."""


def _paths() -> tuple[str, pathlib.Path]:
    """The library's path and the directory CONTAINING espeak-ng-data (what espeak_Initialize
    takes: it appends "/espeak-ng-data"; the bundled 1.52 also accepts the data directory
    itself, but the parent is the documented form)."""
    try:
        import espeakng_loader
    except ImportError:
        raise EspeakError(f"speech synthesis needs libespeak-ng: {INSTALL}") from None
    library = pathlib.Path(espeakng_loader.get_library_path())
    try:
        data = pathlib.Path(espeakng_loader.get_data_path())
    except RuntimeError as e:
        raise EspeakError(f"espeakng-loader's espeak-ng-data is missing ({e}); reinstall it: "
                          f"{INSTALL}") from None
    if not library.is_file():
        raise EspeakError(f"espeakng-loader's library {library} is missing; reinstall it: "
                          f"{INSTALL}")
    for name in ("phontab", "phondata", "phonindex", "intonations", "en_dict"):
        if not (data / name).is_file():  # espeak_Initialize would exit() the process
            raise EspeakError(f"espeak-ng-data at {data} has no {name}; reinstall it: {INSTALL}")
    return str(library), data


def _load() -> ctypes.CDLL:
    library, _ = _paths()
    try:
        lib = ctypes.CDLL(library)
    except OSError as e:
        raise EspeakError(f"cannot load libespeak-ng from {library}: {e}") from None
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    for name in ("espeak_SetVoiceByName", "espeak_SetParameter", "espeak_Synth",
                 "espeak_Synchronize", "espeak_Terminate"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _unload(lib: ctypes.CDLL) -> None:
    import _ctypes
    # dlclose (POSIX) or FreeLibrary (Windows): the next _load starts from fresh static state
    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    if close is not None:
        close(lib._handle)


def available() -> bool:
    """Whether libespeak-ng (from espeakng-loader) is installed, loads and has its data."""
    try:
        with _LOCK:
            _unload(_load())
    except EspeakError:
        return False
    return True


def variants() -> list[str]:
    """The voice variants espeak-ng-data has (the part after '+' in a voice name)."""
    _, data = _paths()
    return sorted(p.name for p in (data / "voices" / "!v").iterdir() if p.is_file())


def voices() -> list[str]:
    """The English voices checked to speak (ENGLISH_VOICES): base voices and voice+variant.
    Any other espeak-ng voice name works too (e.g. "de", "fr+f2")."""
    return list(ENGLISH_VOICES)


def _check_voice(voice: str) -> None:
    base, _, variant = voice.partition("+")
    if not base:
        raise EspeakError(f"unknown espeak-ng voice {voice!r}: no voice before '+'")
    # espeak_SetVoiceByName ignores an unknown variant silently (the plain voice speaks)
    if variant and ("/" in variant or not (_paths()[1] / "voices" / "!v" / variant).is_file()):
        raise EspeakError(f"unknown espeak-ng voice variant {variant!r} in {voice!r}; "
                          f"variants: {', '.join(variants())}")


def synthesise(text: str, *, voice: str = "en", rate: int = 175,
               pitch: int = 50) -> tuple[np.ndarray, int]:
    """`text` spoken by libespeak-ng: float32 [n] mono samples in [-1, 1) and their sample rate
    (SAMPLE_RATE, 22050 Hz).

    voice: an espeak-ng voice name, optionally with "+variant" (e.g. "en-us+f3"; ENGLISH_VOICES
    lists English ones that work). rate: words per minute, 80 to 450. pitch: 0 to 100 (50 is
    the voice's own). The same arguments give the same samples, except with BREATHY_VARIANTS.

    Raises EspeakError when the library is missing or the voice unknown, ValueError for an
    empty text or a rate or pitch out of range.
    """
    if not text.strip():
        raise ValueError("nothing to speak: the text is empty")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise ValueError(f"rate is {RATE_RANGE[0]} to {RATE_RANGE[1]} words per minute, "
                         f"got {rate}")
    if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
        raise ValueError(f"pitch is {PITCH_RANGE[0]} to {PITCH_RANGE[1]}, got {pitch}")
    _check_voice(voice)
    _, data = _paths()
    chunks: list[np.ndarray] = []

    def collect(wav, count, events) -> int:
        if wav and count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())  # [count] int16
        return 0  # 0: go on

    callback = _CALLBACK(collect)  # referenced until the library is unloaded
    encoded = text.encode("utf-8")
    with _LOCK:
        lib = _load()
        try:
            rate_hz = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                            os.fsencode(data.parent), 0)
            if rate_hz <= 0:
                raise EspeakError(f"espeak_Initialize failed ({rate_hz}) with data at {data}")
            try:
                lib.espeak_SetSynthCallback(callback)
                status = lib.espeak_SetVoiceByName(voice.encode("utf-8"))
                if status == _EE_NOT_FOUND:
                    raise EspeakError(f"unknown espeak-ng voice {voice!r}; English ones: "
                                      f"{', '.join(ENGLISH_BASE_VOICES)} (+variant, e.g. en+f3)")
                if status != _EE_OK:
                    raise EspeakError(f"espeak_SetVoiceByName({voice!r}) failed ({status})")
                for parameter, value in ((_RATE, rate), (_PITCH, pitch)):
                    status = lib.espeak_SetParameter(parameter, value, 0)
                    if status != _EE_OK:
                        raise EspeakError(f"espeak_SetParameter({parameter}, {value}) failed "
                                          f"({status})")
                status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0,
                                          _CHARS_UTF8, None, None)
                if status != _EE_OK:
                    raise EspeakError(f"espeak_Synth failed ({status}) on {text!r}")
                lib.espeak_Synchronize()
            finally:
                lib.espeak_Terminate()
        finally:
            _unload(lib)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)  # [n]
    return (samples.astype(np.float32) / 32768.0), rate_hz


def resample(samples: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    """float32 [n] at `rate` -> float32 [ceil(n * target / rate)] at `target`: scipy's polyphase
    filter when SciPy is installed, else band-limited FFT resampling with NumPy."""
    if rate == target:
        return samples.astype(np.float32)
    g = np.gcd(rate, target)
    up, down = target // g, rate // g
    try:
        from scipy.signal import resample_poly
    except ImportError:
        return _resample_fft(samples, up, down)
    return resample_poly(samples, up, down).astype(np.float32)


def _resample_fft(samples: np.ndarray, up: int, down: int) -> np.ndarray:
    n = len(samples)
    out = -(-n * up // down)  # ceil, like resample_poly
    # zeros either side keep the FFT's wrap-around out of the clip; whole multiples of `down`
    # put the clip's first sample exactly on an output sample
    left = down * -(-max(64, n // 8) // down)
    right = left + (-(n + 2 * left)) % down
    padded = np.pad(samples.astype(np.float64), (left, right))  # [total], total % down == 0
    total = len(padded)
    total_out = total // down * up
    spectrum = np.fft.rfft(padded)  # [total // 2 + 1]
    keep = min(len(spectrum), total_out // 2 + 1)
    resampled = np.fft.irfft(spectrum[:keep], total_out) * (total_out / total)  # [total_out]
    start = left // down * up
    return resampled[start:start + out].astype(np.float32)


def synthesise_16k(text: str, **kwargs) -> np.ndarray:
    """`synthesise(text, **kwargs)` resampled to 16 kHz: float32 [n] mono."""
    samples, rate = synthesise(text, **kwargs)
    return resample(samples, rate, TARGET_RATE)
