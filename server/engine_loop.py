"""The engine thread: one thread owns the devices; the gRPC event loop only talks to it by queues.

Design note
1. Threads. The grpc.aio event loop (one thread) runs the servicer: validation, tokenising (in a
   worker thread), streaming responses. One engine thread owns the `Engine` (parameters, KV cache,
   jitted steps); nothing else calls it. They meet at two places: `submit()` puts a validated
   request on a thread-safe inbox, and each request's `Stream` holds an asyncio.Queue that the
   engine thread feeds with `loop.call_soon_threadsafe`.
2. One step. Move the inbox to the waiting line; fill free decode slots from it (prefill, which
   samples the first token); run one batched decode step for every active slot; turn each slot's
   new token into text (incremental detokenising, stop sequences held back until decided) and
   deliver one event per request. A request finishes on its stop token, a stop sequence,
   max_new_tokens, or cancellation; its slot is freed in the same step.
3. Cancellation. A client cancel, disconnect, deadline or server shutdown reaches the servicer as
   asyncio cancellation; it sets the stream's `cancelled` flag (an Event, safe across threads).
   The engine thread checks the flags before every step, so a cancelled stream stops within one
   step and its slot is reused at once.
4. Failure. If a step raises, every request in flight or waiting fails with INTERNAL, the
   `on_failure` callback marks the server NOT_SERVING, and the thread ends: the process never goes
   on serving half-alive.
5. Debugging. `stats()` is a consistent snapshot (running, waiting, slots, token and finish
   counters), served by the GetStats RPC; log lines carry request ids.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from model.engine import Engine
from preprocess.detokenize import IncrementalDetokenizer
from preprocess.tokenizer import Tokenizer
from server.errors import EngineFailure, RequestError, ResourceExhausted, Unavailable
from server.validation import GenerationRequest

log = logging.getLogger(__name__)

# Finish reasons, named as in the API's GenerateResponse.FinishReason.
STOP = "STOP"
MAX_TOKENS = "MAX_TOKENS"
STOP_SEQUENCE = "STOP_SEQUENCE"
CANCELLED = "CANCELLED"


@dataclasses.dataclass(frozen=True)
class Event:
    """What one engine step produced for one request."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    first_token_time: float | None = None  # set on the event carrying the first token
    finish_reason: str | None = None  # set on the last event
    prompt_tokens: int = 0
    generated_tokens: int = 0
    error: RequestError | None = None  # the request failed; no more events follow


