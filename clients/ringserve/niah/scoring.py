"""Scoring an answer against the expected strings: each scorer returns a number in [0, 1].

Comparisons ignore case, punctuation and spacing, so "Eat a sandwich, and sit in Dolores Park!"
matches the needle's phrase, and match whole words only, so "1234567" is not found in "12345678".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_NON_WORD = re.compile(r"[^0-9a-z]+")
_INTEGER = re.compile(r"\d+")

Scorer = Callable[[str, Sequence[str]], float]


def normalize(text: str) -> str:
    """Lower case, every run of punctuation and whitespace one space, no space at the ends."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def contains(answer: str, expected: Sequence[str]) -> float:
    """The fraction of the expected strings found in the answer (whole words, normalized).

    One expected string gives 0 or 1; RULER's multi-value task gives the share found.
    """
    if not expected:
        raise ValueError("nothing to look for: expected is empty")
    words = f" {normalize(answer)} "
    return sum(f" {normalize(e)} " in words for e in expected) / len(expected)


def exact(answer: str, expected: Sequence[str]) -> float:
    """1 when the normalized answer is the (single) expected string, else 0."""
    if len(expected) != 1:
        raise ValueError(f"exact scoring needs one expected answer, not {len(expected)}")
    return float(normalize(answer) == normalize(expected[0]))


def first_integer(answer: str, expected: Sequence[str]) -> float:
    """1 when the first integer in the answer is the expected number (the passkey test), else 0."""
    if len(expected) != 1:
        raise ValueError(f"first-integer scoring needs one expected number, not {len(expected)}")
    match = _INTEGER.search(answer)
    return float(match is not None and int(match.group()) == int(expected[0]))


SCORERS: dict[str, Scorer] = {"contains": contains, "exact": exact, "first-integer": first_integer}
