"""The blocking ringserve client.

    with ringserve.Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Tell me a story", max_output_tokens=64):
            print(chunk.text, end="", flush=True)

Every method raises a `ringserve.errors.RingserveError` subclass instead of `grpc.RpcError`.
Deadlines: `timeout` (seconds) on the client is the default for every call; a method's own
`timeout` overrides it. For `generate` the deadline covers the whole stream.

Media parts (`ringserve.Image`, `Audio`, `Video`) in contents go inline while a request's media
bytes fit `max_inline_bytes`; larger ones are uploaded first (UploadMedia, once per content; see
`ringserve.upload`) and sent by name. Those uploads happen when `generate` is called.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence

import grpc

from ringserve import channels, types, upload
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

_UNSET = object()
# Builds a request given how to place media parts (`types.Resolve`).
Build = Callable[[types.Resolve], object]


def _lost_upload(error: NotFound, names: list[str]) -> bool:
    """Whether the server no longer has one of this client's uploads (its message names it)."""
    return any(name in error.details for name in names)


class _Call:
    """The gRPC call behind a Stream, shared by the Stream and its generator. (The generator
    must not hold the Stream: the cycle would keep a dropped stream's call running until the
    cyclic garbage collector ran.)"""

    def __init__(self) -> None:
        self.call = None  # set when the first next() starts the call
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        call = self.call
        if call is not None:
            call.cancel()