class Stream:
    """The servicer's end of one request: an async iterator of Events, and a cancel switch."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 received_at: float):
        self.request = request
        self.received_at = received_at
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def deliver(self, event: Event) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server gone): nobody is listening
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        if event.finish_reason is not None or event.error is not None:
            self._done = True
        return event


class _Active:
    """Engine-thread state of a request holding a decode slot."""

    def __init__(self, stream: Stream, slot: int, tokenizer: Tokenizer):
        self.stream = stream
        self.slot = slot
        self.detok = IncrementalDetokenizer(tokenizer)
        self.generated = 0
        self.held = ""  # text not yet sent: it may be the start of a stop sequence
        self.first_token_time: float | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.stream.request


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@dataclasses.dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    slots: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    serving: bool = True


class EngineLoop:
    """Runs `engine` on its own thread; see the design note above."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, stop_token_ids: frozenset[int], *,
                 max_slots: int, max_waiting: int = 256,
                 on_failure: Callable[[BaseException], None] | None = None):
        self._engine = engine
        self._tokenizer = tokenizer
        self._stop_ids = stop_token_ids
        self._max_waiting = max_waiting
        self._on_failure = on_failure
        self._inbox: queue.SimpleQueue[Stream] = queue.SimpleQueue()
        self._waiting: collections.deque[Stream] = collections.deque()
        self._free_slots = list(range(max_slots))
        self._active: dict[int, _Active] = {}
        self._stats = Stats(slots=max_slots)
        self._lock = threading.Lock()  # guards _stats and the waiting count seen by submit()
        self._pending = 0  # submitted, not yet holding a slot or finished
        self._stopping = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ringserve-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, received_at: float) -> Stream:
        """Queues a request; raises Unavailable when stopped, ResourceExhausted when full."""
        if self._failed is not None or self._stopping.is_set():
            raise Unavailable("the server is shutting down or its engine has stopped; retry "
                              "against another replica")
        with self._lock:
            if self._pending >= self._max_waiting:
                raise ResourceExhausted(
                    f"the server is full: {self._pending} requests are waiting for a decode slot "
                    f"(limit {self._max_waiting}); retry later")
            self._pending += 1
        stream = Stream(request, asyncio.get_running_loop(), received_at)
        self._inbox.put(stream)
        return stream

    def stats(self) -> Stats:
        with self._lock:
            snapshot = dataclasses.replace(self._stats, finished=collections.Counter(
                self._stats.finished))
            snapshot.waiting = self._pending
            snapshot.serving = self._failed is None and not self._stopping.is_set()
        return snapshot

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the thread; requests still queued or running end as CANCELLED."""
        self._stopping.set()
        self._thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._admit()
                self._reap_cancelled()
                if self._active:
                    self._decode_step()
        except BaseException as error:  # noqa: BLE001 - any failure must end every stream
            log.exception("engine thread failed; failing all requests")
            self._failed = error
            # Report first, so anyone woken by a failed stream already sees NOT_SERVING.
            if self._on_failure is not None:
                self._on_failure(error)
            self._fail_all(EngineFailure(f"the inference engine failed: {error!r}"))
            return
        self._fail_all(None)

    def _drain_inbox(self, block: bool) -> None:
        try:
            stream = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        self._waiting.append(stream)
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        self._drain_inbox(block=not self._active and not self._waiting)
        while self._waiting and self._free_slots:
            stream = self._waiting.popleft()
            if stream.cancelled:
                self._finish_unstarted(stream)
                continue
            slot = self._free_slots.pop()
            active = _Active(stream, slot, self._tokenizer)
            self._active[slot] = active
            with self._lock:
                self._pending -= 1
                self._stats.running = len(self._active)
                self._stats.prompt_tokens += len(stream.request.prompt_ids)
            token = self._engine.prefill(slot, stream.request.prompt_ids, stream.request.params)
            self._on_token(active, int(token))

    def _reap_cancelled(self) -> None:
        for active in [a for a in self._active.values() if a.stream.cancelled]:
            self._finish(active, CANCELLED)
        for stream in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(stream)
            self._finish_unstarted(stream)

    def _decode_step(self) -> None:
        tokens = self._engine.decode()
        for slot, active in list(self._active.items()):
            self._on_token(active, int(tokens[slot]))

    def _on_token(self, active: _Active, token: int) -> None:
        """Turns one sampled token into an event, finishing the request when it is done."""
        now = time.monotonic()
        first = None
        if active.first_token_time is None:
            active.first_token_time = first = now
        if token in self._stop_ids:
            self._finish(active, STOP, first_token_time=first)
            return
        active.generated += 1
        with self._lock:
            self._stats.generated_tokens += 1
        text = active.held + active.detok.push(token)
        stops = active.request.stop_sequences
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                active.held = ""
                self._finish(active, STOP_SEQUENCE, text=text[:cut], token_ids=(token,),
                             first_token_time=first, flush=False)
                return
            keep = _held_back(text, stops)
            text, active.held = (text[:len(text) - keep], text[len(text) - keep:]) if keep else (
                text, "")
        if active.generated >= active.request.max_new_tokens:
            self._finish(active, MAX_TOKENS, text=text, token_ids=(token,),
                         first_token_time=first)
            return
        active.stream.deliver(Event(text=text, token_ids=(token,), first_token_time=first))

    def _finish(self, active: _Active, reason: str, *, text: str = "",
                token_ids: tuple[int, ...] = (), first_token_time: float | None = None,
                flush: bool = True) -> None:
        if flush:
            text += active.held + active.detok.flush()
            active.held = ""
        del self._active[active.slot]
        self._engine.free(active.slot)
        self._free_slots.append(active.slot)
        with self._lock:
            self._stats.running = len(self._active)
            self._stats.finished[reason] += 1
        active.stream.deliver(Event(
            text=text, token_ids=token_ids, first_token_time=first_token_time,
            finish_reason=reason, prompt_tokens=len(active.request.prompt_ids),
            generated_tokens=active.generated))
        log.debug("request %s finished: %s after %d tokens", active.request.request_id, reason,
                  active.generated)

    def _finish_unstarted(self, stream: Stream) -> None:
        with self._lock:
            self._pending -= 1
            self._stats.finished[CANCELLED] += 1
        stream.deliver(Event(finish_reason=CANCELLED,
                             prompt_tokens=len(stream.request.prompt_ids)))

    def _fail_all(self, error: RequestError | None) -> None:
        """Ends every request: with `error`, or as CANCELLED on a clean stop."""
        self._drain_inbox(block=False)
        for active in list(self._active.values()):
            if error is None:
                self._finish(active, CANCELLED)
            else:
                active.stream.deliver(Event(error=error))
        self._active.clear()
        for stream in self._waiting:
            if error is None:
                self._finish_unstarted(stream)
            else:
                stream.deliver(Event(error=error))
        self._waiting.clear()
