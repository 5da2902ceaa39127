"""`ringserve chat` driven through a pseudo-terminal, against the real server, plus the `Chat`
class and the other CLI subcommands in process."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import sys
import time

import pytest

import ringserve
from ringserve import chat as chat_lib
from ringserve import cli

CLIENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clients")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")
STATUS = re.compile(r"\[(stopped · )?ttft [\d.]+ s · [\d.]+ tok/s · (\d+) tokens[^\]]*\]")


class Terminal:
    """A program running on a pseudo-terminal (its controlling tty, so Ctrl-C is SIGINT)."""

    def __init__(self, argv: list[str]):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [CLIENTS, os.environ.get("PYTHONPATH", "")]), TERM="xterm", PYTHONUNBUFFERED="1")
        env.pop("NO_COLOR", None)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once, nothing else
            # A parent started in the background (`make test &`) ignores SIGINT, and a child
            # inherits that: Python then installs no KeyboardInterrupt handler, and Ctrl-C in
            # the terminal would do nothing.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(argv[0], argv, env)
        self.output = ""  # everything read so far, ANSI escapes removed
        self._pos = 0  # where the next expect() starts looking
        self._exit_code: int | None = None

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def ctrl_c_at_prompt(self, seen) -> None:
        """Ctrl-C at the line editor, again until `seen(timeout)` reports its effect.

        CPython's readline only notices SIGINT inside its select(); one that lands just after the
        echo / prompt, before it gets back there (a loaded machine can take any time), waits for
        the next key. So a Ctrl-C with no effect in 10 s is sent again: it was never handled,
        since the handled one shows within milliseconds."""
        for _ in range(6):
            time.sleep(0.3)  # a person never types faster
            self.send(b"\x03")
            if seen(10.0):
                return
        raise AssertionError(f"Ctrl-C had no effect; output:\n{self.output}")

    def expect(self, pattern: str | re.Pattern, timeout: float = 60.0) -> re.Match:
        """Waits for `pattern` in the output after the previous match."""
        match = self.sees(pattern, timeout)
        if match is None:
            raise AssertionError(f"{str(pattern)!r} not seen; output:\n{self.output}")
        return match

    def sees(self, pattern: str | re.Pattern, timeout: float) -> re.Match | None:
        """`pattern` in the output after the previous match, within `timeout`, or None."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self._pos)
            if match:
                self._pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return None

    def exited(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)  # keep draining so the child never blocks on a full terminal
            if self._poll() is not None:
                return True
        return False

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += ANSI.sub("", data.decode(errors="replace").replace("\r\n", "\n"))
        return bool(data)

    def _poll(self) -> int | None:
        """The child's exit code once it has exited (reaped once, then remembered), else None."""
        if self._exit_code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._exit_code = os.waitstatus_to_exitcode(status)
        return self._exit_code

    def alive(self) -> bool:
        return self._poll() is None

    def wait(self, timeout: float = 20.0) -> int:
        if not self.exited(timeout):
            raise AssertionError(f"chat did not exit; output:\n{self.output}")
        os.close(self.fd)
        return self._exit_code

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def terminal():
    started = []

    def start(*args: str) -> Terminal:
        t = Terminal([sys.executable, "-m", "ringserve.cli", "chat", *args])
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


PROMPT = re.compile(r"(^|\n)> ")


def test_chat_streams_an_answer_then_resets_and_exits(terminal, server_target):
    t = terminal("--target", server_target, "--temperature", "0", "--max-output-tokens", "12")
    t.expect(r"ringserve chat · .+ at " + re.escape(server_target))
    t.expect(PROMPT)

    # A question: the answer streams, then the status line, then the prompt again.
    t.send(b"Hello, who are you?\r")
    question = t.expect(r"Hello, who are you\?\n")
    status = t.expect(STATUS)
    assert t.output[question.end():status.start()].strip()  # the answer, before its status
    assert status.group(1) is None and 0 < int(status.group(2)) <= 12
    t.expect(PROMPT)

    # /reset answers and keeps going.
    t.send(b"/reset\r")
    t.expect(r"conversation cleared")
    t.expect(PROMPT)
    t.send(b"/exit\r")
    assert t.wait() == 0


