"""The SDK's media support: parts (Image, Audio, Video), inline vs uploaded placement, the
UploadMedia request stream, MediaInfo and per-modality token counts, the chat's /image, /audio
and /video, and the `upload` / `media` CLI commands.

The end-to-end tests here talk over real gRPC to `FakeMediaServer` below, an in-process fake of
the wire protocol only (the server's media RPCs were not written yet when these were). It keeps
uploads in memory and checks each upload as the protocol says (header first, exact size,
SHA-256); its CountTokens and Generate only record the request and answer with counts from a
fixed rule, with no model. The end-to-end tests against the real ringserve server live in
tests/test_media_e2e.py, written by the server engineer.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import json
import os
import threading
import tracemalloc
import types as pytypes
from concurrent import futures

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

import ringserve
from ringserve import chat as chat_lib
from ringserve import cli, types, upload
from ringserve.media import Audio, Image, Media, Video, guess_mime_type
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc

KiB = 1024
MiB = 1024 * KiB


def _write(path, size: int, seed: int = 0) -> bytes:
    """`size` deterministic pseudo-random bytes (no two chunks alike), written to `path`."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    data = bytes(out[:size])
    with open(path, "wb") as f:
        f.write(data)
    return data


# ---- the fake server -------------------------------------------------------------------------

# The fake's token rule, per part: TEXT one token per word; each image 18, each audio 10 (plus
# nothing else), each video 40 VIDEO + 7 AUDIO (its sound) + 2 TEXT (timestamps).
FAKE_TOKENS = {"IMAGE": {"IMAGE": 18}, "AUDIO": {"AUDIO": 10},
               "VIDEO": {"VIDEO": 40, "AUDIO": 7, "TEXT": 2}}


class FakeMediaServer(pb_grpc.InferenceServicer):
    """Upload/Get/List/DeleteMedia kept in memory; CountTokens and Generate record requests."""

    def __init__(self):
        self.media: dict[str, tuple[pb.Media, bytes]] = {}
        self.uploads: list[list[int]] = []  # chunk sizes of each upload, in order
        self.requests: list = []  # CountTokens / Generate requests, in order
        self._lock = threading.Lock()
        self._next = 0

    # -- media --
    def UploadMedia(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "UploadMedia: header must come first")
        header = first.header
        sha, chunks, data = hashlib.sha256(), [], bytearray()
        for message in request_iterator:
            if message.WhichOneof("payload") != "chunk":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "UploadMedia: a second header")
            chunks.append(len(message.chunk))
            sha.update(message.chunk)
            data += message.chunk
        if len(data) != header.size_bytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"UploadMedia: the upload stopped after {len(data)} of the header's "
                          f"size_bytes={header.size_bytes} bytes")
        if header.sha256 and header.sha256 != sha.hexdigest():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "UploadMedia: sha256 mismatch")
        with self._lock:
            name = f"media/{self._next:04d}"
            self._next += 1
            modality = ringserve.media.modality_of(header.mime_type)
            media = pb.Media(
                name=name, display_name=header.display_name, mime_type=header.mime_type,
                modality=pb.Modality.Value(modality), size_bytes=len(data),
                sha256=sha.hexdigest(), token_count=sum(FAKE_TOKENS[modality].values()),
                create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
                expire_time=timestamp_pb2.Timestamp(seconds=4_000_000_000))
            self.media[name] = (media, bytes(data))
            self.uploads.append(chunks)
        return media

    def _get(self, name, context, field="name"):
        with self._lock:
            found = self.media.get(name)
        if found is None:  # worded as the real server words it: the name is in the message
            context.abort(grpc.StatusCode.NOT_FOUND, f"{field}: no media named {name!r}")
        return found

    def GetMedia(self, request, context):
        return self._get(request.name, context)[0]

    def ListMedia(self, request, context):
        with self._lock:
            return pb.ListMediaResponse(media=[m for m, _ in self.media.values()])

    def DeleteMedia(self, request, context):
        self._get(request.name, context)
        with self._lock:
            del self.media[request.name]
        return pb.DeleteMediaResponse()

    # -- record-only prompt RPCs --
    def _count(self, contents, context) -> dict[str, int]:
        counts: dict[str, int] = {}
        for content in contents:
            for part in content.parts:
                kind = part.WhichOneof("data")
                if kind == "text":
                    add = {"TEXT": len(part.text.split())}
                else:
                    mime = part.inline_data.mime_type
                    if kind == "file_data":
                        media, _ = self._get(part.file_data.file_uri, context,
                                             "contents.parts.file_data.file_uri")
                        mime = media.mime_type
                    add = FAKE_TOKENS[ringserve.media.modality_of(mime)]
                for modality, n in add.items():
                    counts[modality] = counts.get(modality, 0) + n
        return counts

    def _details(self, counts):
        return [pb.ModalityTokenCount(modality=pb.Modality.Value(m), token_count=n)
                for m, n in counts.items()]

    def CountTokens(self, request, context):
        self.requests.append(request)
        counts = self._count(request.contents, context)
        return pb.CountTokensResponse(total_tokens=sum(counts.values()),
                                      prompt_tokens_details=self._details(counts))

    def Generate(self, request, context):
        self.requests.append(request)
        counts = self._count(request.contents, context)
        prompt = sum(counts.values())
        yield pb.GenerateResponse(request_id="r", text="ok", token_ids=[1])
        yield pb.GenerateResponse(
            request_id="r", finish_reason=pb.GenerateResponse.STOP,
            usage_metadata=pb.UsageMetadata(
                prompt_token_count=prompt, candidates_token_count=1, total_token_count=prompt + 1,
                prompt_tokens_details=self._details(counts)))

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(name="fake-media")

    def forget_all(self):
        """As a restarted server: every upload gone."""
        with self._lock:
            self.media.clear()


