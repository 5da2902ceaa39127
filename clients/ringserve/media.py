"""Media parts for a turn: `Image`, `Audio`, `Video` (and `Media`, their common base).

    turn = ["Describe this picture.", Image.from_file("cat.png")]
    clip = Video.from_file("talk.mp4", start_offset=60, end_offset=90, fps=2)
    client.generate_text([turn])  # a list is one user turn holding several parts

A part holds exactly one source: bytes (`from_bytes`), a path read when a request is built
(`from_file`), or media uploaded earlier (`from_upload`, sent as `file_data`). Whether a file goes
inline or through UploadMedia is the client's choice, made per request (`ringserve.upload`).
Nothing here talks to a server, and nothing is read from disk but a `stat`.
"""

from __future__ import annotations

import dataclasses
import datetime
import mimetypes
import os
from typing import ClassVar, Union

from google.protobuf import duration_pb2

from ringserve.v1 import inference_pb2 as pb

IMAGE, AUDIO, VIDEO = "IMAGE", "AUDIO", "VIDEO"
MEDIA_PREFIX = "media/"
MAX_FPS = 24.0  # VideoMetadata.fps is in (0, 24]

# Extensions whose types the server knows under one name, checked before `mimetypes` (whose answers
# depend on the system's /etc/mime.types and lack .opus, .mkv or .flac on some systems).
_BY_EXTENSION = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jpe": "image/jpeg", ".png": "image/png",
    ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
    ".oga": "audio/ogg", ".opus": "audio/ogg",  # an .opus file is Ogg (RFC 7845)
    ".m4a": "audio/mp4", ".aac": "audio/aac", ".weba": "audio/webm",
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
    ".mkv": "video/x-matroska", ".avi": "video/x-msvideo", ".mpeg": "video/mpeg",
    ".mpg": "video/mpeg", ".3gp": "video/3gpp", ".flv": "video/x-flv",
}
_EXAMPLES = "e.g. 'image/png', 'audio/wav', 'video/mp4'"

Offset = Union[float, int, datetime.timedelta]


def guess_mime_type(path: str | os.PathLike) -> str:
    """The media type of a file from its extension; ValueError when it is not image/audio/video."""
    name = os.fspath(path)
    ext = os.path.splitext(name)[1].lower()
    mime = _BY_EXTENSION.get(ext) or mimetypes.guess_type(name, strict=False)[0]
    if mime is None or modality_of(mime) is None:
        found = f" (its extension says {mime})" if mime else ""
        raise ValueError(f"cannot tell the media type of {name!r} from its extension{found}; "
                         f"pass mime_type= ({_EXAMPLES})")
    return mime


def modality_of(mime_type: str) -> str | None:
    """IMAGE, AUDIO or VIDEO from a MIME type's top-level type ("audio/pcm;rate=16000" is AUDIO)."""
    top = mime_type.split(";")[0].strip().lower().split("/")[0]
    return {"image": IMAGE, "audio": AUDIO, "video": VIDEO}.get(top)


def _seconds(value: Offset | None, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{field} must be seconds (a number) or a datetime.timedelta, "
                        f"not {type(value).__name__}")
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{field} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def _duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


