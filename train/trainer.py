"""Training the serving model (model/transformer.Transformer, the same code) on train/data.py.

Design:
1. The model is split once into graphdef, trainable decoder parameters and everything else (the
   media encoders and non-parameter state), so text training never touches the encoders (not even
   weight decay) and jax.jit sees plain pytrees: `step(params, frozen, opt_state, batch)` with
   params and optimizer state donated.
2. Master weights stay float32; `compute_dtype='bfloat16'` casts them for the forward pass only.
3. The loss is cross entropy on the answer tokens only, and logits are computed only there
   (`logits_at`): the unembedding over the whole haystack would cost about as much as the layers.
4. Data for step s come from np.random.default_rng((seed, s)), so a resumed run sees the same
   batches as an uninterrupted one; the only run state besides weights and optimizer is the step.
5. Length curriculum: the steps are split evenly over `lengths`, shortest first; each length
   compiles its own step once.
6. A checkpoint is a ringserve checkpoint directory (model/checkpoint.save, what the server loads,
   with the tokenizer copied in as tokenizer.model) plus optimizer.npz (optimizer state leaves in tree order) and train_state.json (step, seed),
   written beside the directory's files and moved in, state last.
7. Media ('video', 'audio' among the tasks; train/media.py): a step is all one media task or all
   text, drawn per step with the tasks' shares. A media task's encoder then trains with the
   decoder (the other encoder stays frozen); its step encodes the frames or sound windows, scatters
   the rows to their placeholder positions and runs the decoder on them, as the server does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from model import checkpoint, presets
from model.config import LayerKind, ModelConfig
from model.transformer import Transformer
from preprocess import prompt
from preprocess.tokenizer import Tokenizer
from train import data, media

OPTIMIZER_FILE = 'optimizer.npz'
STATE_FILE = 'train_state.json'
LOG_FILE = 'train_log.jsonl'
COMPUTE_DTYPES = ('float32', 'bfloat16')
_ENCODERS = ('vision', 'audio')  # submodules text training leaves alone
TRAINABLE = nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(name)) for name in _ENCODERS))
TASKS = (*data.TASKS, *media.TASKS)


def trainable(tasks: Sequence[str], decoder: bool = True):
    """Which parameters a run with `tasks` trains: the decoder (unless `decoder` is False), and
    each media task's encoder."""
    used = [name for name in _ENCODERS if any(media.ENCODER.get(t) == name for t in tasks)]
    if not decoder:
        # An encoder learns to speak to a decoder kept as it is: what the decoder already does
        # (text, the other media) cannot change.
        return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(name) for name in used)))
    return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(name)) for name in _ENCODERS if name not in used))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Model shape lives in the ModelConfig passed beside it."""

    out: str
    steps: int = 1000
    batch: int = 8
    batch_tokens: int | None = None  # if set, examples per step = batch_tokens // length (at least 1)
    lr: float = 1e-3
    warmup: int = 50
    end_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.1
    clip: float = 1.0  # global gradient norm
    lengths: tuple[int, ...] = (256, 512, 1024)
    tasks: tuple[str, ...] = tuple(data.TASKS)
    fillers: tuple[str, ...] = data.FILLERS
    seed: int = 0
    compute_dtype: str = 'float32'
    max_answer: int = 48  # answer tokens (+ <end_of_turn>) trained per example; longer ones are cut
    checkpoint_every: int = 200
    eval_every: int = 0  # 0: only at the end
    eval_examples: int = 8
    time_limit: float | None = None  # seconds; stop cleanly (and checkpoint) when exceeded
    progress: bool = True
    train_decoder: bool = True  # False: only the media tasks' encoders train

    def __post_init__(self):
        if self.batch_tokens is not None and self.batch_tokens <= 0:
            raise ValueError(f'TrainConfig.batch_tokens={self.batch_tokens}: must be a positive int (or None).')
        for name in ('steps', 'batch', 'max_answer', 'checkpoint_every'):
            if getattr(self, name) <= 0:
                raise ValueError(f'TrainConfig.{name}={getattr(self, name)}: must be a positive int.')
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError(f'TrainConfig.lengths={self.lengths}: give one or more positive token counts.')
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f'compute_dtype={self.compute_dtype!r}: use one of {COMPUTE_DTYPES}.')
        if not self.lr > 0:
            raise ValueError(f'lr={self.lr}: must be > 0.')
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f'task {task!r}: use some of {sorted(TASKS)}.')
        for filler in self.fillers:
            if filler not in data.FILLERS:
                raise ValueError(f'filler {filler!r}: use some of {data.FILLERS}.')
        if not self.train_decoder and not self.media_tasks:
            raise ValueError('train_decoder=False leaves nothing to train: name a media task (video, audio, '
                             'audio_loop, audio_edge), whose encoder then trains alone.')

    def batch_at(self, step: int) -> int:
        """Examples in (0-based) `step`: `batch`, or the same token count at every curriculum length."""
        if self.batch_tokens is None:
            return self.batch
        return max(1, self.batch_tokens // self.length_at(step))

    @property
    def text_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if t not in media.TASKS)

    @property
    def media_tasks(self) -> tuple[str, ...]:
        """The media tasks asked for, each once, in media.TASKS order."""
        return tuple(t for t in media.TASKS if t in self.tasks)

    def media_at(self, step: int) -> str | None:
        """The media task (0-based) `step` trains on, or None for a text step: drawn from
        (seed, step) with the tasks' shares."""
        shares = [self.tasks.count(t) / len(self.tasks) for t in self.media_tasks]
        if not shares:
            return None
        if len(shares) == 1 and not self.text_tasks:
            return self.media_tasks[0]
        u = np.random.default_rng((self.seed, step, 0x71DE0)).random()
        for name, edge in zip(self.media_tasks, np.cumsum(shares)):
            if u < edge:
                return name
        return None if self.text_tasks else self.media_tasks[-1]

    def length_at(self, step: int) -> int:
        """The curriculum: sequence length of (0-based) `step`."""
        stage = min(step * len(self.lengths) // self.steps, len(self.lengths) - 1)
        return sorted(self.lengths)[stage]


@dataclasses.dataclass(frozen=True)
class Summary:
    steps_done: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    seconds_per_step: float | None
    recall: dict[int, float]  # curriculum length -> exact-match recall
    stopped_early: bool
    out: str
    media_recall: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # task -> length -> recall


def model_config(d_model: int | None = None, n_layers: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None, head_dim: int | None = None, mlp_dim: int | None = None,
                 encoders: bool = True, layer_kinds: tuple[LayerKind, ...] | None = None,
                 rope_theta: float | None = None) -> ModelConfig:
    """presets.architecture() with the given sizes replaced (head_dim defaults to d_model // n_heads,
    n_kv_heads to min(2, n_heads), mlp_dim to 3 * d_model when d_model changes). `layer_kinds` also
    sets the layer count; otherwise a resized layer count drops the preset's kinds for global RoPE."""
    base = presets.architecture()
    d = d_model or base.d_model
    n = n_heads or base.n_heads
    n_layers = len(layer_kinds) if layer_kinds else (n_layers or base.n_layers)
    if layer_kinds is None and base.layer_kinds is not None and n_layers == base.n_layers:
        layer_kinds = base.layer_kinds
    changes = dict(d_model=d, n_layers=n_layers, n_heads=n, layer_kinds=layer_kinds,
                   rope_theta=rope_theta or base.rope_theta,
                   n_kv_heads=n_kv_heads or (base.n_kv_heads if n_heads is None else min(2, n)),
                   head_dim=head_dim or (base.head_dim if d_model is None and n_heads is None else d // n),
                   mlp_dim=mlp_dim or (base.mlp_dim if d_model is None else 3 * d))
    if not encoders:
        changes.update(vision=None, audio=None)
    return base.replace(**changes)


# ------------------------------------------------------------------------------------------------
# The step.
# ------------------------------------------------------------------------------------------------
def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=min(cfg.warmup, cfg.steps - 1),
        decay_steps=cfg.steps, end_value=cfg.lr * cfg.end_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norm scales
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask))