@pytest.fixture
def fake():
    servicer = FakeMediaServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None)


def _kinds(request) -> list[tuple[str, str]]:
    """(part kind, its mime type or text) for every part of a recorded request, in order."""
    out = []
    for content in request.contents:
        for part in content.parts:
            kind = part.WhichOneof("data")
            detail = {"text": lambda: part.text,
                      "inline_data": lambda: part.inline_data.mime_type,
                      "file_data": lambda: part.file_data.file_uri}[kind]()
            out.append((kind, detail))
    return out


# ---- parts and MIME types, no server --------------------------------------------------------

@pytest.mark.parametrize("name, mime", [
    ("cat.png", "image/png"), ("CAT.JPG", "image/jpeg"), ("a.jpeg", "image/jpeg"),
    ("a.webp", "image/webp"), ("a.tiff", "image/tiff"),
    ("a.wav", "audio/wav"), ("a.flac", "audio/flac"), ("a.mp3", "audio/mpeg"),
    ("a.opus", "audio/ogg"), ("a.ogg", "audio/ogg"), ("a.m4a", "audio/mp4"),
    ("a.mp4", "video/mp4"), ("a.webm", "video/webm"), ("a.mkv", "video/x-matroska"),
    ("a.mov", "video/quicktime"), ("dir.d/clip.avi", "video/x-msvideo"),
])
def test_mime_type_from_extension(name, mime):
    assert guess_mime_type(name) == mime


@pytest.mark.parametrize("name", ["notes.txt", "blob.zzz", "noextension", "page.html"])
def test_unguessable_mime_type_says_what_to_pass(name):
    with pytest.raises(ValueError, match=r"cannot tell the media type of .*pass mime_type="):
        guess_mime_type(name)


