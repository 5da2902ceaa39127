"""The blocking ringserve client.

    with ringserve.Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Tell me a story", max_output_tokens=64):
            print(chunk.text, end="", flush=True)

Every method raises a `ringserve.errors.RingserveError` subclass instead of `grpc.RpcError`.
Deadlines: `timeout` (seconds) on the client is the default for every call; a method's own
`timeout` overrides it. For `generate` the deadline covers the whole stream.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence

import grpc

from ringserve import types
from ringserve.errors import from_rpc_error
from ringserve.types import (
    CachedContent,
    Chunk,
    Contents,
    ModelInfo,
    Result,
    ServerStats,
    TokenCount,
    Ttl,
    Turn,
)
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc

_UNSET = object()


class Client:
    """A connection to one ringserve server. Thread-safe; close it (or use `with`) when done.

    target: "HOST:PORT". credentials: `grpc.ChannelCredentials` for TLS (plaintext when None).
    options: extra gRPC channel options, as `[(name, value), ...]`.
    """

    def __init__(self, target: str, *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, object]] | None = None):
        self.target = target
        self.timeout = timeout
        options = list(options or [])
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(types.HEALTH_CHECK_METHOD)

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deadline(self, timeout) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    def _unary(self, method, request, timeout):
        try:
            return method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def generate(
        self,
        contents: Contents,
        *,
        system_instruction: str | Turn | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_sequences: Sequence[str] | None = None,
        request_id: str | None = None,
        cached_content: str | CachedContent | None = None,
        timeout: float | None = _UNSET,
    ) -> Iterator[Chunk]:
        """Streams the answer to `contents` as `Chunk`s; the last carries finish_reason and usage.

        contents: a str (one user turn), or a sequence of turns, each a str (a user turn), a
        `(role, text)` tuple with role "user" or "model", a dict `{"role", "parts" | "text"}` or a
        `Content`. Options left as None take the server's defaults (temperature 0 is greedy).

        cached_content: a named cache (its name, or the `CachedContent` from `create_cache`); its
        contents and system instruction come before `contents`, so `system_instruction` must be
        None then. Its pinned prompt tokens are not computed again.

        The call starts on the first `next()`. Leaving the loop early (`break`), or calling the
        iterator's `close()`, cancels the call on the server, which stops generating at once.
        """
        request = types.generate_request(
            contents, system_instruction=system_instruction, max_output_tokens=max_output_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop_sequences=stop_sequences, request_id=request_id, cached_content=cached_content)
        return self._stream(request, self._deadline(timeout))

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        call = self._stub.Generate(request, timeout=timeout)
        try:
            for response in call:
                yield types.to_chunk(response)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            # A no-op when the stream ended; otherwise (break, close(), an exception in the
            # consumer, garbage collection) it tells the server to stop generating.
            call.cancel()

    def generate_text(self, contents: Contents, **options) -> Result:
        """Runs `generate` to the end and returns the whole answer. Takes `generate`'s options."""
        builder = types.ResultBuilder()
        for chunk in self.generate(contents, **options):
            builder.add(chunk)
        return builder.result()

    def count_tokens(self, contents: Contents, system_instruction: str | Turn | None = None, *,
                     cached_content: str | CachedContent | None = None,
                     timeout: float | None = _UNSET) -> int:
        """Prompt tokens a `generate` with the same contents would use (chat template included;
        with `cached_content`, the cache's tokens included)."""
        return self.count_tokens_detail(contents, system_instruction,
                                        cached_content=cached_content, timeout=timeout).total_tokens

    def count_tokens_detail(self, contents: Contents,
                            system_instruction: str | Turn | None = None, *,
                            cached_content: str | CachedContent | None = None,
                            timeout: float | None = _UNSET) -> TokenCount:
        """`count_tokens` in full: `TokenCount(total_tokens, cached_content_token_count)`."""
        request = types.count_tokens_request(contents, system_instruction, cached_content)
        return types.to_token_count(self._unary(self._stub.CountTokens, request, timeout))

    # ---- named context caches -------------------------------------------------------------

    def create_cache(self, contents: Contents, *, system_instruction: str | Turn | None = None,
                     ttl: Ttl | None = None, expire_time: datetime.datetime | None = None,
                     display_name: str = "", timeout: float | None = _UNSET) -> CachedContent:
        """Computes the KV of `contents` (and `system_instruction`) once and pins it, named.

        ttl: seconds (a number) or a `datetime.timedelta`; expire_time: an aware datetime, which
        wins over ttl. With neither, the server's default (1 hour) applies. Pass the result (or
        its `name`) as `cached_content=` to `generate`, `generate_text`, `count_tokens`; delete
        it with `delete_cache` when done, or let it expire.
        """
        request = types.create_cache_request(
            contents, system_instruction=system_instruction, ttl=ttl, expire_time=expire_time,
            display_name=display_name)
        return types.to_cached_content(self._unary(self._stub.CreateCache, request, timeout))

    def get_cache(self, name: str | CachedContent, *,
                  timeout: float | None = _UNSET) -> CachedContent:
        """The live cache `name`; `NotFound` when it never existed, was deleted or expired."""
        request = pb.GetCacheRequest(name=types.cache_name(name))
        return types.to_cached_content(self._unary(self._stub.GetCache, request, timeout))

    def list_caches(self, *, timeout: float | None = _UNSET) -> list[CachedContent]:
        """Every live cache on the server (all clients'), oldest first."""
        response = self._unary(self._stub.ListCaches, pb.ListCachesRequest(), timeout)
        return [types.to_cached_content(c) for c in response.cached_contents]

    def update_cache(self, name: str | CachedContent, *, ttl: Ttl | None = None,
                     expire_time: datetime.datetime | None = None,
                     timeout: float | None = _UNSET) -> CachedContent:
        """Sets a new expiry: `ttl` from now, or `expire_time` (which wins). One is required."""
        request = types.update_cache_request(name, ttl=ttl, expire_time=expire_time)
        return types.to_cached_content(self._unary(self._stub.UpdateCache, request, timeout))

    def delete_cache(self, name: str | CachedContent, *, timeout: float | None = _UNSET) -> None:
        """Deletes the cache and frees its pages at once; `NotFound` if it is not live."""
        self._unary(self._stub.DeleteCache, pb.DeleteCacheRequest(name=types.cache_name(name)),
                    timeout)

    def model_info(self, *, timeout: float | None = _UNSET) -> ModelInfo:
        """The served model's name, limits, vocabulary and modalities."""
        try:
            info = self._stub.GetModelInfo(pb.GetModelInfoRequest(),
                                           timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return types.to_model_info(info)

    def stats(self, *, timeout: float | None = _UNSET) -> ServerStats:
        """Live engine counters: running / waiting requests, token totals, finishes by reason."""
        try:
            stats = self._stub.GetStats(pb.GetStatsRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return types.to_server_stats(stats)

    def health(self, service: str = "", *, timeout: float | None = _UNSET) -> str:
        """The grpc.health.v1 status of `service` ("" = the whole server): "SERVING",
        "NOT_SERVING", ... An unknown service raises `NotFound`."""
        try:
            data = self._health(types.health_request(service), timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return types.health_status(data)
