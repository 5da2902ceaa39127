"""Media steps for the trainer: video (train/video_data.py) and audio (train/audio_data.py) batches
through the model's own encoders and into the decoder, as the server's engine loop feeds them.

A media batch holds the prompt ids (0 where a media row goes), the media inputs (frames or log-mel
windows), and where each encoder row goes (`row_positions`, padding rows pointing past the end,
dropped by the scatter). One function per modality turns inputs into rows; everything else (loss,
step, greedy decoding, eval) is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from model.config import ModelConfig
from preprocess.tokenizer import Tokenizer
from train import audio_data, video_data

TASKS = (video_data.TASK, audio_data.TASK, audio_data.LOOP_TASK, audio_data.EDGE_TASK,
         audio_data.SPEECH_TASK)
SPEECH_SECONDS = 600  # audio_speech's bank: ten minutes of other voices, then looped
# the submodule each task trains
ENCODER = {video_data.TASK: 'vision', audio_data.TASK: 'audio', audio_data.LOOP_TASK: 'audio',
           audio_data.EDGE_TASK: 'audio', audio_data.SPEECH_TASK: 'audio'}


def _image_rows(model, frames: jax.Array) -> jax.Array:
    """u8[B, F, S, S, 3] -> [B, F * R, D]: preprocess.image.normalize (SigLIP's mean = std = 0.5),
    then the image encoder, as the server does for each decoded frame."""
    b, f, s = frames.shape[:3]
    pixels = (frames.astype(jnp.float32) / 255.0 - 0.5) / 0.5
    rows = model.encode_images(pixels.reshape(b * f, s, s, 3))  # [B * F, R, D]
    return rows.reshape(b, -1, rows.shape[-1])


def _audio_rows(model, mel: jax.Array) -> jax.Array:
    """f32[B, W, M, A] log-mel windows -> [B, W * rows_per_window, D]."""
    b, w = mel.shape[:2]
    rows = model.encode_audio(mel.reshape(b * w, *mel.shape[2:]))  # [B * W, R, D]
    return rows.reshape(b, -1, rows.shape[-1])


_ROWS = {task: _image_rows if encoder == 'vision' else _audio_rows for task, encoder in ENCODER.items()}


@dataclasses.dataclass(frozen=True)
class MediaTask:
    """One media task of a run: its bank and how its batches are drawn."""

    name: str  # 'video', 'audio', 'audio_loop', 'audio_edge' or 'audio_speech'
    bank: object  # video_data.FrameBank or audio_data.ClipBank
    config: ModelConfig

    def sample(self, rng: np.random.Generator, batch: int, length: int, tokenizer: Tokenizer):
        if self.name == video_data.TASK:
            return video_data.sample_batch(rng, batch, length, self.bank,
                                           rows_per_frame=self.config.vision.tokens_per_image, tokenizer=tokenizer)
        return audio_data.sample_batch(rng, batch, length, self.bank,
                                       tokens_per_second=self.config.audio.tokens_per_second, tokenizer=tokenizer,
                                       loop=self.name == audio_data.LOOP_TASK,
                                       edge=self.name == audio_data.EDGE_TASK,
                                       mel_spec=audio_data.mel_spec(self.config.audio))

    @staticmethod
    def inputs(batch) -> np.ndarray:
        """The encoder's inputs of a batch: frames or log-mel windows."""
        return batch.frames if isinstance(batch, video_data.VideoBatch) else batch.mel


def media_task(name: str, config: ModelConfig, bank=None) -> MediaTask:
    """`name`'s task for a model of `config`, with `bank` or the data module's default bank
    (built once, then cached under build/)."""
    if name == video_data.TASK:
        if config.vision is None:
            raise ValueError('the video task needs a model with an image encoder (config.vision).')
        bank = bank or video_data.build_bank(config.vision.image_size)
    elif ENCODER.get(name) == 'audio':
        if config.audio is None:
            raise ValueError('the audio task needs a model with an audio encoder (config.audio).')
        if name == audio_data.SPEECH_TASK:  # ten minutes of other voices, from the bank's seed
            bank = bank or audio_data.build_bank(haystack='speech', noise_seconds=SPEECH_SECONDS)
        else:
            bank = bank or audio_data.build_bank()
    else:
        raise ValueError(f'media task {name!r}: use one of {TASKS}.')
    return MediaTask(name, bank, config)


def logits(model, name: str, tokens, at, inputs, row_positions, embed_mask):
    """Logits at `at` [B, M] with each media row where the prompt holds it."""
    rows = _ROWS[name](model, inputs)  # [B, N, D]
    b = tokens.shape[0]
    embeds = jnp.zeros((*tokens.shape, rows.shape[-1]), rows.dtype)  # [B, T, D]
    embeds = embeds.at[jnp.arange(b)[:, None], row_positions].set(rows, mode='drop')
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    out, _ = model(tokens, positions, logits_at=at, embeds=embeds, embed_mask=embed_mask)
    return out


def _merge(graphdef, params, frozen, dtype):
    cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    return nnx.merge(graphdef, cast, frozen)


def make_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, compute_dtype: str, name: str):
    """jit((params, frozen, opt_state, tokens, at, targets, weights, inputs, row_positions, embed_mask)
    -> (params, opt_state, metrics)) for `name`'s batches, params and opt_state donated."""
    dtype = jnp.dtype(compute_dtype)

    def loss_fn(params, frozen, tokens, at, targets, weights, inputs, row_positions, embed_mask):
        model = _merge(graphdef, params, frozen, dtype)
        out = logits(model, name, tokens, at, inputs, row_positions, embed_mask)  # f32[B, M, V]
        nll = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), targets)  # [B, M]
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def step(params, frozen, opt_state, tokens, at, targets, weights, inputs, row_positions, embed_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, tokens, at, targets, weights, inputs,
                                                  row_positions, embed_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 2))


