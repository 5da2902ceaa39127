"""How a checkpoint family writes a media item into its prompt: the tokens around the rows, and
what its chat template writes in the item's place.

A family's processor (transformers' Gemma3Processor, Qwen2AudioProcessor, ...) renders the chat
template, then replaces one token of what the template wrote for each item by the item's full
form, and only then tokenizes. ringserve does the same with ids: `Expansion` says which token is
replaced and by what, and preprocess/chat_template.py splices the ids there, so the text the
template writes beside the token ("Audio 1: ", "\\n\\n") is tokenized with its neighbours exactly
as the processor's tokenizer sees it.

The family is recognised by its tokenizer: the markup whose special tokens it has all.
"""

from __future__ import annotations

import dataclasses

from preprocess.tokenizer_protocol import TextTokenizer

IMAGE, AUDIO, VIDEO = "IMAGE", "AUDIO", "VIDEO"
MEDIA_START, MEDIA_END = "<|media_start|>", "<|media_end|>"


@dataclasses.dataclass(frozen=True)
class Expansion:
    """What replaces the first `token` a chat template writes for one item: `before` text, the
    `ids`, `after` text."""

    token: str
    ids: tuple[int, ...]
    before: str = ""
    after: str = ""


@dataclasses.dataclass(frozen=True)
class Markup:
    """One modality's form in one family's prompts."""

    open: str | None  # special token before the item's rows
    close: str | None  # after them
    template_token: str | None = None  # what the family's chat template writes for the item
    # True: the template writes open and close around template_token, which stands for the rows
    # only (Qwen2-Audio's <|audio_bos|><|AUDIO|><|audio_eos|>, Qwen2.5-VL's
    # <|vision_start|><|image_pad|><|vision_end|>). False: template_token is `open`
    # and stands for the whole item (Gemma 3's <start_of_image>).
    template_writes_markers: bool = False
    around: str = ""  # text the processor puts on both sides of a whole item (Gemma 3: "\n\n")

    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.open, self.close, self.template_token) if t is not None)


@dataclasses.dataclass(frozen=True)
class BoundMarkup:
    """A Markup with its tokenizer's ids."""

    markup: Markup
    open: int | None
    close: int | None

    def wrap(self, inner: list[int]) -> list[int]:
        """The item's ids on their own: open, inner, close (those the tokenizer has)."""
        return ([self.open] if self.open is not None else []) + inner + (
            [self.close] if self.close is not None else [])

    def separator(self) -> list[int]:
        """Between two windows of one item (audio past one encoder window): close, open."""
        return [i for i in (self.close, self.open) if i is not None]

    def expansion(self, inner: list[int]) -> Expansion | None:
        m = self.markup
        if m.template_token is None:
            return None
        if m.template_writes_markers:
            return Expansion(m.template_token, tuple(inner))
        return Expansion(m.template_token, tuple(self.wrap(inner)), m.around, m.around)

    def marker_count(self) -> int:
        return (self.open is not None) + (self.close is not None)


# Families in the order they are tried; the built-in markers last.
_FAMILIES: dict[str, tuple[Markup, ...]] = {
    AUDIO: (Markup("<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>", template_writes_markers=True),),
    IMAGE: (Markup("<start_of_image>", "<end_of_image>", "<start_of_image>", around="\n\n"),
            Markup("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", template_writes_markers=True)),
    VIDEO: (Markup("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", template_writes_markers=True),),
}
BUILT_IN = Markup(MEDIA_START, MEDIA_END)


def markup_for(tokenizer: TextTokenizer, modality: str) -> BoundMarkup:
    """The markup of `modality` for this tokenizer's family (the built-in one when none matches;
    a tokenizer without its markers writes the rows alone)."""
    for markup in _FAMILIES.get(modality, ()):
        if all(tokenizer.token_id(t) is not None for t in markup.tokens()):
            break
    else:
        markup = BUILT_IN
    return BoundMarkup(markup, *(tokenizer.token_id(t) if t is not None else None
                                 for t in (markup.open, markup.close)))
