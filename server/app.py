"""Assembles the gRPC server: Inference, standard health and reflection; graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from server import runtime as runtime_lib
from server.auth import AuthInterceptor, Security
from server.quotas import Quotas
from server.metrics import Metrics
from server.servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
# Large prompts (whole documents) arrive in one message; media upload gets its own streaming RPC.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


async def serve(options: runtime_lib.RuntimeOptions, host: str, port: int,
                grace_period: float = 10.0, metrics_port: int | None = None,
                security: Security = Security(), quotas: Quotas = Quotas()) -> None:
    """Runs until SIGTERM or SIGINT, then drains in-flight streams for `grace_period` seconds."""
    security.check(host)
    keys = security.keyring()  # a bad key file or certificate fails now, before the model loads
    credentials = security.server_credentials()
    loop = asyncio.get_running_loop()
    health_servicer = health.aio.HealthServicer()

    def on_engine_failure(error: BaseException) -> None:
        # Called from the engine thread: report NOT_SERVING rather than serve half-alive.
        loop.call_soon_threadsafe(
            lambda: loop.create_task(_set_health(health_servicer, serving=False)))

    rt = await asyncio.to_thread(runtime_lib.build, options, on_engine_failure, Metrics())
    rt.engine_loop.start()
    if metrics_port is not None:
        bound_metrics = rt.metrics.start_http_server(metrics_port, host)
        print(f"ringserve: metrics on http://{host}:{bound_metrics}/metrics", flush=True)

    server = grpc.aio.server(interceptors=[AuthInterceptor(keys)] if keys else [], options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    servicer = InferenceServicer(rt, keys, quotas)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound = (server.add_insecure_port(address) if credentials is None
             else server.add_secure_port(address, credentials))
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port}")
    await server.start()
    await _set_health(health_servicer, serving=True)
    # Tests and scripts wait for this exact line; it names the port actually bound (for --port 0).
    print(f"ringserve: serving {rt.model_name} on {host}:{bound}", flush=True)

    expiry = asyncio.create_task(servicer.caches.expire_forever())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if keys is not None:
        loop.add_signal_handler(signal.SIGHUP, keys.reload)
    await stop.wait()

    log.info("shutting down: no new calls; in-flight streams have %.1fs", grace_period)
    await _set_health(health_servicer, serving=False)
    expiry.cancel()
    await server.stop(grace_period)
    await asyncio.to_thread(rt.engine_loop.stop)
    rt.close()
    rt.metrics.close()
    print("ringserve: stopped", flush=True)


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)