def answer_slots(batch: data.Batch, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the loss is taken: (at i32[B, M], targets i32[B, M], weights f32[B, M]) with M = width.

    at[b, m] is the index whose logits predict targets[b, m] = tokens[b, at + 1]; unused slots have
    weight 0 (and point at index 0).
    """
    b = batch.tokens.shape[0]
    at = np.zeros((b, width), np.int32)
    targets = np.zeros((b, width), np.int32)
    weights = np.zeros((b, width), np.float32)
    for row in range(b):
        idx = np.flatnonzero(batch.loss_mask[row, 1:])[:width]  # target t + 1 is predicted at t
        at[row, :len(idx)] = idx
        targets[row, :len(idx)] = batch.tokens[row, idx + 1]
        weights[row, :len(idx)] = 1.0
    return at, targets, weights


def make_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, compute_dtype: str):
    """jit((params, frozen, opt_state, tokens, at, targets, weights) -> (params, opt_state, metrics)),
    params and opt_state donated."""
    dtype = jnp.dtype(compute_dtype)

    def loss_fn(params, frozen, tokens, at, targets, weights):
        cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        model = nnx.merge(graphdef, cast, frozen)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # [B, T]
        logits, _ = model(tokens, positions, logits_at=at)  # f32[B, M, V]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, M]
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def step(params, frozen, opt_state, tokens, at, targets, weights):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, tokens, at, targets, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 2))


def batch_for_step(cfg: TrainConfig, step: int, tokenizer: Tokenizer,
                   media_tasks: dict[str, media.MediaTask] | None = None):
    """The batch of (0-based) `step`: a function of (seed, step) only, so resuming replays it.
    A media step (its task in `media_tasks`) gives that task's batch, a text step a data.Batch."""
    rng = np.random.default_rng((cfg.seed, step))
    name = cfg.media_at(step)
    if name is not None:
        return media_tasks[name].sample(rng, cfg.batch_at(step), cfg.length_at(step), tokenizer)
    return data.sample_batch(rng, cfg.batch_at(step), cfg.length_at(step), cfg.text_tasks, cfg.fillers,
                             tokenizer)


# ------------------------------------------------------------------------------------------------
# Evaluation: greedy decoding with the plain (cache-free) forward pass.
# ------------------------------------------------------------------------------------------------
def make_next_token(graphdef: nnx.GraphDef, compute_dtype: str):
    """jit((params, frozen, tokens i32[E, T], at i32[E]) -> i32[E]): the argmax token after tokens[:, :at+1]."""
    dtype = jnp.dtype(compute_dtype)

    def next_token(params, frozen, tokens, at):
        cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        model = nnx.merge(graphdef, cast, frozen)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _ = model(tokens, positions, logits_at=at[:, None])  # [E, 1, V]; causal, so padding after is unseen
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

    return jax.jit(next_token)


def greedy_answers(next_token, params, frozen, examples: Sequence[data.Example], tokenizer: Tokenizer,
                   max_new: int) -> list[str]:
    """Each example's prompt continued greedily until a stop token (or max_new tokens), decoded."""
    width = max(e.prompt_len for e in examples) + max_new
    tokens = np.zeros((len(examples), width), np.int32)  # [E, T]
    for row, e in enumerate(examples):
        tokens[row, :e.prompt_len] = e.prompt_ids
    return _greedy(lambda tokens, at: next_token(params, frozen, tokens, at), tokens, examples, tokenizer, max_new)


def _greedy(next_token, tokens: np.ndarray, examples, tokenizer: Tokenizer, max_new: int) -> list[str]:
    """The greedy loop: next_token(tokens i32[E, W], at i32[E]) -> i32[E], the token after tokens[:, :at + 1];
    `tokens` holds each example's prompt and takes the answers."""
    stops = prompt.stop_token_ids(tokenizer)
    at = np.array([e.prompt_len - 1 for e in examples], np.int32)
    out: list[list[int]] = [[] for _ in examples]
    done = np.zeros(len(examples), bool)
    for _ in range(max_new):
        nxt = np.asarray(next_token(jnp.asarray(tokens), jnp.asarray(at)))
        for row, token in enumerate(nxt):
            if done[row]:
                continue
            if int(token) in stops:
                done[row] = True
                continue
            out[row].append(int(token))
            tokens[row, at[row] + 1] = token
            at[row] += 1
        if done.all():
            break
    return [tokenizer.decode(ids) for ids in out]


def evaluate(next_token, params, frozen, cfg: TrainConfig, tokenizer: Tokenizer) -> dict[int, float]:
    """Exact-match recall at each curriculum length on `eval_examples` fresh examples (seeded apart
    from training data), on the text tasks."""
    recall = {}
    if not cfg.text_tasks:
        return recall
    for length in sorted(cfg.lengths):
        rng = np.random.default_rng((cfg.seed, length, 0xE7A1))
        batch = data.sample_batch(rng, cfg.eval_examples, length, cfg.text_tasks, cfg.fillers, tokenizer)
        max_new = max(len(tokenizer.encode(e.answer)) for e in batch.examples) + 2
        answers = greedy_answers(next_token, params, frozen, batch.examples, tokenizer, max_new)
        hits = [a.strip() == e.answer for a, e in zip(answers, batch.examples)]
        recall[length] = float(np.mean(hits))
    return recall


# ------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, config: ModelConfig, graphdef, params, frozen, opt_state, step: int,
                    cfg: TrainConfig) -> None:
    """Model (ringserve format), optimizer state and step into `out`; the state file last, so a
    reader that finds train_state.json at step s finds that step's weights."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix='.staging-') as staging:
        staging = Path(staging)
        checkpoint.save(staging, config, nnx.merge(graphdef, params, frozen))
        leaves = jax.tree.leaves(opt_state)
        np.savez(staging / OPTIMIZER_FILE, **{f'{i:05d}': np.asarray(leaf) for i, leaf in enumerate(leaves)})
        (staging / STATE_FILE).write_text(json.dumps({'step': step, 'seed': cfg.seed, 'steps': cfg.steps,
                                                      'lengths': list(cfg.lengths)}) + '\n')
        for name in (checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE):
            os.replace(staging / name, out / name)


def load_checkpoint(out: Path, optimizer: optax.GradientTransformation, which=TRAINABLE):
    """(config, graphdef, params, frozen, opt_state, step) from a directory save_checkpoint wrote."""
    if not (out / STATE_FILE).is_file():
        raise FileNotFoundError(f'--resume: {out / STATE_FILE} is missing; train into {out} first (without '
                                '--resume) or point --out at a training directory.')
    state = json.loads((out / STATE_FILE).read_text())
    config, model = checkpoint.load(out)
    graphdef, params, frozen = nnx.split(model, which, ...)
    opt_state = optimizer.init(params)
    leaves, treedef = jax.tree.flatten(opt_state)
    with np.load(out / OPTIMIZER_FILE) as saved:
        if len(saved.files) != len(leaves):
            raise ValueError(f'{out / OPTIMIZER_FILE} holds {len(saved.files)} optimizer arrays, this run expects '
                             f'{len(leaves)}: the model or optimizer settings differ from the saved run.')
        restored = []
        for i, leaf in enumerate(leaves):
            array = saved[f'{i:05d}']
            if array.shape != tuple(np.shape(leaf)):
                raise ValueError(f'optimizer array {i} has shape {array.shape}, expected {np.shape(leaf)}: the '
                                 'model shape differs from the saved run.')
            restored.append(jnp.asarray(array, dtype=jnp.asarray(leaf).dtype))
    return config, graphdef, params, frozen, jax.tree.unflatten(treedef, restored), int(state['step'])


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------
class _Progress:
    """One self-rewriting stderr line: step, loss, length, speed, ETA."""

    def __init__(self, total: int, stream: TextIO, enabled: bool):
        self.total, self.stream, self.enabled = total, stream, enabled

    def update(self, step: int, loss: float, length: int, per_step: float) -> None:
        if not self.enabled:
            return
        filled = int(30 * step / self.total)
        eta = per_step * (self.total - step)
        self.stream.write(f'\r[{"#" * filled}{"." * (30 - filled)}] {step}/{self.total} loss {loss:.4f} '
                          f'len {length} {per_step:.2f} s/step eta {eta / 60:.1f} min ')
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write('\n')
            self.stream.flush()


def train(cfg: TrainConfig, config: ModelConfig | None = None, *, resume: bool = False, until: int | None = None,
          log: TextIO = sys.stderr, tokenizer: Tokenizer | None = None,
          init_from: str | Path | None = None, media_banks: dict | None = None) -> Summary:
    """Train (or, with `resume`, continue) into cfg.out; returns a Summary (also printed to `log`).

    `config` (default presets.architecture()) is used for a fresh start; a resumed run takes the
    saved one. `init_from` (a servable checkpoint directory, e.g. model/assets/default) starts from
    its weights and architecture instead of random ones, with a fresh optimizer and schedule: a
    fine-tune. `until` stops this run after that step (the schedule still spans cfg.steps), as
    --time-limit does, with a checkpoint. `media_banks` ({'video': FrameBank, 'audio': ClipBank})
    replace the banks a media run builds (the data modules' defaults).
    """
    tokenizer = tokenizer or Tokenizer.default()
    out = Path(cfg.out)
    optimizer = make_optimizer(cfg)
    if resume and init_from is not None:
        raise ValueError('resume and init_from exclude each other: resume continues the run in --out, '
                         'init_from starts a new one from a checkpoint\'s weights.')
    if init_from is not None and config is not None:
        raise ValueError('init_from takes the checkpoint\'s own architecture: give no model shape with it.')
    if resume:
        config, graphdef, params, frozen, opt_state, start = load_checkpoint(
            out, optimizer, trainable(cfg.tasks, cfg.train_decoder))
    else:
        if init_from is not None:
            # Master weights in float32 whatever the checkpoint stores (the shipped one is bfloat16).
            config, model = checkpoint.load(init_from, dtype='float32')
        else:
            config = config or presets.architecture()
            model = Transformer(config, rngs=nnx.Rngs(cfg.seed))
        if config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f'model vocab_size={config.vocab_size} differs from the tokenizer\'s '
                             f'{tokenizer.vocab_size} ({tokenizer.path}).')
        graphdef, params, frozen = nnx.split(model, trainable(cfg.tasks, cfg.train_decoder), ...)
        opt_state = optimizer.init(params)
        start = 0
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_FILE).unlink(missing_ok=True)
        # The server reads <model>/tokenizer.model by default: make the directory servable as is.
        shutil.copyfile(tokenizer.path, out / presets.TOKENIZER_FILE)
    step_fn = make_step(graphdef, optimizer, cfg.compute_dtype)
    next_token = make_next_token(graphdef, cfg.compute_dtype)
    media_banks = media_banks or {}
    tasks = {name: media.media_task(name, config, media_banks.get(name)) for name in cfg.media_tasks}
    media_steps = {name: media.make_step(graphdef, optimizer, cfg.compute_dtype, name) for name in tasks}
    media_next = {name: media.make_next_token(graphdef, cfg.compute_dtype, name) for name in tasks}

    def evaluate_media() -> dict[str, dict[int, float]]:
        return {name: media.evaluate(media_next[name], params, frozen, task, cfg.lengths, cfg.eval_examples,
                                     cfg.seed, tokenizer, _greedy) for name, task in tasks.items()}
    progress = _Progress(cfg.steps, log, cfg.progress)
    began = time.monotonic()
    first_loss = last_loss = None
    timed: list[float] = []  # seconds of steps that did not compile
    recall: dict[int, float] = {}
    media_recall: dict[str, dict[int, float]] = {}
    stopped_early = False
    step = start
    # The next step's batch is made on a thread while this one runs: a batch is a function of
    # (seed, step) alone, so this changes no number, and audio batches (log-mel, ~40 ms a window)
    # cost about as much as their step.
    lookahead = ThreadPoolExecutor(1, thread_name_prefix='batches')
    upcoming = lookahead.submit(batch_for_step, cfg, start, tokenizer, tasks) if start < cfg.steps else None
    with open(out / LOG_FILE, 'a') as journal, lookahead:
        for step in range(start, cfg.steps):
            over_time = cfg.time_limit is not None and time.monotonic() - began > cfg.time_limit
            if over_time or (until is not None and step >= until):
                stopped_early = True
                break
            length = cfg.length_at(step)
            kind = cfg.media_at(step)
            batch = upcoming.result()
            if step + 1 < cfg.steps:
                upcoming = lookahead.submit(batch_for_step, cfg, step + 1, tokenizer, tasks)
            at, targets, weights = answer_slots(batch, cfg.max_answer)
            t0 = time.monotonic()
            if kind is not None:
                params, opt_state, metrics = media_steps[kind](
                    params, frozen, opt_state, batch.tokens, at, targets, weights, media.MediaTask.inputs(batch),
                    batch.row_positions, batch.embed_mask)
            else:
                params, opt_state, metrics = step_fn(params, frozen, opt_state, batch.tokens, at, targets,
                                                     weights)
            loss = float(metrics['loss'])
            seconds = time.monotonic() - t0
            if step > start and cfg.length_at(step - 1) == length and kind == cfg.media_at(step - 1):
                timed.append(seconds)
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            journal.write(json.dumps({'step': step + 1, 'loss': loss, 'grad_norm': float(metrics['grad_norm']),
                                      'length': length, 'seconds': round(seconds, 4),
                                      **({'media': kind} if kind else {})}) + '\n')
            journal.flush()
            progress.update(step + 1, loss, length, float(np.mean(timed[-20:])) if timed else seconds)
            if not math.isfinite(loss):
                progress.close()
                raise FloatingPointError(f'loss is {loss} at step {step + 1}: lower --lr (now {cfg.lr}) or use '
                                         'float32.')
            if (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(out, config, graphdef, params, frozen, opt_state, step + 1, cfg)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                recall = evaluate(next_token, params, frozen, cfg, tokenizer)
                journal.write(json.dumps({'step': step + 1, 'recall': recall}) + '\n')
                if tasks:
                    journal.write(json.dumps({'step': step + 1, 'media_recall': evaluate_media()}) + '\n')
        else:
            step = cfg.steps
        progress.close()
        done = step
        save_checkpoint(out, config, graphdef, params, frozen, opt_state, done, cfg)
        if cfg.eval_examples:
            recall = evaluate(next_token, params, frozen, cfg, tokenizer)
            journal.write(json.dumps({'step': done, 'recall': recall}) + '\n')
            if tasks:
                media_recall = evaluate_media()
                journal.write(json.dumps({'step': done, 'media_recall': media_recall}) + '\n')
    seconds = time.monotonic() - began
    summary = Summary(done, first_loss, last_loss, seconds, float(np.mean(timed)) if timed else None, recall,
                      stopped_early, str(out), media_recall)
    log.write(format_summary(summary) + '\n')
    return summary


def format_summary(s: Summary) -> str:
    lines = [f'trained to step {s.steps_done} in {s.seconds:.1f} s'
             + (' (stopped at the time limit)' if s.stopped_early else ''),
             f'loss {s.first_loss if s.first_loss is None else round(s.first_loss, 4)} -> '
             f'{s.last_loss if s.last_loss is None else round(s.last_loss, 4)}'
             + (f', {s.seconds_per_step:.3f} s/step after compilation' if s.seconds_per_step else '')]
    lines += [f'recall at {length} tokens: {value:.0%}' for length, value in sorted(s.recall.items())]
    lines += [f'{name} recall at {length} tokens: {value:.0%}'
              for name, recall in s.media_recall.items() for length, value in sorted(recall.items())]
    lines.append(f'checkpoint: {s.out}')
    return '\n'.join(lines)
