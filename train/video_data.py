"""Seeded video-needle examples: one frame reading "The secret word is: <word>" among filler
frames at 1 fps, asked about in text, laid out id for id as the server lays out a video prompt.

What `ringserve niah --task video` sends, and what the server makes of it:
- niah draws the needle frame (`frames.needle_frame`) and seeded filler frames
  (`frames.filler_frame`) at 256 x 256, writes them as a 1 fps H.264 mp4 (`ffmpeg.VideoWriter`),
  and asks "What is the secret word shown in the video?" under the classic system instruction;
- the server decodes the mp4 at 1 fps, scaled to the vision encoder's 64 x 64 (ffmpeg,
  `preprocess.video.frames`), and lays out <|media_start|>, then per frame "MM:SS" text and the
  frame's 16 rows, then <|media_end|> (`server.media.MediaResolver`).

Training takes its frames from the same path: a `FrameBank` is filler and needle frames drawn by
niah's own functions, written to mp4 by niah's writer and decoded by the server's reader, once,
then cached (`build/video_bank/`). Filler frames use bank seeds away from niah's eval seeds, and
each remembers the distractor words it shows, so an example never shows its needle word twice.
Needle frames come in several variants (each encoded between different fillers: H.264 smears a
frame towards its neighbours a little).

An example is a window of a video: `frames` frames from a random start second (so timestamps
cover the hour, as eval videos reach 59:59), the needle at its depth's frame, the others fillers
drawn at random. The answer is the word, then <end_of_turn>; the loss is on those tokens only.

The words are niah's 32 key nouns, in one font and layout: the model learns to recognise these
words on a frame, not to read arbitrary text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from model import presets
from preprocess import video as video_lib
from preprocess.tokenizer import Tokenizer
from ringserve.niah import ffmpeg as niah_ffmpeg
from ringserve.niah import frames as niah_frames
from ringserve.niah import media_tasks
from ringserve.niah.tasks import _NOUNS
from server.media import MEDIA_END, MEDIA_START, timestamp
from train import media_batch

TASK = 'video'
DRAW_SIZE = 256  # niah's frame_size: frames are drawn at this side, then scaled by the server
MAX_SECONDS = 3600  # window starts are drawn so timestamps stay below an hour ("MM:SS")
BANK_SEED = 7_000_000  # filler seeds from here on; niah's eval uses small seeds (default 0)
EVAL_BANK_SEED = 7_500_000  # train.long_eval's video fillers
BANK_DIR = presets.REPO_ROOT / 'build' / 'video_bank'
WORDS = _NOUNS


@dataclasses.dataclass(frozen=True)
class FrameBank:
    """Frames as the server sees them (uint8, image_size square, RGB)."""

    fillers: np.ndarray  # u8[N, S, S, 3]
    filler_words: tuple[tuple[str, ...], ...]  # [N]: the distractor words each filler shows
    needles: np.ndarray  # u8[W, R, S, S, 3]: R variants of each word's needle frame
    words: tuple[str, ...]  # [W]

    @property
    def image_size(self) -> int:
        return int(self.fillers.shape[1])


def _decode(path: Path, size: int, count: int) -> np.ndarray:
    info = video_lib.probe_video(path, 'video/mp4')
    chunks = [block for _, block in video_lib.frames(path, info, size=size, chunk=64)]
    out = np.concatenate(chunks)
    if len(out) != count:
        raise RuntimeError(f'{path}: decoded {len(out)} frames, wrote {count}')
    return out


def build_bank(image_size: int, *, fillers: int = 2048, variants: int = 4,
               cache_dir: Path | None = BANK_DIR, seed: int = BANK_SEED) -> FrameBank:
    """The bank for a vision encoder of `image_size` pixels; cached by its parameters. Evals
    take another `seed` (EVAL_BANK_SEED): fillers training never saw."""
    params = {'image_size': image_size, 'fillers': fillers, 'variants': variants, 'seed': seed,
              'draw': DRAW_SIZE, 'words': list(WORDS), 'version': 1}
    tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cached = cache_dir / f'bank-{tag}.npz' if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            words = tuple(tuple(w for w in row.split(',') if w) for row in z['filler_words'])
            return FrameBank(z['fillers'], words, z['needles'], tuple(str(w) for w in z['words']))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drawn, shown = [], []
        writer = niah_ffmpeg.VideoWriter(tmp / 'fillers.mp4', DRAW_SIZE)
        for i in range(fillers):
            frame, words = niah_frames.filler_frame_and_words(seed, 0, i, DRAW_SIZE)
            writer.write(frame)
            shown.append(words)
        writer.close()
        filler_frames = _decode(tmp / 'fillers.mp4', image_size, fillers)
        # Needles between fillers (needle, filler, needle, ...): variant r of word w is frame
        # 2 * (r * W + w); its neighbours are bank-seeded fillers of their own.
        writer = niah_ffmpeg.VideoWriter(tmp / 'needles.mp4', DRAW_SIZE)
        pictures = [niah_frames.needle_frame(w, DRAW_SIZE) for w in WORDS]
        for r in range(variants):
            for w in range(len(WORDS)):
                writer.write(pictures[w])
                frame, _ = niah_frames.filler_frame_and_words(seed + 1 + r, 0, w, DRAW_SIZE)
                writer.write(frame)
        writer.close()
        decoded = _decode(tmp / 'needles.mp4', image_size, 2 * variants * len(WORDS))
        needles = decoded[0::2].reshape(variants, len(WORDS), image_size, image_size, 3).swapaxes(0, 1)
    bank = FrameBank(filler_frames, tuple(shown), np.ascontiguousarray(needles), WORDS)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix='.npz', delete=False) as f:
            np.savez(f, fillers=bank.fillers, needles=bank.needles, words=np.array(WORDS),
                     filler_words=np.array([','.join(w) for w in shown]))
        Path(f.name).replace(cached)
    return bank


@dataclasses.dataclass(frozen=True)
class VideoExample(media_batch.MediaExample):
    """One rendered exchange over a video. Token offsets index `input_ids`."""

    input_ids: np.ndarray  # i32[T]: prompt, answer, <end_of_turn>; 0 where a frame row goes
    loss_mask: np.ndarray  # bool[T]: True on the answer tokens and the <end_of_turn>
    prompt_len: int
    frames: np.ndarray  # u8[F, S, S, 3]: the video's frames, in order
    row_positions: np.ndarray  # i32[F, R]: where frame f's R rows go in input_ids
    first_second: int  # frame f is shown at first_second + f ("MM:SS" before its rows)
    needle_frame: int  # which frame is the needle
    word: str  # what the needle frame shows: the answer
    task: str = TASK


def media_ids(first_second: int, count: int, rows_per_frame: int, tokenizer: Tokenizer,
              placeholder: int = -1) -> list[int]:
    """A video's ids as server.media lays them out, every row id `placeholder`."""
    ids = [tokenizer.token_id(MEDIA_START)]
    for f in range(count):
        ids += tokenizer.encode(timestamp(first_second + f)) + [placeholder] * rows_per_frame
    return ids + [tokenizer.token_id(MEDIA_END)]


