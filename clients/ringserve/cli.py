"""The `ringserve` command: chat, generate, count-tokens, info, and serve (with the server package).

Each subcommand is one `Command` in `COMMANDS`: a help line, a function that adds its flags and a
function that runs it and returns the exit status. Add a subcommand by adding an entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

from ringserve import chat, types
from ringserve.client import Client
from ringserve.errors import RingserveError

DEFAULT_TARGET = "127.0.0.1:50051"
SERVE_MISSING = ("ringserve serve needs the server package: "
                 "pip install ringserve (from the repo root)")


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], int] | Callable[[list[str]], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    # Takes the raw argv after its name (its own parser does the rest), e.g. `serve`.
    passthrough: bool = False
    # Talks to a server: gets --target and --timeout.
    remote: bool = True


# ---- generate / count-tokens / info ------------------------------------------------------------

def _prompt(text: str | None) -> str:
    """The prompt argument, or stdin when it is '-' or missing."""
    if text is None or text == "-":
        return sys.stdin.read()
    return text


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the user turn ('-' or missing: read stdin)")
    parser.add_argument("--system", help="system instruction")
    parser.add_argument("--max-output-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 is greedy (server default: 1.0)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", dest="stop_sequences", metavar="TEXT",
                        help="stop before this text (repeatable)")
    parser.add_argument("--stats", action="store_true",
                        help="print finish reason, token counts and timing to stderr")


def _generate(args: argparse.Namespace) -> int:
    prompt = _prompt(args.prompt)
    with Client(args.target, timeout=args.timeout) as client:
        stream = client.generate(
            prompt, system_instruction=args.system, max_output_tokens=args.max_output_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            stop_sequences=args.stop_sequences)
        builder = types.ResultBuilder()
        try:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                builder.add(chunk)
        finally:
            stream.close()
        sys.stdout.write("\n")
        if args.stats:
            result = builder.result()
            stats = {"finish_reason": result.finish_reason,
                     "time_to_first_token": result.time_to_first_token,
                     **(dataclasses.asdict(result.usage) if result.usage else {})}
            print(json.dumps(stats), file=sys.stderr)
    return 0


def _add_count_tokens_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the user turn ('-' or missing: read stdin)")
    parser.add_argument("--system", help="system instruction")


def _count_tokens(args: argparse.Namespace) -> int:
    with Client(args.target, timeout=args.timeout) as client:
        print(client.count_tokens(_prompt(args.prompt), system_instruction=args.system))
    return 0


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _info(args: argparse.Namespace) -> int:
    with Client(args.target, timeout=args.timeout) as client:
        info = dataclasses.asdict(client.model_info())
        info["health"] = client.health()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if isinstance(value, list):
                value = ", ".join(value)
            print(f"{key}: {value}")
    return 0


# ---- serve (needs the server package) ------------------------------------------------------------

def _serve(argv: list[str]) -> int:
    try:
        import server.cli
    except ImportError as e:
        # Only a missing `server` package means "not installed"; a broken server should show.
        if e.name not in ("server", "server.cli"):
            raise
        print(SERVE_MISSING, file=sys.stderr)
        return 2
    return server.cli.main(argv)


COMMANDS: dict[str, Command] = {
    "chat": Command("interactive streaming chat", chat.run, chat.add_arguments),
    "generate": Command("one-shot generation; prints the streamed text", _generate,
                        _add_generate_arguments),
    "count-tokens": Command("count a prompt's tokens (chat template included)", _count_tokens,
                            _add_count_tokens_arguments),
    "info": Command("describe the served model and its health", _info, _add_info_arguments),
    "serve": Command("run the server (needs the server package; see `ringserve serve --help`)",
                     _serve, passthrough=True, remote=False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringserve", description="ringserve client and tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           add_help=not command.passthrough)
        if command.remote:
            p.add_argument("--target", default=os.environ.get("RINGSERVE_TARGET", DEFAULT_TARGET),
                           help="server HOST:PORT (default: $RINGSERVE_TARGET or %(default)s)")
            p.add_argument("--timeout", type=float, help="deadline per call, in seconds")
        if command.add_arguments is not None:
            command.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].passthrough:
        return COMMANDS[argv[0]].run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except RingserveError as e:
        print(f"ringserve {args.command}: {e.code.name}: {e.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
