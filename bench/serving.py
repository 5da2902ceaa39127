"""Serving benchmark: the real gRPC server under concurrent load, next to transformers `generate`.

    python -m bench.serving --out bench/results/serving.json [--quick] [--max-batch 16]

Everything ringserve does here goes through `python -m server.cli` in a child process and the
generated client stubs (`ringserve.v1.inference_pb2_grpc`), on the weights transformers runs:

1. Weights. A random `LlamaForCausalLM` with `presets.bench_llama()`'s shape (vocabulary 8192, width 256,
   4 layers, 4 heads / 2 kv heads, head_dim 64, MLP 768, tied embeddings, 8192 positions, fp32;
   torch seed 0) is saved with `save_pretrained` (safetensors) and served with `--model DIR
   --tokenizer preprocess/assets/ringserve.model`; transformers loads the same directory.
2. Throughput at 1, 4, 16 and 64 concurrent requests (a closed loop: a pool of that many client
   threads, each sending its next request when the last one ends). Requests are seeded: a prompt of
   32..512 corpus tokens (`preprocess.corpus`, behind a unique "Request N." line so that no two
   requests share a KV page and the prefix cache never hits) and `max_output_tokens` 16..128,
   greedy. Output tokens/s over the wall time; time to first token (TTFT) and inter-token latency
   (ITL) from client-side stream arrival times. transformers `generate` runs the same prompt ids
   (the server's chat template, rendered here with `preprocess.prompt` and checked against
   CountTokens), left-padded in batches of the concurrency, `max_new_tokens` the batch's largest,
   the server's stop ids as eos, 2 torch threads; each row is cut at its own `max_output_tokens` and
   stop id, and only those tokens count. Greedy token ids are compared request by request; rows
   that differ are re-run unpadded (batch 1) in transformers to tell padding from numerics.
3. KV memory waste: GetStats every 50 ms during the 16-concurrent run; waste = 1 - live/allocated
   KV token slots, next to a contiguous allocation of the full context per running request.
4. Long-context time to first token: a question after a ~7,500-token context (corpus text, a
   unique first line per use), max_output_tokens 2: (a) a context never seen, (b) the same prompt
   sent a second time (automatic prefix cache), (c) CreateCache with the context, then Generate
   naming the cache with the question only. Median of the repetitions; (b) and (c) as a share of (a).

The server and transformers never run at the same time (the box has 2 cores); their runs
alternate level by level. `--compare-max-batch N` also runs the 16- and 64-concurrent loads on a
second server with `--max-batch N` (fresh requests of the same shape) to justify the choice.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
import transformers

from model import presets
from preprocess import prompt as prompt_lib
from preprocess.corpus import corpus_text
from preprocess.tokenizer import Tokenizer
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "preprocess" / "assets" / "ringserve.model"
READY = re.compile(r"ringserve: serving \S+ on (\S+):(\d+)")
TORCH_THREADS = 2
SEED = 0
CONCURRENCY = (1, 4, 16, 64)
PROMPT_TOKENS = (32, 512)  # corpus tokens per prompt, inclusive (the template adds ~12)
OUTPUT_TOKENS = (16, 128)
STATS_PERIOD = 0.05
CONTEXT_TOKENS = 7500
QUESTION = "In one sentence: what is the text above mostly about?"
TARGET_SPEEDUP = 2.0  # ringserve tokens/s over transformers' at 16 concurrent requests
TARGET_WASTE = 0.04
TARGET_TTFT_SHARE = 0.05


# ---- the server -------------------------------------------------------------------------------


class Server:
    """`python -m server.cli` on a free port; `target` once its ready line is printed."""

    def __init__(self, *args: str, startup_timeout: float = 600.0):
        self.args = list(args)
        cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", "0", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.target = ""
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                match = READY.search(line)
                if match and not self.target:
                    self.target = f"{match.group(1)}:{match.group(2)}"
                    ready.set()
            ready.set()

        started = time.perf_counter()
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(startup_timeout) or not self.target:
            self.close()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        self.startup_s = time.perf_counter() - started
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def close(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def user(text: str) -> pb.Content:
    return pb.Content(role="user", parts=[pb.Part(text=text)])


@dataclasses.dataclass
class Request:
    tag: str
    texts: tuple[str, ...]  # user turns
    prompt_ids: tuple[int, ...]  # as the server renders them
    max_output_tokens: int

    def proto(self, cached_content: str = "") -> pb.GenerateRequest:
        return pb.GenerateRequest(
            request_id=self.tag, contents=[user(t) for t in self.texts],
            cached_content=cached_content,
            generation_config=pb.GenerationConfig(max_output_tokens=self.max_output_tokens,
                                                  temperature=0.0))


@dataclasses.dataclass
class Outcome:
    token_ids: list[int]
    arrivals: list[float]  # perf_counter of each token-carrying response
    start: float
    end: float
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    server_ttft: float | None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def stream(stub, request: pb.GenerateRequest) -> Outcome:
    """One Generate call to its end, stamping each response's arrival."""
    ids: list[int] = []
    arrivals: list[float] = []
    start = time.perf_counter()
    last = None
    for response in stub.Generate(request):
        now = time.perf_counter()
        if response.token_ids:
            if len(response.token_ids) != 1:  # one token a step: a gap per response
                raise AssertionError(f"{len(response.token_ids)} tokens in one response")
            ids.extend(response.token_ids)
            arrivals.append(now)
        last = response
    end = time.perf_counter()
    ttft = last.time_to_first_token.ToNanoseconds() / 1e9 if last.HasField(
        "time_to_first_token") else None
    return Outcome(ids, arrivals, start, end, pb.GenerateResponse.FinishReason.Name(
        last.finish_reason), last.usage_metadata.prompt_token_count,
        last.usage_metadata.cached_content_token_count, ttft)