def _render(video_ids: list[int], word: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    return media_batch.render(video_ids, media_tasks.VIDEO_QUESTION, word, tokenizer)


def frames_for_length(length: int, rows_per_frame: int, tokenizer: Tokenizer) -> int:
    """How many frames fit an example of at most `length` tokens (timestamps of 5 tokens)."""
    fixed = len(_render(media_ids(0, 0, rows_per_frame, tokenizer), max(WORDS, key=len), tokenizer)[0])
    fixed += max(len(tokenizer.encode(w)) for w in WORDS) + 1
    per_frame = len(tokenizer.encode(timestamp(0))) + rows_per_frame
    count = (length - fixed) // per_frame
    if count < 1:
        raise ValueError(f'length={length} is too short for a video example: the template and one '
                         f'frame take {fixed + per_frame} tokens.')
    return count


def example(bank: FrameBank, count: int, depth: float | None, rng: np.random.Generator, *,
            rows_per_frame: int, tokenizer: Tokenizer, word: str | None = None,
            first_second: int | None = None) -> VideoExample:
    """A `count`-frame video with the needle at `depth` (0 to 1; None: random frame), showing
    `word` (None: a random one), from `first_second` on (None: a random start in the hour)."""
    if count < 1:
        raise ValueError(f'count={count}: a video example needs at least one frame.')
    w = bank.words.index(word) if word is not None else int(rng.integers(len(bank.words)))
    word = bank.words[w]
    needle = int(rng.integers(count)) if depth is None else round(depth * (count - 1))
    if not 0 <= needle < count:
        raise ValueError(f'depth={depth}: must be in [0, 1].')
    if first_second is not None:
        first = first_second
    else:
        first = int(rng.integers(0, MAX_SECONDS - count + 1)) if count <= MAX_SECONDS else 0
    allowed = np.flatnonzero([word not in shown for shown in bank.filler_words])
    picks = allowed[rng.integers(len(allowed), size=count)]
    frames = bank.fillers[picks].copy()  # [F, S, S, 3]
    frames[needle] = bank.needles[w, int(rng.integers(bank.needles.shape[1]))]
    video = media_ids(first, count, rows_per_frame, tokenizer)
    prompt_ids, answer_ids = _render(video, word, tokenizer)
    ids = np.asarray(prompt_ids + answer_ids, np.int64)
    holes = np.flatnonzero(ids == -1).astype(np.int32)
    assert len(holes) == count * rows_per_frame
    ids[holes] = 0
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return VideoExample(ids.astype(np.int32), mask, len(prompt_ids), frames,
                        holes.reshape(count, rows_per_frame), first, needle, word)


@dataclasses.dataclass(frozen=True)
class VideoBatch:
    """Examples padded to T tokens and F frames. Padding frames are black and their row
    positions are T (dropped by the scatter); padding tokens are never trained on."""

    tokens: np.ndarray  # i32[B, T]
    loss_mask: np.ndarray  # bool[B, T]
    frames: np.ndarray  # u8[B, F, S, S, 3]
    row_positions: np.ndarray  # i32[B, F * R]
    embed_mask: np.ndarray  # bool[B, T]
    examples: tuple[VideoExample, ...]


def pad_batch(examples: list[VideoExample], length: int, pad_id: int = 0) -> VideoBatch:
    arrays = media_batch.pad(examples, [e.frames for e in examples], length, pad_id)
    return VideoBatch(*arrays, tuple(examples))


def sample_batch(rng: np.random.Generator, batch: int, length: int, bank: FrameBank, *,
                 rows_per_frame: int, tokenizer: Tokenizer) -> VideoBatch:
    """`batch` examples of as many frames as fit `length` tokens, random words and depths."""
    count = frames_for_length(length, rows_per_frame, tokenizer)
    examples = [example(bank, count, None, rng, rows_per_frame=rows_per_frame, tokenizer=tokenizer)
                for _ in range(batch)]
    return pad_batch(examples, length, max(tokenizer.pad_id, 0))
