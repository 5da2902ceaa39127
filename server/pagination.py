"""Pages of a List call (Gemini's page_size / page_token): ids only, no state kept per client.

A page token names the last item of the page before, so a page stays right when items are
created or deleted between calls: the next page starts after that item's place in the order,
whether or not it still exists. Items are ordered by (create_time, name).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import TypeVar

from server.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def page(items: Sequence[T], order: Callable[[T], tuple], page_size: int,
         page_token: str) -> tuple[list[T], str]:
    """(this page's items, the next page's token or ""). `order` gives an item's sort key; it
    must be unique per item (e.g. (create_time, name))."""
    if page_size < 0:
        raise InvalidArgument(f"page_size: {page_size} is negative; use 0 for the default "
                              f"({DEFAULT_PAGE_SIZE}) or up to {MAX_PAGE_SIZE}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    ordered = sorted(items, key=order)
    if page_token:
        after = _decode(page_token)
        ordered = [item for item in ordered if _key_text(order(item)) > after]
    chosen = ordered[:size]
    more = len(ordered) > size
    return chosen, _encode(_key_text(order(chosen[-1]))) if more else ""


def _key_text(key: tuple) -> str:
    # Fixed-width fields compare as text in the same order as the tuple: ISO times with an
    # offset, then names.
    return "|".join(k.isoformat(timespec="microseconds") if hasattr(k, "isoformat") else str(k)
                    for k in key)


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(token: str) -> str:
    try:
        text = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_",
                                validate=True).decode()
        if "|" in text:  # every key this module writes has two fields at least
            return text
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArgument("page_token: not a token this server gave; use the previous "
                          "response's next_page_token, or none for the first page")