def make_next_token(graphdef: nnx.GraphDef, compute_dtype: str, name: str):
    """jit((params, frozen, tokens, at i32[E], inputs, row_positions, embed_mask) -> i32[E])."""
    dtype = jnp.dtype(compute_dtype)

    def next_token(params, frozen, tokens, at, inputs, row_positions, embed_mask):
        model = _merge(graphdef, params, frozen, dtype)
        out = logits(model, name, tokens, at[:, None], inputs, row_positions, embed_mask)
        return jnp.argmax(out[:, 0], axis=-1).astype(jnp.int32)

    return jax.jit(next_token)


def greedy_answers(next_token, params, frozen, batch, tokenizer: Tokenizer, max_new: int,
                   greedy: Callable) -> list[str]:
    """Each example's prompt continued greedily (the media encoded in every call);
    `greedy` is the trainer's loop."""
    examples = batch.examples
    width = max(e.prompt_len for e in examples) + max_new
    tokens = np.zeros((len(examples), width), np.int32)
    embed = np.zeros((len(examples), width), bool)
    for row, e in enumerate(examples):
        tokens[row, :e.prompt_len] = e.prompt_ids
        embed[row, :e.prompt_len] = e.embed_mask[:e.prompt_len]
    positions = np.where(batch.row_positions >= batch.tokens.shape[1], width, batch.row_positions)
    inputs = MediaTask.inputs(batch)
    return greedy(lambda t, at: next_token(params, frozen, t, at, inputs, positions, embed),
                  tokens, examples, tokenizer, max_new)


def evaluate(next_token, params, frozen, task: MediaTask, lengths, examples: int, seed: int,
             tokenizer: Tokenizer, greedy: Callable) -> dict[int, float]:
    """Exact-match recall of the word at each length (fresh examples, seeded apart from training)."""
    recall = {}
    for length in sorted(lengths):
        rng = np.random.default_rng((seed, length, 0xE7A2))
        batch = task.sample(rng, examples, length, tokenizer)
        answers = greedy_answers(next_token, params, frozen, batch, tokenizer, 6, greedy)
        recall[length] = float(np.mean([a.strip() == e.answer for a, e in zip(answers, batch.examples)]))
    return recall
