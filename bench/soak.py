"""Soak: many concurrent streams for minutes against the real server, with cancels and deadlines.

    .venv/bin/python -m bench.soak --out bench/results/soak.json [--seconds 300] [--streams 200]

`--streams` client threads each run requests back to back until `--seconds` pass: 70% run to the
end, 20% are cancelled after a random number of chunks, 10% carry a deadline too short to finish.
Reported (JSON): requests by outcome, time to first token (p50 / p99, client side), the server's
resident memory after warm-up and at the end, and, once the load stops, the KV pages still held
(leaked pages must be 0) and whether the server still answers and reports SERVING.
Prompts are varied (several shared prefixes, so the prefix cache is exercised) and sampling is
seeded with the stop token ignored, so every stream's length is what its plan says.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.serving import Server
from ringserve.v1 import inference_pb2 as pb

TOPICS = ["the mill by the river", "a lighthouse keeper's log", "tides and harbours",
          "the old railway", "bees in winter", "a map of the city", "salt and spice routes",
          "the night train"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def request(rng: random.Random, max_tokens: int) -> pb.GenerateRequest:
    topic = rng.choice(TOPICS)
    text = f"Tell me about {topic}. " * rng.randint(1, 30) + f"Question {rng.randrange(10**6)}."
    return pb.GenerateRequest(
        contents=[pb.Content(role="user", parts=[pb.Part(text=text)])],
        generation_config=pb.GenerationConfig(max_output_tokens=max_tokens, temperature=0.8,
                                              seed=rng.randrange(2**31), ignore_eos=True))


def worker(stub, seed: int, stop_at: float, outcomes: collections.Counter, ttfts: list,
           lock: threading.Lock, max_tokens: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        plan = rng.choices(["full", "cancel", "deadline"], weights=[70, 20, 10])[0]
        timeout = rng.uniform(0.05, 0.5) if plan == "deadline" else 600
        cancel_after = rng.randint(1, 4)
        started = time.monotonic()
        call = stub.Generate(request(rng, max_tokens), timeout=timeout)
        chunks, first = 0, None
        try:
            for response in call:
                if response.token_ids and first is None:
                    first = time.monotonic() - started
                chunks += 1
                if plan == "cancel" and chunks >= cancel_after:
                    call.cancel()
                    break
            outcome = "cancelled" if plan == "cancel" else "completed"
        except grpc.RpcError as error:
            outcome = error.code().name
        with lock:
            outcomes[f"{plan}:{outcome}"] += 1
            if first is not None:
                ttfts.append(first)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32, help="per request")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    with Server("--model", args.model, "--max-batch", str(args.max_batch),
                "--max-waiting", str(4 * args.streams)) as server:
        # Warm-up: one request of each length class, then the RSS baseline.
        list(server.stub.Generate(request(random.Random(0), args.max_tokens), timeout=600))
        rss_start = rss_bytes(server.proc.pid)
        outcomes: collections.Counter = collections.Counter()
        ttfts: list[float] = []
        lock = threading.Lock()
        started = time.monotonic()
        stop_at = started + args.seconds
        with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
            futures = [pool.submit(worker, server.stub, seed, stop_at, outcomes, ttfts, lock,
                                   args.max_tokens) for seed in range(args.streams)]
            for future in futures:
                future.result()
        elapsed = time.monotonic() - started
        rss_end = rss_bytes(server.proc.pid)
        deadline = time.monotonic() + 120
        while True:  # the last cancels reach the engine a moment later
            stats = server.stub.GetStats(pb.GetStatsRequest())
            if (stats.running_requests == 0 and stats.waiting_requests == 0) or (
                    time.monotonic() > deadline):
                break
            time.sleep(0.1)
        health = health_pb2_grpc.HealthStub(server.channel).Check(
            health_pb2.HealthCheckRequest()).status
        after = list(server.stub.Generate(request(random.Random(1), 4), timeout=120))
        result = {
            "command": f"python -m bench.soak --seconds {args.seconds:g} --streams {args.streams}"
                       f" --max-tokens {args.max_tokens} --model {args.model}",
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores",
            "seconds": round(elapsed, 1),
            "streams": args.streams,
            "requests": sum(outcomes.values()),
            "outcomes": dict(sorted(outcomes.items())),
            "unexpected": {k: v for k, v in outcomes.items()
                           if not (k.endswith(":completed") and k.startswith("full")
                                   or k == "cancel:cancelled"
                                   or k.startswith("deadline:"))},
            "ttft_s": {"p50": percentile(ttfts, 0.5), "p99": percentile(ttfts, 0.99),
                       "mean": statistics.fmean(ttfts) if ttfts else None},
            "generated_tokens": stats.generated_tokens_total,
            "server_rss_mib": {"after_warmup": round(rss_start / 2**20, 1),
                               "end": round(rss_end / 2**20, 1),
                               "drift": round((rss_end - rss_start) / 2**20, 1)},
            "after_load": {"running": stats.running_requests, "waiting": stats.waiting_requests,
                           "leaked_pages": stats.kv_pages_used,
                           "pinned_pages": stats.kv_pages_pinned,
                           "serving": health == health_pb2.HealthCheckResponse.SERVING,
                           "answers": sum(len(r.token_ids) for r in after) == 4},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
