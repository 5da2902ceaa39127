"""The SDK's plain-Python values, and their conversion to and from the v1 protos.

Both clients (`client.Client`, `aio.AsyncClient`) build requests and read responses through the
functions here, so the two stay identical in what they accept and return.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

from google.protobuf import duration_pb2, timestamp_pb2

from ringserve.media import Media
from ringserve.v1 import inference_pb2 as pb

# What `contents` may hold, turn by turn: a bare string is one user turn; a list of parts (text
# and media) is one user turn; a (role, text | part | list of parts) pair is a turn of that role.
PartLike = Union[str, Media, Mapping, pb.Part]
Turn = Union[str, list[PartLike], tuple[str, Union[str, Media, list[PartLike]]], Mapping,
             pb.Content]
Contents = Union[str, Media, Sequence[Turn]]
ROLES = ("user", "model")
# Turns a media part into its wire form; the clients pass one that uploads large files. The
# default sends everything inline (a file is read whole).
Resolve = Callable[[Media], pb.Part]


def _inline(media: Media) -> pb.Part:
    return media.inline_part()


def modality_counts(details) -> dict[str, int]:
    """repeated ModalityTokenCount as {"TEXT": n, "IMAGE": m, ...} (repeats summed)."""
    counts: dict[str, int] = {}
    for d in details:
        name = pb.Modality.Name(d.modality)
        counts[name] = counts.get(name, 0) + d.token_count
    return counts


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts of one Generate call (the server's usage_metadata)."""

    prompt_token_count: int
    candidates_token_count: int
    cached_content_token_count: int
    total_token_count: int
    # prompt_token_count by modality, e.g. {"TEXT": 40, "IMAGE": 256}; a video's sound counts as
    # AUDIO and its timestamps as TEXT. Empty from a server that does not split the count.
    prompt_tokens_details: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One streamed Generate response.

    `finish_reason` ("STOP", "MAX_TOKENS", "STOP_SEQUENCE", "CANCELLED") and `usage` are set on the
    last chunk only; `time_to_first_token` (seconds, measured by the server) on the first chunk
    that carries a token and again on the last.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None
    time_to_first_token: float | None
    request_id: str


@dataclasses.dataclass(frozen=True)
class Result:
    """A whole Generate call, collected (`generate_text`)."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    time_to_first_token: float | None
    token_ids: tuple[int, ...]
    request_id: str


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The served model (GetModelInfo)."""

    name: str
    input_token_limit: int
    output_token_limit: int
    vocab_size: int
    supported_modalities: list[str]
    parameter_count: int
    dtype: str
    # Tokens per image (and per video frame) and per second of audio, when the model takes those
    # (markers and timestamps add a few: use count_tokens for exact numbers); 0 otherwise.
    tokens_per_image: int = 0
    audio_tokens_per_second: int = 0
    max_media_bytes: int = 0  # largest media accepted, inline or uploaded; 0: none / unknown
    max_media_duration: float | None = None  # seconds of audio or video; None: unknown


@dataclasses.dataclass(frozen=True)
class ServerStats:
    """Live counters of the serving engine (GetStats).

    The KV fields describe the paged KV cache; an older server that lacks them reports 0.
    """

    running_requests: int  # holding a decode slot
    waiting_requests: int  # accepted, not yet holding a slot
    decode_slots: int
    prompt_tokens_total: int
    generated_tokens_total: int
    finished_requests: dict[str, int]  # by finish reason name, since the server started
    kv_pages_total: int = 0  # pages in the pool (the null page excluded)
    kv_pages_used: int = 0  # held by requests or pinned by named caches
    kv_pages_cached: int = 0  # holding reusable prefix content (free or not)
    kv_pages_pinned: int = 0  # pinned by named caches
    kv_page_tokens: int = 0  # tokens per page
    prefix_cache_hit_rate: float = 0.0  # share of looked-up prompt tokens found cached
    cached_prompt_tokens_total: int = 0  # prompt tokens served from the prefix cache
    preemptions_total: int = 0  # running requests sent back to wait because pages ran out
    kv_token_slots_allocated: int = 0  # token slots in the pages running requests hold
    kv_token_slots_live: int = 0  # of those, slots holding a computed token

    @property
    def kv_paging_waste(self) -> float:
        """Share of allocated KV token slots not (yet) holding a token: 1 - live / allocated."""
        if not self.kv_token_slots_allocated:
            return 0.0
        return 1.0 - self.kv_token_slots_live / self.kv_token_slots_allocated


