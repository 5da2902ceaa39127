"""A checkpoint's Jinja chat template, rendered as transformers renders it, to prompt ids.

transformers renders the template to one string and encodes that, special tokens recognised
anywhere in it, so a user who types "<|im_start|>system" opens a real turn. Here the ids equal
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` for ordinary text, but only
the template itself can write a special token:

1. In every string the user supplied (turn text, the system instruction) each special token gets
   a BREAK character before, between and after its characters. BREAK is a private-use character
   found in no input, so whatever the template does with the text (trim, split, concatenate), no
   special token can match inside it.
2. The template renders in the Jinja environment transformers uses (sandboxed, trim_blocks,
   lstrip_blocks, loopcontrols, raise_exception, strftime_now, tojson, {% generation %}), with
   the same variables: messages, add_generation_prompt, bos_token, eos_token, ...
3. The text is split at the special tokens in it, all written by the template. Each stretch
   between two of them is encoded whole as plain text, BREAKs removed: tokenizers encodes a string
   the same way (it splits at added tokens and encodes the pieces between them on their own), so
   the ids match.
4. Media: each item goes to the template as a content item ({"type": "image"}, as transformers'
   processors pass them) between two text items holding the OPEN and CLOSE sentinels. What the
   template writes for the item, between them, is replaced by the item's laid-out ids; or, when
   the item names an `expansion` (server/media_markup.py) whose token the template wrote, only
   that token is, the way the family's processor expands it before tokenizing. A second render
   without the sentinels checks that they changed nothing else.

A conversation that ends in an assistant turn is continued, as transformers'
`continue_final_message` does it: a tag after the turn's text marks where the prompt ends.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Union

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from preprocess.tokenizer_protocol import TextTokenizer, alternation

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
# A stretch of text to encode whole, a special token's id, or a media item's laid-out ids.
Chunk = Union[str, int, tuple[int, ...]]
# What a turn holds: text, or text and media (objects with `.ids`) in order.
Content = Union[str, Sequence[Any]]

_PRIVATE = re.compile("[\U000F0000-\U000FFFFD]")  # Supplementary Private Use Area-A
_NAMED = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplateError(ValueError):
    """The conversation does not fit the checkpoint's chat template (the template raised, say
    "roles must alternate", or drops text it must keep): a bad request, INVALID_ARGUMENT."""


@dataclasses.dataclass(frozen=True)
class _Markers:
    """Private-use characters that occur in no input of one render."""

    brk: str  # inside the user's special-token strings
    open: str  # before a media item
    close: str  # after it
    tag: str  # where a continued final turn ends

    @classmethod
    def avoiding(cls, texts: Iterable[str]) -> _Markers:
        used = set()
        for text in texts:
            used.update(_PRIVATE.findall(text))
        free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in used)
        return cls(*(next(free) for _ in range(4)))


class ChatTemplate:
    """A template's source bound to the tokenizer whose special tokens it writes.

    Turns are (role, content) with role 'user' or 'assistant'; the system instruction becomes a
    leading 'system' message (templates without a system role fold it in themselves, as Gemma 3's
    does). Raises ChatTemplateError where the conversation does not fit the template.
    """

    def __init__(self, source: str, tokenizer: TextTokenizer):
        self._source = source
        self._template = _compile(source)
        self._tokenizer = tokenizer
        self._specials = tokenizer.special_tokens
        self._special_re = alternation(self._specials)
        ids = {name: getattr(tokenizer, name.replace("_token", "_id")) for name in _NAMED}
        self._variables = {name: tokenizer.pieces([i])[0] for name, i in ids.items() if i >= 0}
        self.end_of_turn_id: int | None = self._end_of_turn()

    def render(self, turns: Sequence[tuple[str, Content]], system: str | None) -> list[int]:
        """Prompt ids: a generation prompt opened after the last turn, or the last turn continued
        when it is the assistant's."""
        return self.encode(self.chunks(turns, system, closed=False))

    def render_prefix(self, turns: Sequence[tuple[str, Content]], system: str | None) -> list[int]:
        """Ids of `turns` closed (no generation prompt), checked to begin every longer
        conversation's `render`; raises ValueError where the template makes no such prefix."""
        prefix = self.chunks(turns, system, closed=True)
        following = USER if turns[-1][0] == ASSISTANT else ASSISTANT
        other = ASSISTANT if following == USER else USER
        checked = 0
        for more in ([(following, "x")], [(following, "x"), (other, "y")]):
            try:
                longer = self.chunks([*turns, *more], system, closed=False)
            except ChatTemplateError:
                continue  # a continuation the template refuses never needs this prefix
            # Equal chunks give equal ids; the text after the prefix is its own chunk, so it
            # cannot merge with the prefix's last text when encoded.
            if longer[:len(prefix)] != prefix or len(longer) <= len(prefix):
                raise ValueError(
                    "this chat template renders a conversation differently once it goes on, so "
                    "it has no stable token prefix to cache")
            checked += 1
        if not checked:
            raise ValueError("this chat template renders no continuation of this conversation, "
                             "so its prefix cannot be checked")
        return self.encode(prefix)

    def chunks(self, turns: Sequence[tuple[str, Content]], system: str | None, *,
               closed: bool) -> list[Chunk]:
        """The rendered conversation as chunks. `closed`: every turn ended, no generation prompt
        (a named cache); else as `render`."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        texts = [system or "", *(t for _, c in turns for t in _texts(c))]
        markers = _Markers.avoiding([self._source, *self._specials, *texts])
        media = [s for _, c in turns if not isinstance(c, str) for s in c if not isinstance(s, str)]
        go_on = not closed and turns[-1][0] == ASSISTANT
        messages = self._messages(turns, system, markers, go_on, sentinels=True)
        text = self._render(messages, add_generation_prompt=not closed and not go_on)
        if media:
            plain = self._render(self._messages(turns, system, markers, go_on, sentinels=False),
                                 add_generation_prompt=not closed and not go_on)
            # Each item's rendering, in order, non-empty (a template that writes the item
            # elsewhere, say all images before the text, leaves its sentinels empty).
            items = re.findall(f"{markers.open}([^{markers.close}]*){markers.close}", text)
            if (len(items) != len(media) or not all(items) or plain != text.replace(
                    markers.open, "").replace(markers.close, "")):
                raise ChatTemplateError(
                    "this chat template does not write each media item in its place, so the "
                    "media cannot be placed")
        if go_on:
            at = text.rfind(markers.tag)
            if at < 0:
                raise ChatTemplateError("this chat template drops the final model turn's text, so "
                                        "the turn cannot be continued")
            # As transformers: the tag is followed by a space; if the template trimmed it, the
            # turn's own trailing whitespace was trimmed too.
            text = text[:at] if text[at + 1:at + 2] == " " else text[:at].rstrip()
        # Each item's rendering becomes one OPEN where its ids go: in place of the token its
        # `expansion` names (the rest of the rendering, and the expansion's text, stay text,
        # tokenized with their neighbours as the family's processor does), else in place of all.
        pieces = re.split(f"{markers.open}(.*?){markers.close}", text, flags=re.S)
        inserts = []
        for k in range(1, len(pieces), 2):
            item, rendered = media[k // 2], pieces[k]
            slot = getattr(item, "expansion", None)
            if slot is not None and slot.token in rendered:
                pieces[k] = rendered.replace(slot.token, slot.before + markers.open + slot.after, 1)
                inserts.append(slot.ids)
            else:
                pieces[k] = markers.open
                inserts.append(tuple(item.ids))
        chunks: list[Chunk] = []
        for k, stretch in enumerate("".join(pieces).split(markers.open)):
            if k:
                chunks.append(tuple(inserts[k - 1]))
            chunks += self._split(stretch, markers.brk)
        return chunks

    def encode(self, chunks: Iterable[Chunk]) -> list[int]:
        ids: list[int] = []
        for chunk in chunks:
            if isinstance(chunk, str):
                ids += self._tokenizer.encode(chunk)
            elif isinstance(chunk, int):
                ids.append(chunk)
            else:
                ids += chunk
        return ids

    def _messages(self, turns, system, markers: _Markers, go_on: bool, sentinels: bool) -> list:
        messages = [{"role": SYSTEM, "content": self._break(system, markers)}] if system else []
        for index, (role, content) in enumerate(turns):
            tag = markers.tag + " " if go_on and index == len(turns) - 1 else ""
            if isinstance(content, str):
                messages.append({"role": role, "content": self._break(content, markers) + tag})
                continue
            items: list[dict] = []
            for segment in content:
                if isinstance(segment, str):
                    items.append({"type": "text", "text": self._break(segment, markers)})
                elif sentinels:
                    items += [{"type": "text", "text": markers.open},
                              {"type": _media_type(segment)},
                              {"type": "text", "text": markers.close}]
                else:
                    items.append({"type": _media_type(segment)})
            if tag and items and items[-1]["type"] == "text" and items[-1]["text"] != markers.close:
                items[-1]["text"] += tag
            elif tag:
                items.append({"type": "text", "text": tag})
            messages.append({"role": role, "content": items})
        return messages

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._variables)
        except Exception as error:  # the template's own checks, or its code failing on this input
            raise ChatTemplateError(f"chat template: {error}") from None

    def _break(self, text: str, markers: _Markers) -> str:
        """`text` with BREAK around and between the characters of each special token in it."""
        brk = markers.brk
        return self._special_re.sub(lambda m: brk + brk.join(m.group()) + brk, text)

    def _split(self, text: str, brk: str) -> list[Chunk]:
        """Text -> text stretches and special ids, at the special tokens the template wrote."""
        chunks: list[Chunk] = []
        start = 0
        for match in self._special_re.finditer(text):
            if len(match.group()) == 1 and text[match.start() - 1:match.start()] == brk == (
                    text[match.end():match.end() + 1]):
                continue  # a one-character token the user typed (longer ones cannot match)
            token = self._specials[match.group()]
            before = text[start:match.start()]
            chunks.append(before.rstrip() if token.lstrip else before)
            chunks.append(token.id)
            start = match.end()
            if token.rstrip:
                start = len(text) - len(text[start:].lstrip())
        chunks.append(text[start:])
        return [c if isinstance(c, int) else c.replace(brk, "") for c in chunks
                if not isinstance(c, str) or c.replace(brk, "")]

    def _end_of_turn(self) -> int | None:
        """The special token the template ends an assistant turn with (<|im_end|>,
        <end_of_turn>): the first one after the turn's text. None if it writes none."""
        probe = "\U000FFFFD"
        try:
            chunks = self.chunks([(USER, "x"), (ASSISTANT, probe)], None, closed=True)
        except ChatTemplateError:
            return None
        for k, chunk in enumerate(chunks):
            if isinstance(chunk, str) and probe in chunk:
                after = chunks[k + 1] if k + 1 < len(chunks) else None
                return after if isinstance(after, int) else None
        return None


@functools.lru_cache(maxsize=32)
def for_tokenizer(tokenizer: TextTokenizer) -> ChatTemplate | None:
    """The tokenizer's chat template, compiled once per tokenizer; None where it has none."""
    if tokenizer.chat_template is None:
        return None
    return ChatTemplate(tokenizer.chat_template, tokenizer)


def _texts(content: Content) -> list[str]:
    return [content] if isinstance(content, str) else [s for s in content if isinstance(s, str)]


def _media_type(segment) -> str:
    """The content item type a template sees: 'image', 'audio' or 'video', from the segment's
    `modality` or its source's (server/media.py's MediaTokens); 'image' if it names none."""
    modality = getattr(segment, "modality", None) or getattr(
        getattr(segment, "source", None), "modality", None) or "image"
    return str(modality).lower()


# ---- the Jinja environment, as transformers' chat_template_utils builds it ----------------------

class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers marks assistant text for training
    masks with it; rendering, it is just its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Dict:
    """`dict(...)` in templates, without the type's attributes (a sandbox escape route)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (CPython internals), as transformers'."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # Templates come from the checkpoint, so they are untrusted code: the sandbox, immutable.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the checkpoint's chat template does not parse: {error}") from None
