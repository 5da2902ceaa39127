"""Per-key limits: what one API key (owner) may hold at once. Each limit is a serve flag; each
refusal is RESOURCE_EXHAUSTED (or INVALID_ARGUMENT for a malformed value) naming the limit and
its flag, so a client knows what to free or whom to ask."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
from collections.abc import Iterator

from server.errors import InvalidArgument, ResourceExhausted

MAX_DISPLAY_NAME_CHARS = 512


@dataclasses.dataclass(frozen=True)
class Quotas:
    caches_per_key: int = 64
    pinned_fraction_per_key: float = 0.5  # of the KV pool's tokens, pinned by one key's caches
    max_cache_ttl: datetime.timedelta = datetime.timedelta(days=30)
    uploads_per_key: int = 1000
    upload_bytes_per_key: int = 10 << 30
    streams_per_key: int = 64  # concurrent Generate calls (with API keys only)
    upload_idle_seconds: float = 60.0  # an open upload that sends nothing this long is dropped

    def __post_init__(self):
        for name in ("caches_per_key", "uploads_per_key", "upload_bytes_per_key",
                     "streams_per_key"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if not 0 < self.pinned_fraction_per_key <= 1:
            raise ValueError(f"pinned_fraction_per_key={self.pinned_fraction_per_key}: use a "
                             "fraction in (0, 1]")
        if not self.upload_idle_seconds > 0:
            raise ValueError(f"upload_idle_seconds={self.upload_idle_seconds}: must be > 0")
        if self.max_cache_ttl <= datetime.timedelta(0):
            raise ValueError("max_cache_ttl must be positive")

    def check_caches(self, held: int, pinned_tokens: int, new_tokens: int,
                     pool_tokens: int, share_pool: bool = True) -> None:
        """Before a key creates a cache: it holds `held` caches pinning `pinned_tokens`.
        `share_pool` False: the key may pin any share of the pool (a server without keys)."""
        if held >= self.caches_per_key:
            raise ResourceExhausted(
                f"caches per key: this key holds {held}, the limit "
                f"(--max-caches-per-key); delete one first")
        allowed = int(self.pinned_fraction_per_key * pool_tokens)
        if share_pool and pinned_tokens + new_tokens > allowed:
            raise ResourceExhausted(
                f"pinned tokens per key: this key's caches pin {pinned_tokens} tokens and this "
                f"one needs {new_tokens}, over {allowed} ({self.pinned_fraction_per_key:g} of the "
                f"KV pool, --max-pinned-fraction-per-key); delete caches or shorten this one")

    def check_uploads(self, held: int, held_bytes: int, new_bytes: int) -> None:
        """Before a key uploads `new_bytes`: it holds `held` uploads of `held_bytes`."""
        if held >= self.uploads_per_key:
            raise ResourceExhausted(f"uploads per key: this key holds {held}, the limit "
                                    "(--max-uploads-per-key); delete some first")
        if held_bytes + new_bytes > self.upload_bytes_per_key:
            raise ResourceExhausted(
                f"upload bytes per key: this key holds {held_bytes} bytes and this upload is "
                f"{new_bytes}, over {self.upload_bytes_per_key} (--max-upload-gib-per-key)")


def check_display_name(name: str, field: str = "display_name") -> None:
    if len(name) > MAX_DISPLAY_NAME_CHARS:
        raise InvalidArgument(f"{field}: {len(name)} characters, at most "
                              f"{MAX_DISPLAY_NAME_CHARS}")


class StreamCounter:
    """Concurrent Generate calls per key (event-loop side only)."""

    def __init__(self, limit: int | None):
        self.limit = limit  # None: no limit
        self._open: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def hold(self, owner: str) -> Iterator[None]:
        if self.limit is not None and self._open[owner] >= self.limit:
            raise ResourceExhausted(f"concurrent streams per key: this key has {self._open[owner]}"
                                    f" open, the limit (--max-streams-per-key); retry when one "
                                    "ends")
        self._open[owner] += 1
        try:
            yield
        finally:
            self._open[owner] -= 1
            if not self._open[owner]:
                del self._open[owner]
