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
7. Video (`'video'` among the tasks, train/video_data.py): a step is all video or all text, drawn
   per step with the tasks' shares. The image encoder then trains with the decoder (the audio
   encoder stays frozen); a video step encodes its frames, scatters the rows to their placeholder
   positions and runs the decoder on them, as the server does.
6. A checkpoint is a ringserve checkpoint directory (model/checkpoint.save, what the server loads,
   with the tokenizer copied in as tokenizer.model) plus optimizer.npz (optimizer state leaves in tree order) and train_state.json (step, seed),
   written beside the directory's files and moved in, state last.
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
from train import data, video_data

OPTIMIZER_FILE = 'optimizer.npz'
STATE_FILE = 'train_state.json'
LOG_FILE = 'train_log.jsonl'
COMPUTE_DTYPES = ('float32', 'bfloat16')
_ENCODERS = ('vision', 'audio')  # submodules text training leaves alone
TRAINABLE = nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(name)) for name in _ENCODERS))
TRAINABLE_WITH_VISION = nnx.All(nnx.Param, nnx.Not(nnx.PathContains('audio')))
TASKS = (*data.TASKS, video_data.TASK)


def trainable(tasks: Sequence[str]):
    """Which parameters a run with `tasks` trains: the decoder, and the image encoder with video."""
    return TRAINABLE_WITH_VISION if video_data.TASK in tasks else TRAINABLE


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

    def batch_at(self, step: int) -> int:
        """Examples in (0-based) `step`: `batch`, or the same token count at every curriculum length."""
        if self.batch_tokens is None:
            return self.batch
        return max(1, self.batch_tokens // self.length_at(step))

    @property
    def text_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if t != video_data.TASK)

    @property
    def video_share(self) -> float:
        """The share of steps that are video steps."""
        return self.tasks.count(video_data.TASK) / len(self.tasks)

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
    video_recall: dict[int, float] = dataclasses.field(default_factory=dict)  # length -> video-word recall


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


def make_video_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, compute_dtype: str):
    """Like make_step, for a video batch: (params, frozen, opt_state, tokens, at, targets, weights,
    frames u8[B, F, S, S, 3], row_positions i32[B, F * R], embed_mask bool[B, T])."""
    loss_fn = _video_loss(graphdef, compute_dtype)

    def step(params, frozen, opt_state, tokens, at, targets, weights, frames, row_positions, embed_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, tokens, at, targets, weights, frames,
                                                  row_positions, embed_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 2))


def _video_logits(model, tokens, at, frames, row_positions, embed_mask):
    """Logits at `at` with each frame's rows where the prompt holds them (padding rows dropped)."""
    b, f, s = frames.shape[:3]
    # preprocess.image.normalize with SigLIP's mean = std = 0.5, what the server feeds the encoder.
    pixels = (frames.astype(jnp.float32) / 255.0 - 0.5) / 0.5
    rows = model.encode_images(pixels.reshape(b * f, s, s, 3))  # [B * F, R, D]
    rows = rows.reshape(b, -1, rows.shape[-1])  # [B, F * R, D]
    embeds = jnp.zeros((*tokens.shape, rows.shape[-1]), rows.dtype)  # [B, T, D]
    embeds = embeds.at[jnp.arange(b)[:, None], row_positions].set(rows, mode='drop')
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = model(tokens, positions, logits_at=at, embeds=embeds, embed_mask=embed_mask)
    return logits


def _video_loss(graphdef: nnx.GraphDef, compute_dtype: str):
    dtype = jnp.dtype(compute_dtype)

    def loss_fn(params, frozen, tokens, at, targets, weights, frames, row_positions, embed_mask):
        cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        model = nnx.merge(graphdef, cast, frozen)
        logits = _video_logits(model, tokens, at, frames, row_positions, embed_mask)  # f32[B, M, V]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, M]
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return loss_fn


def is_video_step(cfg: TrainConfig, step: int) -> bool:
    """Whether (0-based) `step` trains on video: drawn from (seed, step) with the tasks' share."""
    share = cfg.video_share
    if share in (0.0, 1.0):
        return bool(share)
    return bool(np.random.default_rng((cfg.seed, step, 0x71DE0)).random() < share)


