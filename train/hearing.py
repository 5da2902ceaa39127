"""`python -m train.hearing`: teach the audio encoder to hear the needle words, alone, before the
decoder is asked to find them.

Why a stage of its own: through the decoder, a spoken needle trains nothing at first. Its word is
a few of a window's 100 rows, the decoder's attention over them is still even, and 200 steps of
`--tasks audio` (or the looped `audio_loop`) stayed at chance (docs/training.md). The encoder
alone, under a classifier, learns the words in a few hundred steps.

An example is one 10 s window, as the server cuts a track: a random slice of the bank's noise and
- `p_word` of the time, a needle clip placed so that its word's midpoint falls inside the window
  (anywhere, so the clip may run over either edge): the label is the word;
- otherwise, half of the rest noise alone, and half a clip whose word's midpoint falls outside
  (the window holds only "The secret word is", or the word's smaller part): the label is NONE.
  That is what a needle's neighbouring window holds when niah's depth puts the clip on a window
  edge, which it does at many cells (depth 50 of a whole number of windows always does).
So of the windows a track is cut into, exactly one, the needle window, holds a word.

A linear head reads every row the encoder hands the decoder, and the loss is each row's
cross-entropy against its window's label: all 100 rows of the needle window come to carry the
word, which gives the decoder many rows to find. The head is then dropped: the output is a
servable checkpoint that differs from its start in the audio encoder only.

Where the word starts in a clip: espeak-ng says "The secret word is" sample for sample alike for
every word in one voice and rate, so a clip's word starts where it first differs from the other
words' clips (`word_spans`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from model import checkpoint, presets
from preprocess import audio as audio_lib
from preprocess.audio import MelSpec
from preprocess.tokenizer import Tokenizer
from train import audio_data

NONE = len(audio_data.WORDS)  # the label of a window that says no needle word
LOG_FILE = 'hearing_log.jsonl'
HEAD_FILE = 'hearing_head.npz'  # the classifier, kept so that a second run from `out` goes on with it


def word_spans(bank: audio_data.ClipBank, *, tol: float = 1e-3) -> np.ndarray:
    """i64[C, 2]: where each clip's word starts and ends, in samples from the clip's start. The
    start is where the clip first differs (by more than `tol`) from a clip of another word in the
    same voice and rate; a clip with no such neighbour starts at 0. The end is the clip's end."""
    spans = np.zeros((len(bank), 2), np.int64)
    for c in range(len(bank)):
        x = bank.clip(c)
        spans[c, 1] = len(x)
        start = None
        for d in range(len(bank)):
            if (bank.clip_voices[d], bank.clip_rates[d]) != (bank.clip_voices[c], bank.clip_rates[c]) \
                    or bank.clip_words[d] == bank.clip_words[c]:
                continue
            y = bank.clip(d)
            n = min(len(x), len(y))
            differ = np.flatnonzero(np.abs(x[:n] - y[:n]) > tol)
            first = int(differ[0]) if len(differ) else n
            start = first if start is None else min(start, first)
        spans[c, 0] = start or 0
    return spans


@dataclasses.dataclass(frozen=True)
class Window:
    samples: np.ndarray  # f32[window_samples], quantised as niah's FLAC is
    label: int  # the word's index in audio_data.WORDS, or NONE
    clip: int  # the bank clip spliced in, -1 for noise alone
    clip_start: int  # where the clip's first sample falls (may be < 0 or past the window)


