"""The asyncio ringserve client: `Client`'s surface on grpc.aio.

    async with ringserve.AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("Tell me a story", max_output_tokens=64):
            print(chunk.text, end="", flush=True)
        result = await client.generate_text("Hi", temperature=0)

Cancelling the task that consumes `generate` (or closing the iterator with `aclose()`) cancels the
call on the server. Leaving `async for` with `break` closes the iterator when asyncio finalizes it,
one loop turn later; wrap it in `contextlib.aclosing(...)` to close it on the spot.
Create the client inside the event loop that uses it. Media parts are placed as `Client` places
them; reading and hashing files runs in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import grpc.aio

from ringserve import channels, types, upload
from ringserve.client import _UNSET, Build, _lost_upload
from ringserve.errors import NotFound, from_rpc_error
from ringserve.upload import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_INLINE_BYTES, MediaInfo
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
                 api_key: str | None = None, tls: channels.Tls = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, object]] | None = None,
                 max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES):
        self.target = target
        self.timeout = timeout
        self._media = upload.MediaPlanner(max_inline_bytes)
        options = list(options or [])
        self._channel = channels.aio_channel(
            target, options, channels.credentials(tls, credentials), channels.api_key(api_key))
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

    # ---- media parts in requests (see `Client._resolve`) ---------------------------------------

    async def _resolve(self, build: Build, timeout) -> tuple[object, list[str]]:
        request, found = upload.collect_media(build)
        if not found:
            return request, []
        placements = await asyncio.to_thread(self._media.plan, found)
        for i, p in enumerate(placements):
            if p.part is None:
                info = self._media.lookup(p.upload.sha256)
                if info is None:
                    info = await self._upload(p.upload, p.media.display_name,
                                              DEFAULT_CHUNK_SIZE, timeout)
                    self._media.remember(p.upload, info)
                placements[i] = upload.Placement(p.media, part=p.media.file_part(info.name))
        request = build(upload.placed_resolver([p.part for p in placements]))
        return request, upload.auto_uploaded(placements)

    async def _unary_media(self, method, build: Build, timeout):
        request, names = await self._resolve(build, timeout)
        try:
            return await self._unary(method, request, timeout)
        except NotFound as e:
            if not _lost_upload(e, names):
                raise
            self._media.forget(names)
            request, _ = await self._resolve(build, timeout)
            return await self._unary(method, request, timeout)

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
        ignore_eos: bool = False,
        request_id: str | None = None,
        cached_content: str | CachedContent | None = None,
        timeout: float | None = _UNSET,
    ) -> AsyncIterator[Chunk]:
        """Streams the answer as `Chunk`s (`async for`); see `Client.generate` for the arguments.

        Bad turns raise here; media are placed (large ones uploaded) when iteration starts."""
        def build(resolve: types.Resolve) -> pb.GenerateRequest:
            return types.generate_request(
                contents, system_instruction=system_instruction,
                max_output_tokens=max_output_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed, stop_sequences=stop_sequences, ignore_eos=ignore_eos,
                request_id=request_id, cached_content=cached_content, resolve=resolve)

        upload.collect_media(build)  # checks the turns now, as the blocking client does
        return self._stream(build, self._deadline(timeout))

    async def _stream(self, build: Build, timeout: float | None,
                      retry: bool = True) -> AsyncIterator[Chunk]:
        request, names = await self._resolve(build, timeout)
        call = self._stub.Generate(request, timeout=timeout)
        started = lost = False
        try:
            async for response in call:
                started = True
                yield types.to_chunk(response)
        except grpc.RpcError as e:
            error = from_rpc_error(e)
            lost = (retry and not started and isinstance(error, NotFound)
                    and _lost_upload(error, names))
            if not lost:
                raise error from None
        finally:
            # No-op after the stream ended; on aclose(), task cancellation or an error in the
            # consumer it tells the server to stop generating.
            call.cancel()
        if lost:
            # The server lost an upload before generating anything: upload again, retry once.
            self._media.forget(names)
            async for chunk in self._stream(build, timeout, retry=False):
                yield chunk

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
        """`count_tokens` in full: `TokenCount(total_tokens, cached_content_token_count,
        prompt_tokens_details)`, the last split by modality ({"TEXT": n, "IMAGE": m, ...})."""
        def build(resolve: types.Resolve) -> pb.CountTokensRequest:
            return types.count_tokens_request(contents, system_instruction, cached_content,
                                              resolve=resolve)

        return types.to_token_count(
            await self._unary_media(self._stub.CountTokens, build, timeout))

    # ---- named context caches (see `Client.create_cache`) -----------------------------------

    async def create_cache(self, contents: Contents, *,
                           system_instruction: str | Turn | None = None, ttl: Ttl | None = None,
                           expire_time: datetime.datetime | None = None, display_name: str = "",
                           timeout: float | None = _UNSET) -> CachedContent:
        """Computes and pins the KV of `contents`, named; see `Client.create_cache`."""
        def build(resolve: types.Resolve) -> pb.CreateCacheRequest:
            return types.create_cache_request(
                contents, system_instruction=system_instruction, ttl=ttl,
                expire_time=expire_time, display_name=display_name, resolve=resolve)

        return types.to_cached_content(
            await self._unary_media(self._stub.CreateCache, build, timeout))

    async def get_cache(self, name: str | CachedContent, *,
                        timeout: float | None = _UNSET) -> CachedContent:
        """The live cache `name`; `NotFound` when it never existed, was deleted or expired."""
        request = pb.GetCacheRequest(name=types.cache_name(name))
        return types.to_cached_content(await self._unary(self._stub.GetCache, request, timeout))

    async def _all_pages(self, method, request_type, field: str, convert, timeout) -> list:
        """A List call's items from every page, following next_page_token."""
        items, token = [], ""
        while True:
            response = await self._unary(method, request_type(page_token=token), timeout)
            items += [convert(item) for item in getattr(response, field)]
            token = response.next_page_token
            if not token:
                return items

    async def list_caches(self, *, timeout: float | None = _UNSET) -> list[CachedContent]:
        """Every live cache of this client's API key, oldest first (all pages)."""
        return await self._all_pages(self._stub.ListCaches, pb.ListCachesRequest,
                                     "cached_contents", types.to_cached_content, timeout)

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

    # ---- uploaded media (see `Client.upload_media`) -------------------------------------------

    async def upload_media(self, source: str | os.PathLike | bytes,
                           mime_type: str | None = None, *, display_name: str = "",
                           chunk_size: int = DEFAULT_CHUNK_SIZE,
                           timeout: float | None = _UNSET) -> MediaInfo:
        """Uploads a file (a path, or bytes) in chunks; hashing and reading run off the loop."""
        upload.check_chunk_size(chunk_size)
        source = await asyncio.to_thread(upload.upload_source, source, mime_type)
        info = await self._upload(source, display_name, chunk_size, timeout)
        self._media.remember(source, info)
        return info

    async def _upload(self, source: upload.UploadSource, display_name: str, chunk_size: int,
                      timeout) -> MediaInfo:
        requests = upload.CapturingIterator(
            upload.upload_requests(source, display_name=display_name, chunk_size=chunk_size))
        try:
            media = await self._stub.UploadMedia(_off_loop(requests),
                                                 timeout=self._deadline(timeout))
        except (grpc.RpcError, asyncio.CancelledError) as e:
            # grpc.aio cancels the call when the request stream raises: reading the file
            # failed, and that is the news. A real cancellation goes on as itself.
            if requests.error is not None:
                raise requests.error from None
            if isinstance(e, asyncio.CancelledError):
                raise
            raise from_rpc_error(e) from None
        return upload.to_media_info(media)

    async def get_media(self, name: str | MediaInfo, *,
                        timeout: float | None = _UNSET) -> MediaInfo:
        """Uploaded media by name; `NotFound` when never uploaded, deleted or expired."""
        request = pb.GetMediaRequest(name=upload.media_name(name))
        return upload.to_media_info(await self._unary(self._stub.GetMedia, request, timeout))

    async def list_media(self, *, timeout: float | None = _UNSET) -> list[MediaInfo]:
        """Every live upload of this client's API key, oldest first (all pages)."""
        return await self._all_pages(self._stub.ListMedia, pb.ListMediaRequest, "media",
                                     upload.to_media_info, timeout)

    async def delete_media(self, name: str | MediaInfo, *,
                           timeout: float | None = _UNSET) -> None:
        """Deletes an upload; `NotFound` if it is not live."""
        name = upload.media_name(name)
        await self._unary(self._stub.DeleteMedia, pb.DeleteMediaRequest(name=name), timeout)
        self._media.forget([name])

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


_END = object()


async def _off_loop(requests: Iterator[pb.UploadMediaRequest]) -> AsyncIterator[
        pb.UploadMediaRequest]:
    """The upload stream with each chunk read in a worker thread, so disk reads never stall the
    event loop. One read at a time: the file is read in order."""
    while (request := await asyncio.to_thread(next, requests, _END)) is not _END:
        yield request