def batch_for_step(cfg: TrainConfig, step: int, tokenizer: Tokenizer,
                   bank: video_data.FrameBank | None = None, rows_per_frame: int = 0):
    """The batch of (0-based) `step`: a function of (seed, step) only, so resuming replays it.
    A video step (`bank` needed) gives a video_data.VideoBatch, a text step a data.Batch."""
    rng = np.random.default_rng((cfg.seed, step))
    if is_video_step(cfg, step):
        return video_data.sample_batch(rng, cfg.batch_at(step), cfg.length_at(step), bank,
                                       rows_per_frame=rows_per_frame, tokenizer=tokenizer)
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


def make_video_next_token(graphdef: nnx.GraphDef, compute_dtype: str):
    """jit((params, frozen, tokens, at i32[E], frames, row_positions, embed_mask) -> i32[E])."""
    dtype = jnp.dtype(compute_dtype)

    def next_token(params, frozen, tokens, at, frames, row_positions, embed_mask):
        cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        model = nnx.merge(graphdef, cast, frozen)
        logits = _video_logits(model, tokens, at[:, None], frames, row_positions, embed_mask)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

    return jax.jit(next_token)


def greedy_video_answers(next_token, params, frozen, batch: video_data.VideoBatch, tokenizer: Tokenizer,
                         max_new: int) -> list[str]:
    """Each video example's prompt continued greedily (frames encoded in the same call)."""
    examples = batch.examples
    width = max(e.prompt_len for e in examples) + max_new
    tokens = np.zeros((len(examples), width), np.int32)
    embed = np.zeros((len(examples), width), bool)
    for row, e in enumerate(examples):
        tokens[row, :e.prompt_len] = e.prompt_ids
        embed[row, :e.prompt_len] = e.embed_mask[:e.prompt_len]
    positions = np.where(batch.row_positions >= batch.tokens.shape[1], width, batch.row_positions)
    return _greedy(lambda tokens, at: next_token(params, frozen, tokens, at, batch.frames, positions, embed),
                   tokens, examples, tokenizer, max_new)


