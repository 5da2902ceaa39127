"""The ffmpeg binary and one running ffmpeg process: piped output, bounded time, always reaped.

There is no ffprobe: the static build from imageio-ffmpeg ships ffmpeg alone, so probing runs
ffmpeg too (preprocess/video.py). Every process here is started with stdin closed, its stdout read
by the caller in fixed-size pieces, and its stderr drained by a thread that keeps only the tail
(a full stderr pipe would block ffmpeg forever). The process is killed and reaped when it runs past
its timeout, when another thread calls cancel(), and when the consumer stops early (close(),
an exception through `with`, or garbage collection), so no request leaves an ffmpeg behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import weakref
from collections.abc import Sequence

import ffmpeg as ffmpeg_python

from preprocess.errors import MediaError

# Before any input: no banner, never read the terminal, no progress lines, errors only.
GLOBAL_ARGS = ("-hide_banner", "-nostdin", "-nostats", "-loglevel", "error")
STDERR_TAIL = 4096

# ffmpeg's closing summaries say only that it failed; the reason is on the lines before them.
_GENERIC = re.compile(r"^(Error opening input files?|Error opening output files?|Conversion failed"
                      r"|At least one output file must be specified|Exiting normally)")
_LOG_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*")


def binary() -> str:
    """Path of the ffmpeg executable: $RINGSERVE_FFMPEG, else imageio-ffmpeg's static build."""
    override = os.environ.get("RINGSERVE_FFMPEG")
    if override:
        return override
    import imageio_ffmpeg  # imported late: it looks the binary up on first use

    return imageio_ffmpeg.get_ffmpeg_exe()


def compile_args(output: ffmpeg_python.nodes.OutputStream) -> list[str]:
    """The command line of an ffmpeg-python graph, with GLOBAL_ARGS in front of the inputs.

    ffmpeg-python appends global_args() after the outputs, where ffmpeg may ignore them.
    """
    cmd = output.compile(cmd=binary())
    return [cmd[0], *GLOBAL_ARGS, *cmd[1:]]


def input_url(path: str | os.PathLike) -> str:
    """`path` as an ffmpeg input that can only mean a local file (no protocol, no '-' option)."""
    return "file:" + os.path.abspath(os.fspath(path))


def reason(stderr: str, path: str | os.PathLike | None = None) -> str:
    """A short reason from ffmpeg's stderr: its last two specific lines, log prefixes and the
    server's file path removed ('moov atom not found; Invalid data found when processing input')."""
    lines = []
    for line in stderr.replace("\r", "\n").splitlines():
        line = _LOG_PREFIX.sub("", line.strip())
        if not line or _GENERIC.match(line):
            continue
        if path is not None:
            for spelling in (input_url(path), os.path.abspath(os.fspath(path)), os.fspath(path)):
                line = line.replace(spelling, "<input>")
        line = line.removeprefix("Error opening input: ")
        if line not in lines:
            lines.append(line)
    text = "; ".join(lines[-2:]) or "no message"
    return text if len(text) <= 300 else text[:297] + "..."


class Process:
    """One ffmpeg child. Read its stdout with read()/readinto(); use it as a context manager.

    timeout: seconds of wall clock from start (None: no limit) after which ffmpeg is killed and
    reads raise MediaError("ffmpeg timed out after N s"). The clock includes time the consumer
    spends between reads, since a slow consumer keeps ffmpeg blocked on a full pipe.
    """

    def __init__(self, args: Sequence[str], *, timeout: float | None,
                 stderr_tail: int = STDERR_TAIL, path: str | os.PathLike | None = None):
        self.args = list(args)
        self.timeout = timeout
        self._path = path
        self._tail = _Tail(stderr_tail)
        self._lock = threading.Lock()
        self._timed_out = False
        self._cancelled = False
        self._closed = False
        self._timer: threading.Timer | None = None
        self._drain: threading.Thread | None = None
        # bufsize=0: stdout is the raw pipe, so readinto() writes straight into the caller's array.
        self._popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, bufsize=0)
        # Neither thread holds `self`, so an abandoned Process is collected (and its ffmpeg killed).
        self._drain = threading.Thread(target=_drain, args=(self._popen.stderr, self._tail),
                                       name=f"ffmpeg-{self.pid}-stderr", daemon=True)
        self._drain.start()
        if timeout is not None:
            self._timer = threading.Timer(timeout, _expire, args=(weakref.ref(self),))
            self._timer.daemon = True
            self._timer.start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once reaped (negative: killed by that signal), else None."""
        return self._popen.returncode

    @property
    def stderr(self) -> str:
        """The last `stderr_tail` bytes ffmpeg wrote to stderr so far."""
        with self._tail.lock:
            return self._tail.data.decode("utf-8", "replace")

    def readinto(self, buf: memoryview | bytearray) -> int:
        """Fill `buf` from stdout; the bytes read, fewer than len(buf) only at end of output.

        Raises MediaError if the output ended because of the timeout or cancel().
        """
        view = memoryview(buf).cast("B")
        got = 0
        while got < len(view):
            n = self._popen.stdout.readinto(view[got:])
            if not n:
                break
            got += n
        if got < len(view):
            self._raise_if_stopped()
        return got

    def read(self, size: int) -> bytes:
        """Up to `size` bytes from stdout (fewer only at end of output)."""
        buf = bytearray(size)
        return bytes(buf[:self.readinto(buf)])

    def wait(self) -> int:
        """Wait for ffmpeg to exit (bounded by the timeout); its exit status."""
        rc = self._popen.wait()
        self._drain.join()
        self._raise_if_stopped()
        return rc

    def check(self) -> None:
        """Wait for exit; MediaError with ffmpeg's own reason if the exit status is not 0."""
        if self.wait() != 0:
            raise MediaError(f"ffmpeg failed: {reason(self.stderr, self._path)}")

    def cancel(self) -> None:
        """Kill ffmpeg now, from any thread; the reader then gets MediaError('... cancelled')."""
        with self._lock:
            self._cancelled = True
        self._kill()

    def close(self) -> None:
        """Kill ffmpeg if it still runs and reap it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._kill()
        self._popen.wait()
        if self._drain is not None:
            self._drain.join()
        self._popen.stdout.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Garbage collection of an abandoned process still kills and reaps it.
        if "_popen" in self.__dict__:
            self.close()

    def _kill(self) -> None:
        # poll() first: never signal a pid that was already reaped (and may be reused).
        if self._popen.poll() is None:
            try:
                self._popen.kill()
            except ProcessLookupError:
                pass

    def _expire(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._timed_out = True
        self._kill()

    def _raise_if_stopped(self) -> None:
        if self._timed_out:
            raise MediaError(f"ffmpeg timed out after {self.timeout:g} s")
        if self._cancelled:
            raise MediaError("ffmpeg was cancelled")


class _Tail:
    """The newest `size` bytes of a stderr pipe, shared by a Process and its drain thread."""

    def __init__(self, size: int):
        self.size = size
        self.data = b""
        self.lock = threading.Lock()


def _drain(pipe, tail: _Tail) -> None:
    """Read stderr to its end, keeping the tail: a full stderr pipe would block ffmpeg."""
    try:
        for piece in iter(lambda: pipe.read(4096), b""):
            with tail.lock:
                tail.data = (tail.data + piece)[-tail.size:]
    finally:
        pipe.close()


def _expire(ref: weakref.ref) -> None:
    proc = ref()
    if proc is not None:
        proc._expire()