def window(bank: audio_data.ClipBank, spans: np.ndarray, rng: np.random.Generator, *,
           p_word: float = 0.5, mel_spec: MelSpec = MelSpec()) -> Window:
    """One labelled window (see the module's docstring)."""
    size = mel_spec.window_samples
    first = int(rng.integers(len(bank.noise) - size + 1))
    track = np.array(bank.noise[first:first + size], np.float32)
    u = rng.random()
    if u >= p_word and rng.random() < 0.5:
        return Window(audio_data.quantise(track), NONE, -1, 0)
    c = int(rng.integers(len(bank)))
    clip = bank.clip(c)
    start_w, end_w = (int(v) for v in spans[c])
    mid = (start_w + end_w) // 2  # the word's midpoint, from the clip's start
    if u < p_word:
        at = int(rng.integers(size)) - mid  # the midpoint lands in [0, size)
        label = audio_data.WORDS.index(bank.clip_words[c])
    else:
        # The midpoint lands outside but the clip still overlaps: before the window (the clip's
        # tail, after mid, runs into it) or after it (the clip's head runs into its end).
        tail = len(clip) - mid
        if tail > 1 and rng.random() < 0.5:
            at = -mid - int(rng.integers(1, tail))
        else:
            at = size - int(rng.integers(0, mid + 1)) if mid > 0 else size - 1
        label = NONE
    lo, hi = max(at, 0), min(at + len(clip), size)
    if hi > lo:
        track[lo:hi] = clip[lo - at:hi - at]
    return Window(audio_data.quantise(track), label, c, at)


def batch(bank, spans, rng, size: int, *, p_word: float = 0.5,
          mel_spec: MelSpec = MelSpec()) -> tuple[np.ndarray, np.ndarray]:
    """(f32[B, n_mels, window_frames] log-mel as the server computes it, i32[B] labels)."""
    windows = [window(bank, spans, rng, p_word=p_word, mel_spec=mel_spec) for _ in range(size)]
    mel = np.stack([next(iter(audio_lib.mel_windows([w.samples], mel_spec))) for w in windows])
    return mel.astype(np.float32), np.asarray([w.label for w in windows], np.int32)


