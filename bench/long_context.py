"""Long-context benchmark (issue #4): prefill time and per-device KV memory against context length,
ring attention over 8 simulated devices against one device, and a decode step at 1M tokens.

    python -m bench.long_context --out bench/results/long_context.json \
        [--lengths 4096,16384,65536,131072] [--ring-lengths 8192,32768] [--decode-context 1048576]

It drives `model.paged_engine.PagedEngine` directly on the default model (the server's engine, no
gRPC), with the server's page length (16) and a prefill chunk of `--chunk` tokens:
1. Prefill sweep (one device): a prompt of L tokens prefilled chunk by chunk into a pool sized for
   it; wall time, tokens/s, and the KV bytes each device holds (pool share actually used).
2. Ring overhead: the same prompt on a `sequence=8` mesh of 8 simulated CPU devices and on one
   device, in this process, alternately; the ratio is what the ring's collectives, striping and
   padding cost on one machine (the simulated devices share the same 2 cores, so it is an
   overhead measure, not a speed-up).
3. Capacity: the KV bytes per token give the largest context that fits in the box's memory (24 GiB,
   minus what the process needs besides the pool); a pool of `--decode-context` tokens is allocated
   and one decode step is timed at its last position with every page in the table (reads all keys).

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set here before JAX starts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from model import checkpoint, presets, sharding  # noqa: E402
from model.kv_pages import page_bytes  # noqa: E402
from model.paged_engine import PagedEngine  # noqa: E402

PAGE = 16
BOX_BYTES = 24 * 2**30


def _engine(config, net, pages_per_device, max_len, chunk, mesh=None):
    s = 1 if mesh is None else mesh.shape['sequence']
    return PagedEngine(config, net, max_slots=1, num_pages=pages_per_device * s, page_len=PAGE,
                       max_len=max_len, prefill_chunk=chunk, mesh=mesh)


def _tables(length, s, per_device):
    """Page j on device j % S, ids in order on each device (1.. on each; 0 is its null page)."""
    return [(j % s) * per_device + 1 + j // s for j in range(-(-length // PAGE))]


def _prefill(engine, ids, chunk):
    s, per = engine.seq_size, engine.pages_per_device
    table = _tables(len(ids), s, per)
    t0 = time.perf_counter()
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        token = engine.prefill(0, piece, start, table)
    return time.perf_counter() - t0, token


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--lengths', default='4096,16384,65536,131072')
    parser.add_argument('--ring-lengths', default='8192,32768')
    parser.add_argument('--decode-context', type=int, default=1 << 20)
    parser.add_argument('--chunk', type=int, default=2048)
    args = parser.parse_args(argv)

    config, net = checkpoint.load(presets.ensure_default_checkpoint())
    per_token = page_bytes(config, PAGE) // PAGE
    rng = np.random.default_rng(0)
    result = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': f'{platform.node()} {os.cpu_count()} cpus, jax {jax.__version__}',
        'model': {'name': config.name, 'params': None, 'kv_bytes_per_token': per_token},
        'chunk': args.chunk, 'page_len': PAGE, 'prefill': [], 'ring': [], 'capacity': {},
    }

    for length in _ints(args.lengths):
        ids = rng.integers(16, config.vocab_size, length).tolist()
        per = -(-length // PAGE) + 2
        engine = _engine(config, net, per, length + 16, args.chunk)
        engine.warmup()
        seconds, _ = _prefill(engine, ids, args.chunk)
        row = {'tokens': length, 'seconds': round(seconds, 2), 'tokens_per_s': round(length / seconds, 1),
               'kv_bytes_per_device': per_token * length}
        print(json.dumps(row), flush=True)
        result['prefill'].append(row)
        del engine

    mesh = sharding.make_mesh(sharding.MeshShape(sequence=8), jax.devices()[:8]) if _ints(
        args.ring_lengths) else None
    for length in _ints(args.ring_lengths):
        ids = rng.integers(16, config.vocab_size, length).tolist()
        per = -(-length // PAGE) // 8 + 2
        ring = _engine(config, net, per, length + 16, args.chunk, mesh)
        one = _engine(config, net, per * 8, length + 16, args.chunk)
        ring.warmup(), one.warmup()
        times = {'ring8': [], 'one': []}
        tokens = {}
        for _ in range(2):  # alternate, keep the best of each (noisy box)
            for name, engine in (('one', one), ('ring8', ring)):
                seconds, tokens[name] = _prefill(engine, ids, args.chunk)
                times[name].append(seconds)
        row = {'tokens': length, 'one_device_s': round(min(times['one']), 2),
               'ring8_s': round(min(times['ring8']), 2),
               'overhead_ratio': round(min(times['ring8']) / min(times['one']), 2),
               'same_next_token': tokens['one'] == tokens['ring8'],
               'kv_bytes_per_device': {'one': per_token * length, 'ring8': per_token * length // 8}}
        print(json.dumps(row), flush=True)
        result['ring'].append(row)
        del ring, one

    ctx = args.decode_context
    if not ctx:  # 0: skip the capacity step
        return _write(args.out, result)
    engine = _engine(config, net, -(-ctx // PAGE) + 2, ctx, args.chunk)
    table = _tables(ctx, 1, 0)
    engine.decode([0], [5], [ctx - 1], [table])  # compile
    t0 = time.perf_counter()
    engine.decode([0], [5], [ctx - 1], [table])
    step = time.perf_counter() - t0
    result['capacity'] = {
        'kv_bytes_per_token': per_token,
        'largest_context_in_box': int(BOX_BYTES * 0.75 // per_token),  # a quarter left for the rest
        'allocated_context': ctx, 'pool_bytes': engine.pool_bytes_per_device,
        'decode_step_s_at_context': round(step, 3),
    }
    print(json.dumps(result['capacity']), flush=True)
    return _write(args.out, result)


def _ints(text: str) -> list[int]:
    """'4096,16384' -> [4096, 16384]; '' -> [] (that part is skipped)."""
    return [int(x) for x in text.split(',') if x.strip()]


def _write(path: str, result: dict) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