def test_from_file_checks_the_path_and_kind_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        Image.from_file(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError, match="not a regular file"):
        Image.from_file(tmp_path)
    song = tmp_path / "song.wav"
    _write(song, 100)
    with pytest.raises(ValueError, match=r"'audio/wav' is audio, not image; use Audio"):
        Image.from_file(song)
    # An explicit type wins over the extension; the base class picks the kind from it.
    assert type(Media.from_file(song)) is Audio
    assert Media.from_file(song, "video/webm").mime_type == "video/webm"
    assert type(Media.from_file(song, "video/webm")) is Video
    with pytest.raises(ValueError, match="is not an image, audio or video type"):
        Media.from_file(song, "text/plain")
    with pytest.raises(ValueError, match="data is empty"):
        Image.from_bytes(b"", "image/png")


def test_from_file_reads_lazily(tmp_path):
    path = tmp_path / "cat.png"
    _write(path, 10, seed=1)
    image = Image.from_file(path)
    assert (image.path, image.mime_type, image.data) == (str(path), "image/png", None)
    data = _write(path, 20, seed=2)  # changed after the part was made: the request has the new
    part = image.inline_part()
    assert part.inline_data.data == data and part.inline_data.mime_type == "image/png"
    assert not part.HasField("video_metadata")


def test_video_metadata_fields():
    video = Video.from_bytes(b"\0" * 8, "video/mp4", start_offset=1.5,
                             end_offset=datetime.timedelta(seconds=90), fps=2)
    meta = video.inline_part().video_metadata
    assert (meta.start_offset.seconds, meta.start_offset.nanos) == (1, 500_000_000)
    assert (meta.end_offset.seconds, meta.end_offset.nanos) == (90, 0)
    assert meta.fps == 2.0
    # Unset fields stay unset (the server's defaults: the end, 1 fps).
    meta = Video.from_bytes(b"\0", "video/mp4", start_offset=10).inline_part().video_metadata
    assert meta.HasField("start_offset") and not meta.HasField("end_offset") and meta.fps == 0
    assert not Video.from_bytes(b"\0", "video/mp4").inline_part().HasField("video_metadata")
    # The same metadata travels with an uploaded video.
    part = Video.from_upload("media/abc", start_offset=3, fps=0.5).inline_part()
    assert part.file_data.file_uri == "media/abc" and part.file_data.mime_type == ""
    assert part.video_metadata.start_offset.seconds == 3 and part.video_metadata.fps == 0.5


@pytest.mark.parametrize("options, message", [
    ({"start_offset": 5, "end_offset": 5}, r"end_offset \(5 s\) must come after start_offset"),
    ({"start_offset": -1}, r"start_offset must be a finite number of seconds >= 0"),
    ({"end_offset": float("nan")}, r"end_offset must be a finite number"),
    ({"fps": 0}, r"fps must be in \(0, 24\]"),
    ({"fps": 25}, r"fps must be in \(0, 24\]"),
])
def test_video_metadata_errors(options, message):
    with pytest.raises(ValueError, match=message):
        Video.from_bytes(b"\0", "video/mp4", **options)


def test_from_upload():
    info = upload.to_media_info(pb.Media(name="media/x1", mime_type="audio/flac",
                                         modality=pb.AUDIO))
    part = Media.from_upload(info)
    assert type(part) is Audio and part.file_uri == "media/x1" and part.mime_type == "audio/flac"
    assert part.inline_part().file_data.mime_type == "audio/flac"
    bare = Media.from_upload("media/x2")
    assert type(bare) is Media and bare.modality is None
    assert type(Image.from_upload("media/x3")) is Image
    with pytest.raises(ValueError, match="'audio/flac' is audio, not image"):
        Image.from_upload(info)
    with pytest.raises(ValueError, match=r"not an uploaded media name \(media/\.\.\."):
        Media.from_upload("cachedContents/abc")


