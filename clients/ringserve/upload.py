"""Uploading media (UploadMedia) and deciding, per request, which media parts go inline.

The upload stream is built here for both clients: a header (MIME type, size, SHA-256), then the
bytes in chunks read from disk one at a time, so a file of any size never sits in memory. The
SHA-256 needs a first pass over the file (the header carries it and comes first).

`MediaPlanner` chooses for each media part of a request: inline while the request's inline bytes
stay under `max_inline_bytes` (gRPC's default message limit is 4 MiB), else uploaded, once per
client and content (keyed by SHA-256), and sent as `file_data`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar, Union

from ringserve.media import Media, guess_mime_type
from ringserve.v1 import inference_pb2 as pb

MiB = 1 << 20
DEFAULT_CHUNK_SIZE = 1 * MiB
# A chunk message is the bytes plus a few bytes of framing; it must pass gRPC's 4 MiB default.
MAX_CHUNK_SIZE = 4 * MiB - 1024
# Inline media bytes per request: 4 MiB less room for the request's text and framing.
DEFAULT_MAX_INLINE_BYTES = 4 * MiB - 256 * 1024
# An upload this close to its expiry is uploaded again rather than named in a request.
_EXPIRY_MARGIN = datetime.timedelta(minutes=5)
_HASH_BLOCK = 1 * MiB
_RACY_SECONDS = 2.0  # mtimes tick coarsely on some filesystems (FAT: 2 s)

T = TypeVar("T")
Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """Uploaded media (UploadMedia, GetMedia, ListMedia). Times are aware UTC datetimes.

    Pass it to `Image.from_upload` / `Audio...` / `Video...` (or `Media.from_upload`) to use it in
    a turn.
    """

    name: str  # "media/{id}", chosen by the server
    display_name: str
    mime_type: str
    modality: str  # "IMAGE", "AUDIO", "VIDEO"
    size_bytes: int
    sha256: str  # hex
    duration: float | None  # seconds; audio and video only
    width: int | None  # images and videos (before resizing)
    height: int | None
    token_count: int  # tokens the whole media adds to a prompt (video: at 1 fps, with its sound)
    create_time: datetime.datetime | None
    expire_time: datetime.datetime | None


def _datetime(message, field: str) -> datetime.datetime | None:
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=datetime.timezone.utc)


def to_media_info(media: pb.Media) -> MediaInfo:
    duration = media.duration.ToNanoseconds() / 1e9 if media.HasField("duration") else None
    return MediaInfo(
        name=media.name, display_name=media.display_name, mime_type=media.mime_type,
        modality=pb.Modality.Name(media.modality), size_bytes=media.size_bytes,
        sha256=media.sha256, duration=duration, width=media.width or None,
        height=media.height or None, token_count=media.token_count,
        create_time=_datetime(media, "create_time"), expire_time=_datetime(media, "expire_time"))


def media_name(media: str | MediaInfo) -> str:
    if isinstance(media, MediaInfo):
        return media.name
    if isinstance(media, str):
        return media
    raise TypeError(f"pass a media name ('media/...') or a MediaInfo, not {type(media).__name__}")


# ---- the upload stream -------------------------------------------------------------------------

def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, hex SHA-256) of a file, read block by block."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


@dataclasses.dataclass(frozen=True)
class UploadSource:
    """What to upload: a file path or bytes, with its header fields worked out."""

    mime_type: str
    size_bytes: int
    sha256: str
    path: str | None = None
    data: bytes | None = dataclasses.field(default=None, repr=False)


def upload_source(source: Source, mime_type: str | None = None, *,
                  sha256: str | None = None) -> UploadSource:
    """Checks `source` and hashes it (a file: one pass from disk). `sha256` skips the hashing
    when the caller already knows it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not mime_type:
            raise ValueError(f"uploading bytes needs mime_type= (e.g. 'image/png', 'audio/wav', "
                             f"'video/mp4'); {len(data)} bytes given")
        if not data:
            raise ValueError("nothing to upload: the bytes are empty")
        return UploadSource(mime_type, len(data), sha256 or hashlib.sha256(data).hexdigest(),
                            data=data)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"upload a path or bytes, not {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise IsADirectoryError(f"{path}: not a regular file")
    mime_type = mime_type or guess_mime_type(path)
    if sha256 is None:
        size, sha256 = file_digest(path)
    else:
        size = os.stat(path).st_size
    if size == 0:
        raise ValueError(f"nothing to upload: {path} is empty")
    return UploadSource(mime_type, size, sha256, path=path)


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
            0 < chunk_size <= MAX_CHUNK_SIZE):
        raise ValueError(f"chunk_size must be an int in [1, {MAX_CHUNK_SIZE}] bytes "
                         f"(gRPC's 4 MiB message limit), got {chunk_size!r}")


