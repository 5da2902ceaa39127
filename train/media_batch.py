"""Padding media examples (train/video_data.py, train/audio_data.py) into one batch.

An example has `input_ids`, `loss_mask`, `embed_mask` ([T]), `row_positions` ([N, R]: where item
n's R encoder rows go, -1 for a row that goes nowhere) and its media items (frames or log-mel
windows, [N, ...]). The batch pads tokens to `length` and items to the most any example has:
padding items are zeros, and their rows (and rows at -1) point at `length`, past the end, so the
scatter into the prompt drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from preprocess import prompt
from ringserve.niah.tasks import CLASSIC_SYSTEM


def pad(examples: Sequence, items: Sequence[np.ndarray], length: int, pad_id: int = 0):
    """(tokens i32[B, T], loss_mask bool[B, T], items [B, N, ...], row_positions i32[B, N * R],
    embed_mask bool[B, T]) for `examples` and their media `items`."""
    if not examples:
        raise ValueError('a batch needs at least one example.')
    b, count = len(examples), max(len(x) for x in items)
    rows = examples[0].row_positions.shape[1]
    tokens = np.full((b, length), pad_id, np.int32)
    loss = np.zeros((b, length), bool)
    embed = np.zeros((b, length), bool)
    media = np.zeros((b, count, *items[0].shape[1:]), items[0].dtype)
    positions = np.full((b, count * rows), length, np.int32)
    for i, (e, x) in enumerate(zip(examples, items)):
        n = len(e.input_ids)
        if n > length:
            raise ValueError(f'example {i} has {n} tokens, more than the batch length {length}.')
        tokens[i, :n], loss[i, :n], embed[i, :n] = e.input_ids, e.loss_mask, e.embed_mask
        media[i, :len(x)] = x
        at = e.row_positions.reshape(-1)
        positions[i, :at.size] = np.where(at < 0, length, at)  # -1: a row that goes nowhere
    return tokens, loss, media, positions, embed


class _Segment:
    """A `preprocess.prompt.MediaSegment`: media laid out as ids."""

    def __init__(self, ids):
        self.ids = tuple(ids)


def render(media_ids: Sequence[int], question: str, answer: str, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + <end_of_turn>) as niah's media tasks ask: one user turn holding the
    media then the question, under the classic system instruction (SecretWord.contents)."""
    contents = [(prompt.USER, [_Segment(media_ids), question])]
    ids = prompt.render(contents, CLASSIC_SYSTEM, tokenizer)
    return ids, tokenizer.encode(answer) + [tokenizer.token_id(prompt.END_OF_TURN)]


class MediaExample:
    """What video and audio examples share: `input_ids`, `prompt_len`, `row_positions` [N, R] and
    `word` (the answer) are their fields."""

    @property
    def answer(self) -> str:
        return self.word

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.input_ids[:self.prompt_len]

    @property
    def embed_mask(self) -> np.ndarray:
        """bool[T]: the positions that take a media row instead of a token embedding."""
        mask = np.zeros(len(self.input_ids), bool)
        at = self.row_positions.reshape(-1)
        mask[at[at >= 0]] = True
        return mask