class StatsSampler:
    """Polls GetStats every `period` seconds on its own thread while in a `with` block."""

    def __init__(self, stub, period: float = STATS_PERIOD):
        self.stub, self.period = stub, period
        self.samples: list[pb.ServerStats] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.stub.GetStats(pb.GetStatsRequest(), timeout=10))
            self._stop.wait(self.period)

    def __enter__(self) -> StatsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_idle(stub, timeout: float = 60.0) -> pb.ServerStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        if stats.running_requests == 0 and stats.waiting_requests == 0:
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not idle after {timeout}s: {stats}")
        time.sleep(0.05)


# ---- workloads --------------------------------------------------------------------------------


class Corpus:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids = tokenizer.encode(corpus_text())

    def text(self, rng: np.random.Generator, n: int) -> str:
        start = int(rng.integers(0, len(self.ids) - n))
        return self.tok.decode(self.ids[start:start + n])


def make_requests(corpus: Corpus, tokenizer: Tokenizer, count: int, label: str,
                  seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1))
        m = int(rng.integers(OUTPUT_TOKENS[0], OUTPUT_TOKENS[1] + 1))
        text = f"Request {label}-{i}.\n{corpus.text(rng, n)}"
        ids = prompt_lib.render([("user", text)], None, tokenizer)
        out.append(Request(f"{label}-{i}", (text,), tuple(ids), m))
    return out


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def run_server_load(server: Server, requests: list[Request], concurrency: int,
                    sample_stats: bool = False) -> dict:
    """All `requests` through `concurrency` client threads; tokens/s, TTFT, ITL (+ KV samples)."""
    wait_idle(server.stub)
    before = server.stub.GetStats(pb.GetStatsRequest())
    sampler = StatsSampler(server.stub) if sample_stats else None
    load = os.getloadavg()[0]
    server_cpu, client_cpu = server.cpu_s(), time.process_time()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        if sampler:
            sampler.__enter__()
        start = time.perf_counter()
        futures = [pool.submit(stream, server.stub, r.proto()) for r in requests]
        outcomes = [f.result() for f in futures]
        wall = time.perf_counter() - start
        server_cpu, client_cpu = server.cpu_s() - server_cpu, time.process_time() - client_cpu
        if sampler:
            sampler.__exit__()
    after = server.stub.GetStats(pb.GetStatsRequest())
    for r, o in zip(requests, outcomes):
        if o.prompt_tokens != len(r.prompt_ids):
            raise AssertionError(f"{r.tag}: the server counted {o.prompt_tokens} prompt tokens, "
                                 f"the benchmark rendered {len(r.prompt_ids)}")
    tokens = sum(len(o.token_ids) for o in outcomes)
    ttfts = [o.ttft for o in outcomes]
    gaps = [g for o in outcomes for g in o.gaps]
    result = {
        "requests": len(requests),
        "concurrency": concurrency,
        "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,  # this process: the client threads (and the stats sampler)
        "output_tokens_per_server_cpu_s": tokens / server_cpu,
        "loadavg_1min_before": load,
        "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
        "server_ttft_p50_s": pct([o.server_ttft for o in outcomes if o.server_ttft], 50),
        "itl_p50_s": pct(gaps, 50), "itl_p99_s": pct(gaps, 99),
        "finish_reasons": {k: sum(o.finish_reason == k for o in outcomes)
                           for k in sorted({o.finish_reason for o in outcomes})},
        "cached_prompt_tokens": sum(o.cached_tokens for o in outcomes),
        "preemptions": after.preemptions_total - before.preemptions_total,
    }
    if sampler:
        result["kv"] = kv_waste(sampler.samples)
    return result, [o.token_ids for o in outcomes]