class Stream(Iterator[Chunk]):
    """`Client.generate`'s answer: iterate it for `Chunk`s.

    `close()` (or leaving a `for` loop and dropping the stream) cancels the call. `cancel()` may
    be called from any thread or from a signal handler while another thread iterates: it only
    asks gRPC to cancel (thread-safe), and the iteration then ends with `Cancelled`. Raising
    KeyboardInterrupt inside gRPC's wait instead would unwind through its internals.
    """

    def __init__(self, call: _Call, chunks: Iterator[Chunk]) -> None:
        self._call = call
        self._chunks = chunks

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """A connection to one ringserve server. Thread-safe; close it (or use `with`) when done.

    target: "HOST:PORT". api_key: sent on every call (default: $RINGSERVE_API_KEY; "" sends none).
    tls: True (TLS with the system's roots), or the roots to trust (PEM bytes or a file path);
    None: plaintext. credentials: `grpc.ChannelCredentials` instead of `tls` (mutual TLS).
    options: extra gRPC channel options, as `[(name, value), ...]`.
    max_inline_bytes: media bytes one request may carry inline; media past it are uploaded
    first (default 4 MiB less 256 KiB, under gRPC's default 4 MiB message limit).
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
        self._channel = channels.channel(target, options, channels.credentials(tls, credentials),
                                         channels.api_key(api_key))
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(types.HEALTH_CHECK_METHOD)

    @classmethod
    def from_args(cls, args) -> Client:
        """A client from the command line's --target, --timeout, --api-key and --tls."""
        return cls(args.target, timeout=args.timeout, api_key=getattr(args, "api_key", None),
                   tls=getattr(args, "tls", None))

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

    # ---- media parts in requests --------------------------------------------------------------

    def _resolve(self, build: Build, timeout) -> tuple[object, list[str]]:
        """The request `build` makes, its media placed: inline, or uploaded now (large ones not
        uploaded before). Also returns the names of this client's uploads it refers to."""
        request, found = upload.collect_media(build)
        if not found:
            return request, []
        placements = self._media.plan(found)
        for i, p in enumerate(placements):
            if p.part is None:
                info = self._media.lookup(p.upload.sha256)  # the same bytes twice in a request
                if info is None:
                    info = self._upload(p.upload, p.media.display_name, DEFAULT_CHUNK_SIZE,
                                        timeout)
                    self._media.remember(p.upload, info)
                placements[i] = upload.Placement(p.media, part=p.media.file_part(info.name))
        request = build(upload.placed_resolver([p.part for p in placements]))
        return request, upload.auto_uploaded(placements)

    def _unary_media(self, method, build: Build, timeout):
        """A unary call whose request may hold media; uploads the server lost are sent again,
        once."""
        request, names = self._resolve(build, timeout)
        try:
            return self._unary(method, request, timeout)
        except NotFound as e:
            if not _lost_upload(e, names):
                raise
            self._media.forget(names)
            request, _ = self._resolve(build, timeout)
            return self._unary(method, request, timeout)

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
    ) -> Stream:
        """Streams the answer to `contents` as `Chunk`s; the last carries finish_reason and usage.

        contents: a str (one user turn), or a sequence of turns, each a str (a user turn), a
        list of parts (one user turn: strings and `Image` / `Audio` / `Video`, e.g.
        `["Describe this", Image.from_file("cat.png")]`), a `(role, text)` tuple with role "user"
        or "model" (or `(role, [parts])`), a dict `{"role", "parts" | "text"}` or a `Content`.
        Options left as None take the server's defaults (temperature 0 is greedy).
        ignore_eos: keep going past the model's end tokens, to max_output_tokens or a stop
        sequence (fixed-length runs for benchmarks and tests).

        Media: files and bytes go inline while the request's media fit `max_inline_bytes`;
        larger ones are uploaded here, before the call (once per content; with this call's
        timeout), and named by `file_data`. Should the server have lost such an upload, it is
        uploaded again and the call retried, once.

        cached_content: a named cache (its name, or the `CachedContent` from `create_cache`); its
        contents and system instruction come before `contents`, so `system_instruction` must be
        None then. Its pinned prompt tokens are not computed again.

        The call starts on the first `next()`. Leaving the loop early (`break`), or calling the
        stream's `close()`, cancels the call on the server, which stops generating at once.
        `cancel()` does the same from another thread or a signal handler (e.g. Ctrl-C in a chat
        app); the iteration then raises `Cancelled`.
        """
        def build(resolve: types.Resolve) -> pb.GenerateRequest:
            return types.generate_request(
                contents, system_instruction=system_instruction,
                max_output_tokens=max_output_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed, stop_sequences=stop_sequences, ignore_eos=ignore_eos,
                request_id=request_id, cached_content=cached_content, resolve=resolve)

        # Media are placed (and large ones uploaded) now, so a bad file fails here.
        request, names = self._resolve(build, timeout)
        return self._stream(request, self._deadline(timeout), build, names)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None,
                build: Build | None = None, names: Sequence[str] = ()) -> Stream:
        box = _Call()
        return Stream(box, self._chunks(box, request, timeout, build, names))

    def _chunks(self, box: _Call, request: pb.GenerateRequest, timeout: float | None,
                build: Build | None, names: Sequence[str]) -> Iterator[Chunk]:
        call = box.call = self._stub.Generate(request, timeout=timeout)
        if box.cancelled:  # cancel() came before the call existed
            call.cancel()
        started = lost = False
        try:
            for response in call:
                started = True
                yield types.to_chunk(response)
        except grpc.RpcError as e:
            error = from_rpc_error(e)
            lost = (not started and build is not None and isinstance(error, NotFound)
                    and _lost_upload(error, names))
            if not lost:
                raise error from None
        finally:
            # A no-op when the stream ended; otherwise (break, close(), an exception in the
            # consumer, garbage collection) it tells the server to stop generating.
            call.cancel()
        if lost:
            # The server lost an upload before generating anything: upload again, retry once.
            self._media.forget(names)
            request, _ = self._resolve(build, timeout)
            yield from self._chunks(box, request, timeout, None, ())

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
        """`count_tokens` in full: `TokenCount(total_tokens, cached_content_token_count,
        prompt_tokens_details)`, the last split by modality ({"TEXT": n, "IMAGE": m, ...})."""
        def build(resolve: types.Resolve) -> pb.CountTokensRequest:
            return types.count_tokens_request(contents, system_instruction, cached_content,
                                              resolve=resolve)

        return types.to_token_count(self._unary_media(self._stub.CountTokens, build, timeout))

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
        def build(resolve: types.Resolve) -> pb.CreateCacheRequest:
            return types.create_cache_request(
                contents, system_instruction=system_instruction, ttl=ttl,
                expire_time=expire_time, display_name=display_name, resolve=resolve)

        return types.to_cached_content(self._unary_media(self._stub.CreateCache, build, timeout))

    def get_cache(self, name: str | CachedContent, *,
                  timeout: float | None = _UNSET) -> CachedContent:
        """The live cache `name`; `NotFound` when it never existed, was deleted or expired."""
        request = pb.GetCacheRequest(name=types.cache_name(name))
        return types.to_cached_content(self._unary(self._stub.GetCache, request, timeout))

    def _all_pages(self, method, request_type, field: str, convert, timeout) -> list:
        """A List call's items from every page, following next_page_token."""
        items, token = [], ""
        while True:
            response = self._unary(method, request_type(page_token=token), timeout)
            items += [convert(item) for item in getattr(response, field)]
            token = response.next_page_token
            if not token:
                return items

    def list_caches(self, *, timeout: float | None = _UNSET) -> list[CachedContent]:
        """Every live cache of this client's API key, oldest first (all pages)."""
        return self._all_pages(self._stub.ListCaches, pb.ListCachesRequest, "cached_contents",
                                     types.to_cached_content, timeout)

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

    # ---- uploaded media -----------------------------------------------------------------------

    def upload_media(self, source: str | os.PathLike | bytes, mime_type: str | None = None, *,
                     display_name: str = "", chunk_size: int = DEFAULT_CHUNK_SIZE,
                     timeout: float | None = _UNSET) -> MediaInfo:
        """Uploads an image, audio or video file (a path, or bytes) in `chunk_size` chunks.

        A file is hashed in a first pass (the header carries its SHA-256), then streamed from
        disk; it is never read into memory whole. The MIME type comes from the extension unless
        given (bytes need it). Returns the server's `MediaInfo` (name "media/...", duration, size,
        token count, expiry); use it with `Image.from_upload(info)` and the like. Uploads live
        until `delete_media` or the server's media TTL. A file larger than the server takes gives
        `ResourceExhausted`; bytes that are not what the MIME type says, `InvalidArgument`.
        """
        upload.check_chunk_size(chunk_size)
        source = upload.upload_source(source, mime_type)
        info = self._upload(source, display_name, chunk_size, timeout)
        self._media.remember(source, info)  # a part with the same bytes will name this upload
        return info

    def _upload(self, source: upload.UploadSource, display_name: str, chunk_size: int,
                timeout) -> MediaInfo:
        requests = upload.CapturingIterator(
            upload.upload_requests(source, display_name=display_name, chunk_size=chunk_size))
        try:
            media = self._stub.UploadMedia(requests, timeout=self._deadline(timeout))
        except grpc.RpcError as e:
            if requests.error is not None:  # reading the file failed: that is the news
                raise requests.error from None
            raise from_rpc_error(e) from None
        return upload.to_media_info(media)

    def get_media(self, name: str | MediaInfo, *, timeout: float | None = _UNSET) -> MediaInfo:
        """Uploaded media by name; `NotFound` when never uploaded, deleted or expired."""
        request = pb.GetMediaRequest(name=upload.media_name(name))
        return upload.to_media_info(self._unary(self._stub.GetMedia, request, timeout))

    def list_media(self, *, timeout: float | None = _UNSET) -> list[MediaInfo]:
        """Every live upload of this client's API key, oldest first (all pages)."""
        return self._all_pages(self._stub.ListMedia, pb.ListMediaRequest, "media",
                                     upload.to_media_info, timeout)

    def delete_media(self, name: str | MediaInfo, *, timeout: float | None = _UNSET) -> None:
        """Deletes an upload (its disk space is freed at once); `NotFound` if it is not live.
        Requests that name it afterwards fail with `NotFound`."""
        name = upload.media_name(name)
        self._unary(self._stub.DeleteMedia, pb.DeleteMediaRequest(name=name), timeout)
        self._media.forget([name])

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