def _prefetch(make, depth: int = 3):
    """Batches from `make()` built on a thread while the step runs (log-mel is ~40 ms a window)."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def work():
        while not stop.is_set():
            item = make()
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    break
                except queue.Full:
                    pass

    threading.Thread(target=work, daemon=True).start()
    return q, stop


def train_hearing(init_from: str | Path, out: str | Path, *, steps: int = 400, batch_size: int = 32,
                  lr: float = 3e-3, warmup: int = 20, p_word: float = 0.5, seed: int = 0,
                  eval_every: int = 50, eval_windows: int = 128, time_limit: float | None = None,
                  bank: audio_data.ClipBank | None = None, log=sys.stderr) -> dict:
    """Train `init_from`'s audio encoder under a per-row word classifier; write the servable
    checkpoint (the head dropped) and `hearing_log.jsonl` into `out`; return the last eval."""
    if not 0 < p_word < 1:
        raise ValueError(f'p_word={p_word}: the share of windows that hold a word must be in (0, 1).')
    if steps < 1 or batch_size < 1:
        raise ValueError(f'steps={steps}, batch_size={batch_size}: both must be >= 1.')
    out = Path(out)
    bank = bank or audio_data.build_bank()
    spans = word_spans(bank)
    config, model = checkpoint.load(init_from, dtype='float32')
    if model.audio is None:
        raise ValueError(f'{init_from} has no audio encoder to train.')
    graphdef, params = nnx.split(model.audio, nnx.Param)
    key = jax.random.PRNGKey(seed)
    head = {'w': jax.random.normal(key, (config.d_model, NONE + 1)) * config.d_model ** -0.5,
            'b': jnp.zeros(NONE + 1)}
    if (Path(init_from) / HEAD_FILE).is_file():  # a run from a hearing run's output goes on
        with np.load(Path(init_from) / HEAD_FILE) as saved:
            head = {k: jnp.asarray(saved[k]) for k in head}
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state = (params, head)
    opt_state = optimizer.init(state)

    def logits(state, mel):  # [B, R, NONE + 1]
        params, head = state
        rows = nnx.merge(graphdef, params)(mel)
        return rows @ head['w'] + head['b']

    def loss_fn(state, mel, labels):
        lg = logits(state, mel)
        target = jnp.broadcast_to(labels[:, None], lg.shape[:2])
        return optax.softmax_cross_entropy_with_integer_labels(lg, target).mean()

    @jax.jit
    def step(state, opt_state, mel, labels):
        loss, grads = jax.value_and_grad(loss_fn)(state, mel, labels)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    @jax.jit
    def predict(state, mel):  # (each window's label: its rows' mean log-probability, each row's)
        lg = logits(state, mel)
        return jax.nn.log_softmax(lg).mean(1).argmax(-1), lg.argmax(-1)

    eval_rng = np.random.default_rng((seed, 0xE7A1))
    held = [batch(bank, spans, eval_rng, 32, p_word=p_word) for _ in range(max(1, eval_windows // 32))]

    def evaluate() -> dict:
        hit_word = n_word = hit_none = n_none = rows_hit = rows_n = 0
        for mel, labels in held:
            win, rows = (np.asarray(x) for x in predict(state, jnp.asarray(mel)))
            is_word = labels != NONE
            hit_word += int((win == labels)[is_word].sum())
            n_word += int(is_word.sum())
            hit_none += int((win == labels)[~is_word].sum())
            n_none += int((~is_word).sum())
            rows_hit += int((rows == labels[:, None]).sum())
            rows_n += rows.size
        return {'word_windows': hit_word / max(n_word, 1), 'none_windows': hit_none / max(n_none, 1),
                'rows': rows_hit / rows_n, 'n_word': n_word, 'n_none': n_none}

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    log_path.unlink(missing_ok=True)
    train_rng = np.random.default_rng((seed, 0x4EA7))
    q, stop = _prefetch(lambda: batch(bank, spans, train_rng, batch_size, p_word=p_word))
    t0 = time.monotonic()
    result: dict = {}
    try:
        for s in range(1, steps + 1):
            mel, labels = q.get()
            state, opt_state, loss = step(state, opt_state, jnp.asarray(mel), jnp.asarray(labels))
            record = {'step': s, 'loss': float(loss), 'seconds': round(time.monotonic() - t0, 1)}
            last = s == steps or (time_limit is not None and time.monotonic() - t0 > time_limit)
            if last or (eval_every and s % eval_every == 0):
                result = {'step': s, **evaluate()}
                record['eval'] = result
                print(f'hearing step {s}: loss {record["loss"]:.3f}, word windows '
                      f'{result["word_windows"]:.1%}, none windows {result["none_windows"]:.1%}, '
                      f'rows {result["rows"]:.1%} ({record["seconds"]:.0f} s)', file=log, flush=True)
            with log_path.open('a') as f:
                f.write(json.dumps(record) + '\n')
            if last:
                break
    finally:
        stop.set()
    nnx.update(model.audio, state[0])
    checkpoint.save(out, config, model)
    np.savez(out / HEAD_FILE, **{k: np.asarray(v) for k, v in state[1].items()})
    # Servable as is: the start's tokenizer, else the default one (what the server reads then).
    tokenizer = Path(init_from) / presets.TOKENIZER_FILE
    shutil.copyfile(tokenizer if tokenizer.is_file() else Tokenizer.default().path, out / presets.TOKENIZER_FILE)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m train.hearing', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--init-from', default='default',
                   help='checkpoint whose audio encoder to train ("default": the shipped model)')
    p.add_argument('--out', required=True, help='directory for the trained checkpoint and hearing_log.jsonl')
    p.add_argument('--steps', type=int, default=400)
    p.add_argument('--batch', type=int, default=32, help='windows per step (default 32)')
    p.add_argument('--lr', type=float, default=3e-3, help='peak learning rate (default 3e-3), cosine to a tenth')
    p.add_argument('--warmup', type=int, default=20, help='linear warmup steps (default 20)')
    p.add_argument('--p-word', type=float, default=0.5, help='share of windows that hold a word (default 0.5)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--eval-every', type=int, default=50)
    p.add_argument('--time-limit', type=float, help='seconds; stop (and save) when exceeded')
    args = p.parse_args(argv)
    init_from = presets.SHIPPED_DEFAULT if args.init_from == 'default' else args.init_from
    try:
        train_hearing(init_from, args.out, steps=args.steps, batch_size=args.batch, lr=args.lr,
                      warmup=args.warmup, p_word=args.p_word, seed=args.seed, eval_every=args.eval_every,
                      time_limit=args.time_limit)
    except (ValueError, FileNotFoundError) as e:
        print(f'python -m train.hearing: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
