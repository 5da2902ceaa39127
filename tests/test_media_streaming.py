"""Prefill follows media decoding: the engine computes a prompt up to its first media row that is
not final yet, and the result equals computing it with every row known from the start."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from flax import nnx

from _model_helpers import tiny_config
from model.config import VisionConfig
from model.paged_engine import PagedEngine
from model.sampling import SamplingParams
from model.transformer import Transformer
from preprocess.tokenizer import Tokenizer
from server.engine_loop import EngineLoop
from server.kv_manager import KVCacheManager
from server.media import Progress
from server.media_rows import PromptReadiness, placeholder_ids
from server.validation import GenerationRequest

KEY = 987_654_321
ROWS = 24
PROMPT = (1, 5, 7, 9, 11, *placeholder_ids(KEY, ROWS).tolist(), 13, 17)  # media at 5..28


@pytest.fixture(scope="module")
def model():
    # The smallest vision config: the engine then takes embedding rows (its encoder is unused).
    config = tiny_config(vision=VisionConfig(image_size=8, patch_size=8, width=8, n_layers=1,
                                             n_heads=1, mlp_dim=8, tokens_per_image=1))
    engine = PagedEngine(config, Transformer(config, rngs=nnx.Rngs(0)), max_slots=2,
                         num_pages=32, page_len=4, max_len=64, prefill_chunk=8)
    engine.warmup()  # no compiling inside the timed waits below
    return config, engine


def make_loop(config, engine):
    # A fresh cache manager over the same pool: every page is free again for the next loop.
    return EngineLoop(engine, KVCacheManager(32, 4, enable_prefix_caching=False),
                      Tokenizer.default(), frozenset(), max_slots=2, token_budget=10)


def request(rows, ready=None):
    return GenerationRequest(request_id="r", prompt_ids=PROMPT,
                             params=SamplingParams(temperature=0.0), max_new_tokens=5,
                             stop_sequences=(), media=((KEY, rows),), ready=ready)


def test_readiness_limits():
    progress = Progress(KEY, np.zeros((ROWS, 4)))
    ready = PromptReadiness(PROMPT, [progress])
    assert ready() == 5  # the text before the media
    progress.ready = 10
    assert ready() == 15
    progress.ready = ROWS
    assert ready() == len(PROMPT)
    # The same media twice: the earliest position needing a row bounds it.
    twice = (*PROMPT, *placeholder_ids(KEY, 3).tolist())
    progress.ready = 2
    assert PromptReadiness(twice, [progress])() == 7
    progress.ready = ROWS
    assert PromptReadiness(twice, [progress])() == len(twice)


def test_prefill_follows_the_rows_and_equals_known_rows(model):
    config, net = model
    rows = np.random.default_rng(0).normal(size=(ROWS, config.d_model)).astype(np.float32)

    async def live(loop, want):
        # Waits (however long a loaded machine takes) for the prefill to reach `want` tokens,
        # then gives the engine several more polls to show that it goes no further.
        deadline = time.monotonic() + 60
        while loop.stats().slots_live < want and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        return loop.stats().slots_live

    async def streamed():
        loop = make_loop(config, net)
        loop.start()
        progress = Progress(KEY, np.zeros_like(rows))
        stream = loop.submit(request(progress.rows, PromptReadiness(PROMPT, [progress])),
                             time.monotonic())
        events = asyncio.ensure_future(collect(stream))
        computed = [await live(loop, 5)]
        progress.rows[:10] = rows[:10]
        progress.ready = 10
        computed.append(await live(loop, 15))
        progress.rows[10:] = rows[10:]
        progress.ready = ROWS
        out = await events
        loop.stop()
        return computed, out

    async def known():
        loop = make_loop(config, net)
        loop.start()
        out = await collect(loop.submit(request(rows), time.monotonic()))
        loop.stop()
        return out

    computed, events = asyncio.run(streamed())
    assert computed == [5, 15]  # up to the first missing row, no further
    reference = asyncio.run(known())
    assert [t for e in events for t in e.token_ids] == [t for e in reference for t in e.token_ids]
    assert events[-1].finish_reason == "MAX_TOKENS"


async def collect(stream):
    return [event async for event in stream]
