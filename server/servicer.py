"""The `ringserve.v1.Inference` service: validation in, events out. No arrays cross this file.

Handlers raise `RequestError`s; the `_rpc` wrapper is the one place that turns them into gRPC
statuses and counts every call's outcome for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import time

import grpc

from model.sampling import SamplingParams
from preprocess import prompt as prompt_lib
from preprocess.errors import MediaError, MediaTooLarge
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from server import caches as caches_lib
from server import media as media_lib
from server import pagination
from server.auth import KeyRing, presented_key
from server.quotas import Quotas, StreamCounter, check_display_name
from server.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, RequestError,
                           ResourceExhausted, abort)
from server.media_rows import PromptReadiness, rope_positions
from server.probe_pool import has_media
from server.runtime import Runtime
from server.validation import (GenerationRequest, conversation, media_of, render_prompt,
                               validate_generate)

_MODALITY = {"TEXT": pb.TEXT, "IMAGE": pb.IMAGE, "AUDIO": pb.AUDIO, "VIDEO": pb.VIDEO}


def _details(total: int, media) -> list[pb.ModalityTokenCount]:
    counts = media_lib.token_details(total, media)
    return [pb.ModalityTokenCount(modality=_MODALITY[m], token_count=n)
            for m, n in counts.items() if n]

_FINISH = {name: pb.GenerateResponse.FinishReason.Value(name)
           for name in ("STOP", "MAX_TOKENS", "STOP_SEQUENCE", "CANCELLED")}


class _Outcome:
    """Async context of one call: RequestError -> its status; the final code -> the metrics."""

    def __init__(self, servicer, method: str, context):
        self._metrics, self._method, self._context = servicer._rt.metrics, method, context

    async def __aenter__(self):
        return self

    async def __aexit__(self, kind, error, traceback):
        code = "OK"
        try:
            if isinstance(error, RequestError):
                code = error.code.name
                await abort(self._context, error)  # raises: grpc unwinds the handler
            elif isinstance(error, asyncio.CancelledError):
                code = "CANCELLED"
        finally:
            self._metrics.observe_rpc(self._method, code)
        return False


def _rpc(handler):
    """Runs a handler (unary or server-streaming) inside its `_Outcome`."""
    name = handler.__name__

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self, request, context):
            async with _Outcome(self, name, context):
                async for response in handler(self, request, context):
                    yield response
        return stream

    @functools.wraps(handler)
    async def unary(self, request, context):
        async with _Outcome(self, name, context):
            return await handler(self, request, context)
    return unary


class InferenceServicer(pb_grpc.InferenceServicer):
    """`keys`: the server's API keys; caches and uploads then belong to the key (its name) that
    made them, and no other key sees them. Without keys every caller is the same owner ""."""

    def __init__(self, runtime: Runtime, keys: KeyRing | None = None,
                 quotas: Quotas = Quotas()):
        self._rt = runtime
        self._keys = keys
        self._quotas = quotas
        # Without keys every caller is one owner: the engine's own queue limit (--max-waiting)
        # bounds streams then, not a per-key share.
        self._streams = StreamCounter(quotas.streams_per_key if keys is not None else None)
        self.caches = caches_lib.CacheRegistry(unpin=self._unpin)

    def _owner(self, context) -> str:
        if self._keys is None:
            return ""
        # The interceptor let the call in, so the key is known (a reload in between: no one).
        return self._keys.owner(presented_key(context.invocation_metadata())) or "\0"

    def _unpin(self, name: str):
        def unpin(kv):
            try:
                kv.unpin(name)
            except KeyError:  # never pinned (creation cancelled before its pages were computed)
                pass
        done = self._rt.engine_loop.call(unpin, affinity=name)
        self._rt.engine_loop.forget(name)
        return done

    async def _cache(self, request, owner: str) -> caches_lib.CacheEntry | None:
        if not request.cached_content:
            return None
        return await self.caches.get(request.cached_content, owner, field="cached_content")

    @_rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        received = time.monotonic()
        owner = self._owner(context)
        # aclosing: a cancelled call closes the inner stream now (freeing its slot), not when
        # the garbage collector finds it.
        with self._streams.hold(owner), self._request_media(owner) as parts:
            async with contextlib.aclosing(self._generate(request, owner, received,
                                                          parts)) as responses:
                async for response in responses:
                    yield response

    def _validating(self, request):
        """Where a request's validation runs: media parts are probed on the bounded probe
        pool, so slow media never hold up text requests on the shared threads."""
        return self._rt.probes.run if has_media(request) else asyncio.to_thread

    @contextlib.contextmanager
    def _request_media(self, owner: str):
        """The request's view of media parts; inline media it spooled go when it ends."""
        parts = self._rt.media.for_request(owner)
        try:
            yield parts
        finally:
            parts.release()

    async def _generate(self, request: pb.GenerateRequest, owner: str, received: float,
                        parts: media_lib.RequestMedia):
        # Tokenising a long prompt is CPU work: keep it off the event loop.
        cache = await self._cache(request, owner)
        work, media = await self._validating(request)(validate_generate, request,
                                                      self._rt.tokenizer, self._rt.limits,
                                                      cache, parts)
        decoding = None
        if media:
            work, decoding = self._start_media(self._with_rope(work, media), media, cache)
        stream = self._rt.engine_loop.submit(work, received,
                                             affinity=cache.name if cache else None)
        if decoding is not None:
            # A media item failing to decode ends the request (the pages it holds are freed).
            decoding.add_done_callback(lambda task: task.cancelled() or (
                task.exception() is not None and stream.cancel()))
        ttft = None
        try:
            async for event in stream:
                if decoding is not None and decoding.done() and not decoding.cancelled() and (
                        decoding.exception() is not None):
                    raise decoding.exception()
                if event.error is not None:
                    raise event.error
                if event.first_token_time is not None:
                    ttft = event.first_token_time - received
                final = event.finish_reason is not None
                if not (final or event.text or event.token_ids):
                    continue
                response = pb.GenerateResponse(request_id=work.request_id, text=event.text,
                                               token_ids=event.token_ids)
                if ttft is not None and (event.first_token_time is not None or final):
                    response.time_to_first_token.FromNanoseconds(int(ttft * 1e9))
                if final:
                    response.finish_reason = _FINISH[event.finish_reason]
                    response.usage_metadata.CopyFrom(pb.UsageMetadata(
                        prompt_token_count=event.prompt_tokens,
                        candidates_token_count=event.generated_tokens,
                        cached_content_token_count=event.cached_tokens,
                        total_token_count=event.prompt_tokens + event.generated_tokens,
                        prompt_tokens_details=_details(event.prompt_tokens, media)))
                yield response
        finally:
            # Client cancel, disconnect, deadline and shutdown all land here: free the slot now,
            # and stop decoding media nobody else waits for.
            stream.cancel()
            if decoding is not None:
                decoding.cancel()

    def _with_rope(self, work: GenerationRequest, media) -> GenerationRequest:
        """The request with its prompt's M-RoPE positions, for a model whose media shift them
        (Qwen2.5-VL's); unchanged otherwise."""
        if not any(item.grid is not None for item in media):
            return work
        positions, delta = rope_positions(work.prompt_ids, media, self._rt.config)
        return dataclasses.replace(work, rope_positions=positions, rope_delta=int(delta))

    def _start_media(self, work: GenerationRequest, media, cache):
        """Starts decoding the request's media; the engine prefills behind it (`ready`). Returns
        the request with its rows and a task that fails when a media item does."""
        embedder = self._rt.embedder
        known = dict(cache.media) if cache else {}
        started = {}
        for item in media:
            if item.key not in known and item.key not in started:
                started[item.key] = (embedder.start(item), item.source.field)
        rows = (*known.items(), *((key, p.rows) for key, (p, _) in started.items()))
        ready = PromptReadiness(work.prompt_ids, [p for p, _ in started.values()])
        decoding = asyncio.ensure_future(asyncio.gather(
            *(embedder.wait(p, field) for p, field in started.values())))
        return dataclasses.replace(work, media=rows, ready=ready), decoding

    @_rpc
    async def CountTokens(self, request: pb.CountTokensRequest, context):
        owner = self._owner(context)
        cache = await self._cache(request, owner)
        with self._request_media(owner) as parts:
            ids, media = await self._validating(request)(render_prompt, request,
                                                         self._rt.tokenizer, cache, parts)
        return pb.CountTokensResponse(
            total_tokens=len(ids),
            cached_content_token_count=len(cache.token_ids) if cache else 0,
            prompt_tokens_details=_details(len(ids), media))


    @_rpc
    async def GetModelInfo(self, request, context):
        rt = self._rt
        info = pb.ModelInfo(
            name=rt.model_name,
            input_token_limit=rt.limits.context_length,
            output_token_limit=rt.limits.context_length - 1,
            vocab_size=rt.config.vocab_size,
            supported_modalities=[_MODALITY[m] for m in rt.media.modalities],
            parameter_count=rt.param_count,
            dtype=rt.config.dtype,
            tokens_per_image=rt.config.vision.tokens_per_image if rt.config.vision else 0,
            audio_tokens_per_second=rt.config.audio.tokens_per_second if rt.config.audio else 0,
            max_media_bytes=rt.media.limits.max_bytes,
        )
        info.max_media_duration.FromMilliseconds(int(rt.media.limits.max_seconds * 1000))
        return info

    @_rpc
    async def GetStats(self, request, context):
        stats = self._rt.engine_loop.stats()
        kv = stats.kv
        return pb.ServerStats(
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            decode_slots=stats.slots,
            prompt_tokens_total=stats.prompt_tokens,
            generated_tokens_total=stats.generated_tokens,
            finished_requests=dict(stats.finished),
            kv_pages_total=kv.allocatable,
            kv_pages_used=kv.used,
            kv_pages_cached=kv.cached,
            kv_pages_pinned=kv.pinned,
            kv_page_tokens=kv.block_size,
            prefix_cache_hit_rate=kv.hit_rate,
            cached_prompt_tokens_total=stats.cached_prompt_tokens,
            preemptions_total=stats.preemptions,
            kv_token_slots_allocated=stats.slots_allocated,
            kv_token_slots_live=stats.slots_live,
        )

    # ---- named caches -------------------------------------------------------------------------

    @_rpc
    async def CreateCache(self, request: pb.CreateCacheRequest, context):
        owner = self._owner(context)
        with self._request_media(owner) as parts:
            return await self._create_cache(request, owner, parts)

    async def _create_cache(self, request: pb.CreateCacheRequest, owner: str,
                            parts: media_lib.RequestMedia) -> pb.CachedContent:
        rt = self._rt
        if not rt.prefix_caching:
            raise FailedPrecondition("named caches need prefix caching, which this server "
                                     "runs without (--no-prefix-caching)")
        check_display_name(request.display_name)
        turns, system = await self._validating(request)(conversation, request, parts)
        try:
            ids = await asyncio.to_thread(prompt_lib.render_prefix, turns, system,
                                          rt.tokenizer)
        except ValueError as error:
            raise FailedPrecondition(f"named caches: {error}") from None
        if len(ids) >= rt.limits.context_length:
            raise InvalidArgument(
                f"contents: {len(ids)} tokens; the model's context is "
                f"{rt.limits.context_length} tokens, leaving no room for a question")
        expire_time = self._expiry(request)
        held = self.caches.list(owner)
        kv = rt.engine_loop.stats().kv
        # Without keys all callers are one owner, who may pin the whole pool (as before keys).
        self._quotas.check_caches(len(held), sum(e.pinned_tokens for e in held), len(ids),
                                  kv.allocatable * kv.block_size,
                                  share_pool=self._keys is not None)
        rows = await rt.embedder.embed_all(media_of(turns))
        name = caches_lib.new_name()
        work = self._with_rope(GenerationRequest(
            request_id=name, prompt_ids=tuple(ids), params=SamplingParams(temperature=0.0),
            max_new_tokens=1, stop_sequences=(), pin_as=name, media=rows), media_of(turns))
        stream = rt.engine_loop.submit(work, time.monotonic())
        entry = None
        try:
            async for event in stream:
                if event.error is not None:
                    raise event.error
                if event.finish_reason is not None:
                    # The TTL runs from now, when the cache exists. No await between the pin and
                    # this: a cancel cannot strand the pages.
                    entry = caches_lib.CacheRegistry.entry(
                        name, request.display_name, turns, system, ids, rows, event.pinned_tokens,
                        max(expire_time, self._expiry(request)), owner=owner)
                    self.caches.add(entry)
        finally:
            if entry is None:
                stream.cancel()
                self._unpin(name)  # in case the pages were pinned as the call went away
        return entry.to_proto()

    def _expiry(self, request, default=caches_lib.DEFAULT_TTL):
        """The expiry a Create/UpdateCache asks for, within this server's maximum TTL."""
        return caches_lib.expiry(
            request.ttl if request.HasField("ttl") else None,
            request.expire_time if request.HasField("expire_time") else None,
            default=default, max_ttl=self._quotas.max_cache_ttl)

    @_rpc
    async def GetCache(self, request: pb.GetCacheRequest, context):
        return (await self.caches.get(request.name, self._owner(context))).to_proto()

    @_rpc
    async def ListCaches(self, request: pb.ListCachesRequest, context):
        entries, token = pagination.page(self.caches.list(self._owner(context)), _order,
                                         request.page_size, request.page_token)
        return pb.ListCachesResponse(cached_contents=[e.to_proto() for e in entries],
                                     next_page_token=token)

    @_rpc
    async def UpdateCache(self, request: pb.UpdateCacheRequest, context):
        entry = await self.caches.get(request.name, self._owner(context))
        self.caches.touch(entry, self._expiry(request, default=None))
        return entry.to_proto()

    @_rpc
    async def DeleteCache(self, request: pb.DeleteCacheRequest, context):
        await self.caches.delete(request.name, self._owner(context))
        return pb.DeleteCacheResponse()

    # ---- media ----------------------------------------------------------------------------------

    @_rpc
    async def UploadMedia(self, requests, context):
        rt = self._rt
        stream = requests.__aiter__()
        first = await anext(stream, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("UploadMedia: the first message must carry the header "
                                  "(mime_type, size_bytes, optional sha256)")
        header = first.header
        modality = media_lib.modality_of(header.mime_type)
        if modality is None:
            raise InvalidArgument(f"UploadMedia: header.mime_type {header.mime_type!r} is not a "
                                  "supported image, audio or video type")
        owner = self._owner(context)
        check_display_name(header.display_name, "UploadMedia: header.display_name")
        held = rt.media_store.list(owner)
        self._quotas.check_uploads(len(held), sum(m.size_bytes for m in held), header.size_bytes)
        upload = rt.media_store.begin(header.mime_type, header.size_bytes, header.sha256)
        stored = None
        try:
            idle = self._quotas.upload_idle_seconds
            while True:
                try:  # a stalled uploader must not hold its reserved bytes forever
                    message = await asyncio.wait_for(anext(stream, None), idle)
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(
                        f"UploadMedia: no data for {idle:g} s (--upload-idle-seconds); the "
                        "upload was dropped") from None
                if message is None:
                    break
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("UploadMedia: only the first message may be a header")
                upload.write(message.chunk)
            sha = upload.finish()
            source = media_lib.MediaSource(
                modality, header.mime_type, sha, path=upload.path,
                video=media_lib.VideoRead() if modality == media_lib.VIDEO else None)
            try:
                tokens = await rt.probes.run(rt.media.describe, source)
            except MediaTooLarge as error:
                raise ResourceExhausted(f"UploadMedia: {error}") from None
            except MediaError as error:
                raise InvalidArgument(f"UploadMedia: {error}") from None
            stored = rt.media_store.commit(upload, sha, header.display_name, tokens, owner)
        finally:
            if stored is None:
                rt.media_store.abandon(upload)
        return _media_proto(stored)

    @_rpc
    async def GetMedia(self, request: pb.GetMediaRequest, context):
        return _media_proto(self._rt.media_store.get(request.name, self._owner(context)))

    @_rpc
    async def ListMedia(self, request: pb.ListMediaRequest, context):
        stored, token = pagination.page(self._rt.media_store.list(self._owner(context)), _order,
                                        request.page_size, request.page_token)
        return pb.ListMediaResponse(media=[_media_proto(m) for m in stored],
                                    next_page_token=token)

    @_rpc
    async def DeleteMedia(self, request: pb.DeleteMediaRequest, context):
        self._rt.media_store.delete(request.name, self._owner(context))
        return pb.DeleteMediaResponse()


def _order(item) -> tuple:
    """List order for caches and uploads: oldest first, names breaking ties."""
    return item.create_time, item.name


def _media_proto(stored) -> pb.Media:
    tokens = stored.info
    message = pb.Media(
        name=stored.name, display_name=stored.display_name, mime_type=stored.mime_type,
        modality=_MODALITY[tokens.source.modality], size_bytes=stored.size_bytes,
        sha256=stored.sha256, width=tokens.width, height=tokens.height,
        token_count=len(tokens.ids))
    if tokens.duration_s is not None:
        message.duration.FromNanoseconds(int(tokens.duration_s * 1e9))
    message.create_time.FromDatetime(stored.create_time)
    message.expire_time.FromDatetime(stored.expire_time)
    return message
