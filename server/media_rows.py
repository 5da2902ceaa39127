"""Placeholder ids <-> media embedding rows: how a prompt names media rows without tensors.

Row j of the media item with key K (62 bits of a hash of its bytes and of what is read of them)
stands in the prompt as the id -1 - ((K + j) mod 2**62). Ids are negative, so they never collide
with a vocabulary id; they are content-derived, so the prefix cache's page hashes and a named
cache's token prefix tell media apart with no extra keys; and the engine loop maps them back to
rows with arithmetic alone, for whichever chunk it prefills.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.qwen2_5_vl import MediaSpan, mrope_positions

KEY_SPACE = 1 << 62


def placeholder_ids(key: int, rows: int) -> np.ndarray:
    """i64[rows]: the prompt ids standing for rows 0..rows-1 of the media with this key."""
    return -1 - ((key + np.arange(rows, dtype=np.int64)) % KEY_SPACE)


def rows_for(token_ids: Sequence[int], media: Sequence[tuple[int, np.ndarray]],
             width: int) -> np.ndarray | None:
    """f32[T, width] embeddings for a chunk's ids (zeros at text ids), or None when the chunk
    holds no placeholder. `media` is (key, rows [n, width]) for every media item of the request."""
    ids = np.asarray(token_ids, np.int64)
    holes = ids < 0
    if not holes.any():
        return None
    out = np.zeros((len(ids), width), np.float32)
    left = holes.copy()
    for key, rows in media:
        index = (-1 - ids - key) % KEY_SPACE  # the row this id would be, were it this media's
        mine = left & (index < len(rows))
        out[mine] = rows[index[mine]]
        left &= ~mine
    if left.any():
        raise AssertionError(f"{int(left.sum())} placeholder ids belong to no media of the request")
    return out


def span_ids(token_ids: Sequence[int]) -> np.ndarray:
    """i32[T]: 0 at text ids, k at the k-th run of placeholder ids in the chunk (1, 2, ...), for
    models whose media rows of one run attend to each other both ways."""
    holes = np.asarray(token_ids, np.int64) < 0
    starts = holes & ~np.concatenate([[False], holes[:-1]])
    return np.where(holes, np.cumsum(starts), 0).astype(np.int32)


def rope_positions(prompt_ids: Sequence[int], media: Sequence, config) -> tuple[np.ndarray, int]:
    """M-RoPE (Qwen2.5-VL): (i32[3, len(prompt_ids)] rotary positions, delta for the tokens after
    the prompt) of a prompt whose media items (`server.media.MediaTokens` with a `grid`) stand
    in it as placeholder runs. Each run starts at its item's row 0 and is as long as its grid
    says; the same item may appear more than once."""
    grids = {item.key: (item.grid, item.seconds_per_grid) for item in media if item.grid is not None}
    ids = np.asarray(prompt_ids, np.int64)
    holes = np.nonzero(ids < 0)[0]
    merge = config.qwen_vision.merge_size
    spans, at = [], 0
    while (i := int(np.searchsorted(holes, at))) < len(holes):
        start = int(holes[i])
        found = grids.get(int((-1 - ids[start]) % KEY_SPACE))
        if found is None:
            raise AssertionError(f"placeholder at {start} starts no media item's rows")
        spans.append(MediaSpan(start, *found))
        at = start + spans[-1].tokens(merge)
    return mrope_positions(len(ids), spans, config)


class PromptReadiness:
    """How many leading prompt tokens have their inputs: text always, media rows once computed.

    `progress` items have `key`, `rows` (their row count) and `ready` (rows final so far, in
    order; another thread raises it). Calling the object returns the first prompt position whose
    row is not final yet (len(prompt) when all are): the scheduler prefills up to there, so a long
    video's first minutes are prefilled while the rest still decodes.
    """

    def __init__(self, prompt_ids: Sequence[int], progress: Sequence):
        ids = np.asarray(prompt_ids, np.int64)
        self._length = len(ids)
        self._items = []
        for item in progress:
            n = len(item.rows)
            index = (-1 - ids - item.key) % KEY_SPACE
            at = np.nonzero((ids < 0) & (index < n))[0]
            # first[r]: the earliest position holding row r; suffix min: the earliest position
            # needing any row >= r, i.e. the limit while rows [0, r) are final.
            first = np.full(n + 1, self._length, np.int64)
            np.minimum.at(first, index[at], at)
            self._items.append((item, np.minimum.accumulate(first[::-1])[::-1]))

    def __call__(self) -> int:
        return int(min((limit[item.ready] for item, limit in self._items),
                       default=self._length))
