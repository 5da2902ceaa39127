"""`ringserve serve`: command-line entry of the server (dispatched from the SDK's `ringserve`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from server import app
from server.runtime import RuntimeOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve serve", description="Serve a model over gRPC.")
    p.add_argument("--model", default="default",
                   help="'default' (the embedded model) or a checkpoint directory: Hugging Face "
                        "Llama/Qwen2/Gemma (config.json + *.safetensors) or ringserve's own")
    p.add_argument("--tokenizer", help="sentencepiece model (default: <model>/tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=8, help="concurrent decoding requests")
    p.add_argument("--max-len", type=int, help="context cap in tokens (default: the model's)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests past which new ones get RESOURCE_EXHAUSTED")
    p.add_argument("--default-max-output-tokens", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="largest prefill step in tokens (a power of two)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="token budget of one step (default: prefill chunk + max batch)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="memory of the KV page pool, allocated at start-up")
    p.add_argument("--kv-cache-fraction", type=float,
                   help="size the KV pool as this share of the free device memory (GPU/TPU), "
                        "instead of --kv-cache-gib")
    p.add_argument("--page-len", type=int, default=16, help="tokens per KV page")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of equal prompt prefixes")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port (0 picks one; printed)")
    p.add_argument("--grace-period", type=float, default=10.0,
                   help="seconds in-flight streams get to finish on SIGTERM")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = RuntimeOptions(
            model=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
            max_slots=args.max_batch, max_len=args.max_len, max_waiting=args.max_waiting,
            default_max_output_tokens=args.default_max_output_tokens,
            prefill_chunk=args.prefill_chunk, token_budget=args.max_num_batched_tokens,
            kv_cache_gib=args.kv_cache_gib, kv_cache_fraction=args.kv_cache_fraction,
            page_len=args.page_len,
            prefix_caching=not args.no_prefix_caching, warmup=not args.no_warmup)
        asyncio.run(app.serve(options, args.host, args.port, args.grace_period,
                              args.metrics_port))
    except (ValueError, OSError) as error:
        print(f"ringserve serve: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
