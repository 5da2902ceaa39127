"""Host-side KV cache manager: block pool, free queue, hashing, prefix hits, named caches.

Expected values are worked out by hand in the comments, or checked against an independent
reference model (`_Reference`) that tracks holders, the free-queue order and what a fake engine
wrote into every page slot. Pools sharded over sequence-parallel ranks (`num_ranks`) are checked
the same way: column j of every table on rank j % S, one LRU free queue per rank.
"""

import hashlib
import os
import random
import struct
import subprocess
import sys

import pytest

from server.kv_manager import (
    NULL_BLOCK_ID,
    Block,
    BlockPool,
    FreeBlockQueue,
    KVCacheManager,
    PrefixHit,
    columns_per_rank,
    hash_block,
    hash_blocks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def queue_ids(q: FreeBlockQueue) -> list[int]:
    return [b.block_id for b in q]


def free_order(kv: KVCacheManager) -> list[int]:
    return queue_ids(kv.pool.free_queue)


def free_orders(kv: KVCacheManager) -> list[list[int]]:
    """Each rank's free queue, head first."""
    return [queue_ids(q) for q in kv.pool.free_queues]


def ranks(kv: KVCacheManager, table) -> list[int]:
    return [b // (kv.num_blocks // kv.num_ranks) for b in table]


# ---- free queue


def test_free_queue_ops():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks[1:])
    assert queue_ids(q) == [1, 2, 3, 4] and len(q) == 4
    assert q.popleft() is blocks[1]
    q.remove(blocks[3])  # middle
    assert queue_ids(q) == [2, 4]
    q.append(blocks[3])
    q.appendleft(blocks[1])
    assert queue_ids(q) == [1, 2, 4, 3] and len(q) == 4
    q.remove(blocks[1])  # head
    q.remove(blocks[3])  # tail
    assert queue_ids(q) == [2, 4]
    assert blocks[1].prev_free is None and blocks[1].next_free is None
    with pytest.raises(ValueError):
        q.remove(blocks[1])  # not in the queue
    with pytest.raises(ValueError):
        q.append(blocks[2])  # already in it
    q.popleft(), q.popleft()
    assert len(q) == 0 and queue_ids(q) == []
    with pytest.raises(IndexError):
        q.popleft()


# ---- hashing


def test_hash_block_matches_hand_encoding():
    # version tag, "r" for the root, "<I" count + int64 tokens, then the empty extra-keys tuple.
    data = (b"ringserve.kv.v1" + b"r" + struct.pack("<I3q", 3, 1, 2, 3)
            + b"t" + struct.pack("<I", 0))
    expected = int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")
    assert hash_block(None, [1, 2, 3]) == expected
    # A child encodes its parent as a tagged int; so does an int extra key.
    parent_raw = expected.to_bytes((expected.bit_length() + 8) // 8, "little", signed=True)
    data = (b"ringserve.kv.v1" + b"p" + b"i" + struct.pack("<I", len(parent_raw)) + parent_raw
            + struct.pack("<I2q", 2, 4, 5)
            + b"t" + struct.pack("<I", 2) + b"s" + struct.pack("<I", 4) + b"salt"
            + b"i" + struct.pack("<I", 1) + b"\x07")
    child = int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")
    assert hash_block(expected, [4, 5], ("salt", 7)) == child


def test_hash_chains_and_separates():
    a = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == a
    assert hash_block(a, [3, 4]) != hash_block(None, [3, 4])  # same tokens, other prefix
    assert hash_block(None, [1, 2], ("img:abc",)) != a
    assert hash_block(None, [1, 2], ("x",)) != hash_block(None, [1, 2], (b"x",))
    assert hash_block(None, [1, 2], (1,)) != hash_block(None, [1, 2], ("1",))
    assert hash_block(None, [1, 2], ((1, 2),)) != hash_block(None, [1, 2], (1, 2))
    assert hash_blocks([1, 2, 3, 4, 5], 2) == [a, hash_block(a, [3, 4])]
    with pytest.raises(TypeError):
        hash_block(None, [1], (1.5,))


def test_hash_is_the_same_in_another_process():
    code = ("import sys; sys.path.insert(0, '.'); from server.kv_manager import hash_block; "
            "print(hash_block(hash_block(None, [1, 2, 3]), [9], ('salt', b'm', 3)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True).stdout
    assert int(out) == hash_block(hash_block(None, [1, 2, 3]), [9], ("salt", b"m", 3))


# ---- block pool


def test_pool_allocate_to_exhaustion_has_no_side_effects():
    pool = BlockPool(5, 4)  # blocks 1..4 allocatable
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [1, 2, 3] and all(b.ref_cnt == 1 for b in a)
    assert pool.allocate(2) is None
    assert queue_ids(pool.free_queue) == [4] and pool.num_free_blocks == 1
    assert [b.block_id for b in pool.allocate(1)] == [4]
    assert pool.allocate(1) is None and pool.num_free_blocks == 0
    assert pool.null_block.ref_cnt == 0
    with pytest.raises(ValueError):
        pool.touch([pool.null_block])
    pool.free(reversed(a))
    assert queue_ids(pool.free_queue) == [1, 2, 3]  # no hash: each goes to the head
    with pytest.raises(ValueError):
        pool.free([a[0]])  # ref already 0


def test_pool_touch_takes_cached_free_block_out_of_queue_and_eviction_drops_hash():
    pool = BlockPool(4, 2)
    b1, b2 = pool.allocate(2)
    pool.cache_block(b1, 111)
    pool.free([b2, b1])
    assert queue_ids(pool.free_queue) == [2, 3, 1]  # unhashed 2 at the head, hashed 1 at the tail
    assert pool.cached(111) is b1
    pool.touch([b1])  # a prefix hit on a free cached block
    assert b1.ref_cnt == 1 and queue_ids(pool.free_queue) == [2, 3]
    pool.free([b1])
    got = pool.allocate(3)
    assert [b.block_id for b in got] == [2, 3, 1]
    assert pool.cached(111) is None and b1.block_hash is None and pool.num_cached_blocks == 0


# ---- the manager


def test_refcounts_under_sharing():
    kv = KVCacheManager(10, 2)
    prompt = [1, 2, 3, 4, 5]
    assert kv.allocate("a", 5) == [1, 2, 3]
    kv.commit("a", prompt)  # blocks 1, 2 full -> cached; block 3 partial
    hit = kv.lookup(prompt + [6, 7])
    assert hit.block_ids == (1, 2) and hit.num_cached_tokens == 4
    assert kv.allocate("b", 7, prefix=hit) == [1, 2, 4, 5]
    refs = [kv.pool.blocks[i].ref_cnt for i in range(6)]
    assert refs == [0, 2, 2, 1, 1, 1]
    kv.free("a")
    assert [kv.pool.blocks[i].ref_cnt for i in range(6)] == [0, 1, 1, 0, 1, 1]
    s = kv.stats()
    assert (s.used, s.free, s.cached, s.total) == (4, 5, 2, 10)
    assert (s.prefix_lookups, s.prefix_query_tokens, s.prefix_hit_tokens) == (1, 7, 4)
    assert s.hit_rate == pytest.approx(4 / 7)


def test_prefix_hit_after_commit_and_free():
    kv = KVCacheManager(8, 4)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens
    assert kv.lookup(prompt).num_cached_tokens == 0
    table = kv.allocate("a", len(prompt), prefix=kv.lookup(prompt))
    kv.commit("a", prompt)
    kv.free("a")
    hit = kv.lookup(prompt + [7, 8, 9])
    assert hit.block_ids == tuple(table[:2]) and hit.num_cached_tokens == 8
    assert kv.allocate("b", 13, prefix=hit)[:2] == table[:2]


def test_hit_never_covers_the_last_token():
    kv = KVCacheManager(8, 4)
    prompt = list(range(8))  # exactly 2 full blocks
    kv.allocate("a", 8)
    kv.commit("a", prompt)
    assert kv.lookup(prompt).num_cached_tokens == 4  # block 2 would cover the last token
    assert kv.lookup(prompt + [8]).num_cached_tokens == 8
    assert kv.lookup(prompt[:5]).num_cached_tokens == 4
    assert kv.lookup(prompt[:4]).num_cached_tokens == 0
    assert kv.lookup([]).num_cached_tokens == 0


def test_partial_blocks_are_not_cached():
    kv = KVCacheManager(8, 4)
    kv.allocate("a", 12)
    kv.commit("a", [1, 2, 3, 4, 5, 6])  # one full block, one half
    assert kv.stats().cached == 1
    kv.commit("a", [1, 2, 3, 4, 5, 6, 7])
    assert kv.stats().cached == 1
    kv.commit("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # second block now full
    assert kv.stats().cached == 2
    assert [kv.pool.blocks[i].block_hash is not None for i in kv.block_table("a")] == [
        True, True, False]
    with pytest.raises(ValueError):
        kv.commit("a", list(range(13)))  # beyond the table


def test_allocate_exhaustion_returns_none_without_side_effects():
    kv = KVCacheManager(6, 2)  # 5 usable blocks
    kv.allocate("a", 4)
    kv.commit("a", [1, 2, 3, 4])
    kv.free("a")  # blocks 1, 2 cached and free
    before = (free_order(kv), kv.stats())
    hit = kv.lookup([1, 2, 3, 4, 5])
    assert hit.block_ids == (1, 2)
    # 11 tokens = 6 blocks: 2 from the hit + 4 new, but only 3 others are free.
    assert kv.allocate("b", 11, prefix=hit) is None
    assert (free_order(kv), kv.stats()) == before and kv.pool.blocks[1].ref_cnt == 0
    assert kv.allocate("b", 10, prefix=hit) == [1, 2, 3, 4, 5]
    assert kv.num_free_blocks == 0
    assert kv.allocate("b", 11) is None and kv.block_table("b") == [1, 2, 3, 4, 5]
    assert kv.allocate("b", 3) == [1, 2, 3, 4, 5]  # fewer tokens: append-only, no shrink
    assert kv.block_table("b", pad_to=7) == [1, 2, 3, 4, 5, NULL_BLOCK_ID, NULL_BLOCK_ID]


def test_cached_free_blocks_are_reclaimable():
    kv = KVCacheManager(4, 2)
    kv.allocate("a", 6)
    kv.commit("a", [1, 2, 3, 4, 5, 6])
    kv.free("a")
    assert kv.stats().cached == 3 and kv.num_free_blocks == 3
    assert kv.allocate("b", 6) == [3, 2, 1]  # reverse free order: the tail block goes first
    assert kv.stats().cached == 0


def test_lru_eviction_order():
    kv = KVCacheManager(7, 2)  # blocks 1..6
    a = [1, 2, 3, 4, 5]
    assert kv.allocate("a", 5) == [1, 2, 3]
    kv.commit("a", a)  # 1, 2 cached; 3 partial
    kv.free("a")  # reverse: 3 (no hash) to the head, then 2, 1 to the tail
    assert free_order(kv) == [3, 4, 5, 6, 2, 1]
    b = [11, 12, 13, 14, 15, 16, 17, 18]
    assert kv.allocate("b", 8) == [3, 4, 5, 6]
    kv.commit("b", b)
    kv.free("b")  # all cached: tail first -> 6, 5, 4, 3 appended after a's blocks
    assert free_order(kv) == [2, 1, 6, 5, 4, 3]
    assert kv.lookup(a).num_cached_tokens == 4
    # The oldest freed (a's tail block 2) is evicted first, and its hash goes with it.
    assert kv.allocate("c", 1) == [2]
    assert kv.lookup(a).block_ids == (1,)
    assert kv.allocate("c", 3) == [2, 1]
    assert kv.lookup(a).num_cached_tokens == 0
    assert kv.lookup(b).num_cached_tokens == 6  # b untouched so far
    assert kv.allocate("c", 5) == [2, 1, 6]
    assert kv.lookup(b + [0]).num_cached_tokens == 6  # b's last block (6) is gone


def test_extra_keys_separate_equal_blocks():
    kv = KVCacheManager(8, 2)
    prompt = [1, 2, 3, 4, 5]
    kv.allocate("a", 5, prefix=kv.lookup(prompt, ("tenant-a",)))
    kv.commit("a", prompt)
    kv.free("a")
    assert kv.lookup(prompt, ("tenant-a",)).num_cached_tokens == 4
    assert kv.lookup(prompt, ("tenant-b",)).num_cached_tokens == 0
    assert kv.lookup(prompt).num_cached_tokens == 0
    # The hit's extra keys become the request's: its commits chain with them.
    hit = kv.lookup(prompt + [6, 7], ("tenant-a",))
    kv.allocate("b", 7, prefix=hit)
    kv.commit("b", prompt + [6, 7])
    assert kv.lookup(prompt + [6, 7, 8], ("tenant-a",)).num_cached_tokens == 6


def test_stale_prefix_hit_is_refused():
    kv = KVCacheManager(4, 2)
    kv.allocate("a", 2)
    kv.commit("a", [1, 2])
    kv.free("a")
    hit = kv.lookup([1, 2, 3])
    assert hit.block_ids == (1,)
    kv.allocate("x", 6)  # takes all three free blocks, evicting block 1
    kv.free("x")
    with pytest.raises(ValueError, match="stale"):
        kv.allocate("b", 3, prefix=hit)
    assert kv.allocate("x2", 1, prefix=PrefixHit((), 0, 1)) == [2]
    with pytest.raises(ValueError, match="first allocate"):
        kv.allocate("x2", 2, prefix=PrefixHit((), 0, 2))


def test_pinned_blocks_survive_pressure_and_unpin_frees_them():
    kv = KVCacheManager(7, 2)  # 6 usable
    content = [5, 6, 7, 8, 9]  # 2 full blocks + 1 token
    kv.allocate("make-cache", len(content))
    kv.commit("make-cache", content)
    assert kv.pin("doc", content) == [1, 2]
    kv.free("make-cache")
    s = kv.stats()
    assert (s.pinned, s.used, s.free, s.num_pins) == (2, 2, 4, 1)
    # Pressure: fill everything else, twice over.
    for i in range(2):
        assert kv.allocate(f"p{i}", 8) is not None
        assert kv.allocate("more", 1) is None
        kv.free(f"p{i}")
    hit = kv.lookup(content + [42, 43])  # a request naming the cache: prompt = content + question
    assert hit.block_ids == (1, 2) and hit.num_cached_tokens == 4
    kv.allocate("q", 7, prefix=hit)
    assert kv.pool.blocks[1].ref_cnt == 2
    kv.free("q")
    with pytest.raises(ValueError):
        kv.pin("doc", content)
    assert kv.pin("missing", [70, 71, 72]) is None and kv.stats().num_pins == 1
    kv.unpin("doc")
    s = kv.stats()
    assert (s.pinned, s.used, s.free, s.cached) == (0, 0, 6, 2)
    assert kv.allocate("all", 12) is not None  # now the old pinned blocks can be evicted too
    assert kv.lookup(content).num_cached_tokens == 0
    with pytest.raises(KeyError):
        kv.unpin("doc")


def test_preempt_and_readmit_recomputes_only_what_was_evicted():
    kv = KVCacheManager(5, 2)  # 4 usable
    seq = [1, 2, 3, 4, 5, 6, 7]
    kv.allocate("r", 7)
    kv.commit("r", seq)  # 3 full blocks cached
    kv.free("r")  # preempted
    kv.allocate("other", 1)  # takes the unhashed partial block 4 first: nothing evicted
    assert kv.lookup(seq + [8]).num_cached_tokens == 6
    kv.allocate("other", 3)  # one more block: evicts r's tail block
    hit = kv.lookup(seq + [8])
    assert hit.num_cached_tokens == 4
    kv.free("other")
    assert kv.allocate("r", 8, prefix=hit) is not None


def test_prefix_caching_disabled():
    kv = KVCacheManager(6, 2, enable_prefix_caching=False)
    kv.allocate("a", 4)
    kv.commit("a", [1, 2, 3, 4])
    kv.free("a")
    assert kv.lookup([1, 2, 3, 4, 5]).num_cached_tokens == 0
    assert kv.stats().cached == 0
    with pytest.raises(RuntimeError):
        kv.pin("c", [1, 2])


# ---- sequence-parallel ranks: column j on rank j % S


def test_columns_per_rank_by_hand():
    assert columns_per_rank(0, 5, 1) == [5]
    assert columns_per_rank(0, 5, 2) == [3, 2]  # columns 0..4 -> ranks 0 1 0 1 0
    assert columns_per_rank(3, 5, 4) == [1, 1, 1, 2]  # columns 3..7 -> ranks 3 0 1 2 3
    assert columns_per_rank(6, 0, 4) == [0, 0, 0, 0]


def test_rank_layout_is_validated():
    with pytest.raises(ValueError, match="multiple of num_ranks=4"):
        BlockPool(10, 2, num_ranks=4)
    with pytest.raises(ValueError, match="at least 2 blocks per rank"):
        KVCacheManager(4, 2, num_ranks=4)  # every block would be a null block
    with pytest.raises(ValueError, match="num_ranks must be positive"):
        KVCacheManager(8, 2, num_ranks=0)
    pool = BlockPool(12, 2, num_ranks=4)  # P = 3: blocks 0, 3, 6, 9 are the null blocks
    assert pool.null_block_ids == (0, 3, 6, 9) and pool.num_free_blocks == 8
    assert free_orders(KVCacheManager(12, 2, num_ranks=4)) == [[1, 2], [4, 5], [7, 8], [10, 11]]
    for b in pool.null_block_ids:
        with pytest.raises(ValueError):
            pool.touch([pool.blocks[b]])
    with pytest.raises(ValueError, match="free_queues"):
        pool.free_queue  # noqa: B018 - one queue per rank now


def test_two_ranks_by_hand():
    kv = KVCacheManager(8, 2, num_ranks=2)  # P = 4: rank 0 holds 1 2 3, rank 1 holds 5 6 7
    assert kv.allocate("a", 5) == [1, 5, 2]  # columns 0 1 2 -> ranks 0 1 0
    assert kv.allocate("a", 8) == [1, 5, 2, 6]  # column 3 -> rank 1
    assert kv.allocate("b", 2) == [3]  # column 0 -> rank 0, now full
    assert kv.num_free_blocks_per_rank() == [0, 1] and kv.num_free_blocks == 1
    assert not kv.can_allocate(None, 1) and kv.allocate("c", 1) is None  # rank 0 is full
    assert kv.can_allocate("b", 4) and kv.allocate("b", 4) == [3, 7]  # column 1 -> rank 1
    s = kv.stats()
    assert (s.free, s.used, s.allocatable) == (0, 6, 6)
    assert (s.free_per_rank, s.used_per_rank) == ((0, 0), (3, 3))
    assert kv.block_table("b", pad_to=4) == [3, 7, NULL_BLOCK_ID, NULL_BLOCK_ID]


def test_lru_eviction_is_per_rank():
    kv = KVCacheManager(6, 2, num_ranks=2)  # rank 0: 1 2, rank 1: 4 5
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    assert kv.allocate("a", 8) == [1, 4, 2, 5]
    kv.commit("a", a)
    kv.free("a")  # last to first: 5 2 4 1, each to the tail of its rank's queue
    assert free_orders(kv) == [[2, 1], [5, 4]]
    assert kv.allocate("b", 2) == [2]  # rank 0's oldest: a's column 2
    assert kv.lookup(a).block_ids == (1, 4)  # columns 0 and 1 survive; rank 1 untouched
    assert kv.allocate("b", 4) == [2, 5]  # rank 1's oldest: a's column 3


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_tables_are_round_robin_and_never_hold_null_blocks(num_ranks):
    rng = random.Random(num_ranks)
    per_rank = 5
    kv = KVCacheManager(num_ranks * per_rank, 3, num_ranks=num_ranks)
    nulls = set(range(0, kv.num_blocks, per_rank))
    handed, live = [], set()
    for i in range(300):
        rid = f"r{i % 6}"
        if rng.random() < 0.3 and rid in live:
            kv.free(rid)
            live.discard(rid)
            continue
        have = len(kv.block_table(rid)) if rid in live else 0
        table = kv.allocate(rid, (have + rng.randint(0, 2 * num_ranks)) * 3 + 1)
        if table is None:
            continue
        live.add(rid)
        assert ranks(kv, table) == [j % num_ranks for j in range(len(table))]
        assert not nulls & set(table)
        handed += table
    assert set(handed) == set(range(kv.num_blocks)) - nulls  # every other block got used


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_one_full_rank_refuses_and_changes_nothing(num_ranks):
    bs = 2
    kv = KVCacheManager(num_ranks * 3, bs, num_ranks=num_ranks)  # 2 usable blocks per rank
    assert kv.allocate("a", bs) is not None and kv.allocate("b", bs) is not None  # rank 0 full
    kv.commit("a", [1, 2])
    state = (free_orders(kv), kv.stats(), kv.block_table("a"), kv.block_table("b"))
    assert kv.num_free_blocks == 2 * (num_ranks - 1)  # plenty in total, none on rank 0
    assert not kv.can_allocate(None, 1)
    assert kv.allocate("c", 1) is None
    hit = kv.lookup([1, 2, 3])  # a held block of rank 0: hitting it needs no free block there
    assert hit.num_cached_tokens == 2 and kv.can_allocate("c", 3, hit)
    # Growing "a" to S + 1 columns needs rank 0 again (column S): refused, nothing changes.
    assert not kv.can_allocate("a", (num_ranks + 1) * bs)
    assert kv.allocate("a", (num_ranks + 1) * bs) is None
    assert (free_orders(kv), kv.stats(), kv.block_table("a"), kv.block_table("b")) == state
    assert ranks(kv, kv.allocate("a", num_ranks * bs)) == list(range(num_ranks))  # 1..S-1: fine
    kv.free("b")  # rank 0 has one free block again: column S fits, and so does all of rank 1..S-1
    assert ranks(kv, kv.allocate("a", 2 * num_ranks * bs)) == [
        j % num_ranks for j in range(2 * num_ranks)]


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_prefix_hits_and_pins_with_ranks(num_ranks):
    bs, per_rank = 2, 4
    kv = KVCacheManager(num_ranks * per_rank, bs, num_ranks=num_ranks)
    content = list(range(100, 100 + (num_ranks + 1) * bs + 1))  # S + 1 full blocks + 1 token
    table = kv.allocate("make", len(content))
    kv.commit("make", content)
    pinned = kv.pin("doc", content)
    assert pinned == table[:num_ranks + 1]
    kv.free("make")
    s = kv.stats()
    # Columns 0 and S are on rank 0; every other rank holds one pinned column.
    assert s.pinned_per_rank == (2,) + (1,) * (num_ranks - 1)
    assert s.used_per_rank == s.pinned_per_rank
    # Room per rank: rank 0 has 1 unpinned block, the others 2 -> S columns (0..S-1) fit, S+1 not.
    assert s.max_request_blocks == num_ranks
    assert kv.allocate("big", (num_ranks + 1) * bs) is None
    assert kv.allocate("fill", num_ranks * bs) is not None  # pressure: every rank's spare block
    kv.free("fill")
    question = content + [7, 8, 9]
    hit = kv.lookup(question)
    assert list(hit.block_ids) == pinned
    got = kv.allocate("q", len(question), prefix=hit)
    assert got[:num_ranks + 1] == pinned
    assert ranks(kv, got) == [j % num_ranks for j in range(len(got))]
    assert all(kv.pool.blocks[b].ref_cnt == 2 for b in pinned)
    kv.free("q")
    kv.unpin("doc")
    s = kv.stats()
    assert (s.used, s.free, s.pinned, s.max_request_blocks) == (
        0, s.allocatable, 0, num_ranks * (per_rank - 1))


def test_hit_block_on_the_wrong_rank_is_a_bug():
    kv = KVCacheManager(8, 2, num_ranks=2)
    kv.allocate("a", 4)
    kv.commit("a", [1, 2, 3, 4])
    hit = kv.lookup([1, 2, 3, 4, 5])
    assert hit.block_ids == (1, 5)
    swapped = PrefixHit(hit.block_ids[::-1], 4, 5, (), hit.block_hashes[::-1])
    with pytest.raises(AssertionError):
        kv.allocate("b", 5, prefix=swapped)  # block 5 (rank 1) cannot serve column 0


# ---- randomized check against a reference model


class _Reference:
    """What the manager should hold, tracked without looking at its internals.

    refs: holders per block; queues: each rank's free queue, head first (block b is on rank
    b // P; each rank's first block is a null block); hashed: blocks that should be registered;
    slots: (block, slot) -> (extra_keys, the token prefix ending at that slot), as a fake engine
    wrote it.
    """

    def __init__(self, num_blocks, block_size, num_ranks=1):
        self.bs = block_size
        self.total = num_blocks
        self.num_ranks = num_ranks
        self.per_rank = num_blocks // num_ranks
        self.nulls = set(range(0, num_blocks, self.per_rank))
        self.refs = {b: 0 for b in range(num_blocks) if b not in self.nulls}
        self.queues = [[b for b in self.refs if self.rank(b) == r] for r in range(num_ranks)]
        self.hashed = set()
        self.slots = {}
        self.tables = {}  # request id -> block ids
        self.hit_cols = {}  # request id -> how many leading columns came from its prefix hit
        self.reqs = {}  # request id -> dict(seq, extra, computed, target)
        self.pins = {}  # cache id -> block ids

    def rank(self, b):
        return b // self.per_rank

    def hold(self, blocks):
        for b in blocks:
            if self.refs[b] == 0:
                self.queues[self.rank(b)].remove(b)
            self.refs[b] += 1

    def fits(self, first_column, n, hit_ids=()):
        """Does every rank have a free block for each of columns first_column .. + n - 1, after
        holding hit_ids?"""
        free = [len(q) for q in self.queues]
        for b in hit_ids:
            free[self.rank(b)] -= self.refs[b] == 0
        need = [0] * self.num_ranks
        for j in range(first_column, first_column + n):
            need[j % self.num_ranks] += 1
        return all(k <= f for k, f in zip(need, free))

    def take(self, first_column, n):
        new = [self.queues[j % self.num_ranks].pop(0)
               for j in range(first_column, first_column + n)]
        for b in new:
            self.refs[b] = 1
            self.hashed.discard(b)
        return new

    def release(self, blocks):
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hashed:
                    self.queues[self.rank(b)].append(b)
                else:
                    self.queues[self.rank(b)].insert(0, b)

    def num_free(self):
        return sum(len(q) for q in self.queues)

    def holds(self, b, extra, prefix):
        """Does block b hold the K/V of the last block of `prefix` (full), computed with `extra`?"""
        start = len(prefix) - self.bs
        return all(self.slots.get((b, s)) == (extra, tuple(prefix[:start + s + 1]))
                   for s in range(self.bs))


def _check(kv: KVCacheManager, ref: _Reference):
    pool = kv.pool
    assert NULL_BLOCK_ID in ref.nulls and set(pool.null_block_ids) == ref.nulls
    for b in ref.nulls:
        null = pool.blocks[b]
        assert null.ref_cnt == 0 and null.block_hash is None and null.prev_free is None
    queues = free_orders(kv)
    assert queues == ref.queues
    for r, queue in enumerate(queues):
        assert len(set(queue)) == len(queue) and all(ref.rank(b) == r for b in queue)
    for b, n in ref.refs.items():
        assert pool.blocks[b].ref_cnt == n
        assert (pool.blocks[b].prev_free is not None) == (n == 0)  # in the queue iff free
    holders = {}
    owners = {}  # block -> tables holding it at a column that did not come from a prefix hit
    for rid, table in ref.tables.items():
        assert kv.block_table(rid) == table
        assert len(set(table)) == len(table) and not ref.nulls & set(table)
        assert [ref.rank(b) for b in table] == [j % ref.num_ranks for j in range(len(table))]
        for j, b in enumerate(table):
            holders[b] = holders.get(b, 0) + 1
            if j >= ref.hit_cols[rid]:
                owners[b] = owners.get(b, 0) + 1
    assert all(n == 1 for n in owners.values())  # a block is on two tables only through a hit
    for ids in ref.pins.values():
        for b in ids:
            holders[b] = holders.get(b, 0) + 1
    assert holders == {b: n for b, n in ref.refs.items() if n}  # ref counts == holders
    hashed = {b.block_id for b in pool.blocks if b.block_hash is not None}
    assert hashed == ref.hashed
    items = list(pool.cached_items())
    assert sorted(b.block_id for _, b in items) == sorted(hashed)
    for h, block in items:
        assert block.block_hash == h
        extra, prefix = ref.slots[(block.block_id, ref.bs - 1)]
        assert len(prefix) % ref.bs == 0 and ref.holds(block.block_id, extra, prefix)
        assert hash_blocks(prefix, ref.bs, extra)[-1] == h  # the hash names what the page holds
    for b, n in ref.refs.items():
        if n > 1:
            assert b in hashed  # sharing only through the cache
    s = kv.stats()
    assert s.free + s.used == s.total - ref.num_ranks == s.allocatable
    assert (s.free, s.used, s.cached) == (ref.num_free(), sum(1 for n in ref.refs.values() if n),
                                         len(ref.hashed))
    pinned = {b for ids in ref.pins.values() for b in ids}
    assert s.pinned == len(pinned)
    per_rank = [[b for b in ref.refs if ref.rank(b) == r] for r in range(ref.num_ranks)]
    assert s.free_per_rank == tuple(len(q) for q in ref.queues)
    assert s.used_per_rank == tuple(sum(1 for b in bs if ref.refs[b]) for bs in per_rank)
    assert all(f + u == ref.per_rank - 1 for f, u in zip(s.free_per_rank, s.used_per_rank))
    assert s.pinned_per_rank == tuple(len(pinned & set(bs)) for bs in per_rank)
    # max_request_blocks: the longest table that fits once every unpinned block is free.
    room = [ref.per_rank - 1 - p for p in s.pinned_per_rank]
    m = 0
    while m < ref.total and all(
            sum(1 for j in range(m + 1) if j % ref.num_ranks == r) <= room[r]
            for r in range(ref.num_ranks)):
        m += 1
    assert s.max_request_blocks == m


def _check_hit(ref, hit, prompt, extra):
    bs = ref.bs
    k = len(hit.block_ids)
    assert hit.num_cached_tokens == k * bs < max(len(prompt), 1)
    for i, b in enumerate(hit.block_ids):
        assert b in ref.hashed and ref.holds(b, extra, prompt[:(i + 1) * bs])
    if k < (len(prompt) - 1) // bs:  # maximal: no registered block holds the next block
        assert not any(ref.holds(b, extra, prompt[:(k + 1) * bs]) for b in ref.hashed)


@pytest.mark.parametrize("num_ranks,nb", [(1, 33), (4, 36)])  # 32 allocatable blocks either way
def test_randomized_against_reference_model(num_ranks, nb):
    rng = random.Random(20240611)
    bs = 4
    kv = KVCacheManager(nb, bs, num_ranks=num_ranks)
    ref = _Reference(nb, bs, num_ranks)
    docs = [[rng.randrange(40) for _ in range(44)] for _ in range(3)]
    salts = [(), ("tenant-b",)]
    next_id = 0
    counts = dict(admit=0, refused=0, grow=0, commit=0, free=0, pin=0, unpin=0, hits=0)
    rank_refusals = 0  # refused although the total free count would have been enough

    def allocate(rid, n, hit=None):
        """Call allocate and check it against the reference; returns the table or None."""
        nonlocal rank_refusals
        hit_ids = [] if rid in ref.tables else list(hit.block_ids) if hit else []
        first = len(ref.tables.get(rid, hit_ids))
        need = max(-(-n // bs) - first, 0)
        fits = ref.fits(first, need, hit_ids)
        assert kv.can_allocate(rid, n, hit) == fits
        before = (free_orders(kv), kv.stats())
        table = kv.allocate(rid, n, prefix=hit)
        if not fits:
            assert table is None and (free_orders(kv), kv.stats()) == before
            rank_refusals += need <= ref.num_free() - sum(1 for b in hit_ids if ref.refs[b] == 0)
            return None
        assert table is not None
        ref.hold(hit_ids)
        new = ref.take(first, need)  # from each column's rank's queue head, in order
        ref.hit_cols.setdefault(rid, len(hit_ids))
        ref.tables[rid] = ref.tables.get(rid, []) + hit_ids + new
        assert table == ref.tables[rid]
        return table

    def free(rid):
        kv.free(rid)
        ref.release(ref.tables.pop(rid))
        del ref.hit_cols[rid]
        del ref.reqs[rid]
        counts["free"] += 1

    for _ in range(4000):
        op = rng.random()
        running = sorted(ref.reqs)
        if op < 0.25 and len(running) < 8:  # admit a request
            doc = rng.choice(docs)
            tail = [rng.randrange(40) for _ in range(rng.randint(0, 3))]
            prompt = doc[:rng.randint(1, 40)] + tail
            seq = prompt + [rng.randrange(40) for _ in range(rng.randint(0, 6))]
            extra = rng.choice(salts)
            hit = kv.lookup(prompt, extra)
            _check_hit(ref, hit, prompt, extra)
            counts["hits"] += hit.num_cached_tokens > 0
            target = rng.randint(hit.num_cached_tokens + 1, len(prompt))  # first prefill chunk
            rid, next_id = f"r{next_id}", next_id + 1
            if allocate(rid, target, hit) is None:
                counts["refused"] += 1
            else:
                ref.reqs[rid] = dict(seq=seq, extra=extra, computed=hit.num_cached_tokens,
                                     target=target)
                counts["admit"] += 1
        elif op < 0.70 and running:  # the engine runs a step for one request
            rid = rng.choice(running)
            r = ref.reqs[rid]
            if r["computed"] < r["target"]:  # compute what was allocated, then commit
                table = ref.tables[rid]
                for t in range(r["computed"], r["target"]):
                    ref.slots[(table[t // bs], t % bs)] = (r["extra"], tuple(r["seq"][:t + 1]))
                r["computed"] = r["target"]
                kv.commit(rid, r["seq"][:r["computed"]])
                ref.hashed.update(table[:r["computed"] // bs])  # every full block is registered
                counts["commit"] += 1
            elif r["computed"] == len(r["seq"]):
                free(rid)  # finished
            else:  # grow: the next chunk or decode step
                target = min(len(r["seq"]), r["computed"] + rng.randint(1, 6))
                if allocate(rid, target) is None:
                    if rng.random() < 0.5:
                        free(rid)  # preempted
                else:
                    r["target"] = target
                    counts["grow"] += 1
        elif op < 0.80 and running:
            free(rng.choice(running))  # aborted
        elif op < 0.90:  # pin: a running request's computed tokens, or a random doc prefix
            cache_id = f"c{next_id}"
            next_id += 1
            with_req = [rid for rid in running if ref.reqs[rid]["computed"] >= bs]
            from_req = bool(with_req) and rng.random() < 0.7
            if from_req:  # the named-cache flow: pin what a live request computed and committed
                r = ref.reqs[rng.choice(with_req)]
                tokens, extra = r["seq"][:r["computed"]], r["extra"]
            else:
                tokens, extra = rng.choice(docs)[:rng.randint(0, 20)], rng.choice(salts)
            ids = kv.pin(cache_id, tokens, extra)
            nfull = len(tokens) // bs
            findable = all(any(ref.holds(b, extra, tokens[:(i + 1) * bs]) for b in ref.hashed)
                           for i in range(nfull))
            assert (ids is not None) == findable
            assert ids is not None or not from_req  # a live request's committed blocks are there
            if ids is not None:
                assert len(ids) == nfull
                for i, b in enumerate(ids):
                    assert b in ref.hashed and ref.holds(b, extra, tokens[:(i + 1) * bs])
                ref.hold(ids)
                ref.pins[cache_id] = ids
                counts["pin"] += 1
        elif ref.pins:
            cache_id = rng.choice(sorted(ref.pins))
            kv.unpin(cache_id)
            ref.release(ref.pins.pop(cache_id))
            counts["unpin"] += 1
        _check(kv, ref)

    # Every op kind happened often enough for the test to mean something.
    assert min(counts.values()) >= 50, counts
    if num_ranks > 1:  # and some refusals came from one full rank, not from the total
        assert rank_refusals >= 10, rank_refusals
    for rid in sorted(ref.reqs):
        free(rid)
    for cache_id in sorted(ref.pins):
        kv.unpin(cache_id)
        ref.release(ref.pins.pop(cache_id))
    _check(kv, ref)
    s = kv.stats()
    assert (s.used, s.free, s.pinned, s.num_requests, s.num_pins) == (0, nb - num_ranks, 0, 0, 0)
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