def test_turns_mix_text_and_media():
    image = Image.from_bytes(b"png!", "image/png")
    audio = Audio.from_bytes(b"RIFF", "audio/wav")
    contents = types.to_contents([
        ["Describe this", image],                         # a list: one user turn
        ("model", "A cat."),
        ("user", [audio, "And this?"]),
        {"role": "user", "parts": ["and", audio]},
    ])
    assert [(c.role, [p.WhichOneof("data") for p in c.parts]) for c in contents] == [
        ("user", ["text", "inline_data"]), ("model", ["text"]),
        ("user", ["inline_data", "text"]), ("user", ["text", "inline_data"])]
    assert contents[0].parts[1].inline_data.data == b"png!"
    # A single media part, or a (role, parts) pair, may stand alone as the contents.
    assert [c.role for c in types.to_contents(image)] == ["user"]
    assert len(types.to_contents(("user", ["Describe", image]))) == 1
    # Text-only forms keep their meaning: two strings are two turns.
    assert [c.role for c in types.to_contents(["a", "b"])] == ["user", "user"]
    # A bare part among turns would silently be a turn of its own: refused, with the fix.
    with pytest.raises(TypeError, match=r"contents\[1\] is a bare Image.*\[\['Describe this'"):
        types.to_contents(["Describe this", image])
    with pytest.raises(ValueError, match="list of parts is empty"):
        types.to_contents([[]])


# ---- the upload stream, no server -----------------------------------------------------------

def test_upload_stream_header_then_chunks(tmp_path):
    path = tmp_path / "clip.mp4"
    data = _write(path, 2 * MiB + 123)
    source = upload.upload_source(path)
    assert (source.mime_type, source.size_bytes) == ("video/mp4", len(data))
    assert source.sha256 == hashlib.sha256(data).hexdigest()
    stream = upload.upload_requests(source, display_name="clip", chunk_size=MiB)
    assert isinstance(stream, pytypes.GeneratorType)
    messages = list(stream)
    header = messages[0].header
    assert messages[0].WhichOneof("payload") == "header"
    assert (header.mime_type, header.display_name, header.size_bytes, header.sha256) == (
        "video/mp4", "clip", len(data), hashlib.sha256(data).hexdigest())
    assert [m.WhichOneof("payload") for m in messages[1:]] == ["chunk"] * 3
    assert [len(m.chunk) for m in messages[1:]] == [MiB, MiB, 123]
    assert b"".join(m.chunk for m in messages[1:]) == data

    # Bytes are chunked the same way, and need a type.
    messages = list(upload.upload_requests(upload.upload_source(data, "video/mp4"),
                                           chunk_size=MiB))
    assert b"".join(m.chunk for m in messages[1:]) == data
    assert messages[0].header.sha256 == header.sha256
    with pytest.raises(ValueError, match="uploading bytes needs mime_type="):
        upload.upload_source(data)
    with pytest.raises(ValueError, match=r"chunk_size must be an int in \[1, 4193280\]"):
        list(upload.upload_requests(source, chunk_size=4 * MiB))


def test_upload_stream_memory_is_one_chunk_not_the_file(tmp_path):
    # 16 MiB streamed in 64 KiB chunks: Python allocations peak near one chunk (and the hashing
    # pass near one 1 MiB block), far below the file's size.
    path = tmp_path / "big.webm"
    _write(path, 16 * MiB)
    tracemalloc.start()
    try:
        source = upload.upload_source(path)
        _, hash_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        for message in upload.upload_requests(source, chunk_size=64 * KiB):
            total += len(message.chunk)
        _, stream_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 16 * MiB
    assert hash_peak < 3 * MiB, hash_peak
    assert stream_peak < 512 * KiB, stream_peak