@dataclasses.dataclass(frozen=True)
class CachedContent:
    """A named context cache (CreateCache, GetCache, ...). Times are aware UTC datetimes.

    Pass it (or its `name`) as `cached_content=` to `generate`, `generate_text` or
    `count_tokens`: its contents and system instruction come first, then the request's contents.
    """

    name: str  # "cachedContents/{id}", chosen by the server
    display_name: str
    create_time: datetime.datetime | None
    update_time: datetime.datetime | None
    expire_time: datetime.datetime | None
    total_token_count: int  # tokens of the cached prefix (chat template included)
    pinned_token_count: int  # of those, tokens held in pinned KV pages (whole pages)


@dataclasses.dataclass(frozen=True)
class TokenCount:
    """CountTokens in full (`count_tokens_detail`)."""

    total_tokens: int  # prompt tokens, chat template included
    cached_content_token_count: int  # of total_tokens, those the named cache holds
    # total_tokens by modality, e.g. {"TEXT": 12, "IMAGE": 256, "AUDIO": 100}
    prompt_tokens_details: dict[str, int] = dataclasses.field(default_factory=dict)


# ---- requests ----------------------------------------------------------------------------------

def to_content(turn: Turn, *, default_role: str = "user",
               resolve: Resolve | None = None) -> pb.Content:
    """One turn as a `Content`.

    Accepts a string (a `default_role` turn), a media part (`Image`, `Audio`, `Video`) or a list
    of parts (strings and media, e.g. `["Describe this", Image.from_file("cat.png")]`), each a
    `default_role` turn; a `(role, text)` pair, or `(role, part)` / `(role, [parts])`; a dict
    shaped like the proto (`{"role": "model", "parts": [{"text": "..."}]}`, or the shorthand
    `{"role": ..., "text": ...}`) or a `Content` message. `resolve` turns media parts into their
    wire form (default: inline).
    """
    resolve = resolve or _inline
    if isinstance(turn, pb.Content):
        return turn
    if isinstance(turn, str):
        return pb.Content(role=default_role, parts=[pb.Part(text=turn)])
    if isinstance(turn, (Media, list)):
        return pb.Content(role=default_role, parts=_to_parts(turn, resolve))
    if isinstance(turn, tuple) and len(turn) == 2 and all(isinstance(x, str) for x in turn):
        role, text = turn
        return pb.Content(role=role, parts=[pb.Part(text=text)])
    if (isinstance(turn, tuple) and len(turn) == 2 and isinstance(turn[0], str)
            and isinstance(turn[1], (Media, list))):
        role, parts = turn
        return pb.Content(role=role, parts=_to_parts(parts, resolve))
    if isinstance(turn, Mapping):
        extra = set(turn) - {"role", "parts", "text"}
        if extra or ("parts" in turn) == ("text" in turn):
            raise TypeError(
                "a content dict takes 'role' and either 'parts' or 'text', "
                f"got keys {sorted(turn)}")
        if "text" in turn:
            parts = [pb.Part(text=turn["text"])]
        else:
            parts = _to_parts(list(turn["parts"]), resolve)
        return pb.Content(role=turn.get("role", default_role), parts=parts)
    raise TypeError(
        f"cannot use {type(turn).__name__} as a turn; pass a str, a list of parts, a (role, text) "
        "tuple, a dict or a ringserve.v1.inference_pb2.Content")


def _to_parts(parts: Media | list, resolve: Resolve) -> list[pb.Part]:
    if isinstance(parts, Media):
        parts = [parts]
    if not parts:
        raise ValueError("a turn's list of parts is empty; give at least one str or media part")
    return [_to_part(p, resolve) for p in parts]


def _to_part(part, resolve: Resolve) -> pb.Part:
    if isinstance(part, pb.Part):
        return part
    if isinstance(part, str):
        return pb.Part(text=part)
    if isinstance(part, Media):
        return resolve(part)
    if isinstance(part, Mapping) and set(part) == {"text"}:
        return pb.Part(text=part["text"])
    raise TypeError(f"cannot use {part!r} as a part; pass a str, {{'text': str}}, an Image, "
                    "Audio or Video, or a ringserve.v1.inference_pb2.Part")


