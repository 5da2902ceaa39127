"""server/media.py in process: layouts from probes, the embedding cache, shared work, limits."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

import _media
from model import checkpoint, presets
from model.media_encoder import MediaEncoder
from preprocess import image as image_lib
from preprocess.tokenizer import Tokenizer
from ringserve.v1 import inference_pb2 as pb
from server.errors import InvalidArgument, ResourceExhausted
from server.media import (AUDIO, IMAGE, TEXT, VIDEO, MediaEmbedder, MediaLimits, MediaResolver,
                          timestamp)
from server.media_rows import placeholder_ids, rows_for
from server.media_store import MediaStore


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    directory = presets.ensure_default_checkpoint()
    config, model = checkpoint.load(directory)
    tokenizer = Tokenizer(directory / presets.TOKENIZER_FILE)
    store = MediaStore(tmp_path_factory.mktemp("store"))
    return config, model, tokenizer, store


def part(data: bytes, mime: str, **extra) -> pb.Part:
    return pb.Part(inline_data=pb.Blob(mime_type=mime, data=data), **extra)


def test_video_layout_interleaves_frames_sound_and_timestamps(parts, tmp_path):
    config, _, tokenizer, store = parts
    clip = _media.video(tmp_path / "clip.mp4", 4, fps=4)
    tokens = MediaResolver(config, tokenizer, store).resolve(
        part(clip.read_bytes(), "video/mp4", video_metadata=pb.VideoMetadata(fps=2)), "p")
    tpi, tps = config.vision.tokens_per_image, config.audio.tokens_per_second
    assert tokens.video.times == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
    # At 2 fps each frame is followed by half a second of sound: 5 rows.
    assert tokens.video.audio_slices == tuple((5 * i, 5 * i + 5) for i in range(8))
    ids = list(tokens.ids)
    assert ids[0] == tokenizer.token_id("<|media_start|>")
    assert ids[-1] == tokenizer.token_id("<|media_end|>")
    stamp = tokenizer.encode(timestamp(0.5))
    second = ids[1 + len(tokenizer.encode("00:00")) + tpi + 5:][:len(stamp)]
    assert second == stamp
    rows = [i for i in ids if i < 0]
    assert rows == placeholder_ids(tokens.key, 8 * (tpi + 5)).tolist()
    assert dict(tokens.counts) == {TEXT: len(ids) - len(rows), VIDEO: 8 * tpi, AUDIO: 8 * 5}
    assert timestamp(3725.0) == "1:02:05"


def test_embeddings_are_cached_and_shared(parts):
    config, model, tokenizer, store = parts
    resolver = MediaResolver(config, tokenizer, store)
    embedder = MediaEmbedder(MediaEncoder(config, model))
    image = resolver.resolve(part(_media.png(seed=3), "image/png"), "p")
    sound = resolver.resolve(part(_media.wav(1.5), "audio/wav"), "q")

    async def twice():
        together = await asyncio.gather(embedder.embed(sound), embedder.embed(sound),
                                        embedder.embed(image))
        again = await embedder.embed(sound)
        return together, again

    try:
        (first, second, pixels), again = asyncio.run(twice())
    finally:
        embedder.close()
    assert embedder.encoded == 2  # one image, one sound: the concurrent and later asks shared
    assert first is second is again
    assert first.shape == (math.ceil(1.5 * config.audio.tokens_per_second), config.d_model)
    assert pixels.shape == (config.vision.tokens_per_image, config.d_model)
    pixels_in = image_lib.load_image(_media.png(seed=3), "image/png",
                                     image_lib.ImageSpec(size=config.vision.image_size))
    direct = np.asarray(model.encode_images(pixels_in[None]))[0]
    np.testing.assert_allclose(pixels, direct, atol=1e-5)


def test_rows_for_maps_ids_back():
    a, b = np.arange(6.0).reshape(3, 2), -np.arange(4.0).reshape(2, 2) - 10
    ids = [5, *placeholder_ids(7, 3).tolist(), 9, *placeholder_ids(1 << 61, 2).tolist()]
    out = rows_for(ids, [(7, a), (1 << 61, b)], 2)
    np.testing.assert_array_equal(out, np.concatenate([[[0, 0]], a, [[0, 0]], b]))
    assert rows_for([1, 2, 3], [(7, a)], 2) is None
    with pytest.raises(AssertionError):
        rows_for(placeholder_ids(99, 1).tolist(), [(7, a)], 2)


def test_limits(parts):
    config, _, tokenizer, store = parts
    small = MediaResolver(config, tokenizer, store,
                          MediaLimits(max_bytes=1 << 20, max_seconds=2.0, max_pixels=1000))
    with pytest.raises(ResourceExhausted, match=r"p\.inline_data: .*2"):
        small.resolve(part(_media.wav(3.0), "audio/wav"), "p")
    with pytest.raises(ResourceExhausted, match="pixels"):
        small.resolve(part(_media.png(), "image/png"), "p")
    with pytest.raises(ResourceExhausted, match="bytes"):
        small.resolve(part(b"\0" * ((1 << 20) + 1), "audio/wav"), "p")
    with pytest.raises(InvalidArgument, match="video/mp4"):
        small.resolve(part(_media.png(), "video/mp4"), "p")
    text_only = MediaResolver(config.replace(vision=None, audio=None), tokenizer, store)
    assert text_only.modalities == (TEXT,)
    with pytest.raises(InvalidArgument, match="no image input"):
        text_only.resolve(part(_media.png(), "image/png"), "p")
    assert IMAGE not in text_only.modalities


def test_a_dead_image_decoder_is_replaced(parts):
    """A decoding worker that dies (killed, out of memory, a crashing codec) breaks its process
    pool for good; later images must still decode, on a new pool."""
    import os
    import signal

    config, model, tokenizer, store = parts
    resolver = MediaResolver(config, tokenizer, store)
    embedder = MediaEmbedder(MediaEncoder(config, model))
    images = [resolver.resolve(part(_media.png(seed=s), "image/png"), "p") for s in (4, 5, 6)]

    async def run():
        first = await embedder.embed(images[0])
        for process in list(embedder._pool._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        try:
            second = await embedder.embed(images[1])  # the pool may learn of it only now
        except InvalidArgument as error:
            assert "worker process died" in str(error)
            second = None
        return first, second, await embedder.embed(images[2])

    try:
        first, second, third = asyncio.run(run())
    finally:
        embedder.close()
    assert third.shape == first.shape == (config.vision.tokens_per_image, config.d_model)
    assert second is None or second.shape == first.shape


@pytest.mark.parametrize("metadata, field", [
    (dict(start_offset=dict(seconds=10**15)), "start_offset"),
    (dict(start_offset=dict(seconds=2**62)), "start_offset"),
    (dict(end_offset=dict(seconds=10**15)), "end_offset"),
    (dict(start_offset=dict(seconds=-2**62)), "start_offset"),
])
def test_absurd_video_offsets_are_invalid_argument(parts, tmp_path, metadata, field):
    """Offsets past what datetime.timedelta holds once overflowed into UNKNOWN."""
    config, _, tokenizer, store = parts
    clip = _media.video(tmp_path / "clip.mp4", 4, fps=2)
    with pytest.raises(InvalidArgument, match=field):
        MediaResolver(config, tokenizer, store).resolve(
            part(clip.read_bytes(), "video/mp4", video_metadata=pb.VideoMetadata(**metadata)), "p")


def test_inline_video_spool_lives_as_long_as_its_requests(parts, tmp_path):
    """Inline video is spooled for ffmpeg, counted against the store's budget, shared by
    requests with the same bytes, and deleted when the last of them ends."""
    config, _, tokenizer, _ = parts
    store = MediaStore(tmp_path / "store")
    resolver = MediaResolver(config, tokenizer, store)
    clip = part(_media.video(tmp_path / "clip.mp4", 2, fps=2).read_bytes(), "video/mp4")
    size = len(clip.inline_data.data)

    probe_only = resolver.resolve(clip, "p")  # no request holds it: gone after the probe
    assert not probe_only.source.path.exists() and store.spooled_bytes == 0

    first, second = resolver.for_request(""), resolver.for_request("")
    path = first.resolve(clip, "p").source.path
    assert second.resolve(clip, "q").source.path == path and path.exists()
    assert store.spooled_bytes == size
    first.release()
    assert path.exists()  # the second request still reads it
    second.release()
    assert not path.exists() and store.spooled_bytes == 0

    tight = MediaStore(tmp_path / "tight", budget_bytes=size - 1)
    with pytest.raises(ResourceExhausted, match=r"p.inline_data: \d+ bytes to spool.*store is full"):
        MediaResolver(config, tokenizer, tight).for_request("").resolve(clip, "p")
    assert list((tmp_path / "tight").iterdir()) == []


def test_span_ids_number_each_run_of_media_rows():
    from server.media_rows import span_ids

    assert span_ids([5, -1, -2, 7, -9, 3, -4, -5, -6]).tolist() == [0, 1, 1, 0, 2, 0, 3, 3, 3]
    assert span_ids([-3, -2]).tolist() == [1, 1] and span_ids([4, 4]).tolist() == [0, 0]
    assert span_ids([]).tolist() == []
