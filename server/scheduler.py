"""Continuous batching under a per-step token budget (vLLM v1's one rule), over ids only.

Each sequence has `num_computed` tokens in the KV cache and `num_tokens` known tokens (prompt plus
sampled output). Every step the scheduler grants each sequence some of its missing tokens, within
a token budget: a decoding sequence needs one, a prefilling one gets a chunk. That single rule gives
chunked prefill interleaved with decode, prefix caching (a hit simply starts `num_computed` above
zero), preemption by recompute (free the blocks, reset `num_computed` to zero, queue again) and
prefill that follows media decoding (a sequence is granted only tokens whose inputs exist).

The scheduler never touches tensors: it hands the engine request ids, slots, token counts and
block tables, and the engine hands back one sampled token per sequence whose step reached the end
of its known tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Callable, Iterable, Sequence

from server.kv_manager import KVCacheManager


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class SeqState:
    """A request as the scheduler tracks it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    extra_keys: tuple = ()
    # Prompt tokens whose inputs exist so far (media rows still decoding); None: all of them.
    ready: Callable[[], int] | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached: int = 0  # of the prompt, served by the prefix cache on admission
    slot: int | None = None  # decode slot (sampling parameters live there) while running
    status: Status = Status.WAITING
    preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.output_ids]

    def available(self) -> int:
        """Tokens that may be computed now: all known ones, or the prompt up to its first media
        row still being decoded."""
        if self.ready is not None:
            limit = self.ready()
            if limit < len(self.prompt_ids):
                return limit
            self.ready = None  # the prompt's inputs are complete for good
        return self.num_tokens


@dataclasses.dataclass(frozen=True)
class Work:
    """One sequence's share of a step: compute tokens [start, start + count) of it."""

    request_id: str
    slot: int
    start: int
    count: int
    block_table: tuple[int, ...]
    samples: bool  # the step reaches the sequence's last known token: its sample is kept

    @property
    def is_decode(self) -> bool:
        return self.count == 1 and self.start > 0


@dataclasses.dataclass(frozen=True)
class Plan:
    work: tuple[Work, ...]
    preempted: tuple[str, ...]  # sent back to the waiting queue this step (to recompute)

    @property
    def num_tokens(self) -> int:
        return sum(w.count for w in self.work)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_running: int, token_budget: int,
                 max_chunk: int | None = None, whole_spans: bool = False):
        """whole_spans: never end a prefill chunk inside a run of media rows (ids < 0), for
        models whose rows of one image attend to each other both ways (Gemma 3): each run must
        be computed in one chunk. A run resumed from the prefix cache mid-way is fine: the
        cached part was computed with the whole run."""
        if token_budget < max_running:
            raise ValueError(f"token_budget={token_budget} must cover one decode token for each "
                             f"of the {max_running} running sequences")
        self.kv = kv
        self.max_running = max_running
        self.token_budget = token_budget
        self.max_chunk = max_chunk or token_budget
        self.whole_spans = whole_spans
        self.waiting: collections.deque[SeqState] = collections.deque()
        self.running: list[SeqState] = []  # in admission order: the newest is preempted first
        self._free_slots = list(range(max_running))[::-1]
        self._seqs: dict[str, SeqState] = {}

    def add(self, seq: SeqState) -> None:
        self._seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def get(self, request_id: str) -> SeqState:
        return self._seqs[request_id]

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> Plan:
        budget = self.token_budget
        work: list[Work] = []
        preempted: list[str] = []
        # 1. Running sequences first, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            count = self._chunk(seq, seq.num_computed, min(
                seq.available() - seq.num_computed, budget, self.max_chunk))
            if count <= 0:  # waits for its media's next rows
                i += 1
                continue
            table = self.kv.allocate(seq.request_id, seq.num_computed + count)
            while table is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
                table = self.kv.allocate(seq.request_id, seq.num_computed + count)
            if table is None:
                break
            work.append(self._work(seq, count, table))
            budget -= count
            i += 1
        # 2. Then waiting sequences, while there are slots, budget and blocks.
        j = 0
        while j < len(self.waiting) and budget > 0 and self._free_slots and not preempted:
            seq = self.waiting[j]
            available = seq.available()
            hit = self.kv.lookup(seq.token_ids, seq.extra_keys) if available else None
            start = hit.num_cached_tokens if hit else 0
            count = self._chunk(seq, start, min(available - start, budget, self.max_chunk))
            if count <= 0:  # its media have no rows yet: let the next one by
                j += 1
                continue
            table = self.kv.allocate(seq.request_id, start + count, hit)
            if table is None:
                break  # wait for blocks; admitting out of order would starve long prompts
            del self.waiting[j]
            seq.status = Status.RUNNING
            seq.slot = self._free_slots.pop()
            seq.num_computed = start
            if not seq.output_ids:
                seq.num_cached = start
            self.running.append(seq)
            work.append(self._work(seq, count, table))
            budget -= count
        return Plan(tuple(work), tuple(preempted))

    def _chunk(self, seq: SeqState, start: int, count: int) -> int:
        """`count`, shortened with whole_spans so the chunk does not end inside a run of media
        rows (0: the run does not fit this step; it waits for a fuller budget)."""
        ids, end = seq.prompt_ids, start + count
        if not self.whole_spans or count <= 0 or end >= len(ids) or ids[end] >= 0:
            return count
        while end > start and ids[end - 1] < 0:
            end -= 1
        return end - start

    def _work(self, seq: SeqState, count: int, table: Sequence[int]) -> Work:
        return Work(seq.request_id, seq.slot, seq.num_computed, count, tuple(table),
                    samples=seq.num_computed + count == seq.num_tokens)

    def update(self, plan: Plan, sampled: dict[str, int]) -> None:
        """Records a step's results: computed counts, and the tokens sampled where kept."""
        for w in plan.work:
            seq = self._seqs.get(w.request_id)
            if seq is None or seq.status is not Status.RUNNING:
                continue  # finished or cancelled while the step ran
            seq.num_computed = w.start + w.count
            if seq.num_computed // self.kv.block_size > w.start // self.kv.block_size:
                # A block filled up: register it for prefix reuse (partial blocks never are).
                self.kv.commit(seq.request_id, seq.token_ids[:seq.num_computed])
            if w.samples:
                seq.output_ids.append(sampled[w.request_id])

    def finish(self, request_id: str) -> SeqState | None:
        """Removes a sequence (done, cancelled or failed) and frees its blocks and slot."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        return seq

    def _preempt(self, seq: SeqState) -> None:
        """Frees a running sequence's blocks; it is recomputed later from its tokens so far."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: SeqState) -> None:
        self.kv.free(seq.request_id)
        self._free_slots.append(seq.slot)
        seq.slot = None

    def running_ids(self) -> Iterable[str]:
        return (s.request_id for s in self.running)