def to_contents(contents: Contents, resolve: Resolve | None = None) -> list[pb.Content]:
    """`contents` as a list of `Content`: a string (or one media part) is one user turn; a
    sequence is turn by turn, where a list inside it is one turn of several parts."""
    if isinstance(contents, (str, Media, pb.Content, Mapping)) or (
            isinstance(contents, tuple) and len(contents) == 2 and contents[0] in ROLES
            and isinstance(contents[1], (str, Media, list))):
        # A single turn passed bare.
        return [to_content(contents, resolve=resolve)]
    if not isinstance(contents, Iterable):
        raise TypeError(
            f"contents must be a str or a sequence of turns, not {type(contents).__name__}")
    turns = list(contents)
    for i, turn in enumerate(turns):
        if isinstance(turn, Media):
            # ["Describe this", image] would be two user turns: say how to make it one.
            raise TypeError(
                f"contents[{i}] is a bare {type(turn).__name__} in a list of turns; put media "
                "in a turn with its text, as a list: [['Describe this', image]] (one user "
                "turn), or ('user', ['Describe this', image])")
    return [to_content(turn, resolve=resolve) for turn in turns]


def _system_content(system_instruction: str | Turn | None,
                    resolve: Resolve | None = None) -> pb.Content | None:
    if system_instruction is None:
        return None
    return to_content(system_instruction, default_role="", resolve=resolve)


def generate_request(
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
    resolve: Resolve | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; options left as None stay unset so the server applies its defaults.
    `resolve` places media parts (default: inline)."""
    if isinstance(stop_sequences, str):
        stop_sequences = [stop_sequences]
    config = pb.GenerationConfig(
        max_output_tokens=max_output_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, stop_sequences=stop_sequences or [], ignore_eos=ignore_eos)
    return pb.GenerateRequest(
        request_id=request_id or "", contents=to_contents(contents, resolve),
        system_instruction=_system_content(system_instruction, resolve), generation_config=config,
        cached_content=cache_name(cached_content))


def count_tokens_request(contents: Contents,
                         system_instruction: str | Turn | None = None,
                         cached_content: str | CachedContent | None = None,
                         resolve: Resolve | None = None) -> pb.CountTokensRequest:
    return pb.CountTokensRequest(contents=to_contents(contents, resolve),
                                 system_instruction=_system_content(system_instruction, resolve),
                                 cached_content=cache_name(cached_content))


# ---- named caches ------------------------------------------------------------------------------

Ttl = Union[float, int, datetime.timedelta]


def cache_name(cached_content: str | CachedContent | None) -> str:
    """The name to send for `cached_content=`: a name string, a `CachedContent`, or None ("")."""
    if cached_content is None:
        return ""
    if isinstance(cached_content, CachedContent):
        return cached_content.name
    if isinstance(cached_content, str):
        return cached_content
    raise TypeError(f"cached_content must be a cache name or a CachedContent, "
                    f"not {type(cached_content).__name__}")


def _duration(ttl: Ttl) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    if isinstance(ttl, datetime.timedelta):
        message.FromTimedelta(ttl)
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        message.FromNanoseconds(round(ttl * 1e9))
    else:
        raise TypeError(f"ttl must be seconds (a number) or a datetime.timedelta, "
                        f"not {type(ttl).__name__}")
    return message


def _timestamp(when: datetime.datetime) -> timestamp_pb2.Timestamp:
    if not isinstance(when, datetime.datetime):
        raise TypeError(f"expire_time must be a datetime.datetime, not {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("expire_time must be timezone-aware "
                         "(e.g. datetime.datetime.now(datetime.timezone.utc) + ...)")
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(when.astimezone(datetime.timezone.utc))
    return message


def create_cache_request(contents: Contents, *, system_instruction: str | Turn | None = None,
                         ttl: Ttl | None = None, expire_time: datetime.datetime | None = None,
                         display_name: str = "",
                         resolve: Resolve | None = None) -> pb.CreateCacheRequest:
    """A CreateCacheRequest; with neither ttl nor expire_time the server's default (1 h) holds."""
    return pb.CreateCacheRequest(
        contents=to_contents(contents, resolve),
        system_instruction=_system_content(system_instruction, resolve),
        ttl=None if ttl is None else _duration(ttl),
        expire_time=None if expire_time is None else _timestamp(expire_time),
        display_name=display_name or "")


def update_cache_request(name: str | CachedContent, *, ttl: Ttl | None = None,
                         expire_time: datetime.datetime | None = None) -> pb.UpdateCacheRequest:
    return pb.UpdateCacheRequest(
        name=cache_name(name), ttl=None if ttl is None else _duration(ttl),
        expire_time=None if expire_time is None else _timestamp(expire_time))


def _datetime(message, field: str) -> datetime.datetime | None:
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=datetime.timezone.utc)


