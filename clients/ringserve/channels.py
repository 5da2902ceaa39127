"""Channels to a server: plaintext or TLS, with the API key on every call.

The key travels as `authorization: Bearer KEY` metadata, added by a client interceptor, so it works
on plaintext channels too (gRPC's call credentials refuse those). `api_key=None` reads
RINGSERVE_API_KEY; an empty string sends no key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import grpc

API_KEY_ENV = "RINGSERVE_API_KEY"

# tls: None or False (plaintext), True (TLS, the system's root certificates), or the root
# certificates to trust: PEM bytes or the path of a PEM file (a private CA, a self-signed server).
Tls = bool | bytes | str | os.PathLike | None


def api_key(given: str | None) -> str | None:
    key = os.environ.get(API_KEY_ENV) if given is None else given
    return key or None


def credentials(tls: Tls, given: grpc.ChannelCredentials | None) -> grpc.ChannelCredentials | None:
    """`given` (full control, e.g. mutual TLS) wins; else what `tls` says."""
    if given is not None:
        return given
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    roots = tls if isinstance(tls, bytes) else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _with_key(details, key: str):
    metadata = list(details.metadata or ())
    metadata.append(("authorization", f"Bearer {key}"))
    return details._replace(metadata=metadata)


class _Details(grpc.ClientCallDetails):
    """The blocking API's call details as a value with `_replace` (gRPC gives an abstract class)."""

    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = (credentials, wait_for_ready,
                                                                   compression)

    def _replace(self, **changes) -> _Details:
        fields = dict(method=self.method, timeout=self.timeout, metadata=self.metadata,
                      credentials=self.credentials, wait_for_ready=self.wait_for_ready,
                      compression=self.compression)
        return _Details(**{**fields, **changes})


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, key: str):
        self._key = key

    def _details(self, d):
        return _with_key(_Details(d.method, d.timeout, d.metadata, d.credentials,
                                  getattr(d, "wait_for_ready", None),
                                  getattr(d, "compression", None)), self._key)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def channel(target: str, options: Sequence[tuple[str, object]], creds, key: str | None):
    """A blocking channel (`grpc.Channel`) to `target`."""
    made = (grpc.insecure_channel(target, options=options) if creds is None
            else grpc.secure_channel(target, creds, options=options))
    return made if key is None else grpc.intercept_channel(made, _KeyInterceptor(key))


class _AioKey:
    def __init__(self, key: str):
        self._key = key

    def _details(self, d):
        metadata = grpc.aio.Metadata(*tuple(d.metadata or ()))
        metadata.add("authorization", f"Bearer {self._key}")
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials,
                                          d.wait_for_ready)


class _AioUnaryUnary(_AioKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


class _AioStreamStream(_AioKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


def aio_channel(target: str, options: Sequence[tuple[str, object]], creds, key: str | None):
    """A grpc.aio channel to `target`."""
    interceptors = None if key is None else [
        kind(key) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