def kv_waste(samples: list[pb.ServerStats]) -> dict:
    busy = [s for s in samples if s.running_requests > 0 and s.kv_token_slots_allocated > 0]
    context = presets.bench_llama().max_context
    paged = [1 - s.kv_token_slots_live / s.kv_token_slots_allocated for s in busy]
    contiguous = [1 - s.kv_token_slots_live / (s.running_requests * context) for s in busy]
    live = sum(s.kv_token_slots_live for s in busy)
    allocated = sum(s.kv_token_slots_allocated for s in busy)
    return {
        "samples": len(samples), "busy_samples": len(busy),
        "period_s": STATS_PERIOD,
        "running_mean": float(np.mean([s.running_requests for s in busy])) if busy else None,
        "live_slots_mean": float(np.mean([s.kv_token_slots_live for s in busy])) if busy else None,
        "allocated_slots_mean": float(np.mean([s.kv_token_slots_allocated for s in busy]))
        if busy else None,
        "paged_waste_mean": float(np.mean(paged)) if paged else None,
        "paged_waste_max": float(np.max(paged)) if paged else None,
        "paged_waste_pooled": 1 - live / allocated if allocated else None,
        "contiguous_context_slots": context,
        "contiguous_waste_mean": float(np.mean(contiguous)) if contiguous else None,
        "contiguous_waste_max": float(np.max(contiguous)) if contiguous else None,
        "page_tokens": samples[0].kv_page_tokens if samples else None,
    }


# ---- transformers ------------------------------------------------------------------------------


def hf_config(config) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.max_context,
        bos_token_id=config.bos_id, eos_token_id=None, pad_token_id=0, dtype="float32")


def trim(row, limit: int, stops: frozenset[int]) -> list[int]:
    """A generated row as the server would stream it: up to `limit` tokens, before a stop id."""
    out = []
    for t in row[:limit]:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


