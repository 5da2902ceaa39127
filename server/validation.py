"""Turns API requests into validated, tokenised work items (ids and numbers only).

Every check names the offending field and the limit it broke, so a client can fix its request
from the message alone. Nothing here touches the engine.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import uuid
from typing import Callable, Protocol

import numpy as np

from model.sampling import SamplingParams
from preprocess import prompt as prompt_lib
from preprocess.tokenizer_protocol import TextTokenizer
from ringserve.v1 import inference_pb2 as pb
from server.errors import InvalidArgument

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_REQUEST_ID_CHARS = 256
ROLES = ("user", "model")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the served model and server accept."""

    context_length: int  # prompt + output tokens, at most
    default_max_output_tokens: int  # used when the request leaves max_output_tokens unset


class CachedPrefix(Protocol):
    """What a named cache contributes to a prompt (see server/caches.py)."""

    name: str
    turns: tuple[tuple[str, str], ...]
    system: str | None
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated Generate call, as the engine loop sees it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int
    stop_sequences: tuple[str, ...]
    ignore_eos: bool = False  # generation_config.ignore_eos: stop ids are ordinary tokens
    pin_as: str | None = None  # compute the prompt only and pin its pages as this named cache
    # (media key, f32[rows, D] embeddings) of every media item whose placeholder ids (< 0) are in
    # prompt_ids, set by the servicer (server/media.py); rows may still be filling, and `ready`
    # then says how many leading prompt tokens have their inputs (server/media_rows.py).
    media: tuple = ()
    ready: Callable[[], int] | None = None
    # M-RoPE models with media in the prompt (server/media_rows.py, rope_positions): i32[3, P]
    # rotary positions of the prompt, and the delta the tokens after it turn by.
    rope_positions: np.ndarray | None = None
    rope_delta: int = 0


class MediaParts(Protocol):
    """Resolves media parts to laid-out ids (server/media.MediaResolver)."""

    def resolve(self, part, field: str): ...


def _contents(contents, field: str, media: MediaParts | None = None) -> list[tuple]:
    """Checks `contents` and returns it as (role, content) pairs, one per turn: content is the
    text when the turn is text only, else a tuple of texts and laid-out media in order."""
    turns = []
    for i, content in enumerate(contents):
        role = content.role or "user"
        if role not in ROLES:
            raise InvalidArgument(
                f"{field}[{i}].role: {content.role!r} is not a role; use 'user' or 'model'")
        if not content.parts:
            raise InvalidArgument(f"{field}[{i}].parts: empty; a Content needs at least one Part")
        segments = []
        for j, part in enumerate(content.parts):
            where = f"{field}[{i}].parts[{j}]"
            kind = part.WhichOneof("data")
            if kind is None:
                raise InvalidArgument(f"{where}: no data set (set text, inline_data or file_data)")
            if kind == "text":
                if not part.text:
                    raise InvalidArgument(f"{where}.text: empty")
                if part.HasField("video_metadata"):
                    raise InvalidArgument(f"{where}.video_metadata: only for video parts")
                if segments and isinstance(segments[-1], str):
                    segments[-1] += part.text
                else:
                    segments.append(part.text)
                continue
            if media is None:
                raise InvalidArgument(f"{where}: {kind} parts are not accepted here (text only)")
            segments.append(media.resolve(part, where))
        if len(segments) == 1 and isinstance(segments[0], str):
            turns.append((role, segments[0]))
        else:
            turns.append((role, tuple(segments)))
    return turns


def _system(request) -> str | None:
    if not request.HasField("system_instruction"):
        return None
    turns = _contents([request.system_instruction], "system_instruction")
    if not isinstance(turns[0][1], str):
        raise InvalidArgument("system_instruction: text parts only")
    return turns[0][1]


def conversation(request, media: MediaParts | None = None) -> tuple[list[tuple], str | None]:
    """The (role, content) turns and system instruction of a request, checked; media parts are
    resolved by `media` (none accepted without it)."""
    if not request.contents:
        raise InvalidArgument("contents: empty; a request needs at least one Content")
    return _contents(request.contents, "contents", media), _system(request)