def test_media_info_and_counts_conversion():
    message = pb.Media(
        name="media/abc", display_name="talk", mime_type="video/mp4", modality=pb.VIDEO,
        size_bytes=123456, sha256="ab" * 32, duration=duration_pb2.Duration(seconds=61,
                                                                            nanos=500_000_000),
        width=640, height=360, token_count=1234,
        create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        expire_time=timestamp_pb2.Timestamp(seconds=1_700_172_800))
    info = upload.to_media_info(message)
    utc = datetime.timezone.utc
    assert info == upload.MediaInfo(
        name="media/abc", display_name="talk", mime_type="video/mp4", modality="VIDEO",
        size_bytes=123456, sha256="ab" * 32, duration=61.5, width=640, height=360,
        token_count=1234, create_time=datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=utc),
        expire_time=datetime.datetime(2023, 11, 16, 22, 13, 20, tzinfo=utc))
    audio = upload.to_media_info(pb.Media(name="media/a", modality=pb.AUDIO))
    assert (audio.duration, audio.width, audio.height, audio.create_time) == (
        None, None, None, None)

    details = [pb.ModalityTokenCount(modality=pb.TEXT, token_count=12),
               pb.ModalityTokenCount(modality=pb.IMAGE, token_count=256),
               pb.ModalityTokenCount(modality=pb.AUDIO, token_count=30),
               pb.ModalityTokenCount(modality=pb.AUDIO, token_count=5)]
    count = types.to_token_count(pb.CountTokensResponse(total_tokens=303,
                                                        prompt_tokens_details=details))
    assert count.prompt_tokens_details == {"TEXT": 12, "IMAGE": 256, "AUDIO": 35}
    chunk = types.to_chunk(pb.GenerateResponse(usage_metadata=pb.UsageMetadata(
        prompt_token_count=303, prompt_tokens_details=details)))
    assert chunk.usage.prompt_tokens_details == {"TEXT": 12, "IMAGE": 256, "AUDIO": 35}
    # An older server's answer: no split, an empty dict.
    assert types.to_token_count(pb.CountTokensResponse(total_tokens=3)).prompt_tokens_details == {}

    model = types.to_model_info(pb.ModelInfo(
        name="m", supported_modalities=[pb.TEXT, pb.IMAGE], tokens_per_image=256,
        audio_tokens_per_second=25, max_media_bytes=2 << 30,
        max_media_duration=duration_pb2.Duration(seconds=3600)))
    assert (model.supported_modalities, model.tokens_per_image, model.audio_tokens_per_second,
            model.max_media_bytes, model.max_media_duration) == (
        ["TEXT", "IMAGE"], 256, 25, 2 << 30, 3600.0)
    assert types.to_model_info(pb.ModelInfo(name="m")).max_media_duration is None


# ---- over gRPC, against the fake ------------------------------------------------------------

def test_upload_get_list_delete(fake, tmp_path):
    (tmp_path / "notes.txt").write_text("not media")
    path = tmp_path / "talk.flac"
    data = _write(path, 300 * KiB + 7)
    with ringserve.Client(fake.target, timeout=10) as client:
        info = client.upload_media(path, display_name="talk", chunk_size=100 * KiB)
        assert fake.uploads == [[100 * KiB] * 3 + [7]]
        assert fake.media[info.name][1] == data
        assert (info.mime_type, info.modality, info.size_bytes, info.sha256, info.display_name,
                info.token_count) == ("audio/flac", "AUDIO", len(data),
                                      hashlib.sha256(data).hexdigest(), "talk", 10)
        assert info.expire_time == datetime.datetime(2096, 10, 2, 7, 6, 40,
                                                      tzinfo=datetime.timezone.utc)
        second = client.upload_media(b"\x89PNG...", "image/png")
        assert client.get_media(info.name) == info
        assert [m.name for m in client.list_media()] == [info.name, second.name]
        client.delete_media(info)
        assert [m.name for m in client.list_media()] == [second.name]
        with pytest.raises(ringserve.NotFound, match=info.name):
            client.get_media(info.name)
        with pytest.raises(ringserve.NotFound):
            client.delete_media(info.name)
        with pytest.raises(FileNotFoundError):
            client.upload_media(tmp_path / "nope.wav")
        with pytest.raises(IsADirectoryError, match="not a regular file"):
            client.upload_media(tmp_path)
        with pytest.raises(ValueError, match="cannot tell the media type"):
            client.upload_media(tmp_path / "notes.txt")
    assert not fake.uploads[2:]  # the refused ones never reached the server