def upload_requests(source: UploadSource, *, display_name: str = "",
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[pb.UploadMediaRequest]:
    """The UploadMedia request stream: the header, then `chunk_size`-byte chunks (the last may be
    shorter). A file is read chunk by chunk as the stream is consumed, and never past the size
    the header announced (a file that grew meanwhile fails the server's checksum instead)."""
    check_chunk_size(chunk_size)
    yield pb.UploadMediaRequest(header=pb.MediaHeader(
        mime_type=source.mime_type, display_name=display_name, size_bytes=source.size_bytes,
        sha256=source.sha256))
    if source.data is not None:
        view = memoryview(source.data)
        for start in range(0, len(view), chunk_size):
            yield pb.UploadMediaRequest(chunk=bytes(view[start:start + chunk_size]))
        return
    left = source.size_bytes
    with open(source.path, "rb") as f:
        while left > 0:
            chunk = f.read(min(chunk_size, left))
            if not chunk:
                return  # the file shrank: the server reports the short upload
            left -= len(chunk)
            yield pb.UploadMediaRequest(chunk=chunk)


class CapturingIterator:
    """Wraps the request stream so an error reading the file (which gRPC would only report as a
    cancelled call) can be raised as itself after the call fails."""

    def __init__(self, requests: Iterator[pb.UploadMediaRequest]):
        self._requests = requests
        self.error: BaseException | None = None

    def __iter__(self) -> CapturingIterator:
        return self

    def __next__(self) -> pb.UploadMediaRequest:
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise


# ---- inline or uploaded, per request -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Placement:
    """How one media part of a request is sent: `part` when decided, else `upload` to run first."""

    media: Media
    part: pb.Part | None = None
    upload: UploadSource | None = None


class MediaPlanner:
    """Decides inline or uploaded for the media parts of each request, and remembers uploads.

    Thread-safe. Two threads sending the same new large file at once may both upload it (the
    later upload wins the cache); nothing else is shared.
    """

    def __init__(self, max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES):
        if isinstance(max_inline_bytes, bool) or not isinstance(max_inline_bytes, int) or (
                max_inline_bytes < 0):
            raise ValueError(f"max_inline_bytes must be an int >= 0, got {max_inline_bytes!r}")
        self.max_inline_bytes = max_inline_bytes
        self._lock = threading.Lock()
        self._uploaded: dict[str, MediaInfo] = {}  # sha256 -> the upload holding those bytes
        # (path, inode, size, mtime_ns) -> sha256: a file sent again (every chat turn resends
        # the history) is not hashed again while it is unchanged.
        self._file_sha: dict[tuple[str, int, int, int], str] = {}

    def plan(self, media: list[Media]) -> list[Placement]:
        """One `Placement` per part, in order. Parts go inline, in order, while the total inline
        bytes fit `max_inline_bytes`; larger ones are matched against earlier uploads by content
        or marked for upload. Reads files (inline ones whole, others hashed)."""
        budget = self.max_inline_bytes
        placements = []
        for m in media:
            if m.file_uri is not None:
                placements.append(Placement(m, part=m.file_part(m.file_uri)))
                continue
            size = m.size()
            if size <= budget:
                budget -= size
                placements.append(Placement(m, part=m.inline_part()))
                continue
            source = self._source(m)
            known = self.lookup(source.sha256)
            if known is not None:
                placements.append(Placement(m, part=m.file_part(known.name)))
            else:
                placements.append(Placement(m, upload=source))
        return placements

    def _source(self, m: Media) -> UploadSource:
        if m.data is not None:
            return upload_source(m.data, m.mime_type)
        st = os.stat(m.path)
        key = (os.path.realpath(m.path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            sha = self._file_sha.get(key)
        source = upload_source(m.path, m.mime_type, sha256=sha)
        # As git's "racily clean" rule: a file modified within the clock's granularity of now
        # could change again under the same mtime, so its hash is not remembered yet.
        if time.time() - st.st_mtime > _RACY_SECONDS:
            with self._lock:
                self._file_sha[key] = source.sha256
        return source

    def lookup(self, sha256: str) -> MediaInfo | None:
        """This client's live upload of the bytes hashing to `sha256`, if any."""
        now = datetime.datetime.now(datetime.timezone.utc)
        with self._lock:
            info = self._uploaded.get(sha256)
            if info is not None and info.expire_time is not None and (
                    info.expire_time - _EXPIRY_MARGIN <= now):
                del self._uploaded[sha256]
                return None
            return info

    def remember(self, source: UploadSource, info: MediaInfo) -> None:
        with self._lock:
            self._uploaded[source.sha256] = info

    def forget(self, names) -> None:
        """Drops uploads by name (deleted, or gone from the server)."""
        names = set(names)
        with self._lock:
            for sha in [s for s, info in self._uploaded.items() if info.name in names]:
                del self._uploaded[sha]


def collect_media(build: Callable[[Callable[[Media], pb.Part]], T]) -> tuple[T, list[Media]]:
    """Runs `build(resolve)` with a `resolve` that records each media part (in order) and
    returns an empty placeholder part. Returns the request and the parts: with none, the request
    is final; otherwise build again once the parts are placed (`placed_resolver`)."""
    found: list[Media] = []

    def record(media: Media) -> pb.Part:
        found.append(media)
        return pb.Part()

    return build(record), found


def placed_resolver(parts: list[pb.Part]) -> Callable[[Media], pb.Part]:
    """A `resolve` handing out `parts` in the order `collect_media` met their media."""
    it = iter(parts)
    return lambda media: next(it)


def auto_uploaded(placements: list[Placement]) -> list[str]:
    """Names of this client's own uploads that the placed parts refer to, for one retry should
    the server have lost them (restarted, or deleted by someone else)."""
    return [p.part.file_data.file_uri for p in placements
            if p.media.file_uri is None and p.part.WhichOneof("data") == "file_data"]
