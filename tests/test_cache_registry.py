"""The named-cache registry (server/caches.py) on its own: expiry races and limits."""

from __future__ import annotations

import asyncio
import datetime

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from server import caches
from server.errors import InvalidArgument, NotFound


def _entry(name: str, seconds: float) -> caches.CacheEntry:
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return caches.CacheRegistry.entry(name, "", (), None, (1, 2), (), 2, when)


def test_a_read_racing_expiry_neither_raises_nor_unpins_twice():
    """expire() awaits each unpin; a GetCache that meets the next expired cache meanwhile frees
    it first. expire() must skip it, not raise (which stopped all later expiry)."""
    unpinned = []

    async def unpin(name):
        await asyncio.sleep(0)  # the engine thread's round trip: other tasks run here
        unpinned.append(name)

    async def main():
        registry = caches.CacheRegistry(unpin)
        for name in ("cachedContents/a", "cachedContents/b"):
            registry.add(_entry(name, -1))
        expiring = asyncio.ensure_future(registry.expire())
        await asyncio.sleep(0)  # expire() is now inside the first unpin
        with pytest.raises(NotFound):
            await registry.get("cachedContents/b", "")
        assert await expiring == 1
        assert registry.list("") == []

    asyncio.run(main())
    assert sorted(unpinned) == ["cachedContents/a", "cachedContents/b"]


def test_expiry_goes_on_after_a_failed_round():
    calls = []

    async def unpin(name):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("engine failed")

    async def main():
        registry = caches.CacheRegistry(unpin)
        registry.add(_entry("cachedContents/a", -1))
        loop = asyncio.ensure_future(registry.expire_forever(period=0.01))

        async def unpinned(count):
            while len(calls) < count and not loop.done():
                await asyncio.sleep(0.01)

        await asyncio.wait_for(unpinned(1), 60)
        registry.add(_entry("cachedContents/b", -1))
        await asyncio.wait_for(unpinned(2), 60)
        assert not loop.done(), "the expiry loop died"
        loop.cancel()

    asyncio.run(main())
    assert calls == ["cachedContents/a", "cachedContents/b"]


@pytest.mark.parametrize("ttl, expire_time, words", [
    (duration_pb2.Duration(seconds=315576000000), None, "maximum TTL"),
    (duration_pb2.Duration(seconds=10**15), None, "maximum TTL"),
    (duration_pb2.Duration(seconds=0), None, "must be positive"),
    (None, timestamp_pb2.Timestamp(seconds=253402300799), "maximum TTL"),
    (None, timestamp_pb2.Timestamp(seconds=10**13), "maximum TTL"),
    (None, timestamp_pb2.Timestamp(seconds=-10**13), "not in the future"),
])
def test_expiry_out_of_range_is_invalid_argument(ttl, expire_time, words):
    with pytest.raises(InvalidArgument, match=words):
        caches.expiry(ttl, expire_time)


def test_expiry_within_the_limit():
    now = datetime.datetime.now(datetime.timezone.utc)
    got = caches.expiry(duration_pb2.Duration(seconds=3600), None)
    assert abs((got - now).total_seconds() - 3600) < 5
    week = timestamp_pb2.Timestamp(seconds=int(now.timestamp()) + 7 * 86400)
    assert caches.expiry(None, week) == week.ToDatetime(datetime.timezone.utc)
    assert caches.expiry(None, None, default=datetime.timedelta(days=90)) <= (
        datetime.datetime.now(datetime.timezone.utc) + caches.MAX_TTL)
