"""Prose paragraphs from the running CPython's standard library: the default NIAH haystack.

CPython's documentation may be redistributed under the PSF License Agreement, so the haystack is
built on the user's machine from the interpreter at hand instead of being downloaded or shipped.
Two sources, in this order: the docstrings of a fixed list of text-rich modules (module, public
classes and their methods, public functions), then the Language Reference topics that `help()`
shows (`pydoc_data.topics`).

This file imports nothing from ringserve: `haystack.py` runs it as a script in a fresh, isolated
interpreter (`python -I -S stdlib_text.py`), which prints the paragraphs as one JSON list. The
child sees the pristine library; in the calling process grpc, test tools and the like have
imported and patched modules, which would change what a walk finds. Modules and members are
visited in sorted order, so one interpreter build gives the same text on every run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import warnings
from collections.abc import Iterable, Iterator

# Present on every platform in CPython 3.10 to 3.13 and rich in prose. A module some build lacks
# is skipped, so the text can differ between builds, never between runs of one build.
MODULES = """
    argparse ast asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams
    asyncio.tasks base64 bisect builtins calendar cmd codecs collections concurrent.futures
    configparser contextlib copy csv dataclasses datetime decimal difflib dis doctest
    email.message email.policy enum fileinput fnmatch fractions functools gettext glob gzip
    hashlib heapq html.parser http.client http.cookiejar http.server importlib.metadata inspect
    io ipaddress itertools json logging logging.handlers mailbox math mimetypes
    multiprocessing.pool numbers operator optparse pathlib pdb pickle pprint pydoc queue random
    re secrets shelve shlex shutil smtplib statistics string struct subprocess tarfile tempfile
    textwrap threading timeit tokenize traceback typing unittest.case unittest.mock
    urllib.parse urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree
    xmlrpc.client zipfile zoneinfo
""".split()

_MIN_WORDS = 8
_WORD = re.compile(r"[A-Za-z]+")
_MARKUP = re.compile(r":[a-z]+:`~?([^`]+)`|`+([^`]+)`+")  # :class:`Foo` and ``foo`` -> the text


def paragraphs() -> list[str]:
    """The prose paragraphs, each on one line, in a fixed order, without repeats."""
    seen: dict[str, None] = {}
    for doc in _documents():
        for paragraph in prose(doc):
            seen.setdefault(paragraph, None)
    return list(seen)


def prose(doc: str) -> Iterator[str]:
    """The paragraphs of one docstring that read as sentences.

    A paragraph is kept or dropped whole (dropping lines would splice half sentences): indented
    lines are examples or tables, `>>>` starts a doctest, and text heavy in punctuation is code.
    """
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        if any(line[:1].isspace() or line.lstrip().startswith((">>>", "...")) for line in lines):
            continue
        text = _MARKUP.sub(lambda m: m.group(1) or m.group(2), " ".join(block.split()))
        letters = sum(ch.isalpha() or ch == " " for ch in text)
        if (len(_WORD.findall(text)) >= _MIN_WORDS and letters >= 0.9 * len(text)
                and text[:1].isupper() and text.endswith((".", "!", "?"))):
            yield text


def _documents() -> Iterator[str]:
    for name in MODULES:
        module = _import(name)
        if module is not None:
            yield from _module_docs(module)
    topics = _import("pydoc_data.topics")
    if topics is not None:
        yield from (text for _, text in sorted(topics.topics.items()))


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _module_docs(module) -> Iterator[str]:
    """The module's docstring, then its own public classes (with their public methods) and
    functions. `vars()`, not getattr, so lazy attributes stay unloaded; re-exports are skipped
    (they are read under their own module)."""
    yield _doc(module)
    for name, obj in _public(vars(module)):
        if getattr(obj, "__module__", module.__name__) != module.__name__:
            continue
        yield _doc(obj)
        if inspect.isclass(obj):
            yield from (_doc(member) for _, member in _public(vars(obj)))


def _public(namespace) -> Iterable[tuple[str, object]]:
    """Public callables (functions, classes, methods), sorted by name."""
    return ((name, obj) for name, obj in sorted(namespace.items())
            if not name.startswith("_") and callable(obj))


def _doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn when read
    json.dump(paragraphs(), sys.stdout)
