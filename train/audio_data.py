"""Seeded audio-needle examples: "The secret word is <word>" spoken into a noise sound track,
asked about in text, laid out id for id as the server lays out an audio prompt.

What `ringserve niah --modality audio` sends, and what the server makes of it:
- niah synthesises the haystack (`audio.synthesise(seed, trial, samples)`: pink noise with tone
  bursts at 16 kHz), has espeak-ng speak the needle (`audio.speak`: the `espeak-ng` binary when
  it is on PATH, else libespeak-ng, default voice "en" at 175 words per minute, a 16-bit WAV at
  22050 Hz), decodes that WAV to 16 kHz with ffmpeg (`audio.load_clip`: ffmpeg's resampler, then
  16-bit samples), splices it in, replacing samples, from `needle_start(total, clip, depth)`,
  and writes the track as 16-bit FLAC at 16 kHz (clipped to [-1, 32767/32768]); it asks "What
  is the secret word spoken in the audio?" under the classic system instruction;
- the server lays out <|media_start|>, ceil(seconds * tokens_per_second) rows, <|media_end|>
  (`server.media.MediaResolver`), decodes the FLAC (libsndfile: sample / 32768, no resampling at
  16 kHz) and cuts it into 10 s log-mel windows (`preprocess.audio.mel_windows`), each encoded to
  the rows of its middle (`server.media.MediaEmbedder`): with the model's `context_frames` C,
  windows start every 10 s - 2C and hand on (10 s - 2C) * tokens_per_second rows; with none,
  windows are back to back and hand on 10 * tokens_per_second.

Training takes its sound from the same path: a `ClipBank` is a few minutes of haystack noise made
by niah's `synthesise` (bank seeds away from niah's eval seeds) and, for every word, the needle
phrase spoken by libespeak-ng in several voices and rates, each written to a 16-bit WAV and
decoded by niah's own `load_clip` (ffmpeg), so the eval voice's clips ("en" at 175, always in the
bank) are niah's clips sample for sample. (espeak.resample, SciPy's polyphase filter, is not
ffmpeg's: its clips differ from niah's by about 1e-3 rms, -39 dB below the speech, up to 0.012 on
a sample; and decoding many clips in one ffmpeg call changes each clip's last ~16 samples, as
the resampler's flush differs, so each clip gets its own call.) It is built once, then cached
(`build/audio_bank/`).

An example is a whole number of 10 s windows: a random slice of the bank's noise (looped when the
track is longer than the noise), the needle clip of its word spliced in at its depth exactly as
niah splices it, quantised as the FLAC round trip does (round(x * 32768) / 32768 after niah's
clip: measured on soundfile's PCM_16 FLAC write and read), then cut into log-mel windows by the
server's own `mel_windows` (`mel_spec`: the model's window and context). The rows are seconds *
tokens_per_second; the last window's rows past the track's end, if any, go nowhere (position
-1). The answer is the word, then <end_of_turn>; the loss is on those tokens only.

Limits: the words are niah's 32 key nouns in one phrase; the voices are espeak-ng's, robotic
and few (an eval with the binary espeak-ng of another version, or a user's --needle-audio clip,
sounds otherwise); the haystack is niah's synthetic noise, not a user's --haystack sound. The
server's log-mel costs about 40 ms per window here: an example of 80 windows (8k tokens) takes
seconds to make.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from model import presets
from preprocess import audio as audio_lib
from preprocess.audio import MelSpec
from preprocess.tokenizer import Tokenizer
from ringserve.niah import audio as niah_audio
from ringserve.niah import espeak
from ringserve.niah import media_tasks, speech
from ringserve.niah.tasks import _NOUNS
from server.media import MEDIA_END, MEDIA_START
from train import media_batch

TASK = 'audio'
LOOP_TASK = 'audio_loop'  # the needle phrase looped over the whole track: the "hearing" stage
# The needle clip cut by a window edge, or ending with the track: where niah's grid depths often
# put it (depth 100 always; 25, 50 and 75 whenever they land near a multiple of 10 s), and where
# the shipped model missed (docs/benchmarks.md "The audio needle").
EDGE_TASK = 'audio_edge'
# The needle inside other speech: the bank's haystack is niah's speech haystack (other espeak-ng
# voices reading prose, `speech.synthesise`) instead of its noise.
SPEECH_TASK = 'audio_speech'
HAYSTACKS = ('noise', 'speech')
SAMPLE_RATE = niah_audio.SAMPLE_RATE  # 16 kHz: niah's track, the server's samples
WINDOW_S = 10  # seconds of sound per encoder window (MelSpec().window_samples / SAMPLE_RATE)
BANK_SEED = 7_000_000  # the noise's seed; niah's eval uses small seeds (default 0)
EVAL_BANK_SEED = 7_500_000  # for evals: noise training never heard
BANK_DIR = presets.REPO_ROOT / 'build' / 'audio_bank'
WORDS = _NOUNS
EVAL_VOICE, EVAL_RATE = 'en', 175  # what niah's `audio.speak` uses: espeak-ng's defaults
# Six accents and timbres, two of them female. Not the breathy variants (+f2, +f3, +f5,
# +whisper): libespeak-ng seeds their breath noise from the clock (time()), so their samples
# change from one second to the next, and a bank of them would not be rebuilt the same.
VOICES = ('en', 'en-us', 'en-gb-scotland', 'en-029', 'en+f4', 'en-us+f1')
RATES = (140, 175, 220)
_PCM = 32768.0  # 16-bit sample scale: libsndfile and niah's ffmpeg reader divide by it


@dataclasses.dataclass(frozen=True)
class ClipBank:
    """Haystack noise and needle clips, 16 kHz mono, as niah makes them."""

    noise: np.ndarray  # f32[N]: niah's synthesised haystack, from the bank's seed
    clips: np.ndarray  # i16[S]: every clip's 16-bit samples, concatenated (/ 32768: floats)
    offsets: np.ndarray  # i64[C + 1]: clip c is clips[offsets[c]:offsets[c + 1]]
    clip_words: tuple[str, ...]  # [C]
    clip_voices: tuple[str, ...]  # [C]
    clip_rates: tuple[int, ...]  # [C]: words per minute

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.clip_words))

    def __len__(self) -> int:
        return len(self.clip_words)

    def clip(self, c: int) -> np.ndarray:
        """f32[n]: clip c's samples as niah's `load_clip` gives them."""
        return self.clips[self.offsets[c]:self.offsets[c + 1]].astype(np.float32) / _PCM

    def clips_of(self, word: str) -> np.ndarray:
        """i64[k]: the indices of `word`'s clips."""
        return np.flatnonzero(np.asarray(self.clip_words) == word)

    def index(self, word: str, voice: str = EVAL_VOICE, rate: int = EVAL_RATE) -> int:
        """The clip of `word` in `voice` at `rate` (default: niah's eval voice)."""
        for c, key in enumerate(zip(self.clip_words, self.clip_voices, self.clip_rates)):
            if key == (word, voice, rate):
                return c
        raise ValueError(f'the bank has no clip of {word!r} in voice {voice!r} at rate {rate}.')


