"""Media parts -> prompt ids (cheap, from probes) and encoder embeddings (streamed, cached).

How an image, audio clip or video enters a prompt:

1. `MediaResolver.resolve(part)` reads the part (inline bytes or an uploaded id), probes it (image
   header, audio header, `ffmpeg -i` for video: no decoding) and lays it out as prompt ids:
       image  <|media_start|> [tokens_per_image rows] <|media_end|>
       audio  <|media_start|> [ceil(seconds * audio_tokens_per_second) rows] <|media_end|>
       video  <|media_start|> for each sampled frame: "MM:SS" text, the frame's rows, the rows of
              its sound from that frame to the next <|media_end|>
   Those are the built-in model's markers; a checkpoint family's own come from
   server/media_markup.py (Qwen2-Audio: <|audio_bos|> rows <|audio_eos|>, in 30 s windows whose
   rows are those of their audio frames, as its processor counts them; Qwen2.5-VL:
   <|vision_start|> rows <|vision_end|>, as many rows as the image's size gives, `grid`).
   Rows are placeholder ids: negative ints derived from the media's key (content hash plus what
   is read: offsets, fps), so equal media gives equal ids and the prefix cache and named caches
   work on media prompts unchanged, while different media never share a page hash. CountTokens
   stops here: it needs no decoding.
2. `MediaEmbedder.embed(media)` decodes and encodes, streaming: frames come from ffmpeg in chunks
   of 16, sound in 10 s windows, and each chunk is encoded at once, so decoded media never sit in
   memory whole. Image decoding runs in a process pool, video and audio in threads driving ffmpeg
   and libsndfile. Results are cached by key (LRU, bounded bytes), and concurrent requests for
   the same media share one computation.
3. The engine loop, prefilling a chunk, maps each placeholder id back to its row (`rows_for`): the
   model takes those embeddings instead of token embeddings.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from model.config import MEL_FRAMES_PER_SECOND
from preprocess import audio as audio_lib
from preprocess import gemma3_image, qwen2_vl_image, qwen2_vl_video
from preprocess import image as image_lib
from preprocess import video as video_lib
from preprocess import whisper_features
from preprocess.errors import MediaError, MediaTooLarge
from preprocess.tokenizer_protocol import TextTokenizer
from server.errors import InvalidArgument, NotFound, ResourceExhausted
from server.media_markup import (AUDIO, BUILT_IN, IMAGE, MEDIA_END, MEDIA_START, VIDEO, Expansion,
                                 markup_for)
from server.media_rows import KEY_SPACE, placeholder_ids
from server.media_store import MediaStore

log = logging.getLogger(__name__)

TEXT = "TEXT"
_FRAME_BATCH = 16  # frames decoded and encoded together
_AUDIO_BATCH = 4  # 10 s windows encoded together
_PATCHES_PER_CALL = 4096  # a dynamic-resolution tower's patches per call, at most (one temporal patch at least)
_HOP = audio_lib.SAMPLE_RATE // MEL_FRAMES_PER_SECOND  # 16 kHz samples per mel frame


def modality_of(mime_type: str) -> str | None:
    base = mime_type.split(";")[0].strip().lower()
    if base in image_lib.MIME_TYPES:
        return IMAGE
    if base in audio_lib.MIME_TYPES:
        return AUDIO
    if base in video_lib.MIME_TYPES:
        return VIDEO
    return None


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 2 << 30  # one media item, inline or uploaded
    max_seconds: float = 4 * 3600.0  # audio and video
    max_pixels: int = image_lib.DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class VideoRead:
    """Which part of a video to read (Gemini's videoMetadata)."""

    start: float = 0.0
    end: float | None = None
    fps: float = 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class MediaSource:
    """Where a media item's bytes are: inline `data` or an uploaded file at `path`."""

    modality: str
    mime_type: str
    sha256: str
    data: bytes | None = None
    path: Path | None = None
    video: VideoRead | None = None
    field: str = ""  # the request field it came from, for error messages

    def bytes(self) -> bytes:
        return self.data if self.data is not None else Path(self.path).read_bytes()


@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """The sampled frames and where their rows and their sound's rows go."""

    times: tuple[float, ...]  # frame timestamps, seconds
    end: float  # the end of the read span, seconds
    audio_rows: int  # total sound rows (0 without sound)
    # Per frame: the slice of sound rows that follow its image rows.
    audio_slices: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class MediaTokens:
    """One media item laid out as prompt ids (a `preprocess.prompt.MediaSegment`)."""

    key: int
    ids: tuple[int, ...]
    rows: int  # placeholder rows (ids < 0), the embeddings to compute
    counts: tuple[tuple[str, int], ...]  # tokens by modality (markers and timestamps: TEXT)
    source: MediaSource = dataclasses.field(compare=False, repr=False)
    video: VideoLayout | None = dataclasses.field(default=None, compare=False, repr=False)
    duration_s: float | None = dataclasses.field(default=None, compare=False)
    width: int = dataclasses.field(default=0, compare=False)
    height: int = dataclasses.field(default=0, compare=False)
    # What replaces the item's token in a checkpoint's chat template (server/media_markup.py).
    expansion: Expansion | None = dataclasses.field(default=None, compare=False, repr=False)
    # Encoders that mask padding (Qwen2-Audio's): 16 kHz samples in each window that yields rows.
    audio_windows: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)
    # Dynamic-resolution towers (Qwen2.5-VL's): the processor's patch grid (t, h, w); its rows
    # are t * h * w / merge**2, and its M-RoPE positions follow the grid (server/media_rows.py).
    grid: tuple[int, int, int] | None = dataclasses.field(default=None, compare=False)
    # Their videos: seconds each temporal patch spans (temporal_patch_size / fps), which scales
    # the temporal M-RoPE positions.
    seconds_per_grid: float | None = dataclasses.field(default=None, compare=False)


