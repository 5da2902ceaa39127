"""`ringserve chat`: an interactive streaming chat in the terminal.

The whole conversation is sent on every turn (as user / model contents); answers print as their
tokens arrive, followed by a dim status line (time to first token, tokens per second).

Keys: Ctrl-C during an answer stops it (the call is cancelled on the server; the partial answer
stays in the conversation, marked as stopped) and returns to the prompt. Ctrl-C or Ctrl-D at an
empty prompt quits. Commands: /image, /audio and /video attach a file to the next question;
/reset (or /clear) forgets the conversation and the attachments, /exit quits, /help.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from ringserve.client import Client, Stream
from ringserve.errors import Cancelled, RingserveError, Unavailable
from ringserve.media import Audio, Image, Media, Video

SHORT_HELP = "/help lists commands · Ctrl-C stops an answer"
HELP = """\
/image PATH                       attach an image to the next question
/audio PATH                       attach an audio file to the next question
/video PATH [START END FPS]       attach a video, optionally from START to END seconds, sampled at
                                  FPS frames per second ('-' leaves one unset: /video a.mp4 - - 2)
/reset, /clear                    forget the conversation and any attachments
/exit                             quit (or Ctrl-D, or Ctrl-C at an empty prompt)
Ctrl-C during an answer stops it; the partial answer stays in the conversation.
Paths with spaces go in quotes."""
_KINDS: dict[str, type[Media]] = {"/image": Image, "/audio": Audio, "/video": Video}


@dataclasses.dataclass
class Message:
    role: str  # "user" | "model"
    text: str
    stopped: bool = False  # a model answer cut short by Ctrl-C
    media: tuple[Media, ...] = ()  # attachments, sent before the text

    def turn(self) -> tuple:
        """The turn as `contents` takes it: (role, text), or (role, [media..., text])."""
        if not self.media:
            return (self.role, self.text)
        return (self.role, [*self.media, self.text])


@dataclasses.dataclass(frozen=True)
class Settings:
    system: str | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    ignore_eos: bool = False


@contextlib.contextmanager
def _ctrl_c_cancels(stream: Stream) -> Iterator[threading.Event]:
    """While streaming, Ctrl-C cancels the call rather than raising KeyboardInterrupt wherever
    the main thread happens to be (inside gRPC's wait, say). The cancel runs on its own thread,
    so the handler never takes gRPC's locks itself; the stream then ends with `Cancelled`. The
    yielded event says Ctrl-C was pressed. Off the main thread, Ctrl-C is left as it is."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum, frame):
        if interrupted.is_set():  # a second Ctrl-C while the cancel is on its way
            raise KeyboardInterrupt
        interrupted.set()
        threading.Thread(target=stream.cancel, daemon=True).start()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


class Chat:
    """One conversation with a server, printed to `out`."""

    def __init__(self, client: Client, settings: Settings, out: TextIO = sys.stdout,
                 color: bool = False):
        self.client = client
        self.settings = settings
        self.out = out
        self.color = color
        self.history: list[Message] = []
        self.pending: list[Media] = []  # attached, to go with the next question

    def _dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def reset(self) -> None:
        self.history.clear()
        self.pending.clear()

    def attach(self, command: str, args: list[str]) -> bool:
        """Handles /image, /audio, /video: checks the file, counts its tokens with the server
        and keeps it for the next question. Prints an error (and keeps nothing) when the path,
        the options or the media are bad. Returns whether it attached."""
        kind = _KINDS[command]
        usage = f"usage: {command} PATH" + (" [START END FPS]" if kind is Video else "")
        if not args or len(args) > (4 if kind is Video else 1):
            self._print(f"error: {usage}")
            return False
        try:
            options = _video_options(args[1:]) if kind is Video else {}
            media = kind.from_file(os.path.expanduser(args[0]), **options)
            # Counting also uploads a large file (once): the question then sends only its name.
            detail = self.client.count_tokens_detail([[media]])
        except (OSError, ValueError, TypeError) as e:
            self._print(f"error: {e}")
            return False
        except RingserveError as e:
            self._print(f"error: {args[0]}: {_describe(e)}")
            return False
        except KeyboardInterrupt:  # e.g. a long upload
            self._print()
            self._print(self._dim(f"(not attached: {args[0]})"))
            return False
        self.pending.append(media)
        # The media's own tokens (a video's sound included); markers and timestamps are TEXT.
        tokens = sum(n for m, n in detail.prompt_tokens_details.items() if m != "TEXT")
        count = f", {tokens} tokens" if detail.prompt_tokens_details else ""
        self._print(self._dim(f"attached {media.display_name} "
                              f"({media.modality.lower()}{count})"))
        return True

    def ask(self, question: str) -> None:
        """Streams the answer to `question` (with the attachments, if any), keeping both in the
        history. Ctrl-C stops it."""
        self.history.append(Message("user", question, media=tuple(self.pending)))
        self.pending = []
        try:
            stream = self.client.generate(
                [m.turn() for m in self.history], system_instruction=self.settings.system,
                temperature=self.settings.temperature,
                max_output_tokens=self.settings.max_output_tokens,
                ignore_eos=self.settings.ignore_eos)
        except (OSError, ValueError, RingserveError) as e:
            # An attached file went away or changed, or its upload failed.
            self._print(f"error: {_describe(e) if isinstance(e, RingserveError) else e}")
            self._forget_question()
            return
        except KeyboardInterrupt:  # during an upload: nothing was asked
            self._print()
            self._forget_question()
            return
        parts: list[str] = []
        n_tokens, reason, usage, ttft = 0, None, None, None
        start = time.monotonic()
        first = None
        stopped = False
        try:
            with _ctrl_c_cancels(stream) as interrupted:
                try:
                    for chunk in stream:
                        if chunk.token_ids and first is None:
                            first = time.monotonic()
                        n_tokens += len(chunk.token_ids)
                        ttft = chunk.time_to_first_token or ttft
                        reason, usage = chunk.finish_reason or reason, chunk.usage or usage
                        if chunk.text:
                            parts.append(chunk.text)
                            self._print(chunk.text, end="")
                except Cancelled:
                    if not interrupted.is_set():
                        raise
                    stopped = True
        except KeyboardInterrupt:  # not the main thread, or a second Ctrl-C: stop all the same
            stopped = True
        except RingserveError as e:
            self._print()
            self._print(f"error: {_describe(e)}")
            self._forget_question()
            return
        finally:
            stream.close()  # cancels the call if it is still running
            end = time.monotonic()

        answer = "".join(parts)
        if answer:
            self.history.append(Message("model", answer, stopped=stopped))
        else:
            self._forget_question()  # nothing came back: forget the question too
        if usage is not None:
            n_tokens = usage.candidates_token_count
        if ttft is None and first is not None:
            ttft = first - start
        # Decode speed: the tokens after the first, over the time after the first arrived.
        if first is not None and n_tokens > 1 and end > first:
            rate = (n_tokens - 1) / (end - first)
        else:
            rate = n_tokens / max(end - start, 1e-9)
        self._print()
        self._print(self._dim(_status(n_tokens, ttft, rate, reason, stopped)))

    def _forget_question(self) -> None:
        """Drops the last question; its attachments wait for the next one."""
        question = self.history.pop()
        if question.media:
            self.pending = [*question.media, *self.pending]
            n = len(self.pending)
            self._print(self._dim(f"({n} attachment{'s' if n > 1 else ''} kept for the next "
                                  "question; /clear drops them)"))

    def loop(self, read=input) -> int:
        """Reads questions until /exit, Ctrl-D, or Ctrl-C at an empty prompt. Returns 0."""
        while True:
            try:
                line = read("> ")
            except EOFError:
                self._print()
                return 0
            except KeyboardInterrupt:
                if _line_buffer():  # Ctrl-C with text typed: drop the line, ask again
                    self._print()
                    continue
                self._print()
                return 0
            question = line.strip()
            if not question:
                continue
            if question in ("/exit", "/quit"):
                return 0
            if question in ("/reset", "/clear"):
                self.reset()
                self._print(self._dim("(conversation cleared, attachments dropped)"))
                continue
            if question == "/help":
                self._print(self._dim(HELP))
                continue
            command = question.split(maxsplit=1)[0]
            if command in _KINDS:
                try:
                    args = shlex.split(question)[1:]
                except ValueError as e:  # an unclosed quote
                    self._print(f"error: {e}")
                    continue
                self.attach(command, args)
                continue
            self.ask(question)


def _status(n_tokens: int, ttft: float | None, rate: float, reason: str | None,
            stopped: bool) -> str:
    """The line under an answer: "[stopped · ttft 0.05 s · 212.4 tok/s · 64 tokens · REASON]"."""
    items = ["stopped"] if stopped else []
    if ttft is not None:
        items.append(f"ttft {ttft:.2f} s")
    items += [f"{rate:.1f} tok/s", f"{n_tokens} tokens"]
    if reason and not stopped:
        items.append(reason)
    return "[" + " · ".join(items) + "]"


def _video_options(args: list[str]) -> dict:
    """START END FPS for /video, each a number or '-' (unset)."""
    values = []
    for name, text in zip(("START", "END", "FPS"), args):
        if text == "-":
            values.append(None)
            continue
        unit = "frames per second" if name == "FPS" else "seconds"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number ({unit}) or '-', got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {text!r}")
        values.append(value)
    values += [None] * (3 - len(values))
    return dict(zip(("start_offset", "end_offset", "fps"), values))


def _describe(error: RingserveError) -> str:
    if isinstance(error, Unavailable):
        return f"server unavailable ({error.details})"
    return f"{error.code.name}: {error.details}"


def _line_buffer() -> str:
    try:
        import readline
    except ImportError:
        return ""
    return readline.get_line_buffer()


def _use_color(stream: TextIO) -> bool:
    return (stream.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM", "") != "dumb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="system instruction for the whole conversation")
    parser.add_argument("--temperature", type=float, help="0 is greedy (server default: 1.0)")
    parser.add_argument("--max-output-tokens", type=int, help="cap on each answer's tokens")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="answers run to --max-output-tokens, past the model's end tokens")


def run(args: argparse.Namespace) -> int:
    """The `chat` subcommand (args: target, timeout, system, temperature, max_output_tokens,
    ignore_eos)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    settings = Settings(args.system, args.temperature, args.max_output_tokens, args.ignore_eos)
    with Client.from_args(args) as client:
        try:
            info = client.model_info(timeout=10)
        except RingserveError as e:
            print(f"ringserve chat: cannot reach a server at {args.target}: {_describe(e)}",
                  file=sys.stderr)
            return 1
        chat = Chat(client, settings, color=_use_color(sys.stdout))
        banner = f"ringserve chat · {info.name} at {args.target} · {SHORT_HELP}"
        chat._print(chat._dim(banner))
        return chat.loop()
