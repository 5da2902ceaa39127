"""Prose from the running interpreter's own documentation.

Two sources, in this order: the Python Language Reference topics that `help()` shows (shipped with
the standard library as `pydoc_data.topics`), then the docstrings of a fixed list of modules.

Used to train the default tokenizer and, later, as the haystack for needle-in-a-haystack tests. The
text is built on the fly rather than shipped: nothing to download, and CPython's documentation may
be redistributed under the PSF License Agreement (see preprocess/assets/README.md). An interpreter
yields the same text on every run: modules and members are visited in sorted order, and nothing
depends on hash seeds, the clock or platform-specific modules (os, socket, ...). Builds of one minor
version agree unless a patch release edited a docstring.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator

# Text-rich modules present in CPython 3.11 to 3.13 on every platform. A module missing from some
# build is skipped; the text then differs only between interpreter builds, never between runs.
MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.base_events", "asyncio.events",
    "asyncio.futures", "asyncio.locks", "asyncio.protocols", "asyncio.queues", "asyncio.streams",
    "asyncio.subprocess", "asyncio.tasks", "asyncio.transports", "base64", "bdb", "binascii",
    "bisect", "builtins", "calendar", "cmd", "code", "codecs", "codeop", "collections", "colorsys",
    "compileall", "concurrent.futures", "concurrent.futures.process", "concurrent.futures.thread",
    "configparser", "contextlib", "contextvars", "copy", "copyreg", "cProfile", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.charset",
    "email.header", "email.headerregistry", "email.message", "email.parser", "email.policy",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "gc", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookiejar", "http.cookies", "http.server",
    "imaplib", "importlib", "importlib.abc", "importlib.machinery", "importlib.metadata",
    "importlib.resources", "importlib.util", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.config",
    "logging.handlers", "mailbox", "math", "mimetypes", "modulefinder",
    "multiprocessing.connection", "multiprocessing.context", "multiprocessing.managers",
    "multiprocessing.pool", "multiprocessing.process", "multiprocessing.queues",
    "multiprocessing.synchronize", "netrc", "numbers", "operator", "optparse", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re",
    "reprlib", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socketserver", "statistics", "string", "struct", "subprocess", "symtable", "sys",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token",
    "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unittest",
    "unittest.case", "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner",
    "unittest.suite", "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser",
    "uuid", "warnings", "wave", "weakref", "wsgiref.handlers", "wsgiref.headers",
    "wsgiref.simple_server", "wsgiref.util", "xml.dom.minidom", "xml.dom.pulldom",
    "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)

_MIN_WORDS = 8
_BULLETS = ("* ", "- ", "+ ")
_CHILD = "RINGSERVE_CORPUS_CHILD"  # set in the child process that walks the library
_WORD = re.compile(r"[A-Za-z]+")
_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :class:`Foo` -> Foo
_BACKTICKS = re.compile(r"`+([^`]+)`+")


def iter_corpus_text() -> Iterator[str]:
    """Yields prose paragraphs, one line each with single spaces, in a fixed order, no repeats."""
    yield from _paragraphs()


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    """The corpus, walked in a fresh interpreter.

    Libraries loaded in this process (JAX, grpc, test tools) add attributes to standard-library
    modules, and the walk would pick up their docstrings: the text would depend on what ran
    before. A child process that imports only this module sees the pristine library.
    """
    if os.environ.get(_CHILD):
        return tuple(_walk())
    root = pathlib.Path(__file__).resolve().parent.parent
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from preprocess import corpus; "
            "json.dump(list(corpus._paragraphs()), sys.stdout)")
    out = subprocess.run([sys.executable, "-c", code, str(root)], check=True, text=True,
                         capture_output=True, env={**os.environ, _CHILD: "1"})
    return tuple(json.loads(out.stdout))


def _walk() -> Iterator[str]:
    seen: set[str] = set()
    for doc in _documents():
        for paragraph in _prose_paragraphs(doc):
            if paragraph not in seen:
                seen.add(paragraph)
                yield paragraph


def corpus_text(max_chars: int | None = None) -> str:
    """Whole paragraphs joined by blank lines, at most `max_chars` characters (all of it for None).

    The whole corpus is about 650,000 characters (3.11); asking for more returns all of it, so a
    caller needing a longer haystack must repeat it.
    """
    parts: list[str] = []
    size = 0
    for paragraph in iter_corpus_text():
        extra = len(paragraph) + (2 if parts else 0)
        if max_chars is not None and size + extra > max_chars:
            break
        parts.append(paragraph)
        size += extra
    return "\n\n".join(parts)


def _documents() -> Iterator[str]:
    topics = _import("pydoc_data.topics")
    if topics is not None:
        for _, text in sorted(topics.topics.items()):
            yield text
    for name in MODULES:
        module = _import(name)
        if module is not None:
            yield from _docstrings(module)


def _import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices are noise here
        try:
            return importlib.import_module(name)
        except ImportError:
            return None


def _docstrings(module) -> Iterator[str]:
    """The module's own docstring, then those of its public classes, functions and their methods.

    Members re-exported from another module are skipped (they are visited under their own module),
    and `vars()` is read rather than getattr so lazy module attributes do not fire.
    """
    yield _doc(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", module.__name__) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield _doc(obj)
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    yield _doc(member)
        elif callable(obj):
            yield _doc(obj)


def _doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""  # a few classes store a property or tuple there


def _prose_paragraphs(doc: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        if block[:2] in _BULLETS:
            block = "  " + block[2:]  # a list item: keep its text, indented like its continuation
        lines = textwrap.dedent(block).splitlines()
        # A paragraph is judged whole: dropping single lines would splice half sentences together.
        # Indented lines are examples, grammar or argument tables; >>> starts a doctest.
        if any(line[:1].isspace() or line.startswith((">>>", "...")) for line in lines):
            continue
        text = " ".join(" ".join(lines).split())
        text = _BACKTICKS.sub(r"\1", _RST_ROLE.sub(r"\1", text))
        if _is_prose(text):
            yield text


def _is_prose(text: str) -> bool:
    words = _WORD.findall(text)
    plain = sum(ch.isalpha() or ch == " " for ch in text)
    return (
        len(words) >= _MIN_WORDS
        and plain >= 0.9 * len(text)  # code, tables and signatures are heavy in punctuation
        and text[0].isupper()
        and text.endswith((".", "!", "?"))
        and not text.isupper()
    )
