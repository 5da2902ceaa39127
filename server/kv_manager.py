"""Host-side KV cache manager: which device pages (blocks) hold which tokens. Ids only, no arrays.

The device keeps one page pool (`[K, num_blocks, block_size, H]` per layer, owned by model/); this
module decides which block ids each request's tokens live in, shares full blocks between requests
with equal prefixes (prefix caching, vLLM's block pool), and keeps named context caches pinned
(Gemini's cachedContents). The scheduler (server/engine_loop.py) is its only caller, from the
engine thread: nothing here is thread-safe. See docs/kv_cache.md for the design note.

Layers, bottom up:
- `Block`: one page's bookkeeping (ref count, content hash, free-queue links); all made up front.
- `FreeBlockQueue`: the blocks with ref count 0, in eviction order (head = evicted first), O(1) ops.
- `hash_block`: content hash of one full block, chained from its parent block's hash.
- `BlockPool`: allocate / touch / free blocks (one free queue per rank) and the hash -> block map
  of cached blocks.
- `KVCacheManager`: the scheduler-facing API: lookup, allocate, can_allocate, commit, free, pin,
  unpin, stats.

Sequence-parallel ranks: the device pool may be sharded over S devices ("ranks") on the `sequence`
mesh axis. The `num_blocks = S * P` pages are numbered globally; block g lives on rank g // P at
local index g % P. Column j of every block table (tokens [j * block_size, (j + 1) * block_size))
is a block on rank j % S, so each device holds 1/S of every sequence. S = 1 is the unsharded pool.

Each rank's local page 0 (global ids r * P) is a null block: never allocated, never freed, never
cached. The runner pads block tables with `NULL_BLOCK_ID` (0), and each rank reads a padded entry
as its own null page, so padded rows point at a page no request owns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Hashable, Iterable, Iterator, Sequence

NULL_BLOCK_ID = 0

# Bumped when the hash encoding changes, so hashes of two encodings never collide.
_HASH_VERSION = b"ringserve.kv.v1"
_HASH_BYTES = 16


# --------------------------------------------------------------------------------------------------
# Blocks and the free queue


@dataclasses.dataclass(slots=True, eq=False)
class Block:
    """Bookkeeping for one device page. Identity matters (eq=False): blocks are compared by `is`.

    block_id: index of the page in the device pool.
    ref_cnt: number of holders (request block tables and pins). 0 means free: in the free queue.
    block_hash: hash of the full block's content (`hash_block`) while the block is registered in
        the pool's hash map; None for partial, uncached or evicted blocks.
    prev_free / next_free: links of the free queue; both None while the block is not in it.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    prev_free: Block | None = None
    next_free: Block | None = None

    def __repr__(self) -> str:  # the links would recurse through the whole queue
        return f"Block(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order: `popleft` takes the next victim.

    All operations are O(1). The links live in the blocks themselves (no wrapper nodes), between
    two sentinel blocks, as in vLLM. Invariant: a block is in the queue iff its `prev_free` is set,
    and every block in the queue has ref_cnt 0 (the pool keeps this: it only appends blocks whose
    count dropped to 0 and removes a block before giving it a holder).
    """

    def __init__(self, blocks: Iterable[Block] = ()):
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Block]:
        """Head (evicted first) to tail."""
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def popleft(self) -> Block:
        """Remove and return the head block. Raises IndexError when empty."""
        if self._len == 0:
            raise IndexError("pop from an empty FreeBlockQueue")
        block = self._head.next_free
        assert block is not None
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        """Take `block` out of the queue, wherever it is."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def append(self, block: Block) -> None:
        """Put `block` at the tail: evicted after every block already in the queue."""
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: Block) -> None:
        """Put `block` at the head: the next block `popleft` returns."""
        self._insert_after(self._head, block)

    def _insert_after(self, prev: Block | None, block: Block) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"{block} is already in the free queue")
        assert prev is not None and prev.next_free is not None
        nxt = prev.next_free
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self._len += 1


# --------------------------------------------------------------------------------------------------
# Block hashes


