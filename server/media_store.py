"""Uploaded media (UploadMedia) kept on disk, by id, until deleted or expired.

Uploads are written chunk by chunk to a file in the store's directory while their SHA-256 is
computed, so a file of any size never sits in memory. An upload is only visible once it is
complete, its size and checksum match the header and its bytes probe as the media they claim to
be (`server/media.py` checks that); an upload that stops midway leaves nothing behind. The store
has a byte budget: a new upload that does not fit after dropping expired media gets
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from server.errors import InvalidArgument, NotFound, ResourceExhausted

NAME_PREFIX = "media/"
DEFAULT_TTL = datetime.timedelta(hours=48)  # as the Gemini Files API


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class StoredMedia:
    name: str
    display_name: str
    mime_type: str
    path: Path
    size_bytes: int
    sha256: str
    create_time: datetime.datetime
    expire_time: datetime.datetime
    info: object = None  # what server/media.py learnt when it probed the bytes
    owner: str = ""  # the API key's name that uploaded it ("" when the server takes no keys)


class Upload:
    """One upload in progress: bytes go to a temporary file; `finish` checks size and checksum."""

    def __init__(self, store: MediaStore, mime_type: str, size_bytes: int, sha256: str):
        self._store, self.mime_type, self.size_bytes = store, mime_type, size_bytes
        self._expected_sha = sha256.lower()
        self._hash = hashlib.sha256()
        self.received = 0
        fd, path = tempfile.mkstemp(dir=store.directory, prefix=".upload-")
        self.path = Path(path)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.size_bytes:
            raise InvalidArgument(
                f"UploadMedia: more bytes than the header's size_bytes={self.size_bytes} "
                f"(at least {self.received + len(chunk)} sent)")
        self._file.write(chunk)
        self._hash.update(chunk)
        self.received += len(chunk)

    def finish(self) -> str:
        """Closes the file; returns the hex SHA-256. Raises InvalidArgument on a short upload or
        a checksum mismatch (the file is removed by `discard`)."""
        self._file.close()
        if self.received != self.size_bytes:
            raise InvalidArgument(
                f"UploadMedia: the upload stopped after {self.received} of the header's "
                f"size_bytes={self.size_bytes} bytes")
        digest = self._hash.hexdigest()
        if self._expected_sha and digest != self._expected_sha:
            raise InvalidArgument(
                f"UploadMedia: sha256 mismatch: the header says {self._expected_sha}, the bytes "
                f"received hash to {digest}")
        return digest

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class MediaStore:
    """Uploaded media by name. Thread-safe: uploads finish on the event loop, reads come from
    preprocessing threads."""

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 budget_bytes: int = 20 << 30, max_bytes: int = 2 << 30,
                 ttl: datetime.timedelta = DEFAULT_TTL):
        self._owned = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="ringserve-media-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget_bytes, self.max_bytes, self.ttl = budget_bytes, max_bytes, ttl
        self._media: dict[str, StoredMedia] = {}
        self._reserved = 0  # bytes of uploads in progress
        # Inline media spooled for ffmpeg, by sha256: [path, bytes, requests using it]. They
        # count against the budget and go when their last request ends.
        self._spools: dict[str, list] = {}
        self._lock = threading.Lock()

    def begin(self, mime_type: str, size_bytes: int, sha256: str) -> Upload:
        """Starts an upload after checking the header against the limits."""
        if size_bytes <= 0:
            raise InvalidArgument(f"UploadMedia: header.size_bytes={size_bytes}; must be > 0")
        if size_bytes > self.max_bytes:
            raise ResourceExhausted(
                f"UploadMedia: {size_bytes} bytes; this server takes media up to "
                f"{self.max_bytes} bytes")
        if sha256 and (len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256)):
            raise InvalidArgument("UploadMedia: header.sha256 must be 64 hex digits (or empty)")
        with self._lock:
            self._expire_locked()
            if self._used_locked() + size_bytes > self.budget_bytes:
                raise ResourceExhausted(
                    f"UploadMedia: the media store is full ({self._used_locked()} of "
                    f"{self.budget_bytes} bytes in use); delete media or retry later")
            self._reserved += size_bytes
        try:
            return Upload(self, mime_type, size_bytes, sha256)
        except BaseException:
            with self._lock:
                self._reserved -= size_bytes
            raise

    def commit(self, upload: Upload, sha256: str, display_name: str, info,
               owner: str = "") -> StoredMedia:
        """Makes a finished, probed upload visible, to `owner` only, under a new name."""
        name = NAME_PREFIX + uuid.uuid4().hex[:16]
        path = self.directory / name.removeprefix(NAME_PREFIX)
        os.replace(upload.path, path)
        now = _now()
        media = StoredMedia(name, display_name, upload.mime_type, path, upload.size_bytes, sha256,
                            now, now + self.ttl, info, owner)
        with self._lock:
            self._reserved -= upload.size_bytes
            self._media[name] = media
        return media

    def abandon(self, upload: Upload) -> None:
        upload.discard()
        with self._lock:
            self._reserved -= upload.size_bytes

    def get(self, name: str, owner: str, *, field: str = "name") -> StoredMedia:
        """`owner`'s live upload called `name`; NOT_FOUND for another owner's (names of others'
        media are not disclosed)."""
        with self._lock:
            self._expire_locked()
            media = self._media.get(name)
        if media is None or media.owner != owner:
            if not name.startswith(NAME_PREFIX):
                raise InvalidArgument(f"{field}: {name!r} is not a media name (media/...)")
            raise NotFound(f"{field}: no media named {name!r} (never uploaded, deleted or "
                           "expired)")
        return media

    def list(self, owner: str) -> list[StoredMedia]:
        """`owner`'s live uploads, oldest first."""
        with self._lock:
            self._expire_locked()
            return sorted((m for m in self._media.values() if m.owner == owner),
                          key=lambda m: (m.create_time, m.name))

    def delete(self, name: str, owner: str) -> None:
        media = self.get(name, owner)
        with self._lock:
            self._media.pop(name, None)
        media.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)

    def spool(self, data: bytes, sha256: str, field: str) -> Path:
        """Inline bytes on disk (for ffmpeg, which seeks), shared by requests with the same
        content; each call holds the file until its `release`. RESOURCE_EXHAUSTED when the
        store's budget has no room."""
        with self._lock:
            held = self._spools.get(sha256)
            if held is not None:
                held[2] += 1
                return held[0]
            if self._used_locked() + len(data) > self.budget_bytes:
                raise ResourceExhausted(
                    f"{field}: {len(data)} bytes to spool, and the media store is full "
                    f"({self._used_locked()} of {self.budget_bytes} bytes in use); send it later "
                    "or upload it")
            path = self.directory / f"inline-{sha256}"
            self._spools[sha256] = [path, len(data), 1]
        try:
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        except BaseException:
            self.release(path)
            raise
        return path

    def release(self, path: Path) -> None:
        """One request is done with a spooled file; the last one deletes it."""
        sha256 = path.name.removeprefix("inline-")
        with self._lock:
            held = self._spools.get(sha256)
            if held is None:
                return
            held[2] -= 1
            if held[2]:
                return
            del self._spools[sha256]
        path.unlink(missing_ok=True)

    @property
    def spooled_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size, _ in self._spools.values())

    def _used_locked(self) -> int:
        return (self._reserved + sum(m.size_bytes for m in self._media.values())
                + sum(size for _, size, _ in self._spools.values()))

    def _expire_locked(self) -> None:
        now = _now()
        for name in [n for n, m in self._media.items() if m.expire_time <= now]:
            self._media.pop(name).path.unlink(missing_ok=True)