def test_upload_errors_map_to_sdk_types(fake):
    with ringserve.Client(fake.target, timeout=10) as client:
        # A header whose checksum the bytes do not match: the server's INVALID_ARGUMENT.
        source = upload.UploadSource("image/png", 4, "00" * 32, data=b"abcd")
        with pytest.raises(ringserve.InvalidArgument, match="sha256 mismatch"):
            client._upload(source, "", upload.DEFAULT_CHUNK_SIZE, 10)
    with ringserve.Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(ringserve.Unavailable):
            client.upload_media(b"abc", "image/png")


def test_upload_read_error_is_raised_as_itself(fake, tmp_path):
    # The file goes away between the hashing pass and the stream: gRPC alone would report a
    # cancelled call (sync: CANCELLED / UNKNOWN; grpc.aio: asyncio.CancelledError).
    path = tmp_path / "gone.png"
    _write(path, 100)
    source = upload.upload_source(path)
    os.remove(path)
    with ringserve.Client(fake.target, timeout=10) as client:
        with pytest.raises(FileNotFoundError):
            client._upload(source, "", 64, 10)

    async def main():
        async with ringserve.AsyncClient(fake.target, timeout=10) as client:
            with pytest.raises(FileNotFoundError):
                await client._upload(source, "", 64, 10)

    asyncio.run(main())
    assert fake.media == {}


def test_small_media_inline_large_uploaded_once(fake, tmp_path):
    small = tmp_path / "cat.png"
    _write(small, 600, seed=1)
    clip = tmp_path / "clip.mp4"
    clip_bytes = _write(clip, 5000, seed=2)
    song = tmp_path / "song.wav"
    _write(song, 600, seed=3)
    copy = tmp_path / "same-clip.mp4"
    _write(copy, 5000, seed=2)  # other path, same bytes

    with ringserve.Client(fake.target, timeout=10, max_inline_bytes=1000) as client:
        turn = ["Describe", Image.from_file(small), Video.from_file(clip, fps=2),
                Audio.from_file(song), Video.from_file(clip)]
        count = client.count_tokens_detail([turn])
        # cat.png (600) fits the 1000-byte budget; the clip (5000) does not and is uploaded
        # once though named twice; song.wav (600) no longer fits after cat.png: uploaded.
        request = fake.requests[-1]
        assert _kinds(request) == [("text", "Describe"), ("inline_data", "image/png"),
                                   ("file_data", "media/0000"), ("file_data", "media/0001"),
                                   ("file_data", "media/0000")]
        assert [len(u) for u in fake.uploads] == [1, 1]
        assert fake.media["media/0000"][1] == clip_bytes
        assert fake.media["media/0000"][0].display_name == "clip.mp4"
        parts = request.contents[0].parts
        assert parts[2].video_metadata.fps == 2 and not parts[4].HasField("video_metadata")
        assert parts[2].file_data.mime_type == "video/mp4"
        assert count.prompt_tokens_details == {"TEXT": 1 + 2 + 2, "IMAGE": 18,
                                               "VIDEO": 80, "AUDIO": 7 + 7 + 10}
        assert count.total_tokens == sum(count.prompt_tokens_details.values())

        # Again, and through another path with the same bytes: no new upload.
        client.count_tokens([["Again", Video.from_file(copy)]])
        assert _kinds(fake.requests[-1])[1] == ("file_data", "media/0000")
        result = client.generate_text([[Video.from_file(clip), "Go"]])
        assert result.text == "ok" and result.usage.prompt_tokens_details == {
            "VIDEO": 40, "AUDIO": 7, "TEXT": 3}
        assert _kinds(fake.requests[-1])[0] == ("file_data", "media/0000")
        assert len(fake.uploads) == 2

        # Changed content is new content: uploaded again.
        _write(clip, 5000, seed=9)
        client.count_tokens([[Video.from_file(clip)]])
        assert _kinds(fake.requests[-1]) == [("file_data", "media/0002")]
        # Deleting through the client forgets it: the next use uploads again.
        client.delete_media("media/0002")
        client.count_tokens([[Video.from_file(clip)]])
        assert _kinds(fake.requests[-1]) == [("file_data", "media/0003")]
        assert len(fake.uploads) == 4


