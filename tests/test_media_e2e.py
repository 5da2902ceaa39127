"""Images, audio and video through the real server: counts, generation, uploads, caches, bad input.

The media are made here (Pillow, NumPy, the bundled ffmpeg). `test_media_reach_the_model` is the
anchor: the server's greedy tokens for a mixed prompt equal an in-process dense forward pass fed
the same encoder rows, so the rows land at the right positions through chunked, paged prefill.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import struct
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2

import _media
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from test_server_e2e import run, token_ids, wait_idle

GREEDY = pb.GenerationConfig(max_output_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def info(stub):
    return stub.GetModelInfo(pb.GetModelInfoRequest())


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """6 s of test pattern at 4 fps with a 330 Hz tone."""
    return _media.video(tmp_path_factory.mktemp("media") / "clip.mp4", 6)


def inline(data: bytes, mime: str, **extra) -> pb.Part:
    return pb.Part(inline_data=pb.Blob(mime_type=mime, data=data), **extra)


def user(*parts) -> pb.Content:
    return pb.Content(role="user", parts=[pb.Part(text=p) if isinstance(p, str) else p
                                          for p in parts])


def details(message) -> dict[str, int]:
    return {pb.Modality.Name(d.modality): d.token_count for d in message.prompt_tokens_details}


def count(stub, *parts):
    return stub.CountTokens(pb.CountTokensRequest(contents=[user(*parts)]))


def video_part(path: Path, **metadata) -> pb.Part:
    part = inline(path.read_bytes(), "video/mp4")
    if metadata:
        part.video_metadata.CopyFrom(pb.VideoMetadata(**metadata))
    return part


def seconds(s: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(s * 1e9))
    return d


def test_model_info_lists_media(info):
    assert {pb.TEXT, pb.IMAGE, pb.AUDIO, pb.VIDEO} <= set(info.supported_modalities)
    assert info.tokens_per_image > 0 and info.audio_tokens_per_second > 0
    assert info.max_media_bytes > 0 and info.max_media_duration.seconds > 0


def test_token_counts_follow_the_config(stub, info, clip):
    tpi, tps = info.tokens_per_image, info.audio_tokens_per_second
    base = count(stub, "Describe: ").total_tokens

    image = count(stub, "Describe: ", inline(_media.png(), "image/png"))
    assert image.total_tokens == base + tpi + 2  # rows between <|media_start|> and <|media_end|>
    assert details(image) == {"TEXT": base + 2, "IMAGE": tpi}

    audio = count(stub, "Describe: ", inline(_media.wav(3.25, rate=22050), "audio/wav"))
    assert details(audio)["AUDIO"] == math.ceil(3.25 * tps)
    assert audio.total_tokens == base + 2 + math.ceil(3.25 * tps)

    whole = count(stub, "Describe: ", video_part(clip))
    assert details(whole)["VIDEO"] == 6 * tpi  # 1 fps by default
    assert details(whole)["AUDIO"] == 6 * tps
    # Timestamps are text: "00:00" .. "00:05", a few tokens each.
    assert base + 2 + 6 <= details(whole)["TEXT"] <= base + 2 + 6 * 8

    part = count(stub, "Describe: ", video_part(clip, start_offset=seconds(1), end_offset=seconds(5),
                                                fps=2))
    assert details(part)["VIDEO"] == 8 * tpi  # t = 1.0, 1.5, ..., 4.5
    assert details(part)["AUDIO"] == 4 * tps


def mixed_request(clip: Path, question="What happens?") -> pb.GenerateRequest:
    return pb.GenerateRequest(contents=[user(
        "Look: ", inline(_media.png(seed=1), "image/png"), " and listen: ",
        inline(_media.wav(2.0, freq=880), "audio/wav"), " then watch: ", video_part(clip),
        question)], generation_config=GREEDY)


def test_mixed_prompt_generates_and_reuses_its_prefix(stub, clip):
    before = wait_idle(stub)
    first = run(stub, mixed_request(clip))
    usage = first[-1].usage_metadata
    assert first[-1].finish_reason == pb.GenerateResponse.MAX_TOKENS
    assert len(token_ids(first)) == 6
    assert sum(details(usage).values()) == usage.prompt_token_count
    assert set(details(usage)) == {"TEXT", "IMAGE", "AUDIO", "VIDEO"}

    again = run(stub, mixed_request(clip, question="What happens next?"))
    assert again[-1].usage_metadata.cached_content_token_count > usage.prompt_token_count // 2
    repeat = run(stub, mixed_request(clip))
    assert token_ids(repeat) == token_ids(first)
    after = wait_idle(stub)
    assert after.kv_pages_used == before.kv_pages_used  # nothing leaked


def test_media_reach_the_model(stub, clip, tmp_path, random_default_dir):
    """Server tokens == an in-process dense forward pass over the same ids and encoder rows."""
    import jax.numpy as jnp
    from flax import nnx

    from model import checkpoint, presets
    from model.media_encoder import MediaEncoder
    from preprocess.tokenizer import Tokenizer
    from server.media import MediaEmbedder, MediaResolver
    from server.media_rows import rows_for
    from server.media_store import MediaStore
    from server.validation import render_prompt

    request = mixed_request(clip)
    served = token_ids(run(stub, request))

    directory = random_default_dir  # what server_target serves
    config, model = checkpoint.load(directory)
    tokenizer = Tokenizer(directory / presets.TOKENIZER_FILE)
    store = MediaStore(tmp_path / "store")
    parts = MediaResolver(config, tokenizer, store).for_request("")  # holds the spooled video
    ids, media = render_prompt(request, tokenizer, None, parts)
    embedder = MediaEmbedder(MediaEncoder(config, model))
    try:
        rows = asyncio.run(embedder.embed_all(media))
    finally:
        embedder.close()
    tokens = list(ids)
    width = len(ids) + len(served)  # one width, one compiled forward: causal, so padding after is unseen
    embeds = jnp.asarray(np.pad(rows_for(tokens, rows, config.d_model), ((0, len(served)), (0, 0))))[None]
    mask = jnp.asarray(np.pad(np.asarray(tokens) < 0, (0, len(served))))[None]  # placeholders: prompt only
    forward = nnx.jit(lambda m, x: m(x, jnp.arange(width)[None], embeds=embeds, embed_mask=mask)[0])
    for _ in range(len(served)):
        x = np.zeros((1, width), np.int32)
        x[0, :len(tokens)] = np.maximum(tokens, 0)
        tokens.append(int(jnp.argmax(forward(model, jnp.asarray(x))[0, len(tokens) - 1])))
    assert tokens[len(ids):] == served


def test_named_cache_with_a_video(stub, clip):
    contents = [user("Remember this video: ", video_part(clip)),
                pb.Content(role="model", parts=[pb.Part(text="I have watched it.")])]
    cache = stub.CreateCache(pb.CreateCacheRequest(contents=contents,
                                                   ttl=duration_pb2.Duration(seconds=300)))
    try:
        question = user("What colour came first?")
        cached = run(stub, pb.GenerateRequest(cached_content=cache.name, contents=[question],
                                              generation_config=GREEDY))
        whole = run(stub, pb.GenerateRequest(contents=[*contents, question],
                                             generation_config=GREEDY))
        assert token_ids(cached) == token_ids(whole)
        assert cached[-1].usage_metadata.cached_content_token_count >= cache.pinned_token_count
    finally:
        stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name))


def upload(stub, data: bytes, mime: str, *, chunk=1 << 20, sha=None, size=None, cut=None):
    def messages():
        yield pb.UploadMediaRequest(header=pb.MediaHeader(
            mime_type=mime, display_name="test", size_bytes=len(data) if size is None else size,
            sha256=hashlib.sha256(data).hexdigest() if sha is None else sha))
        body = data if cut is None else data[:cut]
        for i in range(0, len(body), chunk):
            yield pb.UploadMediaRequest(chunk=body[i:i + chunk])
    return stub.UploadMedia(messages(), timeout=60)


def test_upload_past_the_message_limit_and_use_it(stub, info):
    data = _media.wav(160.0)  # 5.1 MB: past gRPC's default 4 MiB message
    assert len(data) > 4 << 20
    media = upload(stub, data, "audio/wav")
    assert media.name.startswith("media/") and media.modality == pb.AUDIO
    assert media.size_bytes == len(data) and media.sha256 == hashlib.sha256(data).hexdigest()
    assert abs(media.duration.ToTimedelta().total_seconds() - 160.0) < 0.01
    assert media.token_count == 160 * info.audio_tokens_per_second + 2
    assert stub.GetMedia(pb.GetMediaRequest(name=media.name)).sha256 == media.sha256
    assert media.name in [m.name for m in stub.ListMedia(pb.ListMediaRequest()).media]

    part = pb.Part(file_data=pb.FileData(file_uri=media.name))
    assert details(count(stub, "Hear: ", part))["AUDIO"] == 160 * info.audio_tokens_per_second
    out = run(stub, pb.GenerateRequest(contents=[user("Hear: ", part)], generation_config=GREEDY))
    assert out[-1].finish_reason == pb.GenerateResponse.MAX_TOKENS

    stub.DeleteMedia(pb.DeleteMediaRequest(name=media.name))
    with pytest.raises(grpc.RpcError) as error:
        stub.GetMedia(pb.GetMediaRequest(name=media.name))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        count(stub, "Hear: ", part)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents[0].parts[1].file_data.file_uri" in error.value.details()


@pytest.mark.parametrize("case, code, words", [
    ("checksum", grpc.StatusCode.INVALID_ARGUMENT, "sha256 mismatch"),
    ("stops midway", grpc.StatusCode.INVALID_ARGUMENT, "stopped after"),
    ("too large", grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes"),
    ("not media", grpc.StatusCode.INVALID_ARGUMENT, "UploadMedia"),
    ("mime", grpc.StatusCode.INVALID_ARGUMENT, "mime_type"),
])
def test_bad_uploads(stub, info, case, code, words):
    data = _media.wav(1.0)
    kwargs = {"checksum": dict(sha="0" * 64), "stops midway": dict(cut=len(data) // 2),
              "too large": dict(size=info.max_media_bytes + 1)}.get(case, {})
    mime = {"mime": "application/pdf"}.get(case, "audio/wav")
    if case == "not media":
        data = b"these bytes are no sound at all" * 10
    with pytest.raises(grpc.RpcError) as error:
        upload(stub, data, mime, **kwargs)
    assert error.value.code() == code, error.value.details()
    assert words in error.value.details()


def _pixel_bomb() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels (a few hundred bytes on the wire)."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_media(clip):
    png = _media.png()
    video = clip.read_bytes()
    return {
        "truncated image": (inline(png[:len(png) // 2], "image/png"), "INVALID_ARGUMENT"),
        "corrupt image": (inline(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "image/png"),
                          "INVALID_ARGUMENT"),
        "mime mismatch": (inline(png, "image/jpeg"), "INVALID_ARGUMENT"),
        "zero length": (inline(b"", "image/png"), "INVALID_ARGUMENT"),
        "pixel bomb": (inline(_pixel_bomb(), "image/png"), "RESOURCE_EXHAUSTED"),
        "corrupt audio": (inline(b"RIFF" + b"\x07" * 300, "audio/wav"), "INVALID_ARGUMENT"),
        "truncated video": (inline(video[:len(video) // 3], "video/mp4"), "INVALID_ARGUMENT"),
        "no video stream": (inline(_media.wav(2.0), "video/mp4"), "INVALID_ARGUMENT"),
        "unknown media": (pb.Part(file_data=pb.FileData(file_uri="media/nosuchthing")),
                          "INVALID_ARGUMENT"),
        "unsupported type": (inline(b"%PDF-1.4", "application/pdf"), "INVALID_ARGUMENT"),
        "metadata on image": (inline(png, "image/png",
                                     video_metadata=pb.VideoMetadata(fps=2)), "INVALID_ARGUMENT"),
        "fps out of range": (video_part(clip, fps=100), "INVALID_ARGUMENT"),
    }


@pytest.mark.parametrize("case", [
    "truncated image", "corrupt image", "mime mismatch", "zero length", "pixel bomb",
    "corrupt audio", "truncated video", "no video stream", "unknown media", "unsupported type",
    "metadata on image", "fps out of range"])
def test_bad_media_get_a_clear_status(stub, bad_media, case):
    part, code = bad_media[case]
    # CountTokens reads headers only (counts never depend on pixels), so damage past the header
    # shows when Generate decodes.
    calls = ("Generate",) if case == "truncated image" else ("Generate", "CountTokens")
    for call in calls:
        with pytest.raises(grpc.RpcError) as error:
            if call == "Generate":
                run(stub, pb.GenerateRequest(contents=[user("See: ", part)],
                                             generation_config=GREEDY))
            else:
                count(stub, "See: ", part)
        assert error.value.code().name == code, (call, error.value.details())
        assert "contents[0].parts[1]" in error.value.details(), error.value.details()
    # The server goes on serving.
    assert run(stub, pb.GenerateRequest(contents=[user("Still there?")],
                                        generation_config=GREEDY))[-1].finish_reason


def _ffmpeg_reading(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if name.encode() in cmdline and b"ffmpeg" in cmdline:
                pids.append(int(entry))
    return pids


def test_cancel_kills_ffmpeg(stub, tmp_path):
    long = _media.video(tmp_path / "long.mp4", 900, fps=1, size="32x24")
    spooled = "inline-" + hashlib.sha256(long.read_bytes()).hexdigest()  # the server's copy
    request = pb.GenerateRequest(contents=[user("Watch: ", video_part(long))],
                                 generation_config=GREEDY)
    with pytest.raises(grpc.RpcError) as error:
        run(stub, request, timeout=3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while _ffmpeg_reading(spooled) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ffmpeg_reading(spooled) == []
    wait_idle(stub)