def hf_generate(model, requests: list[Request], stops: frozenset[int]) -> list[list[int]]:
    """One left-padded greedy generate over `requests`; each row trimmed to its own request."""
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.zeros((len(requests), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                             max_new_tokens=max(r.max_output_tokens for r in requests),
                             eos_token_id=sorted(stops))
    return [trim(out[i, width:].tolist(), r.max_output_tokens, stops)
            for i, r in enumerate(requests)]


def run_hf_load(model, requests: list[Request], batch: int, stops: frozenset[int]) -> dict:
    load = os.getloadavg()[0]
    cpu = time.process_time()
    start = time.perf_counter()
    outputs: list[list[int]] = []
    for i in range(0, len(requests), batch):
        outputs += hf_generate(model, requests[i:i + batch], stops)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    tokens = sum(len(o) for o in outputs)
    return {"requests": len(requests), "batch": batch, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "cpu_s": cpu,
            "output_tokens_per_cpu_s": tokens / cpu, "loadavg_1min_before": load}, outputs


def compare(model, requests, ours, theirs, stops, max_recheck: int = 16) -> dict:
    """Greedy ids request by request; differing rows re-run unpadded to find the cause."""
    equal = [a == b for a, b in zip(ours, theirs)]
    diffs = []
    for r, a, b, same in zip(requests, ours, theirs, equal):
        if same:
            continue
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        diffs.append({"request": r.tag, "first_divergence": first, "ringserve_len": len(a),
                      "transformers_len": len(b), "_req": r, "_ours": a, "_theirs": b})
    for d in diffs[:max_recheck]:
        alone = hf_generate(model, [d["_req"]], stops)[0]
        d["ringserve_equals_transformers_unpadded"] = d["_ours"] == alone
        d["transformers_padded_equals_unpadded"] = d["_theirs"] == alone
    for d in diffs:
        for k in ("_req", "_ours", "_theirs"):
            d.pop(k)
    return {"equal": int(sum(equal)), "total": len(equal), "differing": diffs}


# ---- long context: prefix and named caches ---------------------------------------------------


def long_context(server: Server, corpus: Corpus, tokenizer: Tokenizer, repeats: int,
                 hf=None) -> dict:
    rng = np.random.default_rng(SEED + 7)
    question_req = pb.GenerationConfig(max_output_tokens=2, temperature=0.0)

    def context(k: int) -> str:
        return f"Document {k}.\n{corpus.text(rng, CONTEXT_TOKENS)}"

    rows = {"uncached": [], "prefix_hit": [], "named_cache": [], "create_cache": []}
    server_ttft = {"uncached": [], "prefix_hit": [], "named_cache": []}
    cached_tokens = {"uncached": [], "prefix_hit": [], "named_cache": []}
    prompt_tokens = []
    for rep in range(repeats):
        # (a) and (b): a context never seen, then the very same prompt again.
        ctx = context(2 * rep)
        req = pb.GenerateRequest(contents=[user(ctx), user(QUESTION)],
                                 generation_config=question_req)
        for kind in ("uncached", "prefix_hit"):
            wait_idle(server.stub)
            o = stream(server.stub, req)
            rows[kind].append(o.ttft)
            server_ttft[kind].append(o.server_ttft)
            cached_tokens[kind].append(o.cached_tokens)
            prompt_tokens.append(o.prompt_tokens)
        # (c): a named cache of another new context, then the question alone.
        ctx = context(2 * rep + 1)
        wait_idle(server.stub)
        t0 = time.perf_counter()
        cache = server.stub.CreateCache(pb.CreateCacheRequest(contents=[user(ctx)]))
        rows["create_cache"].append(time.perf_counter() - t0)
        wait_idle(server.stub)
        o = stream(server.stub, pb.GenerateRequest(cached_content=cache.name,
                                                   contents=[user(QUESTION)],
                                                   generation_config=question_req))
        rows["named_cache"].append(o.ttft)
        server_ttft["named_cache"].append(o.server_ttft)
        cached_tokens["named_cache"].append(o.cached_tokens)
        prompt_tokens.append(o.prompt_tokens)
        server.stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name))
    med = {k: statistics.median(v) for k, v in rows.items()}
    peer = None
    if hf is not None:  # the same prompt shape through transformers: one forward + 1 token
        ids = prompt_lib.render([("user", ctx), ("user", QUESTION)], None, tokenizer)
        times = []
        for _ in range(3):  # the first is a warm-up (allocator, kernels for this length)
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            with torch.inference_mode():
                hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                            max_new_tokens=1, pad_token_id=0)
            times.append(time.perf_counter() - t0)
        peer = {"prompt_tokens": len(ids), "ttft_s": times[1:],
                "ttft_median_s": statistics.median(times[1:])}
    return {
        "transformers_uncached": peer,
        "repeats": repeats,
        "context_corpus_tokens": CONTEXT_TOKENS,
        "prompt_tokens": sorted(set(prompt_tokens)),
        "ttft_s": rows,
        "ttft_median_s": med,
        "server_ttft_median_s": {k: statistics.median(v) for k, v in server_ttft.items()},
        "cached_tokens": cached_tokens,
        "share_of_uncached": {k: med[k] / med["uncached"] for k in ("prefix_hit", "named_cache")},
    }