def _encode_key(key: Hashable, out: list[bytes]) -> None:
    """Append a self-delimiting, type-tagged encoding of `key` (int, str, bytes or tuple)."""
    if isinstance(key, int):  # bool included: True encodes as 1
        raw = int(key).to_bytes((int(key).bit_length() + 8) // 8, "little", signed=True)
        out += (b"i", struct.pack("<I", len(raw)), raw)
    elif isinstance(key, str):
        raw = key.encode("utf-8")
        out += (b"s", struct.pack("<I", len(raw)), raw)
    elif isinstance(key, bytes):
        out += (b"b", struct.pack("<I", len(key)), key)
    elif isinstance(key, tuple):
        out += (b"t", struct.pack("<I", len(key)))
        for item in key:
            _encode_key(item, out)
    else:
        raise TypeError(f"extra keys must be int, str, bytes or tuples of them, got {type(key)!r}")


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """Content hash of one block: a 128-bit int, equal across processes, runs and machines.

    blake2b over a packed encoding of (version tag, parent hash or "root", token ids as
    little-endian int64, extra keys). Chaining the parent's hash makes a block's hash stand for the
    whole prefix up to and including it, so equal hashes mean equal K/V (positions included).
    `extra_keys` holds whatever else the K/V depend on: a media hash for image/audio placeholder
    tokens, a cache salt that keeps tenants apart, a LoRA id. Ints, strs, bytes or tuples of them.
    """
    parts: list[bytes] = [_HASH_VERSION]
    if parent_hash is None:
        parts.append(b"r")
    else:
        parts.append(b"p")
        _encode_key(parent_hash, parts)
    parts.append(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    _encode_key(tuple(extra_keys), parts)
    digest = hashlib.blake2b(b"".join(parts), digest_size=_HASH_BYTES).digest()
    return int.from_bytes(digest, "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, extra_keys: tuple = (),
                num_blocks: int | None = None, parent_hash: int | None = None,
                start_block: int = 0) -> list[int]:
    """Chained hashes of full blocks `start_block .. start_block + num_blocks - 1` of `token_ids`.

    `num_blocks` defaults to every remaining full block; `parent_hash` is the hash of block
    `start_block - 1` (None when starting at block 0).
    """
    end = len(token_ids) // block_size if num_blocks is None else start_block + num_blocks
    hashes = []
    for i in range(start_block, end):
        parent_hash = hash_block(parent_hash, token_ids[i * block_size:(i + 1) * block_size],
                                 extra_keys)
        hashes.append(parent_hash)
    return hashes


# --------------------------------------------------------------------------------------------------
# The block pool


def columns_per_rank(first_column: int, num_columns: int, num_ranks: int) -> list[int]:
    """How many of the columns `first_column .. first_column + num_columns - 1` fall on each rank.

    Column j is on rank j % num_ranks: every rank gets num_columns // num_ranks, and the
    num_columns % num_ranks ranks that come first from `first_column`'s rank on get one more.
    """
    q, extra = divmod(num_columns, num_ranks)
    return [q + ((r - first_column) % num_ranks < extra) for r in range(num_ranks)]


class BlockPool:
    """All blocks of one device pool, their ref counts, the free queues and the cached-hash map.

    The pool is split into `num_ranks` equal ranks of `blocks_per_rank` (P) blocks: block g is on
    rank g // P, and each rank's first block (g % P == 0) is its null block. Every other block is
    in exactly one of two states:
      - free: ref_cnt == 0 and in its rank's free queue (maybe still cached: content kept until
        evicted);
      - used: ref_cnt > 0 and not in a free queue.
    Hence `num_free_blocks + num_used_blocks == num_blocks - num_ranks` at all times, and per rank
    free + used == P - 1. `allocate` hands out blocks for table columns: column j from rank
    j % num_ranks (one rank: the whole pool, one queue, exactly vLLM's pool).
    """

    def __init__(self, num_blocks: int, block_size: int, num_ranks: int = 1):
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        if num_blocks < 2 * num_ranks or num_blocks % num_ranks:
            raise ValueError(
                f"num_blocks={num_blocks} must be a multiple of num_ranks={num_ranks} with at "
                f"least 2 blocks per rank (each rank reserves its first block as a null block): "
                f"use num_blocks = num_ranks * P for some P >= 2, e.g. "
                f"{max(2, num_blocks // num_ranks) * num_ranks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_ranks = num_ranks
        self.blocks_per_rank = num_blocks // num_ranks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.null_block_ids = tuple(range(0, num_blocks, self.blocks_per_rank))
        self.null_block = self.blocks[NULL_BLOCK_ID]  # rank 0's
        # Null blocks never enter a free queue, so they are never allocated.
        p = self.blocks_per_rank
        self.free_queues = [FreeBlockQueue(self.blocks[r * p + 1:(r + 1) * p])
                            for r in range(num_ranks)]
        # Invariant: the map only holds full blocks (only `cache_block` adds, and the manager calls
        # it for full blocks only); block b is in _cached[h] iff b.block_hash == h. Several blocks
        # may share a hash (two requests computed the same prefix at once), as in vLLM: each stays
        # findable until it is evicted itself.
        self._cached: dict[int, dict[int, Block]] = {}
        self._num_cached = 0

    @property
    def free_queue(self) -> FreeBlockQueue:
        """The free queue of a one-rank pool (with several ranks use `free_queues[rank]`)."""
        if self.num_ranks != 1:
            raise ValueError(f"the pool has {self.num_ranks} free queues, one per rank: use "
                             "free_queues[rank]")
        return self.free_queues[0]

    def rank_of(self, block: Block) -> int:
        return block.block_id // self.blocks_per_rank

    def is_null(self, block: Block) -> bool:
        return block.block_id % self.blocks_per_rank == 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached ones included, over all ranks: all can be allocated."""
        return sum(len(q) for q in self.free_queues)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_ranks - self.num_free_blocks

    def num_free_blocks_per_rank(self) -> list[int]:
        return [len(q) for q in self.free_queues]

    @property
    def num_cached_blocks(self) -> int:
        return self._num_cached

    def can_allocate(self, n: int, first_column: int = 0, touching: Iterable[Block] = ()) -> bool:
        """Would `allocate(n, first_column)` succeed after `touch(touching)`? Changes nothing.

        `touching` are blocks about to get a holder first (a prefix hit): the free ones among them
        leave their rank's free queue, so they do not count as allocatable.
        """
        free = self.num_free_blocks_per_rank()
        for block in touching:
            if block.ref_cnt == 0:
                free[self.rank_of(block)] -= 1
        need = columns_per_rank(first_column, n, self.num_ranks)
        return all(k <= f for k, f in zip(need, free))

    def allocate(self, n: int, first_column: int = 0) -> list[Block] | None:
        """Blocks for table columns `first_column .. first_column + n - 1`, each with ref_cnt 1.

        Column j's block is the head of rank j % num_ranks's free queue. A cached block taken this
        way is evicted: its hash leaves the map. Returns None, changing nothing, when some rank has
        fewer free blocks than the columns that fall on it.
        """
        if not self.can_allocate(n, first_column):
            return None
        out = []
        for column in range(first_column, first_column + n):
            block = self.free_queues[column % self.num_ranks].popleft()
            # A block in the free queue has ref_cnt 0: nobody reads its content any more.
            assert block.ref_cnt == 0
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Add one holder to each block, taking free (cached) ones out of the free queue."""
        for block in blocks:
            if self.is_null(block):
                raise ValueError("a null block cannot be held")
            if block.ref_cnt == 0:
                self.free_queues[self.rank_of(block)].remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one holder from each block, in the given order; blocks reaching 0 become free.

        A freed cached block goes to the tail of its rank's queue (LRU: evicted after everything
        freed before it on that rank). A freed block without a hash holds nothing reusable, so it
        goes to the head and is reused before any cached block of its rank is evicted. Callers pass
        a sequence's blocks last to first, so the tail of a sequence is evicted before its head (a
        later prompt more likely shares the head).
        """
        for block in blocks:
            if block.ref_cnt <= 0 or self.is_null(block):
                raise ValueError(f"{block} freed more often than held")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                queue = self.free_queues[self.rank_of(block)]
                if block.block_hash is None:
                    queue.appendleft(block)
                else:
                    queue.append(block)

    def cached(self, block_hash: int) -> Block | None:
        """A block registered under `block_hash`, held or free; None if absent or evicted."""
        blocks = self._cached.get(block_hash)
        return next(iter(blocks.values())) if blocks else None

    def cache_block(self, block: Block, block_hash: int) -> None:
        """Register a FULL, held block under `block_hash` (the caller guarantees it is full)."""
        if block.block_hash is not None or block.ref_cnt == 0 or self.is_null(block):
            raise ValueError(f"{block} cannot be cached: it must be held and not yet cached")
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, {})[block.block_id] = block
        self._num_cached += 1

    def cached_items(self) -> Iterator[tuple[int, Block]]:
        """(hash, block) pairs of the hash map, for checks and debugging."""
        for h, blocks in self._cached.items():
            for block in blocks.values():
                yield h, block

    def _evict(self, block: Block) -> None:
        assert block.block_hash is not None
        same_hash = self._cached[block.block_hash]
        del same_hash[block.block_id]
        if not same_hash:
            del self._cached[block.block_hash]
        block.block_hash = None
        self._num_cached -= 1


# --------------------------------------------------------------------------------------------------
# The scheduler-facing manager


@dataclasses.dataclass(frozen=True, slots=True)
class PrefixHit:
    """Result of `KVCacheManager.lookup`: cached full blocks matching a prompt's prefix.

    block_ids: the cached blocks, in order; pass the hit to the request's first `allocate`.
    num_cached_tokens: len(block_ids) * block_size; the engine starts computing at this position.
        Always < the prompt length (the last prompt token is always computed, for its logits).
    num_query_tokens: the prompt length looked up (for hit-rate statistics).
    extra_keys: the extra keys the prompt was hashed with; they become the request's.
    block_hashes: the hashes of `block_ids`, used to detect a stale hit in `allocate`.
    """

    block_ids: tuple[int, ...]
    num_cached_tokens: int
    num_query_tokens: int
    extra_keys: tuple = ()
    block_hashes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class KVStats:
    """A snapshot of the pool and of the prefix-cache hit counters.

    total: all blocks, the num_ranks null blocks included (so free + used == total - num_ranks,
        which is `allocatable`).
    used: blocks with ref_cnt > 0 (held by requests or pins).
    free: blocks with ref_cnt 0 (allocatable; some of them cached).
    cached: blocks registered under a hash (held or free).
    pinned: distinct blocks held by named caches.
    prefix_lookups / prefix_query_tokens / prefix_hit_tokens: over requests admitted with a
        PrefixHit (counted by their first successful `allocate`, so a lookup retried while a request
        waits for room counts once).
    num_ranks: sequence-parallel ranks the pool is split over (1: unsharded).
    free_per_rank / used_per_rank / pinned_per_rank: the same counts per rank (index = rank);
        free_per_rank[r] + used_per_rank[r] == total // num_ranks - 1.
    """

    total: int
    used: int
    free: int
    cached: int
    pinned: int
    block_size: int
    num_requests: int
    num_pins: int
    prefix_lookups: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_ranks: int
    free_per_rank: tuple[int, ...]
    used_per_rank: tuple[int, ...]
    pinned_per_rank: tuple[int, ...]

    @property
    def allocatable(self) -> int:
        """Blocks that can ever be allocated: all but the null block of each rank."""
        return self.total - self.num_ranks

    @property
    def max_request_blocks(self) -> int:
        """The most blocks one request's table can hold once every block no pin holds is free.

        Column j needs a block on rank j % num_ranks, and rank r has P - 1 - pinned_per_rank[r]
        such blocks (P = total // num_ranks). With q the smallest of those, every rank can serve
        q columns, and ranks 0, 1, ... one more each up to the first rank that has only q. One
        rank: total - 1 - pinned. (A request hitting pinned blocks can hold more: they are shared.)
        """
        per_rank = self.total // self.num_ranks
        room = [per_rank - 1 - p for p in self.pinned_per_rank]
        q = min(room)
        return q * self.num_ranks + room.index(q)

    @property
    def hit_rate(self) -> float:
        """Fraction of admitted prompt tokens served from the cache."""
        if not self.prefix_query_tokens:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks in use."""
        return self.used / self.allocatable


@dataclasses.dataclass(slots=True)
class _Request:
    blocks: list[Block]  # block table; append-only while the request lives
    block_hashes: list[int]  # chained hashes of its first len(block_hashes) full blocks
    extra_keys: tuple


class KVCacheManager:
    """Block tables for requests, prefix caching and named caches over one `BlockPool`.

    The scheduler's loop, per request (all token counts are totals, not increments):

        hit = kv.lookup(prompt, extra_keys)           # once, right before the first allocate
        table = kv.allocate(rid, n, prefix=hit)       # None: does not fit, nothing changed
        ... engine computes tokens hit.num_cached_tokens .. n-1 into `table` ...
        kv.commit(rid, tokens[:n])                    # full blocks become reusable
        table = kv.allocate(rid, n + k)               # grow (next prefill chunk / decode step)
        kv.free(rid)                                  # finished, aborted or preempted

    Preemption is `free`: the blocks keep their content while cached and free, so re-admitting the
    request later (lookup + allocate from scratch) recomputes only what was evicted meanwhile.

    With `num_ranks` S > 1 the pool is sharded over S sequence-parallel ranks: table column j is
    always a block on rank j % S, and `allocate` fails (None) when any rank it needs is full, even
    if `num_free_blocks` (a total) looks large enough; `can_allocate` asks without allocating.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_ranks: int = 1):
        """`num_blocks` counts all ranks' pages, null blocks included: `num_blocks - num_ranks`
        are allocatable. It must be a multiple of `num_ranks`, with at least 2 per rank."""
        self.pool = BlockPool(num_blocks, block_size, num_ranks)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_ranks = num_ranks
        self.enable_prefix_caching = enable_prefix_caching
        self._requests: dict[Hashable, _Request] = {}
        self._pins: dict[Hashable, list[Block]] = {}
        self._lookups = 0
        self._query_tokens = 0
        self._hit_tokens = 0

    # ---- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks an `allocate` can take now (free, cached-but-free included), over all ranks.

        With several ranks this does not say whether a request fits (column j needs rank j % S):
        use `can_allocate`, or `num_free_blocks_per_rank`.
        """
        return self.pool.num_free_blocks

    def num_free_blocks_per_rank(self) -> list[int]:
        """Free blocks (cached-but-free included) of each rank, index = rank."""
        return self.pool.num_free_blocks_per_rank()

    def block_table(self, request_id: Hashable, pad_to: int | None = None) -> list[int]:
        """The request's block ids in token order, padded with NULL_BLOCK_ID up to `pad_to`."""
        ids = [b.block_id for b in self._requests[request_id].blocks]
        if pad_to is not None:
            if pad_to < len(ids):
                raise ValueError(f"block table of {len(ids)} blocks does not fit pad_to={pad_to}")
            ids += [NULL_BLOCK_ID] * (pad_to - len(ids))
        return ids

    def stats(self) -> KVStats:
        pinned = {b for blocks in self._pins.values() for b in blocks}
        pinned_per_rank = [0] * self.num_ranks
        for block in pinned:
            pinned_per_rank[self.pool.rank_of(block)] += 1
        free_per_rank = self.pool.num_free_blocks_per_rank()
        return KVStats(
            total=self.num_blocks, used=self.pool.num_used_blocks, free=self.pool.num_free_blocks,
            cached=self.pool.num_cached_blocks, pinned=len(pinned), block_size=self.block_size,
            num_requests=len(self._requests), num_pins=len(self._pins),
            prefix_lookups=self._lookups, prefix_query_tokens=self._query_tokens,
            prefix_hit_tokens=self._hit_tokens, num_ranks=self.num_ranks,
            free_per_rank=tuple(free_per_rank),
            used_per_rank=tuple(self.pool.blocks_per_rank - 1 - f for f in free_per_rank),
            pinned_per_rank=tuple(pinned_per_rank))

    def lookup(self, token_ids: Sequence[int], extra_keys: tuple = ()) -> PrefixHit:
        """The longest run of cached FULL blocks matching the prompt's prefix. Changes nothing.

        Never covers the whole prompt: at most the blocks inside `token_ids[:-1]`, so the engine
        always computes at least the last prompt token and gets its logits. The blocks may be free
        (ref 0): call `allocate` with the hit before any other `allocate`, which may evict them
        (`allocate` detects a stale hit and raises).
        """
        n = len(token_ids)
        if not self.enable_prefix_caching or n == 0:
            return PrefixHit((), 0, n, tuple(extra_keys))
        block_ids: list[int] = []
        hashes: list[int] = []
        parent = None
        for i in range((n - 1) // self.block_size):
            parent = hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size],
                                extra_keys)
            block = self.pool.cached(parent)
            if block is None:
                break
            self._check_column(block, i)
            block_ids.append(block.block_id)
            hashes.append(parent)
        return PrefixHit(tuple(block_ids), len(block_ids) * self.block_size, n, tuple(extra_keys),
                         tuple(hashes))

    # ---- request lifecycle

    def allocate(self, request_id: Hashable, num_tokens: int,
                 prefix: PrefixHit | None = None) -> list[int] | None:
        """Make the request's block table hold `num_tokens` tokens in total; return the whole table.

        The first call for a request creates it, taking `prefix` (from `lookup`): its blocks become
        the head of the table (one more holder each) and the request's extra keys are the hit's.
        Later calls only grow the table (block tables are append-only: ids already returned never
        change, so the engine's copy stays valid); asking for fewer tokens than the table holds is a
        no-op. New column j takes a block of rank j % num_ranks. Returns None, changing nothing,
        when some rank has too few free blocks for its new columns (cached-but-free ones count as
        reclaimable, evicted LRU within the rank). Raises ValueError for a prefix on a later call, a
        stale prefix (one of its blocks was evicted since the lookup), or num_tokens below the
        prefix.
        """
        req, hit_blocks, first_column, num_new = self._plan(request_id, num_tokens, prefix)
        # Touching a free hit block takes it out of the free queue: it no longer counts as free.
        if not self.pool.can_allocate(num_new, first_column, hit_blocks):
            return None
        self.pool.touch(hit_blocks)
        new = self.pool.allocate(num_new, first_column)
        assert new is not None  # checked above
        if req is not None:
            req.blocks.extend(new)  # append-only
            return [b.block_id for b in req.blocks]
        hit = prefix if prefix is not None else PrefixHit((), 0, num_tokens)
        self._requests[request_id] = _Request(hit_blocks + new, list(hit.block_hashes),
                                              tuple(hit.extra_keys))
        if prefix is not None:
            self._lookups += 1
            self._query_tokens += prefix.num_query_tokens
            self._hit_tokens += prefix.num_cached_tokens
        return [b.block_id for b in self._requests[request_id].blocks]

    def can_allocate(self, request_id: Hashable | None, num_tokens: int,
                     prefix: PrefixHit | None = None) -> bool:
        """Would `allocate(request_id, num_tokens, prefix)` succeed now? Changes nothing.

        `request_id` None (or one not yet allocated) asks about a new request. Raises the same
        ValueErrors as `allocate` for arguments it would refuse (a stale prefix among them).
        """
        req, hit_blocks, first_column, num_new = self._plan(request_id, num_tokens, prefix)
        return self.pool.can_allocate(num_new, first_column, hit_blocks)

    def _plan(self, request_id: Hashable | None, num_tokens: int,
              prefix: PrefixHit | None) -> tuple[_Request | None, list[Block], int, int]:
        """What `allocate` has to do: (the live request or None for a new one, the prefix-hit
        blocks a new request holds first, the first new column, how many new columns to append).
        Validates the call."""
        num_columns = -(-num_tokens // self.block_size)
        req = self._requests.get(request_id) if request_id is not None else None
        if req is not None:
            if prefix is not None:
                raise ValueError(f"request {request_id!r} already allocated: prefix only on the "
                                 "first allocate")
            return req, [], len(req.blocks), max(num_columns - len(req.blocks), 0)
        hit = prefix if prefix is not None else PrefixHit((), 0, num_tokens)
        if num_tokens < hit.num_cached_tokens:
            raise ValueError(f"num_tokens={num_tokens} is below the prefix hit's "
                             f"{hit.num_cached_tokens} cached tokens")
        hit_blocks = [self.pool.blocks[i] for i in hit.block_ids]
        for column, (block, h) in enumerate(zip(hit_blocks, hit.block_hashes, strict=True)):
            if block.block_hash != h:
                raise ValueError("stale PrefixHit: a block was evicted since lookup; look up again "
                                 "right before allocate")
            self._check_column(block, column)
        return None, hit_blocks, len(hit_blocks), max(num_columns - len(hit_blocks), 0)

    def _check_column(self, block: Block, column: int) -> None:
        """A cached block found for table column `column` is on that column's rank."""
        # The hash chain fixes the column (hash i names tokens [0, (i + 1) * block_size)), and
        # commit registers table column i under hash i, so a block serving column j was computed
        # as some request's column j: it is on rank j % S because every table is round-robin.
        assert self.pool.rank_of(block) == column % self.num_ranks, (block, column)

    def commit(self, request_id: Hashable, token_ids: Sequence[int]) -> None:
        """Record that the K/V of `token_ids` (the request's whole sequence so far) are computed.

        Pass only tokens whose K/V are written: the prompt tokens prefilled so far, plus generated
        tokens already fed back through a decode step (not the token just sampled). Every block
        that became FULL since the last commit is hashed and registered, so later lookups can reuse
        it; a partial last block is never cached. A block whose hash another block already holds
        (two requests computed the same prefix at once) is registered too; either serves a hit.
        Tokens beyond the table's capacity raise ValueError.
        """
        req = self._requests[request_id]
        if len(token_ids) > len(req.blocks) * self.block_size:
            raise ValueError(f"{len(token_ids)} tokens do not fit the request's "
                             f"{len(req.blocks)} blocks; allocate first")
        if not self.enable_prefix_caching:
            return
        start = len(req.block_hashes)
        parent = req.block_hashes[-1] if req.block_hashes else None
        new_hashes = hash_blocks(token_ids, self.block_size, req.extra_keys,
                                 parent_hash=parent, start_block=start)
        for i, h in enumerate(new_hashes, start):
            block = req.blocks[i]
            # The hash map only holds full blocks: block i is full because len(token_ids) covers it.
            if block.block_hash is None:
                self.pool.cache_block(block, h)
            else:
                # A prefix-hit block, registered under h by the request that computed it.
                assert block.block_hash == h
        req.block_hashes.extend(new_hashes)

    def free(self, request_id: Hashable) -> None:
        """Release the request (finished, aborted or preempted). KeyError if unknown.

        Its cached blocks stay cached and free (evictable, LRU); blocks go back last to first so a
        sequence's tail is evicted before its head. Blocks shared with other requests or pins
        only lose one holder.
        """
        req = self._requests.pop(request_id)
        self.pool.free(reversed(req.blocks))

    # ---- named caches (Gemini cachedContents)

    def pin(self, cache_id: Hashable, token_ids: Sequence[int],
            extra_keys: tuple = ()) -> list[int] | None:
        """Hold the cached full blocks of `token_ids` under `cache_id` until `unpin`.

        Flow: run the content as a normal request (prompt = the content tokens, prefill only),
        `commit` its tokens, `pin` the content, then `free` the request. Pinning before freeing
        means nothing can be evicted in between. Requests whose prompt starts with the content (with
        the same extra keys) then hit the pinned blocks through the ordinary `lookup`; nothing
        else is needed. Only full blocks are pinned; the tail of the content past the last full
        block (< block_size tokens) is recomputed by each request.

        Returns the pinned block ids, or None (nothing changed) if some full block of the content
        is not cached (it was never committed, or was evicted). Raises ValueError if `cache_id` is
        already pinned, RuntimeError if prefix caching is disabled.
        """
        if not self.enable_prefix_caching:
            raise RuntimeError("named caches need enable_prefix_caching=True")
        if cache_id in self._pins:
            raise ValueError(f"cache {cache_id!r} is already pinned")
        blocks = []
        for column, h in enumerate(hash_blocks(token_ids, self.block_size, tuple(extra_keys))):
            block = self.pool.cached(h)
            if block is None:
                return None
            self._check_column(block, column)
            blocks.append(block)
        # Pinned blocks have ref_cnt >= 1, so they are never in the free queue: never evicted.
        self.pool.touch(blocks)
        self._pins[cache_id] = blocks
        return [b.block_id for b in blocks]

    def unpin(self, cache_id: Hashable) -> None:
        """Drop a named cache's hold (KeyError if unknown); its blocks become evictable (LRU)."""
        self.pool.free(reversed(self._pins.pop(cache_id)))

    def pinned_blocks(self, cache_id: Hashable) -> list[int]:
        return [b.block_id for b in self._pins[cache_id]]