@dataclasses.dataclass(frozen=True)
class Media:
    """One media part: exactly one of `data` (inline bytes), `path` (a file, read when a request
    is built) or `file_uri` (uploaded media, "media/{id}").

    Build parts with the class methods; `Media.from_file` / `from_bytes` pick `Image`, `Audio`
    or `Video` from the MIME type, and a subclass's own insists on its modality.
    """

    mime_type: str = ""  # may be empty only for `file_uri` (the server knows the upload's type)
    data: bytes | None = dataclasses.field(default=None, repr=False)
    path: str | None = None
    file_uri: str | None = None

    MODALITY: ClassVar[str | None] = None  # IMAGE, AUDIO, VIDEO; None: any (the base class)

    def __post_init__(self) -> None:
        sources = [n for n in ("data", "path", "file_uri") if getattr(self, n) is not None]
        if len(sources) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one of data, path or file_uri "
                             f"(got {', '.join(sources) or 'none'})")
        if self.data is not None:
            if not isinstance(self.data, (bytes, bytearray, memoryview)):
                raise TypeError(f"data must be bytes, not {type(self.data).__name__}")
            object.__setattr__(self, "data", bytes(self.data))
            if not self.data:
                raise ValueError(f"{type(self).__name__}: data is empty")
        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.file_uri is not None and not self.file_uri.startswith(MEDIA_PREFIX):
            raise ValueError(f"file_uri {self.file_uri!r} is not an uploaded media name "
                             f"({MEDIA_PREFIX}...; see Client.upload_media)")
        if not self.mime_type and self.file_uri is None:
            raise ValueError(f"{type(self).__name__}: mime_type is required for inline data "
                             f"and files ({_EXAMPLES})")
        if self.mime_type:
            modality = modality_of(self.mime_type)
            if modality is None:
                raise ValueError(f"mime_type {self.mime_type!r} is not an image, audio or video "
                                 f"type ({_EXAMPLES})")
            if self.MODALITY is not None and modality != self.MODALITY:
                raise ValueError(
                    f"{self._what()}: mime_type {self.mime_type!r} is {modality.lower()}, not "
                    f"{self.MODALITY.lower()}; use {_CLASS_NAMES[modality]} instead of "
                    f"{type(self).__name__}")

    def _what(self) -> str:
        if self.path is not None:
            return repr(self.path)
        return self.file_uri or f"inline data ({len(self.data)} bytes)"

    @property
    def modality(self) -> str | None:
        """IMAGE, AUDIO or VIDEO; None for an upload named without its type."""
        return self.MODALITY or (modality_of(self.mime_type) if self.mime_type else None)

    @property
    def display_name(self) -> str:
        """The file's base name, the upload's name, or "" for bytes."""
        if self.path is not None:
            return os.path.basename(self.path)
        return self.file_uri or ""

    # ---- constructors ---------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, mime_type: str | None = None, **options) -> Media:
        """A file, read when a request is built (inline, or uploaded once when large).

        The MIME type comes from the extension unless given. FileNotFoundError / IsADirectoryError
        at once when `path` is not a file, so a typo shows here and not at the request.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        if not os.path.isfile(path):
            raise IsADirectoryError(f"{path}: not a regular file")
        mime_type = mime_type or guess_mime_type(path)
        return cls._for(mime_type, path)(mime_type=mime_type, path=path, **options)

    @classmethod
    def from_bytes(cls, data: bytes, mime_type: str, **options) -> Media:
        """Bytes already in memory, e.g. `Image.from_bytes(png, "image/png")`."""
        return cls._for(mime_type, "the bytes")(mime_type=mime_type, data=data, **options)

    @classmethod
    def from_upload(cls, media, mime_type: str | None = None, **options) -> Media:
        """Media uploaded earlier (`Client.upload_media`): a `MediaInfo` or its name "media/...".

        With a `MediaInfo` the type is known; with a bare name the base class sends no type (the
        server uses the upload's), while `Image` / `Audio` / `Video` check what they can.
        """
        name = getattr(media, "name", media)
        if not isinstance(name, str):
            raise TypeError(f"from_upload takes a MediaInfo or a name 'media/...', "
                            f"not {type(media).__name__}")
        mime_type = mime_type or getattr(media, "mime_type", "") or ""
        target = cls._for(mime_type, name) if mime_type else cls
        return target(mime_type=mime_type, file_uri=name, **options)

    @classmethod
    def _for(cls, mime_type: str, what: str) -> type[Media]:
        """The class for `mime_type`: the subclass its modality names when called on `Media`."""
        if cls.MODALITY is not None:
            return cls
        modality = modality_of(mime_type)
        if modality is None:
            raise ValueError(f"{what}: mime_type {mime_type!r} is not an image, audio or video "
                             f"type ({_EXAMPLES})")
        return _CLASSES[modality]

    # ---- the wire ---------------------------------------------------------------------------

    def size(self) -> int:
        """Bytes the part would send inline (the file's size now); 0 for an upload."""
        if self.data is not None:
            return len(self.data)
        if self.path is not None:
            return os.stat(self.path).st_size
        return 0

    def _metadata(self) -> pb.VideoMetadata | None:
        return None

    def inline_part(self) -> pb.Part:
        """This part as `inline_data` (a file is read whole now) or, for uploads, `file_data`."""
        if self.file_uri is not None:
            return self.file_part(self.file_uri)
        data = self.data
        if data is None:
            with open(self.path, "rb") as f:
                data = f.read()
        return pb.Part(inline_data=pb.Blob(mime_type=self.mime_type, data=data),
                       video_metadata=self._metadata())

    def file_part(self, file_uri: str) -> pb.Part:
        """This part as `file_data` naming `file_uri` (its own, or where the client uploaded it)."""
        return pb.Part(file_data=pb.FileData(mime_type=self.mime_type, file_uri=file_uri),
                       video_metadata=self._metadata())


@dataclasses.dataclass(frozen=True)
class Image(Media):
    """An image part (JPEG, PNG, WebP, GIF, BMP, TIFF)."""

    MODALITY: ClassVar[str | None] = IMAGE


@dataclasses.dataclass(frozen=True)
class Audio(Media):
    """An audio part (WAV, FLAC, MP3, Ogg, raw "audio/pcm;rate=16000", ...)."""

    MODALITY: ClassVar[str | None] = AUDIO


@dataclasses.dataclass(frozen=True)
class Video(Media):
    """A video part, optionally clipped and sampled (the proto's `video_metadata`).

    start_offset / end_offset: seconds (numbers) or timedeltas; None = the start / the end.
    fps: frames sampled per second, in (0, 24]; None = the server's default (1).
    """

    start_offset: Offset | None = None
    end_offset: Offset | None = None
    fps: float | None = None

    MODALITY: ClassVar[str | None] = VIDEO

    def __post_init__(self) -> None:
        super().__post_init__()
        start = _seconds(self.start_offset, "start_offset")
        end = _seconds(self.end_offset, "end_offset")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"end_offset ({end:g} s) must come after start_offset "
                             f"({start:g} s)")
        if self.fps is not None:
            if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)):
                raise TypeError(f"fps must be a number, not {type(self.fps).__name__}")
            if not 0 < self.fps <= MAX_FPS:
                raise ValueError(f"fps must be in (0, {MAX_FPS:g}] frames per second, "
                                 f"got {self.fps!r}")

    def _metadata(self) -> pb.VideoMetadata | None:
        if self.start_offset is None and self.end_offset is None and self.fps is None:
            return None
        start = _seconds(self.start_offset, "start_offset")
        end = _seconds(self.end_offset, "end_offset")
        return pb.VideoMetadata(
            start_offset=None if start is None else _duration(start),
            end_offset=None if end is None else _duration(end), fps=self.fps or 0.0)


_CLASSES: dict[str, type[Media]] = {IMAGE: Image, AUDIO: Audio, VIDEO: Video}
_CLASS_NAMES = {modality: cls.__name__ for modality, cls in _CLASSES.items()}
