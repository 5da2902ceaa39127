"""Prompt ids from (role, content) turns: the checkpoint's chat template where its tokenizer has
one (preprocess/chat_template.py, rendered as transformers renders it), else ringserve's built-in
Gemma-style template:

    <s><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n

Built-in template ids are built by concatenating special ids with encoded text segments, never by
encoding the marker strings, so a user who types "<start_of_turn>" gets plain text, not a turn.
Each stretch of text between two markers ("user\n{text}", "\n", "model\n") is encoded whole, as
tokenizers that split on special tokens do with the full template string. Chat templates give the
same guarantee another way (see chat_template.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Union

from preprocess import chat_template
from preprocess.tokenizer_protocol import TextTokenizer

USER = "user"
MODEL = "model"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


class MediaSegment(Protocol):
    """Media inside a turn, already laid out as prompt ids (server/media.py makes them). A chat
    template sees it as a content item {"type": "image" | "audio" | "video"} and the ids replace
    what the template writes for that item (or, with an optional `expansion`, one token of it:
    preprocess/chat_template.py)."""

    ids: tuple[int, ...]


# A turn's content: plain text, or text and media in order.
TurnContent = Union[str, Sequence[Union[str, MediaSegment]]]


def render(
    contents: Sequence[tuple[str, TurnContent]],
    system_instruction: str | None,
    tokenizer: TextTokenizer,
) -> list[int]:
    """Prompt ids for `contents`, (role, text) pairs with role 'user', 'model' or '' (user).

    Built-in template: the system instruction is prepended to the first user turn, then a blank
    line (Gemma has no system role); with no user turn first, it becomes a user turn of its own.
    A final 'model' turn is left open, so the answer continues it; otherwise a new model turn is
    opened. Tokenizers without turn pieces (a plain Llama tokenizer.model) get bos + the texts
    joined by newlines.
    With a checkpoint's chat template, 'model' is its 'assistant', the system instruction a
    leading 'system' message, and the same rules for the last turn hold.
    """
    turns = _checked(contents)
    template = chat_template.for_tokenizer(tokenizer)
    if template is not None:
        return template.render(_assistant_roles(turns), system_instruction)
    turns = _fold_system(turns, system_instruction)
    start = tokenizer.token_id(START_OF_TURN)
    end = tokenizer.token_id(END_OF_TURN)
    ids = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    if start is None or end is None:
        if any(not isinstance(text, str) for _, text in turns):
            raise ValueError("this tokenizer has no turn pieces; media needs a chat template")
        return ids + tokenizer.encode("\n".join(text for _, text in turns))
    for i, (role, text) in enumerate(turns):
        ids += [start, *_encode_turn(role, text, tokenizer)]
        if i == len(turns) - 1 and role == MODEL:
            return ids  # pre-filled answer: the model goes on from here
        ids += [end, *tokenizer.encode("\n")]
    return ids + [start, *tokenizer.encode(f"{MODEL}\n")]


def render_prefix(
    contents: Sequence[tuple[str, TurnContent]],
    system_instruction: str | None,
    tokenizer: TextTokenizer,
) -> list[int]:
    """Ids of `contents` as the closed start of a longer conversation (every turn ended).

    For any further turns, `render(contents + more, system_instruction)` begins with exactly these
    ids, which is what lets a named cache hold them. Needs a tokenizer with turn pieces: without
    them the fallback template encodes the whole text at once, so no prefix is stable. A chat
    template's prefix is checked against longer conversations; ValueError where it differs.
    """
    turns = _checked(contents)
    template = chat_template.for_tokenizer(tokenizer)
    if template is not None:
        return template.render_prefix(_assistant_roles(turns), system_instruction)
    turns = _fold_system(turns, system_instruction)
    start = tokenizer.token_id(START_OF_TURN)
    end = tokenizer.token_id(END_OF_TURN)
    if start is None or end is None:
        raise ValueError("this tokenizer has no turn pieces, so a conversation has no stable "
                         "token prefix to cache")
    ids = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    for role, text in turns:
        ids += [start, *_encode_turn(role, text, tokenizer), end, *tokenizer.encode("\n")]
    return ids


def stop_token_ids(tokenizer: TextTokenizer) -> frozenset[int]:
    """Ids that end an answer: the checkpoint's eos ids, and the token that ends a turn: the chat
    template's (<|im_end|>, <end_of_turn>), or <end_of_turn> where the tokenizer has it."""
    template = chat_template.for_tokenizer(tokenizer)
    end = template.end_of_turn_id if template is not None else tokenizer.token_id(END_OF_TURN)
    ids = {*tokenizer.eos_ids, end}
    return frozenset(i for i in ids if i is not None and i >= 0)


def _encode_turn(role: str, content: TurnContent, tokenizer: TextTokenizer) -> list[int]:
    """Ids of "{role}\n{content}": each run of text between media encoded whole, media ids as laid
    out. Text-only content encodes exactly as the plain template always has."""
    if isinstance(content, str):
        return tokenizer.encode(f"{role}\n{content}")
    ids, text = [], f"{role}\n"
    for segment in content:
        if isinstance(segment, str):
            text += segment
            continue
        if text:
            ids += tokenizer.encode(text)
            text = ""
        ids += segment.ids
    return ids + tokenizer.encode(text) if text else ids


def _checked(contents: Sequence[tuple[str, TurnContent]]) -> list[tuple[str, TurnContent]]:
    """(role, content) pairs with role 'user' or 'model' ('' reads 'user')."""
    if not contents:
        raise ValueError("contents is empty: a prompt needs at least one (role, text) turn")
    turns = []
    for index, (role, text) in enumerate(contents):
        role = role or USER
        if role not in (USER, MODEL):
            raise ValueError(
                f"contents[{index}] has unknown role {role!r}: use 'user', 'model' or '' (user)"
            )
        turns.append((role, text))
    return turns


def _assistant_roles(turns: list[tuple[str, TurnContent]]) -> list[tuple[str, TurnContent]]:
    """Turns in chat templates' words: 'model' is 'assistant'."""
    return [(chat_template.ASSISTANT if role == MODEL else chat_template.USER, content)
            for role, content in turns]


def _fold_system(
    turns: list[tuple[str, TurnContent]], system_instruction: str | None
) -> list[tuple[str, TurnContent]]:
    """The built-in template's system instruction: before the first user turn's text."""
    if system_instruction:
        if turns[0][0] == USER:
            first = turns[0][1]
            turns[0] = (USER, f"{system_instruction}\n\n{first}" if isinstance(first, str)
                        else (f"{system_instruction}\n\n", *first))
        else:
            turns.insert(0, (USER, system_instruction))
    return turns
