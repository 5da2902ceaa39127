"""The probe pool: requests with media parts are validated on threads of their own, bounded."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ringserve.v1 import inference_pb2 as pb
from server.errors import ResourceExhausted
from server.probe_pool import ProbePool, has_media


def test_requests_with_media_parts_go_to_the_pool():
    text = pb.Content(role="user", parts=[pb.Part(text="hi")])
    inline = pb.Content(parts=[pb.Part(text="look"), pb.Part(inline_data=pb.Blob(mime_type="image/png", data=b"x"))])
    uploaded = pb.Content(parts=[pb.Part(file_data=pb.FileData(file_uri="media/abc"))])
    assert not has_media(pb.GenerateRequest(contents=[text]))
    assert has_media(pb.GenerateRequest(contents=[text, inline]))
    assert has_media(pb.CountTokensRequest(contents=[uploaded]))
    assert has_media(pb.CreateCacheRequest(contents=[uploaded]))


def test_past_its_bound_the_pool_refuses_at_once_and_recovers():
    """One worker, one waiting: a third concurrent probe is RESOURCE_EXHAUSTED naming the flag,
    and once the held probes finish the pool takes work again."""
    release = threading.Event()
    started = threading.Event()

    def slow():
        started.set()
        assert release.wait(30)
        return threading.current_thread().name

    async def scenario():
        pool = ProbePool(workers=1, waiting=1)
        try:
            held = [asyncio.ensure_future(pool.run(slow)) for _ in range(2)]
            await asyncio.sleep(0)  # both registered before the third asks
            with pytest.raises(ResourceExhausted, match="--media-probe-workers 1"):
                await pool.run(slow)
            assert await asyncio.to_thread(started.wait, 30)
            release.set()
            names = await asyncio.gather(*held)
            assert all(name.startswith("probe") for name in names)
            assert pool.pending == 0
            assert await pool.run(lambda: 7) == 7
        finally:
            release.set()
            pool.close()

    asyncio.run(scenario())


def test_an_exception_in_a_probe_frees_its_place():
    async def scenario():
        pool = ProbePool(workers=1, waiting=0)
        try:
            for _ in range(3):
                with pytest.raises(ValueError, match="bad header"):
                    await pool.run(_raise)
            assert pool.pending == 0
        finally:
            pool.close()

    asyncio.run(scenario())


def _raise():
    raise ValueError("bad header")