def test_chat_ctrl_c_stops_a_long_answer(terminal, server_target):
    t = terminal("--target", server_target, "--max-output-tokens", "4000", "--ignore-eos")
    t.expect(PROMPT)
    t.send(b"Tell me a long story.\r")
    t.expect(r"Tell me a long story\.\n")
    t.expect(r"\S")  # the answer has started streaming
    t.send(b"\x03")
    status = t.expect(STATUS, timeout=20)
    assert status.group(1) == "stopped · " and int(status.group(2)) < 4000
    t.expect(PROMPT)
    assert t.alive()

    # The conversation goes on after the stop.
    t.send(b"Go on.\r")
    t.expect(r"Go on\.\n")
    t.expect(r"\S")
    t.send(b"\x03")
    t.expect(STATUS, timeout=20)
    t.expect(PROMPT)
    t.send(b"/exit\r")
    assert t.wait() == 0


def test_chat_exits_on_ctrl_d_and_ctrl_c_at_empty_prompt(terminal, server_target):
    t = terminal("--target", server_target)
    t.expect(PROMPT)
    t.send(b"\x04")
    assert t.wait() == 0

    t = terminal("--target", server_target)
    t.expect(PROMPT)
    t.send(b"some half-typed line")
    t.expect(r"half-typed line")  # echoed: readline holds it
    t.ctrl_c_at_prompt(lambda timeout: t.sees(PROMPT, timeout))  # text typed: drops the line only
    assert t.alive()
    t.ctrl_c_at_prompt(t.exited)
    assert t.wait() == 0
    assert "Traceback" not in t.output


def test_chat_unreachable_server_is_one_line(terminal):
    t = terminal("--target", "127.0.0.1:1")
    assert t.wait() == 1
    assert "cannot reach a server at 127.0.0.1:1" in t.output
    assert "Traceback" not in t.output


# ---- the Chat class, in process ---------------------------------------------------------------

class InterruptingOutput(io.StringIO):
    """Raises KeyboardInterrupt on the first answer text written, as a Ctrl-C would."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def write(self, text: str) -> int:
        if self.armed and text.strip():
            self.armed = False
            super().write(text)
            raise KeyboardInterrupt
        return super().write(text)


def test_chat_history_keeps_stopped_answer(server_target):
    settings = chat_lib.Settings(system="Be brief.", temperature=0, max_output_tokens=8)
    with ringserve.Client(server_target, timeout=60) as client:
        out = io.StringIO()
        c = chat_lib.Chat(client, settings, out=out)
        c.ask("Hi")
        assert [(m.role, m.stopped) for m in c.history] == [("user", False), ("model", False)]
        answer = c.history[1].text
        assert answer and answer in out.getvalue()
        assert STATUS.search(out.getvalue())

        # The second turn sends the whole history: its prompt is longer than the first's.
        c.settings = chat_lib.Settings(system="Be brief.", temperature=0, max_output_tokens=4000,
                                       ignore_eos=True)
        c.out = InterruptingOutput()
        c.ask("Tell me more")
        assert [(m.role, m.stopped) for m in c.history] == [
            ("user", False), ("model", False), ("user", False), ("model", True)]
        assert "[stopped" in c.out.getvalue()

        c.out = io.StringIO()
        c.ask("")  # the server refuses an empty turn: error line, history unchanged
        assert "error: INVALID_ARGUMENT" in c.out.getvalue()
        assert len(c.history) == 4

        c.reset()
        assert c.history == []


# ---- the other subcommands, in process --------------------------------------------------------

def test_cli_generate_count_info(server_target, capsys):
    assert cli.main(["generate", "--target", server_target, "--temperature", "0",
                     "--max-output-tokens", "5", "--stats", "Hi"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and '"finish_reason": "MAX_TOKENS"' in err
    assert '"candidates_token_count": 5' in err

    assert cli.main(["count-tokens", "--target", server_target, "Hi"]) == 0
    with ringserve.Client(server_target) as client:
        assert int(capsys.readouterr().out) == client.count_tokens("Hi")

    assert cli.main(["info", "--target", server_target]) == 0
    out = capsys.readouterr().out
    assert "vocab_size: 8192" in out and "health: SERVING" in out


def test_cli_errors_are_one_line(server_target, capsys):
    assert cli.main(["generate", "--target", server_target, "--top-p", "1.5", "Hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ringserve generate: INVALID_ARGUMENT:") and "top_p" in err
    assert err.count("\n") == 1


def test_cli_serve_dispatch(monkeypatch, capsys):
    # `serve` passes its argv through untouched; --help is the server's own.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out

    # Without the server package, a clear message and exit status 2.
    monkeypatch.setitem(sys.modules, "server", None)
    monkeypatch.delitem(sys.modules, "server.cli", raising=False)
    assert cli.main(["serve", "--model", "default"]) == 2
    assert cli.SERVE_MISSING in capsys.readouterr().err