def token_details(total: int, media: Sequence[MediaTokens]) -> dict[str, int]:
    """A prompt's `total` tokens by modality: media's own rows under theirs, the rest TEXT."""
    counts = {TEXT: total}
    for item in media:
        for modality, n in item.counts:
            if modality != TEXT:
                counts[modality] = counts.get(modality, 0) + n
                counts[TEXT] -= n
    return counts


def media_key(source: MediaSource, salt: str) -> int:
    """62 bits naming what the embeddings depend on: bytes, what is read of them, the encoders."""
    read = source.video or VideoRead()
    text = f"{salt}|{source.modality}|{source.sha256}|{read.start!r}|{read.end!r}|{read.fps!r}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % KEY_SPACE


def timestamp(seconds: float) -> str:
    """'MM:SS', or 'H:MM:SS' from an hour on (the text before each video frame)."""
    whole = int(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class RequestMedia:
    """A MediaResolver for one request (`MediaParts` for server/validation.py): file_data names
    only its owner's uploads, and the inline media it spools stay on disk until `release`."""

    def __init__(self, resolver: MediaResolver, owner: str):
        self.resolver, self.owner = resolver, owner
        self._spooled: list[Path] = []
        self._lock = threading.Lock()  # resolve runs in worker threads

    def resolve(self, part, field: str) -> MediaTokens:
        return self.resolver.resolve(part, field, self.owner, self._spooled.append)

    def release(self) -> None:
        """The request is over: its spooled files may go."""
        with self._lock:
            spooled, self._spooled = self._spooled, []
        for path in spooled:
            self.resolver.store.release(path)


class MediaResolver:
    """Parts -> `MediaTokens`, from probes only. Raises RequestErrors naming the part."""

    def __init__(self, config, tokenizer: TextTokenizer, store: MediaStore,
                 limits: MediaLimits = MediaLimits(), image_processor=None,
                 video_processor: qwen2_vl_video.Qwen2VLVideoConfig | None = None):
        """image_processor, video_processor: the checkpoint's (server/runtime.py); a Qwen2.5-VL
        model's size its images' and videos' grids (no video_processor: no video input)."""
        self.vision, self.audio = config.vision, config.audio
        self.qwen_vision = getattr(config, "qwen_vision", None)
        if self.qwen_vision is not None and not isinstance(image_processor,
                                                           qwen2_vl_image.Qwen2VLImageConfig):
            raise ValueError("a Qwen2.5-VL vision tower needs its image processor's config "
                             "(preprocessor_config.json)")
        self.image_processor, self.video_processor = image_processor, video_processor
        self.tokenizer, self.store, self.limits = tokenizer, store, limits
        self._markup = {m: markup_for(tokenizer, m) for m in (IMAGE, AUDIO, VIDEO)}
        # Encoders' identity: embeddings cached under one config are not reused under another.
        self._salt = hashlib.sha256(repr((config.vision, config.audio, self.qwen_vision,
                                          image_processor, video_processor, config.d_model,
                                          config.name)).encode()).hexdigest()[:16]

    @property
    def modalities(self) -> tuple[str, ...]:
        found = [TEXT]
        if self.vision is not None or self.qwen_vision is not None:
            found.append(IMAGE)
        if self.audio is not None:
            found.append(AUDIO)
        # Video is frames with their sound laid out between them: the built-in layout only.
        if (self.vision is not None and self._markup[IMAGE].markup is BUILT_IN
                and (self.audio is None or not self.audio.mask_padding)):
            found.append(VIDEO)
        elif self.qwen_vision is not None and self.video_processor is not None:
            found.append(VIDEO)  # temporal patches, the family's own layout
        return tuple(found)

    def for_request(self, owner: str) -> RequestMedia:
        """This resolver for one request of `owner`; `release()` it when the request ends."""
        return RequestMedia(self, owner)

    def resolve(self, part, field: str, owner: str = "",
                spooled: Callable[[Path], None] | None = None) -> MediaTokens:
        """A Part with inline_data or file_data (`owner`'s upload) -> its layout (probing; no
        decoding). Inline video is spooled to disk; `spooled(path)` takes the lease, which the
        caller releases when done with the media; without it the file goes after the probe."""
        leases: list[Path] = []
        try:
            source = self._source(part, field, owner, spooled or leases.append)
            return self._layout_or_error(source)
        finally:
            for path in leases:
                self.store.release(path)

    def _layout_or_error(self, source: MediaSource) -> MediaTokens:
        try:
            return self._layout(source)
        except MediaTooLarge as error:
            raise ResourceExhausted(f"{source.field}: {error}") from None
        except MediaError as error:
            raise InvalidArgument(f"{source.field}: {error}") from None

    def describe(self, source: MediaSource) -> MediaTokens:
        """Layout of a whole media item (an upload's token count); MediaErrors propagate."""
        return self._layout(source)

    # ----- reading a part -----

    def _source(self, part, field: str, owner: str,
                spooled: Callable[[Path], None]) -> MediaSource:
        kind = part.WhichOneof("data")
        if kind == "inline_data":
            blob = part.inline_data
            mime = blob.mime_type
            where = f"{field}.inline_data"
            if not blob.data:
                raise InvalidArgument(f"{where}.data: empty")
            if len(blob.data) > self.limits.max_bytes:
                raise ResourceExhausted(f"{where}.data: {len(blob.data)} bytes; media up to "
                                        f"{self.limits.max_bytes} bytes are accepted")
            data, path, sha = blob.data, None, hashlib.sha256(blob.data).hexdigest()
        else:
            where = f"{field}.file_data"
            try:
                stored = self.store.get(part.file_data.file_uri, owner, field=f"{where}.file_uri")
            except NotFound as error:  # in a prompt, a bad id is a bad argument
                raise InvalidArgument(error.message) from None
            if part.file_data.mime_type and part.file_data.mime_type != stored.mime_type:
                raise InvalidArgument(
                    f"{where}.mime_type: {part.file_data.mime_type!r}, but "
                    f"{stored.name} was uploaded as {stored.mime_type!r}")
            mime, data, path, sha = stored.mime_type, None, stored.path, stored.sha256
        modality = modality_of(mime) if mime else None
        if modality is None:
            raise InvalidArgument(f"{where}.mime_type: {mime!r} is not a supported media type "
                                  f"(images: {', '.join(image_lib.MIME_TYPES)}; audio: "
                                  f"{', '.join(audio_lib.MIME_TYPES)}; video: "
                                  f"{', '.join(video_lib.MIME_TYPES)})")
        if modality not in self.modalities:
            raise InvalidArgument(f"{where}: this model takes no {modality.lower()} input "
                                  f"(it takes {', '.join(m.lower() for m in self.modalities)})")
        video = None
        if part.HasField("video_metadata"):
            if modality != VIDEO:
                raise InvalidArgument(f"{field}.video_metadata: only for video parts; this part "
                                      f"is {modality.lower()} ({mime})")
            video = _video_read(part.video_metadata, f"{field}.video_metadata")
        elif modality == VIDEO:
            video = VideoRead()
        if modality == VIDEO and path is None:
            # ffmpeg seeks in files (an mp4's index may sit at its end): spool the encoded bytes
            # once, content-addressed. Decoded frames never touch the disk.
            path = self.store.spool(data, sha, where)
            spooled(path)
        return MediaSource(modality, mime, sha, data=data, path=path, video=video, field=where)

    # ----- layouts -----

    def _wrap(self, key: int, body: list[int], rows: int, counts: dict, source: MediaSource,
              **extra) -> MediaTokens:
        markup = self._markup[source.modality]
        counts = dict(counts)
        counts[TEXT] = counts.get(TEXT, 0) + markup.marker_count()
        return MediaTokens(key, tuple(int(i) for i in markup.wrap(body)), rows,
                           tuple((m, n) for m, n in counts.items() if n), source,
                           expansion=markup.expansion([int(i) for i in body]), **extra)

    def _layout(self, source: MediaSource) -> MediaTokens:
        key = media_key(source, self._salt)
        if source.modality == IMAGE:
            info = image_lib.probe_image(source.bytes(), source.mime_type,
                                         max_pixels=self.limits.max_pixels)
            if self.qwen_vision is not None:
                return self._grid_layout(key, source, info)
            rows = self.vision.tokens_per_image
            return self._wrap(key, placeholder_ids(key, rows).tolist(), rows, {IMAGE: rows},
                              source, width=info.width, height=info.height)
        if source.modality == AUDIO:
            info = audio_lib.probe_audio(source.data if source.data is not None else source.path,
                                         source.mime_type, max_seconds=self.limits.max_seconds)
            if self.audio.mask_padding:
                return self._window_layout(key, source, info)
            rows = audio_lib.token_count(info.duration_s, self.audio.tokens_per_second)
            return self._wrap(key, placeholder_ids(key, rows).tolist(), rows, {AUDIO: rows},
                              source, duration_s=info.duration_s)
        return self._video_layout(key, source)

    def _grid_layout(self, key: int, source: MediaSource, info) -> MediaTokens:
        """An image for a dynamic-resolution tower (Qwen2.5-VL's): the processor's resize rule
        picks its patch grid from the displayed size, and each merge x merge block of patches
        is one row."""
        try:
            grid = qwen2_vl_image.image_grid(info.height, info.width, self.image_processor)
        except ValueError as error:
            raise MediaError(str(error)) from None
        t, h, w = grid
        rows = t * h * w // self.image_processor.merge_size ** 2
        return self._wrap(key, placeholder_ids(key, rows).tolist(), rows, {IMAGE: rows}, source,
                          width=info.width, height=info.height, grid=grid)

    def _temporal_layout(self, key: int, source: MediaSource, info, frames: int) -> MediaTokens:
        """A video for a dynamic-resolution tower (Qwen2.5-VL's): the frames sampled at the
        request's fps, in temporal patches of temporal_patch_size frames (the last padded with
        copies of the final frame, as the processor does), one grid for all of them; no sound."""
        cfg = self.video_processor
        try:
            grid = qwen2_vl_video.video_grid(frames, info.height, info.width, cfg)
        except ValueError as error:
            raise MediaError(str(error)) from None
        t, h, w = grid
        rows = t * h * w // cfg.pixels.merge_size ** 2
        seconds = cfg.pixels.temporal_patch_size / source.video.fps
        return self._wrap(key, placeholder_ids(key, rows).tolist(), rows, {VIDEO: rows}, source,
                          duration_s=info.duration_s, width=info.width, height=info.height,
                          grid=grid, seconds_per_grid=seconds)

    def _window_layout(self, key: int, source: MediaSource, info) -> MediaTokens:
        """Audio for an encoder that masks padding (Qwen2-Audio's): the clip in windows of
        window_frames mel frames, each yielding the rows of its audio frames only, as the
        family's processor counts them; windows after the first are set off by close and open
        markers (the processor keeps only the first window: longer clips are an extension)."""
        per_window = self.audio.window_frames * _HOP
        # The resampled length as librosa fixes it: ceil(n * 16000 / rate).
        samples = -(-info.frames * audio_lib.SAMPLE_RATE // info.sample_rate)
        windows, counts = [], []
        for start in range(0, samples, per_window):
            n = min(per_window, samples - start)
            rows = self.audio.valid_rows(-(-n // _HOP))
            if rows:  # a last sliver of a window under 0.03 s yields no row
                windows.append(n)
                counts.append(rows)
        if not windows:
            raise MediaError(f"audio is {info.duration_s:.3f} s long: too short to yield one "
                             "encoder row")
        ids = placeholder_ids(key, sum(counts)).tolist()
        body, row = [], 0
        for k, n in enumerate(counts):
            body += (self._markup[AUDIO].separator() if k else []) + ids[row:row + n]
            row += n
        separators = len(body) - row
        return self._wrap(key, body, row, {AUDIO: row, TEXT: separators}, source,
                          duration_s=info.duration_s, audio_windows=tuple(windows))

    def _video_layout(self, key: int, source: MediaSource) -> MediaTokens:
        info = video_lib.probe_video(source.path, source.mime_type,
                                     max_seconds=self.limits.max_seconds)
        read = source.video
        try:
            times = video_lib.sample_times(info.duration_s, fps=read.fps, start=read.start,
                                           end=read.end)
        except ValueError as error:
            raise MediaError(str(error)) from None
        if len(times) == 0:
            raise MediaError(f"no frame to sample between {read.start} s and "
                             f"{read.end if read.end is not None else info.duration_s} s")
        if self.qwen_vision is not None:
            return self._temporal_layout(key, source, info, len(times))
        end = min(read.end, info.duration_s) if read.end is not None else info.duration_s
        per_frame = self.vision.tokens_per_image
        audio_rows = 0
        if info.has_audio and self.audio is not None:
            audio_rows = audio_lib.token_count(end - read.start, self.audio.tokens_per_second)
        # Sound row k covers [start + k / tps, start + (k + 1) / tps); it follows the last frame
        # shown at or before its start.
        slices, first = [], 0
        for i in range(len(times)):
            last = audio_rows
            if i + 1 < len(times) and audio_rows:
                tps = self.audio.tokens_per_second
                last = min(audio_rows, math.ceil((times[i + 1] - read.start) * tps - 1e-9))
            slices.append((first, last))
            first = last
        body, row, text = [], 0, 0
        rows_ids = placeholder_ids(key, len(times) * per_frame + audio_rows)
        for t, (a0, a1) in zip(times, slices):
            stamp = self.tokenizer.encode(timestamp(t))
            text += len(stamp)
            body += stamp
            n = per_frame + (a1 - a0)
            body += rows_ids[row:row + n].tolist()
            row += n
        layout = VideoLayout(tuple(float(t) for t in times), float(end), audio_rows,
                             tuple(slices))
        counts = {TEXT: text, VIDEO: len(times) * per_frame, AUDIO: audio_rows}
        return self._wrap(key, body, row, counts, source, video=layout,
                          duration_s=info.duration_s, width=info.width, height=info.height)


def _seconds(duration) -> float:
    # Not Duration.ToTimedelta(): it overflows on values past ~2**31 days, and any int64 of
    # seconds is a valid (if absurd) request that must get INVALID_ARGUMENT, not UNKNOWN.
    return duration.seconds + duration.nanos * 1e-9


def _video_read(metadata, field: str) -> VideoRead:
    start = _seconds(metadata.start_offset) if metadata.HasField("start_offset") else 0.0
    end = _seconds(metadata.end_offset) if metadata.HasField("end_offset") else None
    fps = metadata.fps or 1.0
    if not (math.isfinite(fps) and 0 < fps <= 24):
        raise InvalidArgument(f"{field}.fps: {metadata.fps}; use a rate in (0, 24] frames/s")
    if start < 0:
        raise InvalidArgument(f"{field}.start_offset: {start} s is negative")
    if end is not None and end <= start:
        raise InvalidArgument(f"{field}.end_offset: {end} s is not after start_offset ({start} s)")
    return VideoRead(start, end, float(fps))


def _decode_image(data: bytes, mime_type: str, size: int, max_pixels: int,
                  processor=None) -> np.ndarray:
    """Process-pool job (top level, so it pickles): bytes -> f32[S, S, 3] pixels; with Gemma 3's
    image processor config its pixels, channels last; with Qwen2-VL's the patches
    f32[P, C*T*p*p] of its grid."""
    if processor is None:
        return image_lib.load_image(data, mime_type, image_lib.ImageSpec(size=size),
                                    max_pixels=max_pixels)
    image = image_lib.decode_image(data, mime_type, max_pixels=max_pixels)
    if isinstance(processor, qwen2_vl_image.Qwen2VLImageConfig):
        return qwen2_vl_image.preprocess(image, processor).pixel_values
    return gemma3_image.preprocess(image, processor).transpose(1, 2, 0)


class Cancelled(Exception):
    """The request that wanted these embeddings went away."""


class MediaEmbedder:
    """Embeddings of laid-out media: decode, encode, cache. See the module note."""

    def __init__(self, encoder, limits: MediaLimits = MediaLimits(), *,
                 cache_bytes: int = 1 << 30, processes: int = 2,
                 audio_features: whisper_features.WhisperFeatureConfig | None = None,
                 image_processor: (gemma3_image.Gemma3ImageConfig
                                   | qwen2_vl_image.Qwen2VLImageConfig | None) = None,
                 video_processor: qwen2_vl_video.Qwen2VLVideoConfig | None = None):
        """audio_features: the checkpoint's feature extractor, for encoders that mask padding
        (their windows are extracted as the family's processor does). image_processor: the
        checkpoint's image processor (Gemma 3's, Qwen2-VL's); without it, the built-in
        preprocessing. video_processor: Qwen2-VL's, for videos laid out in temporal patches."""
        self.encoder, self.limits = encoder, limits
        side = getattr(encoder, "image_size", None)
        if isinstance(image_processor, gemma3_image.Gemma3ImageConfig) and (
                image_processor.size != (side, side)):
            raise ValueError(f"the image processor makes {image_processor.size[0]} x "
                             f"{image_processor.size[1]} pixels; the vision encoder takes "
                             f"{side} x {side}")
        self.image_processor, self.video_processor = image_processor, video_processor
        if getattr(encoder, "mask_padding", False):
            if audio_features is None:
                raise ValueError("this audio encoder masks padding: it needs the checkpoint's "
                                 "feature extractor config (preprocessor_config.json)")
            got = (audio_features.feature_size, audio_features.nb_max_frames,
                   audio_features.hop_length)
            if got != (encoder.n_mels, encoder.window_frames, _HOP):
                raise ValueError(
                    f"the feature extractor makes {got[0]} mel bins x {got[1]} frames per window "
                    f"at hop {got[2]}; the audio encoder takes {encoder.n_mels} x "
                    f"{encoder.window_frames} at hop {_HOP}")
        self.audio_features = audio_features
        self.mel_spec = (audio_lib.MelSpec(n_mels=encoder.n_mels, window_frames=encoder.window_frames,
                                             context_frames=encoder.context_frames)
                         if getattr(encoder, "n_mels", None) else None)
        self.cache_bytes = cache_bytes
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[int, asyncio.Future] = {}
        self._processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None  # made on first image
        self.encoded = 0  # media items computed (not served from the cache), for tests

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _decoders(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the server process holds JAX's threads.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self._processes, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def _decode_image(self, source) -> np.ndarray:
        """f32[S, S, 3] pixels, decoded in the process pool. A pool whose worker died (killed,
        out of memory, a crashing codec) is broken for good, so it is replaced: a pool found
        broken before this job ran is retried once on the new one; a worker that died running
        this job fails this request only, naming the image."""
        loop = asyncio.get_running_loop()
        args = (source.bytes(), source.mime_type, getattr(self.encoder, "image_size", 0),
                self.limits.max_pixels, self.image_processor)
        for attempt in range(2):
            pool = self._decoders()
            try:
                future = pool.submit(_decode_image, *args)
            except BrokenProcessPool:
                self._replace_pool(pool)
                continue
            try:
                return await asyncio.wrap_future(future, loop=loop)
            except BrokenProcessPool:
                self._replace_pool(pool)
                raise MediaError("the image decoder's worker process died on this image "
                                 "(a corrupt or hostile file?)") from None
        raise MediaError("the image decoder's worker processes cannot start")

    def _replace_pool(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._pool is broken:
            self._pool = None
            broken.shutdown(wait=False, cancel_futures=True)

    def cached(self, key: int) -> np.ndarray | None:
        rows = self._cache.get(key)
        if rows is not None:
            self._cache.move_to_end(key)
        return rows

    def start(self, media: MediaTokens) -> Progress:
        """Starts (or joins) computing one media item's rows; returns at once. The rows fill in
        prompt order (`Progress.ready`), so prefill can run behind the decoding."""
        rows = self.cached(media.key)
        if rows is not None:
            return Progress(media.key, rows, len(rows))
        shared = self._inflight.get(media.key)
        if shared is None:
            shared = Progress(media.key, np.zeros((media.rows, self.encoder.width), np.float32))
            shared.future = asyncio.ensure_future(self._compute(media, shared))
            self._inflight[media.key] = shared
            shared.future.add_done_callback(lambda _: self._inflight.pop(media.key, None))
        return shared

    async def wait(self, progress: Progress, field: str = "") -> np.ndarray:
        """The finished rows. Callers wanting the same media share one computation; when the
        last of them goes away (cancel, deadline), it stops and its ffmpeg is killed. Decoding
        errors become RequestErrors naming `field`."""
        if progress.future is None:
            return progress.rows
        progress.waiters += 1
        try:
            return await asyncio.shield(progress.future)
        except MediaTooLarge as error:
            raise ResourceExhausted(f"{field}: {error}") from None
        except MediaError as error:
            raise InvalidArgument(f"{field}: {error}") from None
        finally:
            progress.waiters -= 1
            if progress.waiters == 0 and not progress.future.done():
                progress.future.cancel()

    async def embed(self, media: MediaTokens) -> np.ndarray:
        """f32[rows, D] for one media item, once complete."""
        return await self.wait(self.start(media), media.source.field)

    async def embed_all(self, media: Sequence[MediaTokens],
                        known: Sequence[tuple[int, np.ndarray]] = ()) -> tuple:
        """(key, rows) for each distinct media item, in order, complete; `known` ones (a named
        cache's) are taken as they are."""
        out = dict(known)
        for item in media:
            if item.key not in out:
                out[item.key] = await self.embed(item)
        return tuple(out.items())

    async def _compute(self, media: MediaTokens, progress: Progress) -> np.ndarray:
        source = media.source
        if source.modality == IMAGE and media.grid is not None:
            patches = await self._decode_image(source)
            progress.rows[:] = await asyncio.to_thread(self.encoder.qwen_image, patches, media.grid)
            progress.ready = len(progress.rows)
        elif source.modality == IMAGE:
            pixels = await self._decode_image(source)
            progress.rows[:] = (await asyncio.to_thread(self.encoder.images, pixels[None]))[0]
            progress.ready = len(progress.rows)
        else:
            cancel = _Cancel()
            try:
                work = (self._temporal_patches if source.modality == VIDEO and media.grid else
                        self._video if source.modality == VIDEO else
                        self._audio_windows if media.audio_windows else self._audio)
                await asyncio.to_thread(work, media, progress, cancel)
            except asyncio.CancelledError:
                cancel.set()
                raise
        self.encoded += 1
        self._remember(media.key, progress.rows)
        return progress.rows

    def _remember(self, key: int, rows: np.ndarray) -> None:
        if rows.nbytes > self.cache_bytes:
            return
        self._cache[key] = rows
        self._cached_bytes += rows.nbytes
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes

    # ----- streamed decoding (worker threads) -----

    def _sound(self, windows, cancel: _Cancel):
        """Encoded sound rows, f32[n, D] per batch of windows, in order."""
        batch = []
        for window in windows:
            cancel.check()
            batch.append(window)
            if len(batch) == _AUDIO_BATCH:
                yield self.encoder.audio(np.stack(batch)).reshape(-1, self.encoder.width)
                batch = []
        if batch:
            yield self.encoder.audio(np.stack(batch)).reshape(-1, self.encoder.width)

    def _audio(self, media: MediaTokens, progress: Progress, cancel: _Cancel) -> None:
        source = media.source
        windows = audio_lib.load_windows(source.data if source.data is not None else source.path,
                                         source.mime_type, self.mel_spec,
                                         max_seconds=self.limits.max_seconds)
        try:
            for rows in self._sound(windows, cancel):
                take = min(len(rows), media.rows - progress.ready)
                progress.rows[progress.ready:progress.ready + take] = rows[:take]
                progress.ready += take  # after the rows are written: readers trust `ready`
        finally:
            windows.close()
        if progress.ready < media.rows:  # ran short of the probed duration: silence's rows
            log.warning("sound gave %d of %d rows; the rest stay zero", progress.ready, media.rows)
            progress.ready = media.rows

    def _audio_windows(self, media: MediaTokens, progress: Progress, cancel: _Cancel) -> None:
        """Audio in the layout's windows (`media.audio_windows`, 16 kHz samples each): features
        of each as the family's extractor makes them, the encoder masking each window's padding,
        and each window's audio rows (AudioConfig.valid_rows) in order."""
        source = media.source
        samples = audio_lib.stream_samples(source.data if source.data is not None else source.path,
                                           source.mime_type)
        windows = _cut(samples, media.audio_windows)
        try:
            while True:
                cancel.check()
                batch = [w for _, w in zip(range(_AUDIO_BATCH), windows)]
                if not batch:
                    break
                features = [whisper_features.extract(w, audio_lib.SAMPLE_RATE, self.audio_features)
                            for w in batch]
                rows = self.encoder.audio(np.stack([f.input_features for f in features]),
                                          np.array([f.valid_frames for f in features]))
                for f, window_rows in zip(features, rows):
                    n = self.encoder.valid_rows(f.valid_frames)
                    progress.rows[progress.ready:progress.ready + n] = window_rows[:n]
                    progress.ready += n  # after the rows are written: readers trust `ready`
        finally:
            samples.close()
        if progress.ready != media.rows:
            raise AssertionError(f"audio windows gave {progress.ready} rows, laid out {media.rows}")

    def _temporal_patches(self, media: MediaTokens, progress: Progress, cancel: _Cancel) -> None:
        """A video for a dynamic-resolution tower (Qwen2.5-VL's): frames decoded as displayed,
        resized and normalised as the processor does, and encoded a few temporal patches at a
        time (patches of different temporal positions never attend to each other, so the rows
        are those of one call over the whole video), rows completing in order."""
        source, read = media.source, media.source.video
        px = self.video_processor.pixels
        info = video_lib.probe_video(source.path, source.mime_type,
                                     max_seconds=self.limits.max_seconds)
        t, h, w = media.grid
        step = px.temporal_patch_size
        per_call = step * max(1, _PATCHES_PER_CALL // (h * w))  # frames per encoder call
        frames = video_lib.frames(source.path, info, size=None, fps=read.fps, start=read.start,
                                  end=read.end, chunk=_FRAME_BATCH, process_hook=cancel.watch)
        pending: list[np.ndarray] = []  # normalised frames [3, H, W] not yet encoded

        def encode(group: list[np.ndarray]) -> None:
            patches, grid = qwen2_vl_image.patchify(np.stack(group), px)
            rows = self.encoder.qwen_image(patches, grid)
            progress.rows[progress.ready:progress.ready + len(rows)] = rows
            progress.ready += len(rows)  # after the rows are written: readers trust `ready`

        try:
            for _, chunk in frames:
                cancel.check()
                pending += [qwen2_vl_image.resize_normalize(f, h * px.patch_size,
                                                            w * px.patch_size, px) for f in chunk]
                while len(pending) >= per_call:
                    encode(pending[:per_call])
                    del pending[:per_call]
        finally:
            frames.close()
        if pending:  # the last temporal patch padded with copies of the final frame
            encode(pending + [pending[-1]] * (-len(pending) % step))
        if progress.ready != media.rows:
            raise AssertionError(f"video gave {progress.ready} rows, laid out {media.rows}")

    def _video(self, media: MediaTokens, progress: Progress, cancel: _Cancel) -> None:
        """Frames and sound decoded side by side (two ffmpeg processes), so rows complete in
        prompt order: frame i's rows, then its sound's, then frame i + 1's."""
        source, layout, read = media.source, media.video, media.source.video
        info = video_lib.probe_video(source.path, source.mime_type,
                                     max_seconds=self.limits.max_seconds)
        per_frame = self.encoder.tokens_per_image
        # Where each frame's rows start in the media's rows, and where each sound row goes.
        starts = np.cumsum([0] + [per_frame + a1 - a0 for a0, a1 in layout.audio_slices])
        sound_at = np.concatenate([np.arange(a1 - a0) + starts[i] + per_frame
                                   for i, (a0, a1) in enumerate(layout.audio_slices)] or [[]])
        spec = image_lib.ImageSpec(size=self.encoder.image_size)
        frames = video_lib.frames(source.path, info, size=spec.size, fps=read.fps,
                                  start=read.start, end=read.end, chunk=_FRAME_BATCH,
                                  process_hook=cancel.watch)
        chunks, sound = None, iter(())
        if layout.audio_rows:
            chunks = video_lib.sound(source.path, info, start=read.start, end=layout.end,
                                     process_hook=cancel.watch)
            sound = self._sound(audio_lib.mel_windows(chunks, self.mel_spec), cancel)
        frames_done = sound_done = 0
        try:
            for _, chunk in frames:
                cancel.check()
                encoded = self.encoder.images(image_lib.normalize(chunk, spec))
                for j, rows in enumerate(encoded, frames_done):
                    progress.rows[starts[j]:starts[j] + per_frame] = rows
                frames_done += len(chunk)
                # Sound up to the end of the last decoded frame's slice.
                need = layout.audio_slices[frames_done - 1][1]
                while sound_done < need:
                    rows = next(sound, None)
                    if rows is None:
                        break
                    rows = rows[:layout.audio_rows - sound_done]
                    progress.rows[sound_at[sound_done:sound_done + len(rows)]] = rows
                    sound_done += len(rows)
                if sound_done < need:  # the sound ran short: its missing rows stay zero
                    sound_done = need
                # Complete: every frame before frames_done with its whole sound slice.
                done = frames_done
                while done > 0 and layout.audio_slices[done - 1][1] > sound_done:
                    done -= 1
                progress.ready = int(starts[done])
            for rows in sound:  # the remaining sound (a last slice longer than a chunk)
                rows = rows[:layout.audio_rows - sound_done]
                progress.rows[sound_at[sound_done:sound_done + len(rows)]] = rows
                sound_done += len(rows)
        finally:
            frames.close()
            if chunks is not None:
                chunks.close()
        progress.ready = len(progress.rows)


def _cut(chunks, sizes: Sequence[int]):
    """Sample chunks -> one array per window of `sizes` samples; audio past the last window is
    dropped and a stream short of it is padded with zeros (as librosa fixes the resampled
    length, which the decoder's streaming resampler can miss by a sample)."""
    buffer, held = [], 0
    for size in sizes:
        while held < size:
            chunk = next(chunks, None)
            if chunk is None:
                break
            buffer.append(chunk)
            held += len(chunk)
        joined = np.concatenate(buffer) if buffer else np.zeros(0, np.float32)
        window = np.zeros(size, np.float32)
        window[:min(size, len(joined))] = joined[:size]
        buffer, held = [joined[size:]], max(0, len(joined) - size)
        yield window


class Progress:
    """One media item's rows as they are computed: `rows[:ready]` are final. `future` completes
    with the rows (None when they came from the cache)."""

    def __init__(self, key: int, rows: np.ndarray, ready: int = 0):
        self.key, self.rows, self.ready = key, rows, ready
        self.future: asyncio.Future | None = None
        self.waiters = 0


class _Cancel:
    """Cancels a worker thread's decoding: checked between chunks, and kills running ffmpeg."""

    def __init__(self):
        self._event = threading.Event()
        self._procs = []

    def watch(self, process) -> None:
        self._procs.append(process)
        if self._event.is_set():
            process.cancel()

    def set(self) -> None:
        self._event.set()
        for process in self._procs:
            process.cancel()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the request was cancelled")
