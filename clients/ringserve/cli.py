"""The `ringserve` command: chat, generate, count-tokens, info, cache, upload, media, niah, and
serve (with the server package).

Each subcommand is one `Command` in `COMMANDS`: a help line, a function that adds its flags and a
function that runs it and returns the exit status. Add a subcommand by adding an entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from ringserve import chat, types, upload
from ringserve.client import Client
from ringserve.errors import RingserveError
from ringserve.media import guess_mime_type
from ringserve.niah import command as niah

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
    parser.add_argument("--ignore-eos", action="store_true",
                        help="go on past the model's end tokens, to --max-output-tokens")
    parser.add_argument("--cached-content", metavar="NAME",
                        help="a named cache (`ringserve cache create`) to put before the prompt")
    parser.add_argument("--stats", action="store_true",
                        help="print finish reason, token counts and timing to stderr")


def _generate(args: argparse.Namespace) -> int:
    prompt = _prompt(args.prompt)
    with Client.from_args(args) as client:
        stream = client.generate(
            prompt, system_instruction=args.system, max_output_tokens=args.max_output_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            stop_sequences=args.stop_sequences, ignore_eos=args.ignore_eos,
            cached_content=args.cached_content)
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
    parser.add_argument("--cached-content", metavar="NAME",
                        help="count with this named cache first (its tokens included)")


def _count_tokens(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        print(client.count_tokens(_prompt(args.prompt), system_instruction=args.system,
                                  cached_content=args.cached_content))
    return 0


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _info(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
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


# ---- cache: named context caches -------------------------------------------------------------

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(text: str) -> float:
    """Seconds, optionally with a unit: 90, 1.5, 30s, 10m, 2h, 1d."""
    unit = _TTL_UNITS.get(text[-1:].lower())
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give seconds, or a number with s, m, h or d") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive and finite")
    return seconds


def _cache_dict(cache: types.CachedContent) -> dict:
    out = dataclasses.asdict(cache)
    for key in ("create_time", "update_time", "expire_time"):
        if out[key] is not None:
            out[key] = out[key].isoformat()
    return out


def _print_cache(cache: types.CachedContent, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_cache_dict(cache)))
    else:
        for key, value in _cache_dict(cache).items():
            print(f"{key}: {value}")


def _common_remote_arguments() -> argparse.ArgumentParser:
    # For subcommands with actions: --target / --timeout also after the action (`cache list
    # --target ...`); SUPPRESS keeps a value given before the action.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=argparse.SUPPRESS,
                        help="server HOST:PORT (default: $RINGSERVE_TARGET or 127.0.0.1:50051)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="deadline per call, in seconds")
    return common


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    common = _common_remote_arguments()
    actions = parser.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    create = actions.add_parser("create", parents=[common], help="cache a text (one user turn)",
                                description="Compute a text's KV once and pin it under a name; "
                                "prints the name and token counts.")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", metavar="PATH", help="the text to cache ('-': stdin)")
    source.add_argument("--text", help="the text to cache")
    create.add_argument("--system", help="system instruction, cached with the text")
    create.add_argument("--ttl", type=_ttl, metavar="SECONDS",
                        help="time to live: seconds, or 10m, 2h, 1d (server default: 1 h)")
    create.add_argument("--display-name", default="")
    create.add_argument("--json", action="store_true", help="print one JSON object")

    listing = actions.add_parser("list", parents=[common], help="list the live caches")
    listing.add_argument("--json", action="store_true", help="print one JSON list")

    get = actions.add_parser("get", parents=[common], help="describe one cache")
    get.add_argument("name")
    get.add_argument("--json", action="store_true", help="print one JSON object")

    update = actions.add_parser("update", parents=[common], help="change a cache's expiry")
    update.add_argument("name")
    update.add_argument("--ttl", type=_ttl, metavar="SECONDS", required=True,
                        help="new time to live from now: seconds, or 10m, 2h, 1d")
    update.add_argument("--json", action="store_true", help="print one JSON object")

    delete = actions.add_parser("delete", parents=[common], help="delete a cache, freeing it")
    delete.add_argument("name")


def _cache(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        if args.cache_command == "create":
            if args.file is not None:
                if args.file == "-":
                    text = sys.stdin.read()
                else:
                    with open(args.file, encoding="utf-8") as f:
                        text = f.read()
            else:
                text = args.text
            cache = client.create_cache(text, system_instruction=args.system, ttl=args.ttl,
                                        display_name=args.display_name)
            _print_cache(cache, args.json)
        elif args.cache_command == "list":
            caches = client.list_caches()
            if args.json:
                print(json.dumps([_cache_dict(c) for c in caches]))
            else:
                for c in caches:
                    expires = c.expire_time.isoformat() if c.expire_time else "-"
                    print(f"{c.name}\t{c.total_token_count} tokens\t"
                          f"{c.pinned_token_count} pinned\texpires {expires}\t{c.display_name}")
        elif args.cache_command == "get":
            _print_cache(client.get_cache(args.name), args.json)
        elif args.cache_command == "update":
            _print_cache(client.update_cache(args.name, ttl=args.ttl), args.json)
        elif args.cache_command == "delete":
            client.delete_cache(args.name)
            print(f"deleted {args.name}")
    return 0


# ---- upload / media: uploaded media ------------------------------------------------------------

def _media_dict(media: upload.MediaInfo) -> dict:
    out = dataclasses.asdict(media)
    for key in ("create_time", "expire_time"):
        if out[key] is not None:
            out[key] = out[key].isoformat()
    return out


def _print_media(media: upload.MediaInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_media_dict(media)))
    else:
        for key, value in _media_dict(media).items():
            print(f"{key}: {value}")


def _add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="an image, audio or video file")
    parser.add_argument("--mime-type", help="e.g. video/mp4 (default: from the extension)")
    parser.add_argument("--display-name", help="default: the file's name")
    parser.add_argument("--chunk-size", type=int, default=upload.DEFAULT_CHUNK_SIZE,
                        metavar="BYTES", help="bytes per message (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _upload(args: argparse.Namespace) -> int:
    display_name = args.display_name
    if display_name is None:
        display_name = os.path.basename(args.file)
    mime_type = args.mime_type
    if mime_type is None and os.path.isfile(args.file):
        try:
            mime_type = guess_mime_type(args.file)
        except ValueError:
            raise ValueError(f"cannot tell the media type of {args.file!r} from its extension; "
                             "pass --mime-type (e.g. image/png, audio/wav, video/mp4)") from None
    with Client.from_args(args) as client:
        media = client.upload_media(args.file, mime_type, display_name=display_name,
                                    chunk_size=args.chunk_size)
    _print_media(media, args.json)
    return 0


def _add_media_arguments(parser: argparse.ArgumentParser) -> None:
    common = _common_remote_arguments()
    actions = parser.add_subparsers(dest="media_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[common], help="list the uploaded media")
    listing.add_argument("--json", action="store_true", help="print one JSON list")
    get = actions.add_parser("get", parents=[common], help="describe one upload")
    get.add_argument("name")
    get.add_argument("--json", action="store_true", help="print one JSON object")
    delete = actions.add_parser("delete", parents=[common], help="delete an upload")
    delete.add_argument("name")


def _media(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        if args.media_command == "list":
            media = client.list_media()
            if args.json:
                print(json.dumps([_media_dict(m) for m in media]))
            else:
                for m in media:
                    expires = m.expire_time.isoformat() if m.expire_time else "-"
                    print(f"{m.name}\t{m.modality.lower()}\t{m.mime_type}\t"
                          f"{m.size_bytes} bytes\t{m.token_count} tokens\t"
                          f"expires {expires}\t{m.display_name}")
        elif args.media_command == "get":
            _print_media(client.get_media(args.name), args.json)
        elif args.media_command == "delete":
            client.delete_media(args.name)
            print(f"deleted {args.name}")
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
    "cache": Command("named context caches: create, list, get, update, delete", _cache,
                     _add_cache_arguments),
    "upload": Command("upload an image, audio or video file (for file_data parts)", _upload,
                      _add_upload_arguments),
    "media": Command("uploaded media: list, get, delete", _media, _add_media_arguments),
    "niah": Command("needle-in-a-haystack eval: a grid of context lengths x needle depths",
                    niah.run, niah.add_arguments),
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
            p.add_argument("--api-key", help="the server's API key (default: $RINGSERVE_API_KEY)")
            p.add_argument("--tls", nargs="?", const=True, default=None, metavar="CA_PEM",
                           help="connect with TLS (the system's roots, or the CA in CA_PEM)")
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
    except (OSError, ValueError) as e:  # a missing file; a type that cannot be guessed
        print(f"ringserve {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