def test_lost_uploads_are_sent_again_once(fake, tmp_path):
    clip = tmp_path / "clip.webm"
    _write(clip, 5000)
    with ringserve.Client(fake.target, timeout=10, max_inline_bytes=1000) as client:
        client.count_tokens([["hi", Video.from_file(clip)]])
        fake.forget_all()  # the server restarted: its uploads are gone
        assert client.count_tokens([["hi", Video.from_file(clip)]]) == 1 + 49
        assert len(fake.uploads) == 2
        fake.forget_all()
        assert client.generate_text([["hi", Video.from_file(clip)]]).text == "ok"
        assert len(fake.uploads) == 3
        # Media named by the caller are not this client's to re-upload: NotFound stands.
        with pytest.raises(ringserve.NotFound, match="media/gone"):
            client.count_tokens([[Image.from_upload("media/gone")]])
        with pytest.raises(ringserve.NotFound, match="media/gone"):
            client.generate_text([[Image.from_upload("media/gone")]])
        assert len(fake.uploads) == 3


def test_async_client_media(fake, tmp_path):
    path = tmp_path / "talk.opus"
    data = _write(path, 3000)

    async def main():
        async with ringserve.AsyncClient(fake.target, timeout=10,
                                         max_inline_bytes=1000) as client:
            info = await client.upload_media(path, chunk_size=1024, display_name="t")
            assert (info.mime_type, info.size_bytes) == ("audio/ogg", 3000)
            assert fake.uploads == [[1024, 1024, 952]] and fake.media[info.name][1] == data
            assert await client.get_media(info.name) == info
            # A part with the same bytes (too large to go inline) names that upload.
            count = await client.count_tokens_detail([["hi", Audio.from_file(path)]])
            assert count.prompt_tokens_details == {"TEXT": 1, "AUDIO": 10}
            assert _kinds(fake.requests[-1])[1] == ("file_data", info.name)
            chunks = [c async for c in client.generate([[Audio.from_file(path), "hi"]])]
            assert chunks[-1].usage.prompt_tokens_details == {"AUDIO": 10, "TEXT": 1}
            assert len(fake.uploads) == 1
            # Lost by the server: uploaded again, once, before anything was generated.
            fake.forget_all()
            chunks = [c async for c in client.generate([[Audio.from_file(path), "hi"]])]
            assert chunks[0].text == "ok" and len(fake.uploads) == 2
            assert [m.name for m in await client.list_media()] == ["media/0001"]
            await client.delete_media("media/0001")
            assert await client.list_media() == []
            with pytest.raises(ringserve.NotFound):
                await client.get_media("media/0001")
            # Bad turns fail when generate is called, before anything is sent.
            with pytest.raises(TypeError):
                client.generate(["hi", Audio.from_file(path)])

    asyncio.run(main())


# ---- the chat's attachments --------------------------------------------------------------------

