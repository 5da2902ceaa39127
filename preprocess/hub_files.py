"""What a Hugging Face checkpoint directory says about its tokenizer besides the vocabulary.

The files transformers reads: tokenizer_config.json (named special tokens, added tokens, the chat
template), special_tokens_map.json (older checkpoints' named tokens), chat_template.jinja and
chat_template.json (newer and processor templates), generation_config.json (the eos ids generation
stops at). Each is optional; a directory with none of them reads as `TokenizerFiles()`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

NAMED = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    chat_template: str | None = None
    named: tuple[tuple[str, str], ...] = ()  # ("bos_token", "<bos>"), ... where given
    special: tuple[str, ...] = ()  # added tokens tokenizer_config.json marks special
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id (int or list)

    def token(self, name: str) -> str | None:
        """The text of a named special token ("bos_token"), or None."""
        return dict(self.named).get(name)

    @classmethod
    def read(cls, directory: str | Path) -> TokenizerFiles:
        directory = Path(directory)
        config = _json(directory / "tokenizer_config.json")
        tokens_map = _json(directory / "special_tokens_map.json")
        named = []
        for name in NAMED:
            # tokenizer_config.json wins, as in transformers; either may hold a string or an
            # AddedToken dict ({"content": "<bos>", ...}) or null.
            text = _content(config.get(name)) if name in config else _content(tokens_map.get(name))
            if text is not None:
                named.append((name, text))
        added = config.get("added_tokens_decoder", {}).values()
        special = tuple(token["content"] for token in added
                        if isinstance(token, dict) and token.get("special"))
        eos = _json(directory / "generation_config.json").get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
        return cls(chat_template=_chat_template(directory, config), named=tuple(named),
                   special=special, eos_token_ids=tuple(int(i) for i in eos_ids))


def _chat_template(directory: Path, config: dict) -> str | None:
    """The default template. Processor templates (chat_template.jinja, then the older
    chat_template.json) come before tokenizer_config.json's: they are the ones that know media
    items, and a model that has them is served with media."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _json(directory / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # A list of {"name", "template"}: transformers uses "default" unless told otherwise.
    named = {entry["name"]: entry["template"] for entry in template}
    if "default" not in named:
        raise ValueError(f"{directory}: the chat templates are named {sorted(named)}, none "
                         "'default'; add a chat_template.jinja with the one to serve")
    return named["default"]


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
