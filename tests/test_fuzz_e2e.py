"""Hostile input through the real server: property-based requests (Hypothesis, with a fixed seed so
a run is repeatable) and a corpus of malformed media. Every answer must be a defined status, never
UNKNOWN or INTERNAL, and the server must still serve, idle, with no page held, afterwards."""

from __future__ import annotations

import struct
import zlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _media
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from test_server_e2e import wait_idle

# What bad input may answer: the request's fault, a limit, a missing name, or a client deadline.
DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
MIMES = ["image/png", "image/jpeg", "image/webp", "audio/wav", "audio/flac", "audio/mpeg",
         "audio/pcm;rate=16000", "audio/pcm", "video/mp4", "video/webm", "text/plain", "",
         "application/octet-stream", "image/png; charset=x", "video/x-matroska"]
# Special strings a tokenizer or template might treat as markup.
MARKERS = ["<start_of_turn>", "<end_of_turn>", "<image>", "<|media_start|>", "<eos>", "<s>", "</s>",
           "\x00", "\ufffd", "\U0001F600", "{{ messages }}", "%s%n"]


def _png_bomb() -> bytes:
    """A PNG header claiming 100000 x 100000 pixels, with one tiny IDAT."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _corpus() -> list[tuple[str, bytes, str]]:
    """(label, bytes, mime type) of malformed media."""
    png, wav = _media.png(seed=1), _media.wav(0.5)
    return [
        ("truncated png", png[: len(png) // 2], "image/png"),
        ("png as wav", png, "audio/wav"),
        ("wav as png", wav, "image/png"),
        ("png bomb", _png_bomb(), "image/png"),
        ("truncated wav", wav[:60], "audio/wav"),
        ("empty-ish wav", wav[:44], "audio/wav"),
        ("hls playlist of a local file", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n"
         b"file:///etc/passwd\n#EXT-X-ENDLIST\n", "video/mp4"),
        ("hls playlist of a url", b"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n", "video/mp4"),
        ("concat list", b"ffconcat version 1.0\nfile '/etc/passwd'\n", "video/mp4"),
        ("garbage video", bytes(range(256)) * 40, "video/mp4"),
        ("mp4 header only", b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", "video/mp4"),
        ("zeros as audio", b"\0" * 5000, "audio/mpeg"),
        ("odd pcm", b"\1" * 1001, "audio/pcm;rate=16000"),
    ]


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _media_part(draw) -> pb.Part:
    label, data, mime = draw(st.sampled_from(_corpus() + [
        ("png", _media.png(seed=2), "image/png"), ("wav", _media.wav(0.3), "audio/wav")]))
    mime = draw(st.sampled_from([mime, mime, *MIMES]))
    if draw(st.booleans()):
        return pb.Part(inline_data=pb.Blob(mime_type=mime, data=data))
    uri = draw(st.sampled_from(["media/0123456789abcdef", "", "media/", "file:///etc/passwd",
                                "http://127.0.0.1:9/x", "media/" + "a" * 300]))
    return pb.Part(file_data=pb.FileData(file_uri=uri, mime_type=mime))


def _mostly(draw, good, bad):
    """A value from `good`, or now and then from `bad`: most requests should get far enough into
    the server to exercise more than the first check. (Hypothesis favours small and boundary
    draws, so the bad branch sits inside the range.)"""
    return draw(bad) if draw(st.integers(0, 12)) == 7 else draw(good)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    text = st.one_of(st.text(min_size=1, max_size=60), st.sampled_from(MARKERS),
                     st.lists(st.sampled_from(MARKERS), min_size=1, max_size=5).map("".join))
    contents = []
    for _ in range(_mostly(draw, st.integers(1, 3), st.just(0))):
        parts = []
        for _ in range(_mostly(draw, st.integers(1, 3), st.just(0))):
            kind = _mostly(draw, st.sampled_from(["text", "text", "media"]), st.just("empty"))
            part = (pb.Part(text=draw(text)) if kind == "text" else
                    _media_part(draw) if kind == "media" else pb.Part())
            if draw(st.integers(0, 9)) == 0:
                part.video_metadata.CopyFrom(pb.VideoMetadata(
                    fps=draw(st.sampled_from([0.0, -1.0, 1e9, float("nan"), 1.0])),
                    start_offset={"seconds": draw(st.sampled_from([0, -5, 10**12, 2**62]))}))
            parts.append(part)
        role = _mostly(draw, st.sampled_from(["user", "model", ""]),
                       st.sampled_from(["system", "x" * 50, "USER"]))
        contents.append(pb.Content(role=role, parts=parts))
    floats = st.sampled_from([-1.0, 1e30, float("nan"), float("inf"), -0.0])
    config = pb.GenerationConfig(
        max_output_tokens=_mostly(draw, st.integers(1, 4), st.sampled_from([0, -1, 2**31 - 1])),
        temperature=_mostly(draw, st.sampled_from([0.0, 0.7, 1.0, 2.0]), floats),
        top_p=_mostly(draw, st.sampled_from([0.1, 0.9, 1.0]), floats),
        top_k=_mostly(draw, st.sampled_from([0, 1, 5]), st.sampled_from([-3, 2**31 - 1])),
        seed=draw(st.sampled_from([0, -1, 2**63 - 1, -(2**63)])),
        stop_sequences=draw(st.lists(text, max_size=3)), ignore_eos=draw(st.booleans()))
    request = pb.GenerateRequest(
        contents=contents, generation_config=config,
        request_id=_mostly(draw, st.sampled_from(["", "r"]), st.just("x" * 300)),
        cached_content=_mostly(draw, st.just(""), st.sampled_from(
            ["cachedContents/nope", "../../etc", "x" * 1000])))
    if draw(st.booleans()):
        request.system_instruction.CopyFrom(pb.Content(parts=[pb.Part(text=draw(text))]))
    return request


@FUZZ
@given(request=requests())
def test_fuzzed_requests_get_defined_answers(stub, request):
    inference, _ = stub
    counted = pb.CountTokensRequest(contents=request.contents,
                                    system_instruction=request.system_instruction,
                                    cached_content=request.cached_content)
    assert _code(lambda: inference.CountTokens(counted, timeout=30)) in DEFINED
    assert _code(lambda: list(inference.Generate(request, timeout=30))) in DEFINED
    cache = pb.CreateCacheRequest(contents=request.contents, ttl={"seconds": 5},
                                  system_instruction=request.system_instruction)
    try:
        made = inference.CreateCache(cache, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in DEFINED, err
    else:
        inference.DeleteCache(pb.DeleteCacheRequest(name=made.name))


@pytest.mark.parametrize("label, data, mime", _corpus(), ids=[c[0] for c in _corpus()])
def test_malformed_media_is_refused_clearly(stub, label, data, mime):
    inference, _ = stub
    content = pb.Content(role="user", parts=[pb.Part(text="What is this?"), pb.Part(
        inline_data=pb.Blob(mime_type=mime, data=data))])
    with pytest.raises(grpc.RpcError) as err:
        list(inference.Generate(pb.GenerateRequest(
            contents=[content], generation_config=pb.GenerationConfig(max_output_tokens=2)),
            timeout=60))
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.RESOURCE_EXHAUSTED), err.value
    assert "contents[0].parts[1]" in err.value.details()


def test_server_still_serves_after_the_fuzzing(stub):
    inference, health = stub
    assert health.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING)
    stats = wait_idle(inference)
    assert stats.kv_pages_used == 0
    answer = list(inference.Generate(pb.GenerateRequest(
        contents=[pb.Content(role="user", parts=[pb.Part(text="hi")])],
        generation_config=pb.GenerationConfig(max_output_tokens=3, temperature=0,
                                              ignore_eos=True))))
    assert sum(len(r.token_ids) for r in answer) == 3
