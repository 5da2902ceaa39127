"""Haystacks: text cut into sentence units, so that a needle goes in at a sentence boundary and a
prompt grows or shrinks one sentence at a time.

Three sources: the standard library's docstrings of the running interpreter (the default; PSF
licence, built here rather than shipped), the passkey filler, or the user's own files. A haystack
repeats from its start when a prompt needs more text than it holds.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence

from ringserve.niah import stdlib_text

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")

# A unit longer than this (text without sentence punctuation: code, logs) is cut at spaces, so
# that sizing a prompt to the token stays fine-grained whatever the text.
MAX_UNIT_CHARS = 600
# A sentence ends at . ! or ? (and any closing quotes or brackets), before whitespace and a
# capital letter or digit: "e.g. foo" and "3.14" stay whole.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclasses.dataclass(frozen=True)
class Haystack:
    """A text as units (sentences, each with the whitespace that follows it), repeated forever.

    Unit i of the endless haystack is `units[i % len(units)]`; `text(a, b)` is units a..b-1.
    """

    name: str
    units: tuple[str, ...]
    # Character offset of each unit's start in one pass of the text, plus its total length.
    _offsets: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    _full: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.units or not "".join(self.units).strip():
            raise ValueError(f"haystack {self.name!r} has no text")
        offsets = [0]
        for unit in self.units:
            offsets.append(offsets[-1] + len(unit))
        object.__setattr__(self, "_offsets", tuple(offsets))
        object.__setattr__(self, "_full", "".join(self.units))

    def chars(self, units: int) -> int:
        """Characters in the first `units` units (the offset of unit `units`)."""
        cycles, rest = divmod(units, len(self.units))
        return cycles * len(self._full) + self._offsets[rest]

    def text(self, start: int, stop: int) -> str:
        """Units start..stop-1 joined (their own whitespace kept)."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad unit range {start}..{stop}")
        begin, end = self.chars(start), self.chars(stop)
        size = len(self._full)
        first = begin // size
        repeats = (end + size - 1) // size - first
        return (self._full * repeats)[begin - first * size:end - first * size]

    def units_for_chars(self, chars: int) -> int:
        """About how many units hold `chars` characters (a first guess for a search)."""
        cycles, rest = divmod(max(chars, 0), len(self._full))
        return cycles * len(self.units) + bisect.bisect_right(self._offsets, rest) - 1


def split_units(text: str) -> list[str]:
    """`text` as sentence units: paragraphs split at blank lines, line breaks inside a paragraph
    folded to spaces, each sentence followed by " " or, last in its paragraph, by a blank line."""
    units: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        sentences, start = [], 0
        for match in _SENTENCE_END.finditer(paragraph):
            sentences.append(paragraph[start:match.end()].rstrip())
            start = match.end()
        sentences.append(paragraph[start:])
        for i, sentence in enumerate(sentences):
            pieces = _cut(sentence)
            last = i == len(sentences) - 1
            units += [piece + " " for piece in pieces[:-1]]
            units.append(pieces[-1] + ("\n\n" if last else " "))
    return units


def _cut(sentence: str) -> list[str]:
    """A sentence in pieces of at most MAX_UNIT_CHARS, cut at spaces where there are any."""
    pieces = []
    while len(sentence) > MAX_UNIT_CHARS:
        cut = sentence.rfind(" ", 0, MAX_UNIT_CHARS)
        cut = cut if cut > 0 else MAX_UNIT_CHARS
        pieces.append(sentence[:cut])
        sentence = sentence[cut:].lstrip()
    return pieces + [sentence] if sentence else pieces


def from_text(name: str, text: str) -> Haystack:
    return Haystack(name, tuple(split_units(text)))


def passkey_filler() -> Haystack:
    """Mohtashami & Jaggi's filler: five sentences that repeat as one run of text."""
    return Haystack("passkey-filler", tuple(u.rstrip() + " " for u in split_units(PASSKEY_FILLER)))


def from_files(paths: Sequence[str | os.PathLike]) -> Haystack:
    """The user's files (UTF-8 text), one after another in the order given."""
    texts = [pathlib.Path(p).read_text(encoding="utf-8") for p in paths]
    return from_text(", ".join(pathlib.Path(p).name for p in paths), "\n\n".join(texts))


def home() -> pathlib.Path:
    """ringserve's own directory: $RINGSERVE_HOME, else ~/.cache/ringserve."""
    root = os.environ.get("RINGSERVE_HOME")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "ringserve"


def stdlib(cache_dir: pathlib.Path | None = None) -> Haystack:
    """The running interpreter's standard-library prose (see `stdlib_text`), cached on disk.

    The file name holds a digest of the interpreter's version string and of the walker's source,
    so another Python build or an edited walker gets its own file.
    """
    walker = pathlib.Path(stdlib_text.__file__)
    digest = hashlib.sha256(sys.version.encode() + walker.read_bytes()).hexdigest()[:16]
    path = (cache_dir or home() / "niah") / f"stdlib-{digest}.json"
    try:
        paragraphs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        paragraphs = _walk_stdlib(walker)
        _write_atomically(path, json.dumps(paragraphs))
    return from_text("python-stdlib-docs", "\n\n".join(paragraphs))


def _walk_stdlib(walker: pathlib.Path) -> list[str]:
    # -I: no PYTHON* variables, user site or script directory on the path; -S: no site-packages.
    # The child can import the standard library and nothing else.
    out = subprocess.run([sys.executable, "-I", "-S", str(walker)], check=True,
                         capture_output=True, text=True, encoding="utf-8")
    return json.loads(out.stdout)


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """A cache file is whole or absent, even when two runs write it at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load(files: Iterable[str] | None, default: str) -> Haystack:
    """The haystack a run uses: the user's files if any, else `default` ("stdlib" or "passkey")."""
    files = list(files or [])
    if files:
        return from_files(files)
    if default == "passkey":
        return passkey_filler()
    return stdlib()
