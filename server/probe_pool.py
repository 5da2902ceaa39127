"""Media probing on threads of its own, bounded.

Validating a request with media parts reads headers and runs ffprobe on videos, which can take
seconds per part (30 s at most per video). On the event loop's shared thread pool a burst of slow
media would delay every text request's tokenizing; here at most `workers` probe at once, at most
`waiting` more queue, and the rest are refused at once with RESOURCE_EXHAUSTED naming the flag,
while text-only requests keep the shared pool to themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools

from server.errors import ResourceExhausted

WAITING_PER_WORKER = 16


class ProbePool:
    def __init__(self, workers: int = 4, waiting: int | None = None):
        if workers < 1:
            raise ValueError(f"--media-probe-workers {workers}: need at least 1")
        self.workers = workers
        self.limit = workers + (WAITING_PER_WORKER * workers if waiting is None else waiting)
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="probe")
        self.pending = 0  # touched on the event loop's thread only

    async def run(self, fn, /, *args):
        """fn(*args) on a probe thread (context variables carried, as asyncio.to_thread does)."""
        if self.pending >= self.limit:
            raise ResourceExhausted(
                f"media probing is busy: {self.pending} requests with media are being validated "
                f"(--media-probe-workers {self.workers}, {self.limit - self.workers} more may wait); "
                "retry shortly")
        self.pending += 1
        try:
            call = functools.partial(contextvars.copy_context().run, fn, *args)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def has_media(request) -> bool:
    """Whether a request's contents hold a media part (inline or uploaded)."""
    return any(part.WhichOneof("data") in ("inline_data", "file_data")
               for content in request.contents for part in content.parts)
