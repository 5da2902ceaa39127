"""Named context caches (Gemini's cachedContents): names, expiry and the pages they pin.

A cache is created by running its contents through the engine as a prompt-only request whose full
KV pages are then pinned (server/engine_loop.py, `pin_as`); requests naming the cache render its
turns first, so the ordinary prefix lookup finds the pinned pages. This module keeps the registry
(event-loop side) and turns deletion and expiry into unpins on the engine thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import uuid

from google.protobuf import duration_pb2, timestamp_pb2

from ringserve.v1 import inference_pb2 as pb
from server.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

DEFAULT_TTL = datetime.timedelta(hours=1)  # Gemini's default
# The longest a cache may pin its pages for; a later UpdateCache can extend it again.
MAX_TTL = datetime.timedelta(days=30)
NAME_PREFIX = "cachedContents/"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass
class CacheEntry:
    name: str
    display_name: str
    turns: tuple[tuple[str, str], ...]
    system: str | None
    token_ids: tuple[int, ...]
    media: tuple  # (media key, f32[rows, D]) of the media in its turns (server/media.py)
    pinned_tokens: int
    create_time: datetime.datetime
    update_time: datetime.datetime
    expire_time: datetime.datetime
    owner: str = ""  # the API key's name that made it ("" when the server takes no keys)

    def to_proto(self) -> pb.CachedContent:
        message = pb.CachedContent(name=self.name, display_name=self.display_name,
                                   total_token_count=len(self.token_ids),
                                   pinned_token_count=self.pinned_tokens)
        message.create_time.FromDatetime(self.create_time)
        message.update_time.FromDatetime(self.update_time)
        message.expire_time.FromDatetime(self.expire_time)
        return message


def new_name() -> str:
    return NAME_PREFIX + uuid.uuid4().hex[:16]


def expiry(ttl: duration_pb2.Duration | None, expire_time: timestamp_pb2.Timestamp | None,
           default: datetime.timedelta | None = DEFAULT_TTL,
           max_ttl: datetime.timedelta = MAX_TTL) -> datetime.datetime:
    """The expiry a Create/UpdateCache asks for (expire_time wins over ttl), at most `max_ttl`
    from now. Seconds are compared before any date arithmetic, which overflows past year 9999."""
    now = _now()
    limit = max_ttl.total_seconds()
    if expire_time is not None:
        seconds = expire_time.seconds + expire_time.nanos / 1e9 - now.timestamp()
        if seconds <= 0:
            raise InvalidArgument(
                f"expire_time: {_timestamp_text(expire_time)} is not in the future")
        if seconds > limit:
            raise InvalidArgument(f"expire_time: {_timestamp_text(expire_time)} is more than the "
                                  f"maximum TTL of {limit:.0f} s from now "
                                  "(--max-cache-ttl-hours)")
        return expire_time.ToDatetime(datetime.timezone.utc)
    if ttl is not None:
        seconds = ttl.seconds + ttl.nanos / 1e9
        if seconds <= 0:
            raise InvalidArgument(f"ttl: {seconds}s; must be positive")
        if seconds > limit:
            raise InvalidArgument(f"ttl: {seconds:.0f} s; the maximum TTL is {limit:.0f} s "
                                  "(--max-cache-ttl-hours)")
        return now + ttl.ToTimedelta()
    if default is None:
        raise InvalidArgument("ttl or expire_time: set one to change the expiry")
    return now + min(default, max_ttl)


def _timestamp_text(stamp: timestamp_pb2.Timestamp) -> str:
    try:
        return stamp.ToJsonString()
    except ValueError:  # outside years 1-9999
        return f"{stamp.seconds} s after the epoch"


class CacheRegistry:
    """Live caches by name. Event-loop side only; unpinning goes through `unpin`."""

    def __init__(self, unpin):
        self._entries: dict[str, CacheEntry] = {}
        self._unpin = unpin  # async (name) -> None, runs on the engine thread

    def add(self, entry: CacheEntry) -> None:
        self._entries[entry.name] = entry

    async def get(self, name: str, owner: str, field: str = "name") -> CacheEntry:
        """`owner`'s live cache called `name`; NOT_FOUND if unknown, expired (then freed now) or
        another owner's (whose names are not disclosed).

        `field` names the request field that held the name, for the error message.
        """
        if not name:
            raise InvalidArgument(f"{field}: empty; give a cache name ({NAME_PREFIX}...)")
        entry = self._entries.get(name)
        if entry is not None and entry.expire_time <= _now():
            if self._entries.pop(name, None) is not None:
                await self._unpin(name)
            entry = None
        if entry is None or entry.owner != owner:
            raise NotFound(f"{field}: no live cache named {name!r} (never created, deleted, "
                           "or expired)")
        return entry

    def list(self, owner: str) -> list[CacheEntry]:
        """`owner`'s live caches, oldest first."""
        now = _now()
        return sorted((e for e in self._entries.values() if e.expire_time > now
                       and e.owner == owner), key=lambda e: (e.create_time, e.name))

    async def delete(self, name: str, owner: str) -> None:
        entry = self._entries.get(name)
        if entry is None or entry.owner != owner:
            raise NotFound(f"name: no live cache named {name!r}")
        del self._entries[name]
        await self._unpin(name)

    async def expire(self) -> int:
        """Frees every cache past its expiry; returns how many. A cache that a concurrent read
        or delete removes while this awaits an unpin is skipped, not an error."""
        now = _now()
        expired = [name for name, e in self._entries.items() if e.expire_time <= now]
        freed = 0
        for name in expired:
            if self._entries.pop(name, None) is None:
                continue
            await self._unpin(name)
            freed += 1
            log.info("cache %s expired; its pages are free", name)
        return freed

    async def expire_forever(self, period: float = 0.5) -> None:
        """Runs `expire` every `period` seconds for the server's life: one failed round (an
        unpin refused by a failed engine, say) is logged, and the next round runs."""
        while True:
            await asyncio.sleep(period)
            try:
                await self.expire()
            except Exception:
                log.exception("cache expiry round failed; retrying in %.1f s", period)

    def touch(self, entry: CacheEntry, expire_time: datetime.datetime) -> None:
        entry.expire_time = expire_time
        entry.update_time = _now()

    @staticmethod
    def entry(name: str, display_name: str, turns, system, token_ids, media, pinned_tokens,
              expire_time: datetime.datetime, owner: str = "") -> CacheEntry:
        now = _now()
        return CacheEntry(name=name, display_name=display_name, turns=tuple(turns), system=system,
                          token_ids=tuple(token_ids), media=tuple(media),
                          pinned_tokens=pinned_tokens,
                          create_time=now, update_time=now, expire_time=expire_time, owner=owner)
