"""`ringserve serve`: command-line entry of the server (dispatched from the SDK's `ringserve`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import logging
import os
import sys

from model.sharding import MeshShape
from server import app, distributed, runtime
from server.auth import Security
from server.quotas import Quotas
from server.media import MediaLimits
from server.runtime import RuntimeOptions


def _mesh(spec: str) -> MeshShape:
    try:
        return MeshShape.parse(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve serve", description="Serve a model over gRPC.")
    p.add_argument("--model", default="default",
                   help="'default' (the embedded model) or a checkpoint directory: Hugging Face "
                        "Llama/Qwen2/Gemma (config.json + *.safetensors) or ringserve's own")
    p.add_argument("--tokenizer", help="a tokenizer.json, a sentencepiece .model or a directory "
                                       "holding one (default: the model directory's tokenizer.json, "
                                       "else its tokenizer.model)")
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
    p.add_argument("--mesh", type=_mesh, default=MeshShape(), metavar="AXIS=SIZE,...",
                   help="device mesh, e.g. 'sequence=8' or 'data=2,sequence=2,tensor=2' (missing "
                        "axes are 1): data makes that many engine replicas (each with its own "
                        "weights, pool and --max-batch slots; one process only), sequence splits "
                        "the KV pool and long prompts, tensor splits heads and MLP. Sizes multiply "
                        "to the devices used: "
                        "with several processes, all their devices (on CPU set XLA_FLAGS="
                        "--xla_force_host_platform_device_count=N). KV budgets are per device")
    media = p.add_argument_group("media (images, audio, video)")
    media.add_argument("--media-dir", help="where uploaded media are kept (default: a temporary "
                       "directory removed on exit)")
    media.add_argument("--max-media-mib", type=float, default=2048.0,
                       help="largest image, audio or video accepted, inline or uploaded")
    media.add_argument("--max-media-seconds", type=float, default=4 * 3600.0,
                       help="longest audio or video accepted")
    media.add_argument("--media-store-gib", type=float, default=20.0,
                       help="uploads kept at once; past it UploadMedia answers RESOURCE_EXHAUSTED")
    media.add_argument("--media-probe-workers", type=int, default=4,
                       help="threads validating requests with media parts (probing headers, "
                            "ffprobe); 16 more requests per thread may wait, the rest get "
                            "RESOURCE_EXHAUSTED")
    security = p.add_argument_group("security (docs/security.md)")
    security.add_argument("--api-keys", metavar="FILE",
                          help="accepted API keys, one per line (KEY or NAME:KEY); every RPC but "
                               "health needs one; SIGHUP reloads the file")
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    security.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    security.add_argument("--tls-client-ca", metavar="PEM",
                          help="mutual TLS: clients must present a certificate this CA signed")
    security.add_argument("--insecure-allow-remote", action="store_true",
                          help="serve on a non-loopback --host without --api-keys (anyone who "
                               "reaches the port can use the server)")
    limits = p.add_argument_group("per-key limits (each API key; all callers are one key "
                                  "without --api-keys)")
    limits.add_argument("--max-caches-per-key", type=int, default=Quotas.caches_per_key)
    limits.add_argument("--max-pinned-fraction-per-key", type=float,
                        default=Quotas.pinned_fraction_per_key,
                        help="share of the KV pool one key's named caches may pin")
    limits.add_argument("--max-cache-ttl-hours", type=float,
                        default=Quotas.max_cache_ttl.total_seconds() / 3600)
    limits.add_argument("--max-uploads-per-key", type=int, default=Quotas.uploads_per_key)
    limits.add_argument("--max-upload-gib-per-key", type=float,
                        default=Quotas.upload_bytes_per_key / 2**30)
    limits.add_argument("--max-streams-per-key", type=int, default=Quotas.streams_per_key,
                        help="concurrent Generate calls")
    limits.add_argument("--upload-idle-seconds", type=float, default=Quotas.upload_idle_seconds,
                        help="an open upload that sends nothing this long is dropped")
    p.add_argument("--log-level", default="INFO")
    group = p.add_argument_group(
        "several processes (one per host)",
        "run the same command on every process; process 0 serves gRPC, the others follow it. "
        "See docs/multihost.md")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       default=os.environ.get("RINGSERVE_COORDINATOR"),
                       help="process 0's address for JAX's coordinator service, or 'auto' on a "
                            "TPU pod / SLURM / Open MPI job [env RINGSERVE_COORDINATOR]")
    group.add_argument("--num-processes", type=int,
                       default=os.environ.get("RINGSERVE_NUM_PROCESSES"),
                       help="processes in the group [env RINGSERVE_NUM_PROCESSES]")
    group.add_argument("--process-id", type=int, default=os.environ.get("RINGSERVE_PROCESS_ID"),
                       help="this process's id, 0..N-1; 0 serves gRPC [env RINGSERVE_PROCESS_ID]")
    group.add_argument("--step-port", type=int, default=0,
                       help="process 0's port for the engine calls it sends the others (default: "
                            "a free one, announced to them)")
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
            prefix_caching=not args.no_prefix_caching, warmup=not args.no_warmup, mesh=args.mesh,
            media_dir=args.media_dir, media_store_gib=args.media_store_gib,
            media_probe_workers=args.media_probe_workers,
            media_limits=MediaLimits(max_bytes=int(args.max_media_mib * 2**20),
                                     max_seconds=args.max_media_seconds))
        group = distributed.ProcessGroup(args.coordinator, args.num_processes, args.process_id,
                                         args.step_port)
        channel = distributed.setup(group)  # before anything touches a device
    except (ValueError, OSError, RuntimeError) as error:  # JAX's and the step channel's too
        print(f"ringserve serve: {error}", file=sys.stderr)
        if args.coordinator is not None:
            distributed.exit_now(2)  # JAX's exit barrier would wait for the others
        return 2
    if isinstance(channel, distributed.StepFollower):
        return _follow(options, channel)
    return _serve(dataclasses.replace(options, steps=channel), args)


def _security(args: argparse.Namespace) -> Security:
    return Security(api_keys=args.api_keys, tls_cert=args.tls_cert, tls_key=args.tls_key,
                    tls_client_ca=args.tls_client_ca, allow_remote=args.insecure_allow_remote)


def _quotas(args: argparse.Namespace) -> Quotas:
    return Quotas(caches_per_key=args.max_caches_per_key,
                  pinned_fraction_per_key=args.max_pinned_fraction_per_key,
                  max_cache_ttl=datetime.timedelta(hours=args.max_cache_ttl_hours),
                  uploads_per_key=args.max_uploads_per_key,
                  upload_bytes_per_key=int(args.max_upload_gib_per_key * 2**30),
                  streams_per_key=args.max_streams_per_key,
                  upload_idle_seconds=args.upload_idle_seconds)


def _serve(options: RuntimeOptions, args: argparse.Namespace) -> int:
    """Process 0 (or the only process): the gRPC server until SIGTERM."""
    status = 1
    try:
        asyncio.run(app.serve(options, args.host, args.port, args.grace_period,
                              args.metrics_port, _security(args), _quotas(args)))
        status = 0
    except (ValueError, OSError, distributed.WorkerLost) as error:
        print(f"ringserve serve: {error}", file=sys.stderr)
        status = 2
    finally:
        if options.steps is not None:
            options.steps.close(status)  # the workers exit with the same status
    if options.steps is not None and options.steps.lost is not None:
        distributed.exit_now(status or 1)
    return status


def _follow(options: RuntimeOptions, follower: distributed.StepFollower) -> int:
    """Any other process of a group: runs process 0's engine calls until it says stop."""
    print(f"ringserve: worker process {follower.process_id} following process 0", flush=True)
    try:
        factory, identity = runtime.worker_engine(options)
    except (ValueError, OSError) as error:
        follower.report(f"{type(error).__name__}: {error}")
        print(f"ringserve serve: {error}", file=sys.stderr)
        distributed.exit_now(2)
    status = distributed.run_worker(follower, factory, identity)
    print(f"ringserve: worker process {follower.process_id} stopped ({status})", flush=True)
    if status:
        distributed.exit_now(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