def test_chat_attachments(fake, tmp_path):
    cat = tmp_path / "cat.png"
    _write(cat, 500)
    clip = tmp_path / "my clip.mp4"
    _write(clip, 700)
    (tmp_path / "notes.txt").write_text("not media")
    lines = iter([
        "/image " + str(tmp_path / "nope.png"),   # bad path: an error, the session goes on
        "/image " + str(tmp_path / "notes.txt"),
        f"/image {cat}",
        f"/video '{clip}' 1.5 - 2",
        "/video clip.mp4 1 x",
        "What are these?",
        "And now?",                               # the earlier turn's media are sent again
        f"/audio {cat}",                          # a PNG is not audio
        f"/image {cat}",
        "/clear",
        "Plain question",
        "/exit",
    ])
    out = io.StringIO()
    with ringserve.Client(fake.target, timeout=10) as client:
        chat = chat_lib.Chat(client, chat_lib.Settings(), out=out)
        assert chat.loop(read=lambda prompt: next(lines)) == 0
    text = out.getvalue()
    assert f"error: {tmp_path / 'nope.png'}: no such file" in text
    assert "error: cannot tell the media type of" in text and "notes.txt" in text
    assert "attached cat.png (image, 18 tokens)" in text
    assert "attached my clip.mp4 (video, 47 tokens)" in text   # 40 VIDEO + 7 AUDIO (its sound)
    assert "error: FPS must be a number (frames per second) or '-', got 'x'" not in text
    assert "error: END must be a number (seconds) or '-', got 'x'" in text
    assert "'image/png' is image, not audio; use Image" in text
    assert text.count("attached") == 3
    assert "(conversation cleared, attachments dropped)" in text

    generates = [r for r in fake.requests if isinstance(r, pb.GenerateRequest)]
    assert len(generates) == 3
    first, second, third = generates
    assert _kinds(first) == [("inline_data", "image/png"), ("inline_data", "video/mp4"),
                             ("text", "What are these?")]
    meta = first.contents[0].parts[1].video_metadata
    assert (meta.start_offset.seconds, meta.start_offset.nanos, meta.HasField("end_offset"),
            meta.fps) == (1, 500_000_000, False, 2.0)
    assert [c.role for c in second.contents] == ["user", "model", "user"]
    assert _kinds(second)[:3] == _kinds(first) and _kinds(second)[-1] == ("text", "And now?")
    # /clear dropped the conversation and the pending image: a text-only turn.
    assert _kinds(third) == [("text", "Plain question")]


def test_chat_keeps_attachments_when_the_question_fails(fake, tmp_path):
    cat = tmp_path / "cat.png"
    _write(cat, 500)
    out = io.StringIO()
    with ringserve.Client(fake.target, timeout=10) as client:
        chat = chat_lib.Chat(client, chat_lib.Settings(), out=out)
        assert chat.attach("/image", [str(cat)])
        os.remove(cat)  # gone before the question is sent
        chat.ask("What is it?")
        assert chat.history == [] and len(chat.pending) == 1
        assert "No such file or directory" in out.getvalue()
        assert "(1 attachment kept for the next question; /clear drops them)" in out.getvalue()
        assert "attach" in chat_lib.HELP and "/video PATH [START END FPS]" in chat_lib.HELP


# ---- the CLI -----------------------------------------------------------------------------------

def test_cli_upload_and_media(fake, tmp_path, capsys):
    path = tmp_path / "photo.jpg"
    data = _write(path, 2500)
    assert cli.main(["upload", "--target", fake.target, str(path), "--chunk-size", "1000",
                     "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["name"], info["display_name"], info["mime_type"], info["modality"],
            info["size_bytes"], info["sha256"]) == (
        "media/0000", "photo.jpg", "image/jpeg", "IMAGE", 2500, hashlib.sha256(data).hexdigest())
    assert fake.uploads == [[1000, 1000, 500]]

    assert cli.main(["upload", "--target", fake.target, str(path), "--mime-type", "image/png",
                     "--display-name", "as png"]) == 0
    out = capsys.readouterr().out
    assert "name: media/0001\n" in out and "mime_type: image/png\n" in out
    assert "display_name: as png\n" in out

    assert cli.main(["media", "list", "--target", fake.target]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split("\t")[:4] for r in rows] == [
        ["media/0000", "image", "image/jpeg", "2500 bytes"],
        ["media/0001", "image", "image/png", "2500 bytes"]]
    assert cli.main(["media", "get", "media/0001", "--target", fake.target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["display_name"] == "as png"
    assert cli.main(["media", "delete", "media/0000", "--target", fake.target]) == 0
    assert capsys.readouterr().out == "deleted media/0000\n"

    # Failures are one line: a missing server-side name, a file the type of which is unknown.
    assert cli.main(["media", "get", "media/0000", "--target", fake.target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ringserve media: NOT_FOUND:") and err.count("\n") == 1
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    assert cli.main(["upload", "--target", fake.target, str(notes)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ringserve upload: cannot tell the media type") and "--mime-type" in err