def evaluate_video(next_token, params, frozen, cfg: TrainConfig, tokenizer: Tokenizer,
                   bank: video_data.FrameBank, rows_per_frame: int) -> dict[int, float]:
    """Exact-match recall of the video word at each curriculum length (fresh seeded examples)."""
    recall = {}
    for length in sorted(cfg.lengths):
        rng = np.random.default_rng((cfg.seed, length, 0xE7A2))
        batch = video_data.sample_batch(rng, cfg.eval_examples, length, bank, rows_per_frame=rows_per_frame,
                                        tokenizer=tokenizer)
        answers = greedy_video_answers(next_token, params, frozen, batch, tokenizer, 4)
        recall[length] = float(np.mean([a.strip() == e.answer for a, e in zip(answers, batch.examples)]))
    return recall


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
          init_from: str | Path | None = None, video_bank: video_data.FrameBank | None = None) -> Summary:
    """Train (or, with `resume`, continue) into cfg.out; returns a Summary (also printed to `log`).

    `config` (default presets.architecture()) is used for a fresh start; a resumed run takes the
    saved one. `init_from` (a servable checkpoint directory, e.g. model/assets/default) starts from
    its weights and architecture instead of random ones, with a fresh optimizer and schedule: a
    fine-tune. `until` stops this run after that step (the schedule still spans cfg.steps), as
    --time-limit does, with a checkpoint. `video_bank` replaces the frame bank a video run builds
    (video_data.build_bank with its defaults).
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
        config, graphdef, params, frozen, opt_state, start = load_checkpoint(out, optimizer, trainable(cfg.tasks))
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
        graphdef, params, frozen = nnx.split(model, trainable(cfg.tasks), ...)
        opt_state = optimizer.init(params)
        start = 0
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_FILE).unlink(missing_ok=True)
        # The server reads <model>/tokenizer.model by default: make the directory servable as is.
        shutil.copyfile(tokenizer.path, out / presets.TOKENIZER_FILE)
    step_fn = make_step(graphdef, optimizer, cfg.compute_dtype)
    next_token = make_next_token(graphdef, cfg.compute_dtype)
    bank, rows_per_frame = None, 0
    if cfg.video_share:
        if config.vision is None:
            raise ValueError('the video task needs a model with an image encoder (config.vision).')
        bank = video_bank or video_data.build_bank(config.vision.image_size)
        rows_per_frame = config.vision.tokens_per_image
        video_step = make_video_step(graphdef, optimizer, cfg.compute_dtype)
        video_next = make_video_next_token(graphdef, cfg.compute_dtype)
    progress = _Progress(cfg.steps, log, cfg.progress)
    began = time.monotonic()
    first_loss = last_loss = None
    timed: list[float] = []  # seconds of steps that did not compile
    recall: dict[int, float] = {}
    video_recall: dict[int, float] = {}
    stopped_early = False
    step = start
    with open(out / LOG_FILE, 'a') as journal:
        for step in range(start, cfg.steps):
            over_time = cfg.time_limit is not None and time.monotonic() - began > cfg.time_limit
            if over_time or (until is not None and step >= until):
                stopped_early = True
                break
            length = cfg.length_at(step)
            batch = batch_for_step(cfg, step, tokenizer, bank, rows_per_frame)
            at, targets, weights = answer_slots(batch, cfg.max_answer)
            video = isinstance(batch, video_data.VideoBatch)
            t0 = time.monotonic()
            if video:
                params, opt_state, metrics = video_step(params, frozen, opt_state, batch.tokens, at, targets,
                                                        weights, batch.frames, batch.row_positions,
                                                        batch.embed_mask)
            else:
                params, opt_state, metrics = step_fn(params, frozen, opt_state, batch.tokens, at, targets,
                                                     weights)
            loss = float(metrics['loss'])
            seconds = time.monotonic() - t0
            if step > start and cfg.length_at(step - 1) == length and video == is_video_step(cfg, step - 1):
                timed.append(seconds)
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            journal.write(json.dumps({'step': step + 1, 'loss': loss, 'grad_norm': float(metrics['grad_norm']),
                                      'length': length, 'seconds': round(seconds, 4),
                                      **({'video': True} if video else {})}) + '\n')
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
                if bank is not None:
                    journal.write(json.dumps({'step': step + 1, 'video_recall': evaluate_video(
                        video_next, params, frozen, cfg, tokenizer, bank, rows_per_frame)}) + '\n')
        else:
            step = cfg.steps
        progress.close()
        done = step
        save_checkpoint(out, config, graphdef, params, frozen, opt_state, done, cfg)
        if cfg.eval_examples:
            recall = evaluate(next_token, params, frozen, cfg, tokenizer)
            journal.write(json.dumps({'step': done, 'recall': recall}) + '\n')
            if bank is not None:
                video_recall = evaluate_video(video_next, params, frozen, cfg, tokenizer, bank, rows_per_frame)
                journal.write(json.dumps({'step': done, 'video_recall': video_recall}) + '\n')
    seconds = time.monotonic() - began
    summary = Summary(done, first_loss, last_loss, seconds, float(np.mean(timed)) if timed else None, recall,
                      stopped_early, str(out), video_recall)
    log.write(format_summary(summary) + '\n')
    return summary


def format_summary(s: Summary) -> str:
    lines = [f'trained to step {s.steps_done} in {s.seconds:.1f} s'
             + (' (stopped at the time limit)' if s.stopped_early else ''),
             f'loss {s.first_loss if s.first_loss is None else round(s.first_loss, 4)} -> '
             f'{s.last_loss if s.last_loss is None else round(s.last_loss, 4)}'
             + (f', {s.seconds_per_step:.3f} s/step after compilation' if s.seconds_per_step else '')]
    lines += [f'recall at {length} tokens: {value:.0%}' for length, value in sorted(s.recall.items())]
    lines += [f'video recall at {length} tokens: {value:.0%}' for length, value in sorted(s.video_recall.items())]
    lines.append(f'checkpoint: {s.out}')
    return '\n'.join(lines)
