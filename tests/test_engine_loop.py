"""The engine thread in-process, on a real (tiny) model: finishing, queue limits, engine failure."""

import asyncio
import time

import pytest

from _model_helpers import tiny_config, tiny_model
from model.paged_engine import PagedEngine
from model.sampling import SamplingParams
from preprocess.tokenizer import Tokenizer
from server.engine_loop import EngineLoop
from server.errors import EngineFailure, ResourceExhausted, Unavailable
from server.kv_manager import KVCacheManager
from server.validation import GenerationRequest


def work(i, max_new=6):
    return GenerationRequest(request_id=f"r{i}", prompt_ids=(1, 5 + i, 7, 9),
                             params=SamplingParams(temperature=0.0), max_new_tokens=max_new,
                             stop_sequences=())


class FailingEngine(PagedEngine):
    """A real engine whose device 'fails' on the nth decode step."""

    fail_at = 3

    def decode(self, *args):
        self.decodes = getattr(self, "decodes", 0) + 1
        if self.decodes >= self.fail_at:
            raise RuntimeError("device lost")
        return super().decode(*args)


def make_loop(config, net, *, slots, engine_cls=PagedEngine, pages=32, **kwargs):
    engine = engine_cls(config, net, max_slots=slots, num_pages=pages, page_len=4, max_len=32,
                        prefill_chunk=16)
    return EngineLoop(engine, KVCacheManager(pages, 4), Tokenizer.default(), frozenset(),
                      max_slots=slots, token_budget=16 + slots, **kwargs)


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    return config, tiny_model(config, seed=0)


async def collect(stream):
    return [event async for event in stream]


def test_requests_finish_and_slots_come_back(model):
    config, net = model

    async def main():
        loop = make_loop(config, net, slots=2)
        loop.start()
        streams = [loop.submit(work(i), time.monotonic()) for i in range(5)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        stats = loop.stats()
        loop.stop()
        return results, stats

    results, stats = asyncio.run(main())
    for events in results:
        assert events[-1].finish_reason == "MAX_TOKENS"
        assert sum(len(e.token_ids) for e in events) == 6 == events[-1].generated_tokens
        assert events[0].first_token_time is not None
    assert (stats.running, stats.waiting, stats.finished["MAX_TOKENS"]) == (0, 0, 5)
    assert stats.generated_tokens == 30


def test_full_queue_is_resource_exhausted(model):
    config, net = model

    async def main():
        # The thread is not started, so nothing leaves the queue.
        loop = make_loop(config, net, slots=1, max_waiting=2)
        loop.submit(work(0), time.monotonic())
        loop.submit(work(1), time.monotonic())
        with pytest.raises(ResourceExhausted, match="limit 2"):
            loop.submit(work(2), time.monotonic())

    asyncio.run(main())


def test_engine_failure_fails_every_request_and_stops_serving(model):
    config, net = model
    failures = []

    async def main():
        loop = make_loop(config, net, slots=2, engine_cls=FailingEngine,
                         on_failure=failures.append)
        loop.start()
        streams = [loop.submit(work(i, max_new=20), time.monotonic()) for i in range(3)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        with pytest.raises(Unavailable):
            loop.submit(work(9), time.monotonic())
        # A KV call (DeleteCache's unpin) after the failure is refused, not left waiting on a
        # thread that will never run it.
        with pytest.raises(Unavailable, match="engine has stopped"):
            await asyncio.wait_for(loop.call(lambda kv: kv.stats()), 60)
        return results, loop.stats()

    results, stats = asyncio.run(main())
    for events in results:  # running and waiting requests alike end with the engine's error
        assert isinstance(events[-1].error, EngineFailure)
        # The client learns what kind of failure, not the internals (the log has those).
        assert "RuntimeError" in events[-1].error.message
        assert "device lost" not in events[-1].error.message
    assert len(failures) == 1 and not stats.serving


def test_rope_columns_continue_past_the_prompt_by_delta():
    """M-RoPE columns of a chunk: the prompt's own, then (a preempted request recomputing its
    generated tokens) index + delta on all three rows."""
    import numpy as np

    from server.engine_loop import _rope_columns

    prompt = np.array([[0, 1, 2, 2, 2, 5], [0, 1, 2, 3, 3, 5], [0, 1, 2, 3, 4, 5]], np.int32)
    request = GenerationRequest(request_id="r", prompt_ids=(1,) * 6, params=SamplingParams(),
                                max_new_tokens=4, stop_sequences=(), rope_positions=prompt, rope_delta=-2)
    np.testing.assert_array_equal(_rope_columns(request, 1, 3), prompt[:, 1:4])
    np.testing.assert_array_equal(_rope_columns(request, 4, 4), [[2, 5, 4, 5], [3, 5, 4, 5], [4, 5, 4, 5]])
    np.testing.assert_array_equal(_rope_columns(request, 7, 2), [[5, 6]] * 3)