def _speak(text: str, voice: str, rate: int, tmp: Path) -> np.ndarray:
    """i16[n]: `text` by libespeak-ng, through a 16-bit WAV and niah's `load_clip` (ffmpeg)."""
    samples, sr = espeak.synthesise(text, voice=voice, rate=rate)
    path = tmp / 'clip.wav'
    sf.write(path, samples, sr, format='WAV', subtype='PCM_16')  # what `audio.speak` writes
    clip = niah_audio.load_clip(path)  # f32[n]: int16 / 32768
    return np.round(clip * _PCM).astype(np.int16)


def clip_keys(voices: tuple[str, ...], rates: tuple[int, ...]) -> list[tuple[str, int]]:
    """Each word's (voice, rate)s: every voice at every rate, niah's eval voice first when
    those leave it out."""
    keys = [(EVAL_VOICE, EVAL_RATE)] + [(v, int(r)) for v in voices for r in rates]
    if (EVAL_VOICE, EVAL_RATE) in keys[1:]:
        keys = keys[1:]
    return list(dict.fromkeys(keys))


def build_bank(*, voices: tuple[str, ...] = VOICES, rates: tuple[int, ...] = RATES,
               noise_seconds: int = 300, cache_dir: Path | None = BANK_DIR,
               seed: int = BANK_SEED, haystack: str = 'noise') -> ClipBank:
    """`noise_seconds` of niah's haystack from `seed` (`haystack`: 'noise', its synthesised
    noise, or 'speech', its speech haystack), and every word spoken in every voice at every rate,
    plus niah's eval voice (EVAL_VOICE at EVAL_RATE) when those leave it out; cached by its
    parameters (cache_dir None: not cached). Evals take another `seed` (EVAL_BANK_SEED): sound
    training never heard."""
    if haystack not in HAYSTACKS:
        raise ValueError(f'haystack={haystack!r}: use one of {HAYSTACKS}.')
    voices, rates = tuple(voices), tuple(int(r) for r in rates)
    if not voices or not rates:
        raise ValueError(f'a clip bank needs at least one voice and one rate, got voices={voices} '
                         f'and rates={rates}.')
    if noise_seconds < 1:
        raise ValueError(f'noise_seconds={noise_seconds}: the bank needs at least 1 s of noise.')
    keys = clip_keys(voices, rates)
    params = {'keys': keys, 'noise_seconds': noise_seconds, 'seed': seed, 'words': list(WORDS),
              'version': 1}
    if haystack != 'noise':  # the noise banks' cache tags stay as they were
        # the sentences come from the running interpreter's docstrings: another Python, another bank
        lines = hashlib.sha256('\n'.join(speech.default_lines()).encode()).hexdigest()[:12]
        params.update(haystack=haystack, speech_version=speech.VERSION, lines=lines)
    tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cached = cache_dir / f'bank-{tag}.npz' if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            return ClipBank(z['noise'], z['clips'], z['offsets'],
                            tuple(str(w) for w in z['clip_words']),
                            tuple(str(v) for v in z['clip_voices']),
                            tuple(int(r) for r in z['clip_rates']))
    if haystack == 'speech':
        noise = np.concatenate(list(speech.synthesise(speech.default_lines(), seed, 0,
                                                      noise_seconds * SAMPLE_RATE)))
    else:
        noise = np.concatenate(list(niah_audio.synthesise(seed, 0, noise_seconds * SAMPLE_RATE)))
    task = media_tasks.AudioSecretWord()
    spoken, words, names, speeds = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for word in WORDS:
            for voice, rate in keys:
                spoken.append(_speak(task.phrase(word), voice, rate, Path(tmp)))
                words.append(word)
                names.append(voice)
                speeds.append(rate)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in spoken])]).astype(np.int64)
    bank = ClipBank(noise.astype(np.float32), np.concatenate(spoken), offsets, tuple(words),
                    tuple(names), tuple(speeds))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix='.npz', delete=False) as f:
            np.savez(f, noise=bank.noise, clips=bank.clips, offsets=bank.offsets,
                     clip_words=np.array(words), clip_voices=np.array(names),
                     clip_rates=np.array(speeds, np.int64))
        Path(f.name).replace(cached)
    return bank


