"""The engine thread: one thread owns the devices; the gRPC event loop only talks to it by queues.

Design note
1. Threads. The grpc.aio event loop (one thread) runs the servicer: validation, tokenising (in a
   worker thread), streaming responses. One engine thread owns the `PagedEngine` (parameters, page
   pool, jitted steps), the `Scheduler` and the `KVCacheManager`; nothing else calls them. They
   meet at two places: `submit()` puts a validated request on a thread-safe inbox, and each
   request's `Stream` holds an asyncio.Queue that the engine thread feeds with
   `loop.call_soon_threadsafe`.
2. One step. Move the inbox into the scheduler; drop cancelled requests; ask the scheduler for a
   plan (each request's share of the token budget: a prefill chunk or one decode token, with its
   block table); run the prefill chunks one by one and all decode rows in one batched call; hand
   the sampled tokens back to the scheduler; turn each kept token into text (incremental
   detokenising, stop sequences held back until decided) and queue one event per request; the
   step's events reach the event loop together, in one wakeup (`_Outbox`). A
   request finishes on its stop token, a stop sequence, max_new_tokens or cancellation; its blocks
   and slot are freed in the same step. Requests preempted for memory are recomputed later and
   stream on where they stopped (sampling keys depend only on seed and position).
   Multi-step windows: when a plan is decode only, nothing waits for a slot and no request
   ended in the previous step (its client's next request is probably on its way), the decode rows
   run up to `max_steps` steps in one engine call (`decode_steps`: no host round trip
   between them), with pages allocated ahead for the whole window. The window's tokens are then
   handed to the scheduler step by step, exactly as single steps would have been; a row that
   finishes inside the window (stop token, stop sequence, max_new_tokens) drops the tokens
   computed after its end. Requests arriving meanwhile wait for the window (at most
   max_steps steps) and cancellation is seen after it.
3. Cancellation. A client cancel, disconnect, deadline or server shutdown reaches the servicer as
   asyncio cancellation; it sets the stream's `cancelled` flag (an Event, safe across threads).
   The engine thread checks the flags before every step, so a cancelled stream stops within one
   step and its pages are reusable at once.
4. Failure. If a step raises, every request in flight or waiting fails with INTERNAL, the
   `on_failure` callback marks the server NOT_SERVING, and the thread ends: the process never goes
   on serving half-alive.
5. Debugging. `stats()` is a consistent snapshot (running, waiting, slots, tokens, finishes, KV
   pages and prefix-cache hits), served by the GetStats RPC; log lines carry request ids.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

from model.paged_engine import PagedEngine
from preprocess.detokenize import IncrementalDetokenizer
from preprocess.tokenizer_protocol import TextTokenizer
from server.errors import EngineFailure, RequestError, ResourceExhausted, Unavailable
from server.kv_manager import KVCacheManager, KVStats
from server.media_rows import rows_for, span_ids
from server.metrics import Metrics
from server.scheduler import Plan, Scheduler, SeqState, Work
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
    cached_tokens: int = 0  # prompt tokens served by the prefix cache
    pinned_tokens: int = 0  # for a cache-creating request: tokens whose pages are now pinned
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

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        if event.finish_reason is not None or event.error is not None:
            self._done = True
        return event


def _put_all(batch: list[tuple[Stream, Event]]) -> None:
    for stream, event in batch:
        stream._events.put_nowait(event)


class _Outbox:
    """Events the engine thread produced, handed to the event loop once per engine iteration:
    one wakeup of the loop a step, not one a token (each is a syscall and a loop turn, taken
    from the cores XLA computes on). Events keep their order."""

    def __init__(self) -> None:
        self._items: list[tuple[Stream, Event]] = []

    def put(self, stream: Stream, event: Event) -> None:
        self._items.append((stream, event))

    def flush(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Event]]] = {}
        for stream, event in items:
            by_loop.setdefault(stream._loop, []).append((stream, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop has closed (server gone): nobody is listening
                pass


class _Active:
    """Engine-thread state of one request, from submission to finish."""

    def __init__(self, stream: Stream, seq: SeqState, tokenizer: TextTokenizer):
        self.stream = stream
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer)
        self.generated = 0
        self.held = ""  # text not yet sent: it may be the start of a stop sequence
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        self.admitted = False  # has held a slot (prompt counted in the stats)

    @property
    def request(self) -> GenerationRequest:
        return self.stream.request


def _rope_columns(request: GenerationRequest, start: int, count: int) -> np.ndarray:
    """i32[3, count] M-RoPE positions of tokens [start, start + count): the prompt's, then (for
    generated tokens recomputed after a preemption) index + delta on all three rows."""
    known = request.rope_positions.shape[1]
    columns = request.rope_positions[:, start:start + count]
    if start + count > known:
        after = np.arange(max(start, known), start + count, dtype=np.int32) + request.rope_delta
        columns = np.concatenate([columns, np.broadcast_to(after, (3, len(after)))], axis=1)
    return columns


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
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    slots_allocated: int = 0  # token slots in pages held by running requests
    slots_live: int = 0  # of those, slots holding computed tokens
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kv: KVStats | None = None
    serving: bool = True


class EngineLoop:
    """Runs `engine` on its own thread under `scheduler`; see the design note above."""

    def __init__(self, engine: PagedEngine, kv: KVCacheManager, tokenizer: TextTokenizer,
                 stop_token_ids: frozenset[int], *, max_slots: int, token_budget: int,
                 max_waiting: int = 256, metrics: Metrics | None = None,
                 on_failure: Callable[[BaseException], None] | None = None,
                 max_steps: int | None = None):
        """`max_steps`: the most decode steps one engine call may run (a multi-step window, see
        the design note); default the engine's own max_steps, 1 turns windows off."""
        self._engine = engine
        self._max_steps = engine.max_steps if max_steps is None else min(max_steps, engine.max_steps)
        self._kv = kv
        # Media rows that attend to each other both ways (Gemma 3's images) are prefilled a run
        # at a time, which a chunk must hold whole.
        self._spans = bool(getattr(engine.config, "bidirectional_media", False))
        vision = engine.config.vision
        if self._spans and vision is not None and engine.prefill_chunk < vision.tokens_per_image:
            raise ValueError(f"--prefill-chunk {engine.prefill_chunk} is under the "
                             f"{vision.tokens_per_image} rows of one image, which this model must "
                             "prefill in one chunk")
        self._scheduler = Scheduler(kv, max_running=max_slots, token_budget=token_budget,
                                    max_chunk=engine.prefill_chunk, whole_spans=self._spans)
        self._tokenizer = tokenizer
        self._stop_ids = stop_token_ids
        self._max_waiting = max_waiting
        self._on_failure = on_failure
        self._metrics = metrics or Metrics()
        self._inbox: queue.SimpleQueue[Stream] = queue.SimpleQueue()
        # (run, refuse) pairs: run on the engine thread, or refused once it has ended.
        self._calls: queue.SimpleQueue[tuple[Callable[[], None], Callable[[Exception], None]]] = (
            queue.SimpleQueue())
        self._ended = threading.Event()  # the engine thread has returned
        self._active: dict[str, _Active] = {}  # by internal id (client request ids may repeat)
        self._finished = False  # a request ended since the last step
        self._outbox = _Outbox()
        self._compiles = engine.compile_count  # programs so far (warm-up's), to spot new ones
        self._ids = itertools.count()
        self._stats = Stats(slots=max_slots, kv=kv.stats())
        self._lock = threading.Lock()  # guards _stats and _pending, read by other threads
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
        tokens = len(request.prompt_ids) + request.max_new_tokens
        room = self.pool_tokens_free_of_pins()
        if tokens > room:
            raise ResourceExhausted(
                f"the request needs {tokens} tokens of KV cache; the pool holds {room} tokens "
                f"({room // self._kv.block_size} pages of {self._kv.block_size}) besides named "
                "caches: lower max_output_tokens, shorten the prompt or delete caches")
        with self._lock:
            if self._pending >= self._max_waiting:
                raise ResourceExhausted(
                    f"the server is full: {self._pending} requests are waiting for a decode slot "
                    f"(limit {self._max_waiting}); retry later")
            self._pending += 1
        stream = Stream(request, asyncio.get_running_loop(), received_at)
        self._inbox.put(stream)
        return stream

    def call(self, fn: Callable[[KVCacheManager], object]) -> asyncio.Future:
        """Runs `fn(kv_manager)` on the engine thread between steps; awaits its result. Once the
        engine thread has ended (failed or stopped), the future fails with Unavailable instead
        of waiting for a thread that will never run it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result, error) -> None:
            def set_it() -> None:
                if future.done():
                    return
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
            loop.call_soon_threadsafe(set_it)

        def run() -> None:
            try:
                result, error = fn(self._kv), None
            except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, e
            self._refresh_stats()  # before the caller resumes: its next GetStats sees the change
            settle(result, error)

        self._calls.put((run, lambda error: settle(None, error)))
        if self._ended.is_set():  # the thread may have ended before or after the put: no matter
            self._refuse_calls()
        return future

    def pool_tokens_free_of_pins(self) -> int:
        """Tokens the pool can hold for one request, pages pinned by named caches excluded (with
        several sequence ranks, the rank with the fewest unpinned pages bounds it)."""
        with self._lock:
            blocks = self._stats.kv.max_request_blocks
        return blocks * self._kv.block_size

    @property
    def metrics(self) -> Metrics:
        return self._metrics

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
                self._drain_inbox(block=not self._scheduler.has_work())
                self._run_calls()
                self._reap_cancelled()
                if self._scheduler.has_work():
                    self._step()
                    self._note_compiles()
                self._outbox.flush()
        except BaseException as error:  # noqa: BLE001 - any failure must end every stream
            log.exception("engine thread failed; failing all requests")
            self._failed = error
            # Report first, so anyone woken by a failed stream already sees NOT_SERVING.
            if self._on_failure is not None:
                self._on_failure(error)
            # The message goes to clients: the exception's type only, its text stays in the log.
            self._fail_all(EngineFailure(f"the inference engine failed ({type(error).__name__}); "
                                         "the server log has the details"))
        else:
            self._fail_all(None)
        finally:
            self._ended.set()
            self._refuse_calls()

    def _note_compiles(self) -> None:
        """Warns when a step compiled a program warm-up did not: every stream stalled for it."""
        count = self._engine.compile_count
        if count > self._compiles:
            log.warning("a step compiled %d program(s) after warm-up (%d in all): a shape "
                        "warm-up missed; every running stream waited for it",
                        count - self._compiles, count)
        self._compiles = count

    def _run_calls(self) -> None:
        while True:
            try:
                run, _ = self._calls.get_nowait()
            except queue.Empty:
                return
            run()

    def _refuse_calls(self) -> None:
        """Fails every queued `call`: the engine thread has ended and will not run them."""
        while True:
            try:
                _, refuse = self._calls.get_nowait()
            except queue.Empty:
                return
            refuse(Unavailable("the inference engine has stopped; the server cannot change its "
                               "KV cache any more"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            stream = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._add(stream)
            try:
                stream = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, stream: Stream) -> None:
        request = stream.request
        seq = SeqState(request_id=f"{next(self._ids)}", prompt_ids=request.prompt_ids,
                       max_new_tokens=request.max_new_tokens, ready=request.ready)
        self._active[seq.request_id] = _Active(stream, seq, self._tokenizer)
        self._scheduler.add(seq)

    def _reap_cancelled(self) -> None:
        for active in [a for a in self._active.values() if a.stream.cancelled]:
            self._finish(active, CANCELLED)

    def _step(self) -> None:
        plan = self._scheduler.schedule()
        if not plan.work:
            # Every waiting request needs blocks that pinned caches hold: wait for a change.
            self._drain_inbox(block=True)
            return
        # No window right after a request ended: its client's next request is likely on its way,
        # and a window would keep it waiting (and its slot idle) for max_steps steps.
        finished, self._finished = self._finished, False
        if (plan.work and all(w.is_decode for w in plan.work) and not self._scheduler.waiting
                and not finished):
            steps, tables = self._window(plan.work)
            if steps > 1:
                self._decode_window(plan, steps, tables)
                return
        decodes, sampled = [], {}
        for work in plan.work:
            active = self._active[work.request_id]
            if not active.admitted:
                self._on_admit(active)
            self._engine.set_params(work.slot, active.request.params, active.request.rope_delta)
            if work.is_decode:
                decodes.append(work)
                continue
            tokens = active.seq.token_ids[work.start:work.start + work.count]
            media = active.request.media
            embeds = rows_for(tokens, media, media[0][1].shape[1]) if media else None
            extra = {} if embeds is None else {"embeds": embeds}
            if self._spans and embeds is not None:
                extra["spans"] = span_ids(tokens)
            if active.request.rope_positions is not None:
                extra["rope_positions"] = _rope_columns(active.request, work.start, work.count)
            token = self._engine.prefill(work.slot, tokens, work.start, work.block_table, **extra)
            if work.samples:
                sampled[work.request_id] = token
        if decodes:
            tokens = self._engine.decode(
                [w.slot for w in decodes],
                [self._active[w.request_id].seq.token_ids[w.start] for w in decodes],
                [w.start for w in decodes], [w.block_table for w in decodes])
            sampled.update((w.request_id, t) for w, t in zip(decodes, tokens))
        self._scheduler.update(plan, sampled)
        if plan.preempted:
            with self._lock:
                self._stats.preemptions += len(plan.preempted)
            self._metrics.observe_preemptions(len(plan.preempted))
        self._refresh_stats()
        for request_id, token in sampled.items():
            self._on_token(self._active[request_id], token)

    def _window(self, work: tuple[Work, ...]) -> tuple[int, list[list[int]]]:
        """Steps for a decode-only plan (1: no window) and block tables covering them: as many as
        the longest-running row can use, up to engine.max_steps and max_len, when the pool has
        the pages (allocated now; rows keep them, as later steps would have taken them)."""
        steps = min(self._max_steps,
                    max(self._active[w.request_id].request.max_new_tokens
                        - self._active[w.request_id].generated for w in work),
                    self._engine.max_len - max(w.start for w in work))
        if steps <= 1:
            return 1, []
        tables = []
        for w in work:
            table = self._kv.allocate(w.request_id, w.start + steps)
            if table is None:
                return 1, []
            tables.append(table)
        return steps, tables

    def _decode_window(self, plan: Plan, steps: int, tables: list[list[int]]) -> None:
        """Runs `steps` decode steps of every row in one engine call, then replays them into the
        scheduler and the streams one step at a time."""
        work = plan.work
        for w in work:
            request = self._active[w.request_id].request
            self._engine.set_params(w.slot, request.params, request.rope_delta)
        rows = self._engine.decode_steps(
            [w.slot for w in work], [self._active[w.request_id].seq.token_ids[w.start] for w in work],
            [w.start for w in work], tables, steps)
        for i in range(steps):
            live = [(w, r) for w, r in zip(work, rows) if w.request_id in self._active]
            if not live:
                break
            step = Plan(tuple(dataclasses.replace(w, start=w.start + i) for w, _ in live), ())
            sampled = {w.request_id: r[i] for w, r in live}
            self._scheduler.update(step, sampled)
            for w, _ in live:
                self._on_token(self._active[w.request_id], sampled[w.request_id])
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        running = self._scheduler.running
        pages = sum(len(self._kv.block_table(s.request_id)) for s in running)
        kv = self._kv.stats()
        with self._lock:
            self._stats.running = len(running)
            self._stats.slots_allocated = pages * self._kv.block_size
            self._stats.slots_live = sum(s.num_computed for s in running)
            self._stats.kv = kv
            waiting = self._pending
        self._metrics.set_snapshot(len(running), waiting, kv.allocatable, kv.used, kv.cached,
                                   kv.pinned)

    def _on_admit(self, active: _Active) -> None:
        active.admitted = True
        self._metrics.observe_queue_wait(time.monotonic() - active.stream.received_at)
        self._metrics.observe_prefix(active.seq.num_cached, len(active.seq.prompt_ids))
        with self._lock:
            self._pending -= 1
            self._stats.prompt_tokens += len(active.seq.prompt_ids)
            self._stats.cached_prompt_tokens += active.seq.num_cached

    def _on_token(self, active: _Active, token: int) -> None:
        """Turns one sampled token into an event, finishing the request when it is done."""
        now = time.monotonic()
        first = None
        if active.first_token_time is None:
            active.first_token_time = first = now
            self._metrics.observe_first_token(now - active.stream.received_at)
        else:
            self._metrics.observe_token_gap(now - active.last_token_time)
        active.last_token_time = now
        if active.request.pin_as is not None:
            self._pin(active, first)
            return
        if token in self._stop_ids and not active.request.ignore_eos:
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
        self._outbox.put(active.stream, Event(text=text, token_ids=(token,), first_token_time=first))

    def _pin(self, active: _Active, first: float | None) -> None:
        """A cache-creating request has computed its prompt: pin its full pages, then finish."""
        try:
            blocks = self._kv.pin(active.request.pin_as, active.seq.prompt_ids)
        except (ValueError, RuntimeError) as error:  # duplicate id, or prefix caching off
            blocks, reason = None, str(error)
        else:
            reason = "its pages were evicted before they could be pinned"
        if blocks is None:
            self._finish(active, STOP, error=EngineFailure(
                f"could not pin cache {active.request.pin_as}: {reason}"))
            return
        self._finish(active, STOP, first_token_time=first,
                     pinned_tokens=len(blocks) * self._kv.block_size)

    def _finish(self, active: _Active, reason: str, *, text: str = "",
                token_ids: tuple[int, ...] = (), first_token_time: float | None = None,
                flush: bool = True, pinned_tokens: int = 0,
                error: RequestError | None = None) -> None:
        if flush:
            text += active.held + active.detok.flush()
            active.held = ""
        del self._active[active.seq.request_id]
        self._finished = True
        self._scheduler.finish(active.seq.request_id)  # frees its blocks and slot
        with self._lock:
            if not active.admitted:
                self._pending -= 1
            self._stats.finished[reason] += 1
        self._refresh_stats()
        self._metrics.observe_finish("ERROR" if error else reason,
                                     time.monotonic() - active.stream.received_at,
                                     len(active.seq.prompt_ids), active.generated)
        if error is not None:
            self._outbox.put(active.stream, Event(error=error))
            return
        self._outbox.put(active.stream, Event(
            text=text, token_ids=token_ids, first_token_time=first_token_time,
            finish_reason=reason, prompt_tokens=len(active.request.prompt_ids),
            cached_tokens=active.seq.num_cached, generated_tokens=active.generated,
            pinned_tokens=pinned_tokens))
        log.debug("request %s finished: %s after %d tokens", active.request.request_id, reason,
                  active.generated)

    def _fail_all(self, error: RequestError | None) -> None:
        """Ends every request: with `error`, or as CANCELLED on a clean stop."""
        self._drain_inbox(block=False)
        for active in list(self._active.values()):
            if error is None:
                self._finish(active, CANCELLED)
            else:
                self._metrics.observe_finish("ERROR", time.monotonic() - active.stream.received_at,
                                             len(active.seq.prompt_ids), active.generated)
                self._outbox.put(active.stream, Event(error=error))
        self._active.clear()
        self._outbox.flush()
