"""The scheduler over the real KVCacheManager, with a page store standing in for device K/V.

The "model" samples a token from what the pages hold, read back through the block table. So a
wrong block table, a bad prefix hit or a preemption that skips recomputation changes the tokens.
"""

import random

import pytest

from server.kv_manager import KVCacheManager
from server.scheduler import Scheduler, SeqState

G = 4  # tokens per block


def next_token(ids):
    return (sum((i + 1) * t for i, t in enumerate(ids)) * 7 + len(ids)) % 101


def solo(prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(next_token(ids))
    return ids[len(prompt):]


class PageStore:
    """What the engine would have written: block id -> G token slots."""

    def __init__(self, num_blocks):
        self.pages = {b: [None] * G for b in range(num_blocks)}

    def run(self, sched, plan):
        sampled = {}
        for w in plan.work:
            seq = sched.get(w.request_id)
            ids = seq.token_ids
            for p in range(w.start, w.start + w.count):
                self.pages[w.block_table[p // G]][p % G] = ids[p]
            if w.samples:
                end = w.start + w.count
                seen = [self.pages[w.block_table[p // G]][p % G] for p in range(end)]
                sampled[w.request_id] = next_token(seen)
        return sampled


def drive(sched, store, seqs, max_steps=10_000, on_step=None):
    for seq in seqs:
        sched.add(seq)
    done = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return done
        plan = sched.schedule()
        assert plan.num_tokens <= sched.token_budget
        if on_step:
            on_step(plan)
        sched.update(plan, store.run(sched, plan))
        for seq in list(sched.running):
            if len(seq.output_ids) >= seq.max_new_tokens:
                sched.finish(seq.request_id)
                done[seq.request_id] = seq
    raise AssertionError("did not finish")


def test_outputs_equal_solo_runs_and_nothing_leaks():
    kv = KVCacheManager(num_blocks=64, block_size=G)
    sched = Scheduler(kv, max_running=4, token_budget=16)
    rng = random.Random(0)
    seqs = [SeqState(f"r{i}", tuple(rng.randrange(101) for _ in range(rng.randrange(1, 30))),
                     max_new_tokens=rng.randrange(1, 12)) for i in range(10)]
    done = drive(sched, PageStore(64), seqs)
    for seq in seqs:
        assert done[seq.request_id].output_ids == solo(seq.prompt_ids, seq.max_new_tokens)
    stats = kv.stats()
    assert stats.used == 0 and stats.free == stats.total - 1


def test_long_prefill_is_chunked_while_decodes_keep_flowing():
    kv = KVCacheManager(num_blocks=128, block_size=G)
    sched = Scheduler(kv, max_running=4, token_budget=8)
    short = SeqState("short", (1, 2, 3), max_new_tokens=30)
    sched.add(short)
    store = PageStore(128)
    sched.update(p := sched.schedule(), store.run(sched, p))  # short is now decoding
    steps = []
    long = SeqState("long", tuple(range(100)), max_new_tokens=2)
    done = drive(sched, store, [long], on_step=steps.append)
    long_steps = [s for s in steps if any(w.request_id == "long" for w in s.work)]
    # The 100-token prompt took many steps, and the short stream decoded in every one of them.
    assert len(long_steps) >= 100 // 8
    for plan in long_steps[:-2]:
        assert any(w.request_id == "short" and w.count == 1 for w in plan.work)
    assert done["long"].output_ids == solo(long.prompt_ids, 2)
    assert done["short"].output_ids == solo(short.prompt_ids, 30)


def test_pool_pressure_preempts_and_recomputes_correctly():
    kv = KVCacheManager(num_blocks=12, block_size=G)  # 11 usable blocks = 44 tokens
    sched = Scheduler(kv, max_running=4, token_budget=32)
    seqs = [SeqState(f"p{i}", tuple(range(i, i + 10)), max_new_tokens=14) for i in range(4)]
    preempted = []
    done = drive(sched, PageStore(12), seqs, on_step=lambda p: preempted.extend(p.preempted))
    assert preempted, "the pool was meant to run out"
    for seq in seqs:
        assert done[seq.request_id].output_ids == solo(seq.prompt_ids, 14)
    assert kv.stats().used == 0


def test_prefix_hit_skips_cached_tokens_with_same_output():
    kv = KVCacheManager(num_blocks=64, block_size=G)
    sched = Scheduler(kv, max_running=2, token_budget=64)
    store = PageStore(64)
    prompt = tuple(range(1, 23))  # 22 tokens: 5 full blocks
    first = drive(sched, store, [SeqState("a", prompt, max_new_tokens=3)])["a"]
    second = drive(sched, store, [SeqState("b", prompt + (9,), max_new_tokens=3)])["b"]
    assert first.num_cached == 0
    assert second.num_cached == 20
    assert second.output_ids == solo(prompt + (9,), 3)
    assert kv.stats().hit_rate > 0


def test_finish_of_a_waiting_request_frees_nothing_twice():
    kv = KVCacheManager(num_blocks=8, block_size=G)
    sched = Scheduler(kv, max_running=1, token_budget=8)
    sched.add(SeqState("a", (1, 2, 3), max_new_tokens=5))
    sched.add(SeqState("b", (4, 5, 6), max_new_tokens=5))
    sched.schedule()
    assert sched.finish("b").request_id == "b"  # still waiting: no blocks to free
    assert sched.finish("a").request_id == "a"
    assert sched.finish("a") is None
    assert kv.stats().used == 0 and not sched.has_work()


def test_budget_must_cover_running_decodes():
    with pytest.raises(ValueError, match="token_budget"):
        Scheduler(KVCacheManager(num_blocks=8, block_size=G), max_running=4, token_budget=2)


def _cuts_inside_a_run(plan, sched, cuts):
    for w in plan.work:
        ids, end = sched.get(w.request_id).prompt_ids, w.start + w.count
        if 0 < end < len(ids) and ids[end - 1] < 0 and ids[end] < 0:
            cuts.append((w.request_id, end))


@pytest.mark.parametrize("whole_spans", [True, False])
def test_whole_spans_never_cut_a_run_of_media_rows(whole_spans):
    """Prompts with runs of media rows (ids < 0, up to the chunk size) beside decoding streams:
    with whole_spans no prefill chunk ends inside a run, and outputs equal solo runs; without
    it, the same prompts are cut inside runs (so the check can fail)."""
    rng = random.Random(1)
    seqs = []
    for i in range(8):
        prompt = []
        for _ in range(rng.randrange(1, 4)):
            prompt += [rng.randrange(101) for _ in range(rng.randrange(1, 9))]
            prompt += [-1 - rng.randrange(10**6) for _ in range(rng.randrange(3, 9))]
        seqs.append(SeqState(f"r{i}", tuple(prompt + [5]), max_new_tokens=rng.randrange(1, 6)))
    kv = KVCacheManager(num_blocks=256, block_size=G)
    sched = Scheduler(kv, max_running=3, token_budget=11, max_chunk=8, whole_spans=whole_spans)
    cuts = []
    done = drive(sched, PageStore(256), seqs, on_step=lambda plan: _cuts_inside_a_run(plan, sched, cuts))
    for seq in seqs:
        assert done[seq.request_id].output_ids == solo(seq.prompt_ids, seq.max_new_tokens)
    assert (cuts == []) == whole_spans


def test_whole_spans_resume_a_run_from_the_prefix_cache():
    """A prefix hit may end inside a run (pages are G tokens): the rest of the run is computed
    in one chunk from there."""
    kv = KVCacheManager(num_blocks=64, block_size=G)
    sched = Scheduler(kv, max_running=2, token_budget=10, max_chunk=8, whole_spans=True)
    store = PageStore(64)
    prompt = (1, 2, 3, 4, 5, 6, -5, -6, -7, -8, -9, 3)  # the hit's 8 tokens hold 2 of the run's rows
    drive(sched, store, [SeqState("a", prompt, max_new_tokens=1)])
    steps = []
    done = drive(sched, store, [SeqState("b", prompt, max_new_tokens=2)], on_step=steps.append)
    assert steps[0].work[0].start == 8 and done["b"].output_ids == solo(prompt, 2)