def quantise(samples: np.ndarray) -> np.ndarray:
    """f32[n]: `samples` as niah's FLAC holds them and the server reads them back: clipped to
    [-1, 32767/32768] (niah's `build`), then soundfile's PCM_16 round trip, round(x * 32768) /
    32768 (checked sample for sample against soundfile)."""
    clipped = np.clip(np.asarray(samples, np.float32), -1.0, 32767 / 32768)
    return (np.round(clipped.astype(np.float64) * _PCM) / _PCM).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SoundTrack:
    """An example's sound before the server's front end: what niah's FLAC decodes to."""

    samples: np.ndarray  # f32[windows * window_samples], quantised as the FLAC round trip does
    needle_start: int  # the clip's first sample
    clip: int  # which of the bank's clips
    word: str
    noise_start: int  # the bank noise's sample at the track's start (-1: the given `noise`)


def mel_spec(cfg) -> MelSpec:
    """The server's log-mel windows for a model's AudioConfig (server.media.MediaEmbedder's)."""
    return MelSpec(n_mels=cfg.n_mels, window_frames=cfg.window_frames, context_frames=cfg.context_frames)


def edge_start(total: int, clip: int, window: int, rng: np.random.Generator) -> int:
    """Where a `clip`-sample needle starts in a `total`-sample track so that one of the track's
    window edges (the multiples of `window`, its end included, each as likely) falls inside the
    clip, at a uniform point of it; at the track's end the clip ends with the track. `window`:
    MelSpec.stride_samples, where one window's middle ends and the next's begins."""
    if not 0 < clip <= total:
        raise ValueError(f'a {clip}-sample clip does not fit a {total}-sample track.')
    edge = window * int(rng.integers(1, total // window + 1))
    return min(max(edge - int(rng.integers(1, clip + 1)), 0), total - clip)


def sound_track(bank: ClipBank, windows: int, depth: float | None, rng: np.random.Generator, *,
                mel_spec: MelSpec = MelSpec(), word: str | None = None, clip: int | None = None,
                noise: np.ndarray | None = None, loop: bool = False, edge: bool = False) -> SoundTrack:
    """`windows` windows of sound: bank noise from a random sample on (looped when the track is
    longer), or the first samples of `noise`; the needle clip (`clip`, else a random one of
    `word`'s, else of a random word's) spliced in at `depth` (0 to 1; None: random) as niah
    splices it; quantised as niah's FLAC is.

    `loop`: the word is said all through the track instead (`loop_needles`), for the first,
    "hearing" stage: a needle that fills a tenth of one window's rows gives the encoder almost no
    gradient while the decoder still attends evenly (measured: 200 steps at chance).
    `edge`: the clip goes across a window edge or ends the track (`edge_start`), not at a depth."""
    if windows < 1:
        raise ValueError(f'windows={windows}: an audio example needs at least one window.')
    if edge and (loop or depth is not None):
        raise ValueError('edge places the needle itself: it takes neither a depth nor loop.')
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f'depth={depth}: must be in [0, 1].')
    if word is not None and word not in bank.clip_words:
        raise ValueError(f'word={word!r} has no clip in the bank; its words: {", ".join(bank.words)}.')
    if clip is not None:
        if not 0 <= clip < len(bank):
            raise ValueError(f'clip={clip}: the bank has clips 0 to {len(bank) - 1}.')
        if word is not None and bank.clip_words[clip] != word:
            raise ValueError(f'clip={clip} says {bank.clip_words[clip]!r}, not word={word!r}.')
        c = clip
    else:
        if word is None:
            word = bank.words[int(rng.integers(len(bank.words)))]
        choices = bank.clips_of(word)
        c = int(choices[rng.integers(len(choices))])
    total = windows * mel_spec.window_samples
    if noise is not None:
        if len(noise) < total:
            raise ValueError(f'noise has {len(noise)} samples; {windows} windows take {total}.')
        track, first = np.array(noise[:total], np.float32), -1
    else:
        n = len(bank.noise)
        first = int(rng.integers(n - total + 1)) if total <= n else int(rng.integers(n))
        track = np.take(bank.noise, np.arange(first, first + total), mode='wrap').astype(np.float32)
    if depth is None and not edge:
        depth = float(rng.random())
    needle = bank.clip(c)
    if loop:
        start = loop_needles(track, bank, c, rng)
    else:
        start = (edge_start(total, len(needle), mel_spec.stride_samples, rng) if edge
                 else niah_audio.needle_start(total, len(needle), depth * 100))  # niah's depth is in %
        track[start:start + len(needle)] = needle
    return SoundTrack(quantise(track), start, c, bank.clip_words[c], first)


def loop_needles(track: np.ndarray, bank: ClipBank, clip: int, rng: np.random.Generator) -> int:
    """Splices `clip`, then random clips of its word (any voice and rate), one after another
    with 0.1-0.5 s of the track between them, from a random start in the first half second
    until the next would not fit; returns the first clip's first sample."""
    choices = bank.clips_of(bank.clip_words[clip])
    first = at = int(rng.integers(SAMPLE_RATE // 2))
    c = clip
    while True:
        needle = bank.clip(c)
        if at + len(needle) > len(track):
            return first
        track[at:at + len(needle)] = needle
        at += len(needle) + int(rng.integers(SAMPLE_RATE // 10, SAMPLE_RATE // 2))
        c = int(choices[rng.integers(len(choices))])


@dataclasses.dataclass(frozen=True)
class AudioExample(media_batch.MediaExample):
    """One rendered exchange over a sound track. Token offsets index `input_ids`."""

    input_ids: np.ndarray  # i32[T]: prompt, answer, <end_of_turn>; 0 where a sound row goes
    loss_mask: np.ndarray  # bool[T]: True on the answer tokens and the <end_of_turn>
    prompt_len: int
    mel: np.ndarray  # f32[Wn, n_mels, window_frames]: the server's log-mel windows
    row_positions: np.ndarray  # i32[Wn, R]: where window k's R rows go in input_ids (-1: nowhere)
    needle_start_s: float  # when the needle clip starts (needle_start_s * 16000: its sample)
    needle_seconds: float  # how long it lasts
    word: str  # what the clip says: the answer
    voice: str  # the clip's espeak-ng voice
    rate: int  # and its words per minute
    clip: int = -1  # the bank's clip

    @property
    def task(self) -> str:
        return TASK


def _layout(rows: int, tokenizer: Tokenizer, placeholder: int) -> list[int]:
    start, end = tokenizer.token_id(MEDIA_START), tokenizer.token_id(MEDIA_END)
    return ([start] if start is not None else []) + [placeholder] * rows + (
        [end] if end is not None else [])


def media_ids(seconds: float, tokens_per_second: int, tokenizer: Tokenizer,
              placeholder: int = -1) -> list[int]:
    """A sound's ids as server.media lays them out, every row id `placeholder`."""
    return _layout(audio_lib.token_count(seconds, tokens_per_second), tokenizer, placeholder)


def _render(sound_ids: list[int], word: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    return media_batch.render(sound_ids, media_tasks.AUDIO_QUESTION, word, tokenizer)


def windows_for_length(length: int, tokens_per_second: int, tokenizer: Tokenizer,
                       window_s: int = WINDOW_S) -> int:
    """How many whole `window_s` windows fit an example of at most `length` tokens."""
    if tokens_per_second < 1 or window_s < 1:
        raise ValueError(f'need tokens_per_second >= 1 and window_s >= 1, got {tokens_per_second} '
                         f'and {window_s}.')
    fixed = len(_render(_layout(0, tokenizer, -1), WORDS[0], tokenizer)[0])
    fixed += max(len(tokenizer.encode(w)) for w in WORDS) + 1
    per_window = window_s * tokens_per_second
    count = (length - fixed) // per_window
    if count < 1:
        raise ValueError(f'length={length} is too short for an audio example: the template and one '
                         f'{window_s} s window take {fixed + per_window} tokens.')
    return count


def example(bank: ClipBank, windows: int, depth: float | None, rng: np.random.Generator, *,
            tokens_per_second: int, tokenizer: Tokenizer, mel_spec: MelSpec = MelSpec(),
            word: str | None = None, clip: int | None = None,
            noise: np.ndarray | None = None, loop: bool = False, edge: bool = False) -> AudioExample:
    """`windows` windows of sound with the needle at `depth` (0 to 1; None: random), saying
    `word` (None: a random one) in the bank's `clip` (None: a random one of the word's), over
    bank noise from a random sample (or the first samples of `noise`). The rng draws are
    `sound_track`'s, so the same seed gives the same track there."""
    if mel_spec.window_samples % SAMPLE_RATE:
        raise ValueError(f'{mel_spec}: a window must be whole seconds ({mel_spec.window_samples} '
                         f'samples at {SAMPLE_RATE} Hz).')
    if tokens_per_second < 1:
        raise ValueError(f'tokens_per_second={tokens_per_second}: must be >= 1.')
    track = sound_track(bank, windows, depth, rng, mel_spec=mel_spec, word=word, clip=clip,
                        noise=noise, loop=loop, edge=edge)
    window_s = mel_spec.window_samples // SAMPLE_RATE
    mel = np.stack(list(audio_lib.mel_windows([track.samples], mel_spec)))  # [Wn, M, A]
    assert len(mel) == mel_spec.window_count(len(track.samples))
    sound = media_ids(windows * window_s, tokens_per_second, tokenizer)
    prompt_ids, answer_ids = _render(sound, track.word, tokenizer)
    ids = np.asarray(prompt_ids + answer_ids, np.int64)
    holes = np.flatnonzero(ids == -1).astype(np.int32)
    assert len(holes) == windows * window_s * tokens_per_second
    rows, odd = divmod(mel_spec.stride_samples * tokens_per_second, SAMPLE_RATE)  # per window
    if odd:
        raise ValueError(f'{mel_spec}: a window\'s middle is not a whole number of rows at '
                         f'{tokens_per_second} per second.')
    ids[holes] = 0
    holes = np.concatenate([holes, np.full(len(mel) * rows - len(holes), -1, np.int32)])
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    c = track.clip
    return AudioExample(ids.astype(np.int32), mask, len(prompt_ids), mel,
                        holes.reshape(len(mel), rows), track.needle_start / SAMPLE_RATE,
                        float(bank.offsets[c + 1] - bank.offsets[c]) / SAMPLE_RATE, track.word,
                        bank.clip_voices[c], bank.clip_rates[c], c)


@dataclasses.dataclass(frozen=True)
class AudioBatch:
    """Examples padded to T tokens and Wn windows. Padding windows are zeros and their row
    positions are T (dropped by the scatter); padding tokens are never trained on."""

    tokens: np.ndarray  # i32[B, T]
    loss_mask: np.ndarray  # bool[B, T]
    mel: np.ndarray  # f32[B, Wn, n_mels, window_frames]
    row_positions: np.ndarray  # i32[B, Wn * R]
    embed_mask: np.ndarray  # bool[B, T]
    examples: tuple[AudioExample, ...]


def pad_batch(examples: list[AudioExample], length: int, pad_id: int = 0) -> AudioBatch:
    arrays = media_batch.pad(examples, [e.mel for e in examples], length, pad_id)
    return AudioBatch(*arrays, tuple(examples))


def sample_batch(rng: np.random.Generator, batch: int, length: int, bank: ClipBank, *,
                 tokens_per_second: int, tokenizer: Tokenizer, loop: bool = False,
                 edge: bool = False, mel_spec: MelSpec = MelSpec()) -> AudioBatch:
    """`batch` examples of as many windows as fit `length` tokens, random words, clips, depths
    (`loop`: the word said all through; `edge`: across a window edge; see `sound_track`)."""
    count = windows_for_length(length, tokens_per_second, tokenizer)
    examples = [example(bank, count, None, rng, tokens_per_second=tokens_per_second,
                        tokenizer=tokenizer, loop=loop, edge=edge, mel_spec=mel_spec) for _ in range(batch)]
    return pad_batch(examples, length, max(tokenizer.pad_id, 0))
