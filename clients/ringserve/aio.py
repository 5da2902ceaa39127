"""The asyncio ringserve client: `Client`'s surface on grpc.aio.

    async with ringserve.AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("Tell me a story", max_output_tokens=64):
            print(chunk.text, end="", flush=True)
        result = await client.generate_text("Hi", temperature=0)

Cancelling the task that consumes `generate` (or closing the iterator with `aclose()`) cancels the
call on the server. Leaving `async for` with `break` closes the iterator when asyncio finalizes it,
one loop turn later; wrap it in `contextlib.aclosing(...)` to close it on the spot.
Create the client inside the event loop that uses it.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio

from ringserve import types
from ringserve.client import _UNSET
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


class AsyncClient:
    """A grpc.aio connection to one ringserve server; `await close()` (or `async with`) when done.

    Arguments as for `ringserve.Client`.
    """

    def __init__(self, target: str, *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, object]] | None = None):
        self.target = target
        self.timeout = timeout
        options = list(options or [])
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(types.HEALTH_CHECK_METHOD)

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _deadline(self, timeout) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    async def _unary(self, method, request, timeout):
        try:
            return await method(request, timeout=self._deadline(timeout))
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
    ) -> AsyncIterator[Chunk]:
        """Streams the answer as `Chunk`s (`async for`); see `Client.generate` for the arguments."""
        request = types.generate_request(
            contents, system_instruction=system_instruction, max_output_tokens=max_output_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop_sequences=stop_sequences, request_id=request_id, cached_content=cached_content)
        return self._stream(request, self._deadline(timeout))

    async def _stream(self, request: pb.GenerateRequest,
                      timeout: float | None) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(request, timeout=timeout)
        try:
            async for response in call:
                yield types.to_chunk(response)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            # No-op after the stream ended; on aclose(), task cancellation or an error in the
            # consumer it tells the server to stop generating.
            call.cancel()

    async def generate_text(self, contents: Contents, **options) -> Result:
        """Runs `generate` to the end and returns the whole answer. Takes `generate`'s options."""
        builder = types.ResultBuilder()
        async for chunk in self.generate(contents, **options):
            builder.add(chunk)
        return builder.result()

    async def count_tokens(self, contents: Contents,
                           system_instruction: str | Turn | None = None, *,
                           cached_content: str | CachedContent | None = None,
                           timeout: float | None = _UNSET) -> int:
        """Prompt tokens a `generate` with the same contents would use (chat template included;
        with `cached_content`, the cache's tokens included)."""
        detail = await self.count_tokens_detail(contents, system_instruction,
                                                cached_content=cached_content, timeout=timeout)
        return detail.total_tokens

    async def count_tokens_detail(self, contents: Contents,
                                  system_instruction: str | Turn | None = None, *,
                                  cached_content: str | CachedContent | None = None,
                                  timeout: float | None = _UNSET) -> TokenCount:
        """`count_tokens` in full: `TokenCount(total_tokens, cached_content_token_count)`."""
        request = types.count_tokens_request(contents, system_instruction, cached_content)
        return types.to_token_count(await self._unary(self._stub.CountTokens, request, timeout))

    # ---- named context caches (see `Client.create_cache`) -----------------------------------

    async def create_cache(self, contents: Contents, *,
                           system_instruction: str | Turn | None = None, ttl: Ttl | None = None,
                           expire_time: datetime.datetime | None = None, display_name: str = "",
                           timeout: float | None = _UNSET) -> CachedContent:
        """Computes and pins the KV of `contents`, named; see `Client.create_cache`."""
        request = types.create_cache_request(
            contents, system_instruction=system_instruction, ttl=ttl, expire_time=expire_time,
            display_name=display_name)
        return types.to_cached_content(
            await self._unary(self._stub.CreateCache, request, timeout))

    async def get_cache(self, name: str | CachedContent, *,
                        timeout: float | None = _UNSET) -> CachedContent:
        """The live cache `name`; `NotFound` when it never existed, was deleted or expired."""
        request = pb.GetCacheRequest(name=types.cache_name(name))
        return types.to_cached_content(await self._unary(self._stub.GetCache, request, timeout))

    async def list_caches(self, *, timeout: float | None = _UNSET) -> list[CachedContent]:
        """Every live cache on the server (all clients'), oldest first."""
        response = await self._unary(self._stub.ListCaches, pb.ListCachesRequest(), timeout)
        return [types.to_cached_content(c) for c in response.cached_contents]

    async def update_cache(self, name: str | CachedContent, *, ttl: Ttl | None = None,
                           expire_time: datetime.datetime | None = None,
                           timeout: float | None = _UNSET) -> CachedContent:
        """Sets a new expiry: `ttl` from now, or `expire_time` (which wins). One is required."""
        request = types.update_cache_request(name, ttl=ttl, expire_time=expire_time)
        return types.to_cached_content(
            await self._unary(self._stub.UpdateCache, request, timeout))

    async def delete_cache(self, name: str | CachedContent, *,
                           timeout: float | None = _UNSET) -> None:
        """Deletes the cache and frees its pages at once; `NotFound` if it is not live."""
        await self._unary(self._stub.DeleteCache,
                          pb.DeleteCacheRequest(name=types.cache_name(name)), timeout)

    async def model_info(self, *, timeout: float | None = _UNSET) -> ModelInfo:
        """The served model's name, limits, vocabulary and modalities."""
        try:
            info = await self._stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                 timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return types.to_model_info(info)

    async def stats(self, *, timeout: float | None = _UNSET) -> ServerStats:
        """Live engine counters: running / waiting requests, token totals, finishes by reason."""
        try:
            stats = await self._stub.GetStats(pb.GetStatsRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return types.to_server_stats(stats)

    async def health(self, service: str = "", *, timeout: float | None = _UNSET) -> str:
        """The grpc.health.v1 status of `service` ("" = the whole server), e.g. "SERVING"."""
        try:
            data = await self._health(types.health_request(service),
                                      timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return types.health_status(data)