# ---- the run ----------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax  # noqa: PLC0415 - only for its version; the benchmark process computes nothing in JAX

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "grpcio": grpc.__version__,
        "torch_threads": TORCH_THREADS,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_head": git("rev-parse", "HEAD"),
        "git_dirty_files": dirty.splitlines() if dirty else [],
        "command": " ".join([Path(sys.executable).name, "-m", "bench.serving", *sys.argv[1:]]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="fewer requests and repetitions")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--compare-max-batch", type=int, default=0,
                    help="also run the 16/64-concurrent loads on a server with this --max-batch")
    ap.add_argument("--levels", default=",".join(map(str, CONCURRENCY)),
                    help="concurrency levels, comma-separated")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(TORCH_THREADS)
    levels = [int(x) for x in args.levels.split(",")]
    counts = ({1: 2, 4: 4, 16: 16, 64: 64} if args.quick else {1: 6, 4: 12, 16: 48, 64: 128})
    repeats = 2 if args.quick else 3
    result: dict = {"machine": machine(), "quick": args.quick, "max_batch": args.max_batch,
                    "loadavg_at_start": os.getloadavg()}
    log = lambda *a: print(f"[{time.perf_counter() - began:6.1f}s]", *a, flush=True)  # noqa: E731

    tokenizer = Tokenizer(TOKENIZER)
    stops = prompt_lib.stop_token_ids(tokenizer)
    corpus = Corpus(tokenizer)
    config = presets.bench_llama()
    with tempfile.TemporaryDirectory(prefix="ringserve-bench-") as tmp:
        weights = Path(tmp) / "llama-default"
        torch.manual_seed(SEED)
        transformers.LlamaForCausalLM(hf_config(config)).save_pretrained(
            weights, safe_serialization=True)
        hf = transformers.LlamaForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
        params = sum(p.numel() for p in hf.parameters())
        result["model"] = {"preset": config.name, "parameters": params, "dtype": "float32",
                           "vocab": config.vocab_size, "context": config.max_context,
                           "torch_seed": SEED}
        server_args = ["--model", str(weights), "--tokenizer", str(TOKENIZER)]
        requests = {c: make_requests(corpus, tokenizer, counts[c], f"c{c}", SEED + c)
                    for c in levels}
        result["workload"] = {
            "prompt_corpus_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
            "requests": {c: len(requests[c]) for c in levels}, "greedy": True,
            "stop_ids": sorted(stops),
        }

        log("starting the server")
        with Server(*server_args, "--max-batch", str(args.max_batch)) as server:
            result["server"] = {"args": server.args[4:], "startup_s": server.startup_s}
            info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
            result["server"]["model_info"] = {"name": info.name, "parameters": info.parameter_count,
                                              "dtype": info.dtype,
                                              "context": info.input_token_limit}
            r0 = requests[levels[0]][0]
            counted = server.stub.CountTokens(pb.CountTokensRequest(
                contents=[user(t) for t in r0.texts])).total_tokens
            if counted != len(r0.prompt_ids):
                raise AssertionError(f"CountTokens says {counted}, the benchmark rendered "
                                     f"{len(r0.prompt_ids)}")
            # Warm-up, untimed: both sides see every code path once (no prefix hits later).
            warm = make_requests(corpus, tokenizer, 4, "warm", SEED + 999)
            run_server_load(server, warm, 4)
            hf_generate(hf, warm, stops)

            result["throughput"] = []
            server_ids = {}
            for c in levels:
                log(f"concurrency {c}: ringserve ({len(requests[c])} requests)")
                ours, our_ids = run_server_load(server, requests[c], c, sample_stats=(c == 16))
                server_ids[c] = our_ids
                if not server.alive():
                    raise RuntimeError("server died:\n" + server.log_tail())
                log(f"concurrency {c}: transformers, batches of {c}")
                theirs, their_ids = run_hf_load(hf, requests[c], c, stops)
                log(f"concurrency {c}: comparing greedy ids")
                row = {"concurrency": c, "ringserve": ours, "transformers": theirs,
                       "speedup": ours["output_tokens_per_s"] / theirs["output_tokens_per_s"],
                       # tokens per CPU second of the server process vs the transformers process:
                       # less sensitive than wall time to what else runs on a shared box
                       "cpu_speedup": ours["output_tokens_per_server_cpu_s"]
                       / theirs["output_tokens_per_cpu_s"],
                       "greedy": compare(hf, requests[c], our_ids, their_ids, stops)}
                log(f"  ringserve {ours['output_tokens_per_s']:.0f} tok/s, transformers "
                    f"{theirs['output_tokens_per_s']:.0f} tok/s, x{row['speedup']:.2f}, equal "
                    f"{row['greedy']['equal']}/{row['greedy']['total']}")
                if ours["output_tokens"] != theirs["output_tokens"]:
                    log("  note: output token counts differ (a stop id in one and not the other)")
                result["throughput"].append(row)
                if c == 16:
                    result["kv_waste"] = ours.get("kv")

            log("long context: uncached / prefix hit / named cache")
            result["long_context"] = long_context(server, corpus, tokenizer, repeats, hf)
            log(f"  medians {result['long_context']['ttft_median_s']}")
            if not server.alive():
                raise RuntimeError("server died:\n" + server.log_tail())

        if args.compare_max_batch:
            n = args.compare_max_batch
            log(f"starting a second server with --max-batch {n}")
            with Server(*server_args, "--max-batch", str(n)) as other:
                run_server_load(other, make_requests(corpus, tokenizer, 4, "warm2", SEED + 998), 4)
                rows = []
                for c in [c for c in levels if c >= 16]:
                    # The same requests: a new server has no prefix hits, and greedy ids must
                    # not depend on the batch the request ran in.
                    load, ids = run_server_load(other, requests[c], c)
                    main_row = next(r for r in result["throughput"] if r["concurrency"] == c)
                    rows.append({"concurrency": c, "max_batch": n, "ringserve": load,
                                 "relative_to_main": load["output_tokens_per_s"]
                                 / main_row["ringserve"]["output_tokens_per_s"],
                                 "greedy_equal_to_main": sum(
                                     a == b for a, b in zip(ids, server_ids[c]))})
                    log(f"  max-batch {n}, concurrency {c}: {load['output_tokens_per_s']:.0f} "
                        f"tok/s, x{rows[-1]['relative_to_main']:.2f} of max-batch {args.max_batch}")
                result["max_batch_comparison"] = rows

    c16 = next((r for r in result["throughput"] if r["concurrency"] == 16), None)
    kv = result.get("kv_waste") or {}
    lc = result["long_context"]["share_of_uncached"]
    result["targets"] = {
        "speedup_at_16": {"target": TARGET_SPEEDUP, "measured": c16 and c16["speedup"],
                          "met": bool(c16 and c16["speedup"] >= TARGET_SPEEDUP)},
        "kv_waste": {"target": TARGET_WASTE, "measured_mean": kv.get("paged_waste_mean"),
                     "measured_max": kv.get("paged_waste_max"),
                     "met": kv.get("paged_waste_mean") is not None
                     and kv["paged_waste_mean"] <= TARGET_WASTE},
        "prefix_hit_ttft_share": {"target": TARGET_TTFT_SHARE, "measured": lc["prefix_hit"],
                                  "met": lc["prefix_hit"] <= TARGET_TTFT_SHARE},
        "named_cache_ttft_share": {"target": TARGET_TTFT_SHARE, "measured": lc["named_cache"],
                                   "met": lc["named_cache"] <= TARGET_TTFT_SHARE},
    }
    result["loadavg_at_end"] = os.getloadavg()
    result["runtime_s"] = time.perf_counter() - began
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