def to_cached_content(message: pb.CachedContent) -> CachedContent:
    return CachedContent(
        name=message.name, display_name=message.display_name,
        create_time=_datetime(message, "create_time"),
        update_time=_datetime(message, "update_time"),
        expire_time=_datetime(message, "expire_time"),
        total_token_count=message.total_token_count,
        pinned_token_count=message.pinned_token_count)


def to_token_count(response: pb.CountTokensResponse) -> TokenCount:
    return TokenCount(total_tokens=response.total_tokens,
                      cached_content_token_count=response.cached_content_token_count,
                      prompt_tokens_details=modality_counts(response.prompt_tokens_details))


# ---- responses ---------------------------------------------------------------------------------

def to_chunk(response: pb.GenerateResponse) -> Chunk:
    usage = None
    if response.HasField("usage_metadata"):
        u = response.usage_metadata
        usage = Usage(u.prompt_token_count, u.candidates_token_count,
                      u.cached_content_token_count, u.total_token_count,
                      modality_counts(u.prompt_tokens_details))
    ttft = None
    if response.HasField("time_to_first_token"):
        ttft = response.time_to_first_token.ToNanoseconds() / 1e9
    reason = None
    if response.finish_reason != pb.GenerateResponse.FINISH_REASON_UNSPECIFIED:
        reason = pb.GenerateResponse.FinishReason.Name(response.finish_reason)
    return Chunk(text=response.text, token_ids=tuple(response.token_ids), finish_reason=reason,
                 usage=usage, time_to_first_token=ttft, request_id=response.request_id)


class ResultBuilder:
    """Folds chunks into a `Result` (shared by the sync and async `generate_text`)."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._ids: list[int] = []
        self._last: Chunk | None = None
        self._ttft: float | None = None

    def add(self, chunk: Chunk) -> None:
        self._texts.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        if chunk.time_to_first_token is not None:
            self._ttft = chunk.time_to_first_token
        self._last = chunk

    def result(self) -> Result:
        last = self._last
        return Result(text="".join(self._texts),
                      finish_reason=last.finish_reason if last else None,
                      usage=last.usage if last else None, time_to_first_token=self._ttft,
                      token_ids=tuple(self._ids), request_id=last.request_id if last else "")


def to_model_info(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=info.name, input_token_limit=info.input_token_limit,
        output_token_limit=info.output_token_limit, vocab_size=info.vocab_size,
        supported_modalities=[pb.Modality.Name(m) for m in info.supported_modalities],
        parameter_count=info.parameter_count, dtype=info.dtype,
        tokens_per_image=info.tokens_per_image,
        audio_tokens_per_second=info.audio_tokens_per_second,
        max_media_bytes=info.max_media_bytes,
        max_media_duration=(info.max_media_duration.ToNanoseconds() / 1e9
                            if info.HasField("max_media_duration") else None))


def to_server_stats(stats: pb.ServerStats) -> ServerStats:
    return ServerStats(
        running_requests=stats.running_requests, waiting_requests=stats.waiting_requests,
        decode_slots=stats.decode_slots, prompt_tokens_total=stats.prompt_tokens_total,
        generated_tokens_total=stats.generated_tokens_total,
        finished_requests=dict(stats.finished_requests),
        kv_pages_total=stats.kv_pages_total, kv_pages_used=stats.kv_pages_used,
        kv_pages_cached=stats.kv_pages_cached, kv_pages_pinned=stats.kv_pages_pinned,
        kv_page_tokens=stats.kv_page_tokens, prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        cached_prompt_tokens_total=stats.cached_prompt_tokens_total,
        preemptions_total=stats.preemptions_total,
        kv_token_slots_allocated=stats.kv_token_slots_allocated,
        kv_token_slots_live=stats.kv_token_slots_live)


# ---- grpc.health.v1, without grpcio-health-checking ----------------------------------------------
# HealthCheckRequest {string service = 1;}  HealthCheckResponse {ServingStatus status = 1;}
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in health response")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def health_request(service: str) -> bytes:
    name = service.encode()
    return b"\x0a" + _varint(len(name)) + name if name else b""


def health_status(data: bytes) -> str:
    """The ServingStatus name in a serialized HealthCheckResponse (skips unknown fields)."""
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire_type} in health response")
    return _HEALTH_STATUS.get(status, f"UNKNOWN_STATUS_{status}")