def media_of(turns) -> list:
    """The laid-out media items of some turns, in order."""
    return [s for _, content in turns if not isinstance(content, str)
            for s in content if not isinstance(s, str)]


def render_prompt(request, tokenizer: TextTokenizer, cache: CachedPrefix | None = None,
                  media: MediaParts | None = None) -> tuple[list[int], list]:
    """The prompt token ids of a Generate or CountTokens request (chat template applied), and
    its media items (the cache's first). With a named cache, its turns and system instruction
    come first."""
    turns, system = conversation(request, media)
    if cache is not None:
        if system is not None:
            raise InvalidArgument(
                "system_instruction: not allowed with cached_content (the cache holds its own)")
        turns, system = [*cache.turns, *turns], cache.system
    try:
        ids = prompt_lib.render(turns, system, tokenizer)
    except ValueError as error:  # the checkpoint's template refused these turns (e.g. order)
        raise InvalidArgument(f"contents: {error}") from None
    if cache is not None and tuple(ids[:len(cache.token_ids)]) != cache.token_ids:
        raise InvalidArgument(f"cached_content: {cache.name} is not a prefix of this prompt")
    return ids, media_of(turns)


def _seed(config: pb.GenerationConfig) -> int:
    # Unseeded requests get a fresh random seed; SamplingParams takes any int64.
    return config.seed if config.HasField("seed") else secrets.randbits(63)


def _sampling(config: pb.GenerationConfig) -> SamplingParams:
    temperature = config.temperature if config.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(
            f"generation_config.temperature: {temperature} is invalid; use a finite value >= 0 "
            "(0 means greedy)")
    top_p = config.top_p if config.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):
        raise InvalidArgument(f"generation_config.top_p: {top_p} is outside (0, 1]")
    top_k = config.top_k if config.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument(f"generation_config.top_k: {top_k} is negative; use 0 for no limit")
    return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                          seed=_seed(config))


def _stop_sequences(config: pb.GenerationConfig) -> tuple[str, ...]:
    stops = tuple(config.stop_sequences)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(
            f"generation_config.stop_sequences: {len(stops)} given, at most {MAX_STOP_SEQUENCES}")
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidArgument(f"generation_config.stop_sequences[{i}]: empty")
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(
                f"generation_config.stop_sequences[{i}]: {len(stop)} characters, "
                f"at most {MAX_STOP_SEQUENCE_CHARS}")
    return stops


def validate_generate(request: pb.GenerateRequest, tokenizer: TextTokenizer, limits: Limits,
                      cache: CachedPrefix | None = None,
                      media: MediaParts | None = None) -> tuple[GenerationRequest, list]:
    """Validates and tokenises a Generate call; raises InvalidArgument naming the field."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"request_id: {len(request.request_id)} characters, at most {MAX_REQUEST_ID_CHARS}")
    config = request.generation_config
    params = _sampling(config)
    stops = _stop_sequences(config)
    if config.HasField("max_output_tokens") and config.max_output_tokens <= 0:
        raise InvalidArgument(
            f"generation_config.max_output_tokens: {config.max_output_tokens}; must be at least 1")
    prompt_ids, media_items = render_prompt(request, tokenizer, cache, media)
    room = limits.context_length - len(prompt_ids)
    if room < 1:
        raise InvalidArgument(
            f"contents: the prompt is {len(prompt_ids)} tokens; the model's context is "
            f"{limits.context_length} tokens, which leaves no room for output")
    if config.HasField("max_output_tokens"):
        max_new = config.max_output_tokens
        if max_new > room:
            raise InvalidArgument(
                f"generation_config.max_output_tokens: {max_new} plus the {len(prompt_ids)}-token "
                f"prompt exceeds the model's context of {limits.context_length} tokens "
                f"(at most {room} for this prompt)")
    else:
        max_new = min(limits.default_max_output_tokens, room)
    return GenerationRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_ids=tuple(prompt_ids),
        params=params,
        max_new_tokens=max_new,
        stop_sequences=stops,
        ignore_eos=config.ignore_eos,
    ), media_items
