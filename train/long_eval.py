"""Recall at lengths far past training, in process: chunked prefill into a paged KV cache, then greedy
decoding, with the serving model's own cache path (model/kv_pages.py, sliding windows included).

The trainer's own eval runs the cache-free forward pass, whose [T, T] scores limit it to a few
thousand tokens; this one holds only [chunk, keys] blocks, so a 64K-token prompt costs memory for
its KV pages and time for its attention, nothing more. It is for the architecture study and the
trainer's `eval_lengths`; the recorded figures come from `ringserve niah` against the real server.

    python -m train.long_eval --model build/train/default --lengths 1024,4096,16384 --examples 8

`--tasks video` asks for the secret word of a video (train/video_data.py) as many frames long as
fit the length, with fillers from a bank training never saw; the frames go through the model's
image encoder and their rows into the prefill chunks, as the server's engine loop does.
`--tasks audio` does the same for a spoken word (train/audio_data.py) in niah's voice, over noise
training never heard, as many 10 s windows as fit the length, through the audio encoder;
`--tasks audio_speech` over other voices reading prose (niah's speech haystack) instead.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import checkpoint
from model.kv_pages import PagedKVCache
from preprocess import prompt
from preprocess.tokenizer import Tokenizer
from ringserve.niah import scoring
from train import audio_data, data, media, video_data

PAGE = 64  # tokens per page
CHUNK = 1024  # prefill tokens per call (a power of two: one compiled program per bucket)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _forward(graphdef, state, cache, tokens, positions, embeds=None, embed_mask=None):
    """Logits at the last of `tokens` [1, T] (padding at position -1 sits after it) and the cache;
    `embeds` [1, T, D] replace the token embeddings where `embed_mask` [1, T] is set."""
    model = nnx.merge(graphdef, state)
    last = jnp.sum(positions >= 0, axis=1, keepdims=True) - 1  # [1, 1]
    logits, cache = model(tokens, positions, cache, logits_at=last, embeds=embeds, embed_mask=embed_mask)
    return jnp.argmax(logits[:, 0], axis=-1), cache


@functools.partial(jax.jit, static_argnums=0)
def _encode_frames(graphdef, state, frames):
    """u8[N, S, S, 3] -> f32[N, R, D], normalised as preprocess.image.normalize does."""
    model = nnx.merge(graphdef, state)
    return model.encode_images((frames.astype(jnp.float32) / 255.0 - 0.5) / 0.5).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _encode_mel(graphdef, state, mel):
    """f32[N, M, A] log-mel windows -> f32[N, R, D]."""
    return nnx.merge(graphdef, state).encode_audio(mel).astype(jnp.float32)


class LongEval:
    """Greedy answers for prompts of any length up to `max_len`, one prompt at a time."""

    def __init__(self, model: nnx.Module, max_len: int):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        pages = -(-max_len // PAGE)
        self.cache = PagedKVCache.init(self.config, pages + 1, PAGE, 1, pages).with_page_table(
            np.arange(1, pages + 1, dtype=np.int32)[None])  # one row owning pages 1..n in order

    def rows(self, frames: np.ndarray, batch: int = 64) -> np.ndarray:
        """f32[N * R, D]: the image encoder's rows for u8[N, S, S, 3] frames, in order."""
        return self._encoded(_encode_frames, frames, batch)

    def audio_rows(self, mel: np.ndarray, batch: int = 16) -> np.ndarray:
        """f32[N * R, D]: the audio encoder's rows for f32[N, M, A] log-mel windows, in order."""
        return self._encoded(_encode_mel, mel, batch)

    def _encoded(self, encode, inputs: np.ndarray, batch: int) -> np.ndarray:
        out = []  # fixed-size batches, the last one zero-padded: one compiled program
        for i in range(0, len(inputs), batch):
            part = np.zeros((batch, *inputs.shape[1:]), inputs.dtype)
            part[:len(inputs[i:i + batch])] = inputs[i:i + batch]
            out.append(np.asarray(encode(self.graphdef, self.state, part))[:len(inputs[i:i + batch])])
        rows = np.concatenate(out)
        return rows.reshape(-1, rows.shape[-1])

    def answer(self, prompt_ids: Sequence[int], max_new: int, stops: frozenset[int],
               media: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
        """Greedy answer ids; `media` is (positions i32[M], rows f32[M, D]): prompt position
        positions[m] takes rows[m] instead of its token's embedding."""
        n = len(prompt_ids)
        row_at = np.full(n, -1, np.int64)  # [n]: the media row each prompt position takes, or -1
        if media is not None:
            row_at[media[0]] = np.arange(len(media[0]))
        if n + max_new > self.cache.max_len:
            raise ValueError(f'prompt of {n} tokens + {max_new} new exceeds max_len {self.cache.max_len}.')
        nxt = None
        for start in range(0, n, CHUNK):
            piece = np.asarray(prompt_ids[start:start + CHUNK], np.int32)
            bucket = CHUNK if len(piece) > CHUNK // 4 else max(16, 1 << (len(piece) - 1).bit_length())
            tokens = np.zeros((1, bucket), np.int32)
            positions = np.full((1, bucket), -1, np.int32)
            tokens[0, :len(piece)] = piece
            positions[0, :len(piece)] = np.arange(start, start + len(piece))
            embeds = mask = None
            if media is not None:
                embeds = np.zeros((1, bucket, media[1].shape[1]), np.float32)
                mask = np.zeros((1, bucket), bool)
                rows = row_at[start:start + len(piece)]
                mask[0, :len(piece)] = rows >= 0
                embeds[0, :len(piece)][rows >= 0] = media[1][rows[rows >= 0]]
            nxt, self.cache = _forward(self.graphdef, self.state, self.cache, tokens, positions, embeds, mask)
        out, pos = [], n
        for _ in range(max_new):
            token = int(nxt[0])
            if token in stops:
                break
            out.append(token)
            nxt, self.cache = _forward(self.graphdef, self.state, self.cache, np.array([[token]], np.int32),
                                       np.array([[pos]], np.int32))
            pos += 1
        return out


def recall(model: nnx.Module, lengths: Sequence[int], examples: int, tasks: Sequence[str], seed: int = 0,
           tokenizer: Tokenizer | None = None, depths: Sequence[float] | None = None,
           log=None) -> dict[int, float]:
    """Mean niah score (the task's own scorer) per length over `examples` seeded examples each, at
    evenly spread depths (or `depths`)."""
    tokenizer = tokenizer or Tokenizer.default()
    stops = prompt.stop_token_ids(tokenizer)
    evaluator = LongEval(model, max(lengths) + 64)
    bank = clips = speech = None
    if video_data.TASK in tasks:
        bank = video_data.build_bank(model.config.vision.image_size, seed=video_data.EVAL_BANK_SEED)
    if audio_data.TASK in tasks:
        clips = audio_data.build_bank(seed=audio_data.EVAL_BANK_SEED)
    if audio_data.SPEECH_TASK in tasks:  # other voices training never heard
        speech = audio_data.build_bank(seed=audio_data.EVAL_BANK_SEED, haystack='speech',
                                       noise_seconds=media.SPEECH_SECONDS)
    out = {}
    for length in lengths:
        scores = []
        for i in range(examples):
            rng = np.random.default_rng((seed, length, i, 0x10E))
            task = tasks[i % len(tasks)]
            depth = depths[i % len(depths)] if depths else (i + 0.5) / examples
            if task == video_data.TASK:
                scores.append(_video_score(evaluator, bank, length, depth, rng, tokenizer, stops, log))
                continue
            if task in (audio_data.TASK, audio_data.SPEECH_TASK):
                scores.append(_audio_score(evaluator, clips if task == audio_data.TASK else speech, length,
                                           depth, rng, tokenizer, stops, log, task))
                continue
            filler = 'passkey' if task == 'passkey' else 'stdlib'
            ex = data.TASKS[task](length, depth, rng, filler=filler, tokenizer=tokenizer)
            t0 = time.monotonic()
            ids = evaluator.answer(ex.prompt_ids.tolist(), len(tokenizer.encode(' ' + ex.answer)) + 2, stops)
            text = tokenizer.decode(ids)
            scorer = scoring.SCORERS[ex.origin.task.scorer]
            scores.append(float(scorer(text, ex.expected)))
            if log:
                log(f'{task} {length} depth {depth:.2f}: {text!r} vs {ex.answer!r} -> {scores[-1]:.2f} '
                    f'({time.monotonic() - t0:.1f} s)')
        out[length] = float(np.mean(scores))
    return out


def _video_score(evaluator: LongEval, bank, length: int, depth: float, rng, tokenizer, stops, log) -> float:
    rows_per_frame = evaluator.config.vision.tokens_per_image
    count = video_data.frames_for_length(length, rows_per_frame, tokenizer)
    ex = video_data.example(bank, count, depth, rng, rows_per_frame=rows_per_frame, tokenizer=tokenizer,
                            first_second=0)  # niah's videos start at 00:00
    t0 = time.monotonic()
    rows = evaluator.rows(ex.frames)
    ids = evaluator.answer(ex.prompt_ids.tolist(), 6, stops, (ex.row_positions.reshape(-1), rows))
    text = tokenizer.decode(ids)
    score = float(scoring.contains(text, (ex.word,)))  # niah's scorer for the video task
    if log:
        log(f'video {length} ({count} frames) depth {depth:.2f}: {text!r} vs {ex.word!r} -> {score:.2f} '
            f'({time.monotonic() - t0:.1f} s)')
    return score


def _audio_score(evaluator: LongEval, bank, length: int, depth: float, rng, tokenizer, stops, log,
                 task: str = audio_data.TASK) -> float:
    per_second = evaluator.config.audio.tokens_per_second
    windows = audio_data.windows_for_length(length, per_second, tokenizer)
    word = audio_data.WORDS[int(rng.integers(len(audio_data.WORDS)))]
    ex = audio_data.example(bank, windows, depth, rng, tokens_per_second=per_second, tokenizer=tokenizer,
                            word=word, clip=bank.index(word),  # niah's voice and rate
                            mel_spec=audio_data.mel_spec(evaluator.config.audio))
    t0 = time.monotonic()
    rows = evaluator.audio_rows(ex.mel)
    at = ex.row_positions.reshape(-1)
    ids = evaluator.answer(ex.prompt_ids.tolist(), 6, stops, (at[at >= 0], rows[at >= 0]))
    text = tokenizer.decode(ids)
    score = float(scoring.contains(text, (ex.word,)))  # niah's scorer for the audio task
    if log:
        log(f'{task} {length} ({windows} windows) depth {depth:.2f}: {text!r} vs {ex.word!r} -> {score:.2f} '
            f'({time.monotonic() - t0:.1f} s)')
    return score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m train.long_eval', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='a ringserve checkpoint directory (e.g. a training --out)')
    p.add_argument('--lengths', default='1024,4096,16384', help='comma-separated prompt lengths in tokens')
    p.add_argument('--examples', type=int, default=8, help='examples per length, at evenly spread depths')
    p.add_argument('--tasks', default='passkey',
                   help=f'comma-separated, from {",".join(data.TASKS)},{video_data.TASK},{audio_data.TASK},'
                        f'{audio_data.SPEECH_TASK}')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('-v', '--verbose', action='store_true', help='print every answer')
    args = p.parse_args(argv)
    _, model = checkpoint.load(args.model)
    lengths = [int(x) for x in args.lengths.split(',') if x]
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    result = recall(model, lengths, args.examples, args.tasks.split(','), args.seed, log=log)
    for length, value in result.items():
        print(f'{length:>8} tokens: {value:.1%}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
