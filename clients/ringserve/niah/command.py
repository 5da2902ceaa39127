"""`ringserve niah`: the flags, and running or re-plotting a grid from them.

The media modules (`media_runner` and the builders it loads) are imported only for a video or
audio run, so the text test and the SDK need grpcio and protobuf alone.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from ringserve.client import Client
from ringserve.niah import deps, media_tasks, plot, results, tasks
from ringserve.niah import haystack as haystack_lib
from ringserve.niah.runner import Grid, Runner, Settings

_LENGTH = re.compile(r"(\d+(?:\.\d+)?)([kKmM]?)")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhSMH]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
MODALITIES = ("text", "video", "audio")
DEFAULT_LENGTHS = "1k,2k,4k,8k"
DEFAULT_DURATIONS = "1m,5m,10m"
DEFAULT_FRAME_SIZE = 256
# Flags that only one kind of run reads (all default to None), so a flag given to a run that would
# ignore it is refused rather than silently dropped.
_ONLY = {"--lengths": ("text",), "--task": ("text",), "--haystack-file": ("text",),
         "--durations": ("video", "audio"), "--needle-word": ("video", "audio"),
         "--work-dir": ("video", "audio"), "--haystack-video": ("video",),
         "--frame-size": ("video",), "--haystack-audio": ("audio",),
         "--needle-audio": ("audio",)}


def parse_lengths(text: str) -> tuple[int, ...]:
    """"1k,4k,16k,128k" -> (1024, 4096, 16384, 131072): k is 1024 tokens, M 1024k."""
    lengths = []
    for item in text.split(","):
        match = _LENGTH.fullmatch(item.strip())
        if not match:
            raise argparse.ArgumentTypeError(
                f"{item!r}: give token counts like 512, 4k, 1.5k or 1M, comma-separated")
        tokens = round(float(match.group(1)) * _UNITS[match.group(2).lower()])
        if tokens <= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a length must be positive")
        lengths.append(tokens)
    return tuple(sorted(set(lengths)))


def parse_durations(text: str) -> tuple[int, ...]:
    """"30s,10m,1.5h" -> (30, 600, 5400): seconds, minutes or hours (a bare number is seconds),
    each a whole number of seconds: a video has one frame a second."""
    durations = []
    for item in text.split(","):
        match = _DURATION.fullmatch(item.strip())
        if not match:
            raise argparse.ArgumentTypeError(
                f"{item!r}: give durations like 30s, 10m, 1.5h or 90, comma-separated")
        seconds = float(match.group(1)) * _SECONDS[match.group(2).lower()]
        if seconds < 1 or seconds != int(seconds):
            raise argparse.ArgumentTypeError(
                f"{item!r} is {seconds:g} s: a duration is a whole number of seconds >= 1")
        durations.append(int(seconds))
    return tuple(sorted(set(durations)))


def parse_depths(text: str) -> tuple[float, ...]:
    """"0,25,50,75,100" -> depths in percent of the haystack's tokens."""
    try:
        depths = [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give percentages from 0 to 100, comma-separated") from None
    if not all(0 <= d <= 100 for d in depths):
        raise argparse.ArgumentTypeError(f"{text!r}: depths run from 0 to 100")
    return tuple(sorted(set(depths)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", choices=MODALITIES,
                        help="text (default): a needle in text, --task picks which; video: a "
                        "frame reading 'The secret word is: WORD' in a video; audio: the "
                        "phrase spoken in a sound track. With --plot-only, plots that modality's "
                        "rows")
    parser.add_argument("--task", choices=list(tasks.TASKS),
                        help="classic (default), passkey, multikey or multivalue; with "
                        "--plot-only, the task to plot (default: each in the file)")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lengths", type=parse_lengths,
                      help="text: prompt lengths in tokens, chat template included (k = 1024, "
                      "M = 1024k; default 1k,2k,4k,8k); lengths past the server's limit are "
                      "skipped")
    grid.add_argument("--durations", type=parse_durations,
                      help="video and audio: haystack durations (s, m, h; default 1m,5m,10m); "
                      "durations past the server's max_media_duration are skipped")
    grid.add_argument("--depths", type=parse_depths, default=parse_depths("0,25,50,75,100"),
                      help="needle depths, percent of the haystack's tokens, or of its duration "
                      "for video and audio (default 0,25,50,75,100)")
    grid.add_argument("--trials", type=int, default=1, help="answers per cell (default 1)")
    grid.add_argument("--seed", type=int, default=0,
                      help="seeds pass keys, keys and values; secret words and generated media")
    text = parser.add_argument_group("haystack and needle")
    text.add_argument("--haystack-file", action="append", metavar="PATH",
                      help="your own UTF-8 text as the haystack (repeatable; default: Python's "
                      "standard-library docs, or the passkey filler for --task passkey)")
    text.add_argument("--needle", default=tasks.CLASSIC_NEEDLE, help="classic task's needle")
    text.add_argument("--question", help="classic, video or audio task's question (default: "
                      "gkamradt's, or 'What is the secret word shown in the video?' / 'spoken "
                      "in the audio?')")
    text.add_argument("--answer", help="classic task's expected answer phrase (default: the "
                      "default needle's phrase, or the whole --needle); audio: what the "
                      "--needle-audio clip says")
    text.add_argument("--distractors", type=int, default=3,
                      help="multikey: needles with other keys besides one per depth (default 3)")
    text.add_argument("--values", type=int, default=4,
                      help="multivalue: values hidden for the one key (default 4)")
    media = parser.add_argument_group(
        "video and audio (need numpy, pillow, imageio-ffmpeg and, for audio, soundfile: "
        "pip install 'ringserve-client[niah]')")
    media.add_argument("--haystack-video", metavar="FILE",
                       help="your video as the haystack, at 1 fps, looped or cut to each "
                       "duration (default: generated frames of shapes and words)")
    media.add_argument("--haystack-audio", metavar="FILE|noise|speech",
                       help="your sound file as the haystack, looped or cut to each duration; "
                       "or 'speech': other espeak-ng voices reading prose, the needle inside "
                       "other speech; or 'noise' (default): synthesised pink noise with tone "
                       "bursts (a file named so: ./speech)")
    media.add_argument("--needle-word", help="the secret word in every cell (default: a seeded "
                       "random word per cell)")
    media.add_argument("--needle-audio", metavar="CLIP",
                       help="audio: your needle clip, spliced in, with --answer saying what it "
                       "says (default: espeak-ng speaking 'The secret word is WORD')")
    media.add_argument("--frame-size", type=int,
                       help=f"video: pixels on a side of each frame (even; default "
                       f"{DEFAULT_FRAME_SIZE}; the server scales frames to its encoder's size)")
    media.add_argument("--work-dir", metavar="DIR",
                       help="keep built videos and sound tracks here, for reruns to reuse "
                       "(default: a temporary directory, removed after the run)")
    run = parser.add_argument_group("answers and output")
    run.add_argument("--score", choices=["exact", "contains", "first-integer"],
                     help="contains (classic, multikey, multivalue: share found) or "
                     "first-integer (passkey) by default")
    run.add_argument("--max-output-tokens", type=int,
                     help="answer length cap (default per task: 16 to 64)")
    run.add_argument("--out", default="niah.jsonl",
                     help="results, JSON lines (default niah.jsonl); done cells are skipped")
    run.add_argument("--heatmap", metavar="PNG", help="write a heatmap (needs Pillow: "
                     "pip install 'ringserve-client[niah]')")
    run.add_argument("--plot-only", action="store_true",
                     help="no server: summarize and plot the rows already in --out")
    run.add_argument("--cache-ttl", type=float, default=600.0,
                     help="seconds a named context cache lives between questions (default 600)")
    run.add_argument("--no-named-cache", action="store_true",
                     help="send whole prompts even when several questions share a context")


def _task(args: argparse.Namespace) -> tasks.Task:
    name = args.task or "classic"
    if name == "classic":
        custom = args.needle != tasks.CLASSIC_NEEDLE
        answer = args.answer or (args.needle if custom else tasks.CLASSIC_ANSWER)
        return tasks.Classic(needle=args.needle, question=args.question or tasks.CLASSIC_QUESTION,
                             answer=answer)
    if name == "passkey":
        return tasks.Passkey(seed=args.seed)
    if name == "multikey":
        return tasks.MultiKey(seed=args.seed, distractors=args.distractors)
    return tasks.MultiValue(seed=args.seed, values=args.values)


def _report(rows: list[results.Row], heatmap: str | None, title: str) -> None:
    """Prints the summary table of `rows` and writes the heatmap when asked (and there is
    something to draw)."""
    print(results.summary_table(rows, title))
    if heatmap and rows:
        plot.heatmap(rows, heatmap, title)
        print(f"heatmap: {heatmap}")


def _title(task: str, rows: list[results.Row]) -> str:
    """"niah classic - MODEL", the model as the rows name it."""
    model = next((row["model"] for row in rows if row.get("model")), "")
    return f"niah {task}" + (f" - {model}" if model else "")


def _plot_only(args: argparse.Namespace) -> int:
    rows = results.read_rows(args.out)
    if args.modality in ("video", "audio"):
        names = [args.modality]
    elif args.task:
        names = [args.task]
    else:  # each task in the file; only the text ones with --modality text
        names = sorted({row["task"] for row in rows
                        if args.modality != "text" or "duration_s" not in row})
    if not any(row["task"] in names for row in rows):
        what = f"{args.task} results" if args.task else "results"
        print(f"ringserve niah: no {what} in {args.out}", file=sys.stderr)
        return 1
    for name in names:
        picked = [row for row in rows if row["task"] == name]
        path = args.heatmap
        if path and len(names) > 1:  # one picture per task: plot.png -> plot-passkey.png
            p = pathlib.Path(path)
            path = str(p.with_name(f"{p.stem}-{name}{p.suffix}"))
        _report(picked, path, _title(name, picked))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.heatmap and not plot.available():
        print(f"ringserve niah: {plot.PILLOW_MISSING}", file=sys.stderr)
        return 2
    if args.plot_only:
        return _plot_only(args)
    try:
        _refuse_misplaced(args)
    except ValueError as e:
        print(f"ringserve niah: {e}", file=sys.stderr)
        return 2
    if args.modality in ("video", "audio"):
        return _run_media(args)
    try:
        task = _task(args)
        grid = Grid(args.lengths or parse_lengths(DEFAULT_LENGTHS), args.depths, args.trials)
        scorer = args.score or task.scorer
        tasks.check_scorer(task, scorer)
        hay = haystack_lib.load(args.haystack_file, task.haystack)
    except ValueError as e:  # a bad option, or a haystack file with no text
        print(f"ringserve niah: {e}", file=sys.stderr)
        return 2
    settings = Settings(out=args.out, scorer=scorer,
                        max_output_tokens=args.max_output_tokens or task.max_output_tokens,
                        named_cache=not args.no_named_cache, cache_ttl=args.cache_ttl)
    with Client.from_args(args) as client:
        Runner(client, task, hay, settings).run(grid)
    keys = {(length, depth) for length in grid.lengths for depth in grid.depths}
    rows = [row for row in results.read_rows(args.out) if row["task"] == task.name
            and (int(row["length"]), float(row["depth"])) in keys and row["trial"] < grid.trials]
    _report(rows, args.heatmap, _title(task.name, rows))
    return 0


def _refuse_misplaced(args: argparse.Namespace) -> None:
    """ValueError naming a flag given that this run's modality does not read."""
    modality = args.modality or "text"
    for flag, modalities in _ONLY.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and modality not in modalities and not args.plot_only:
            hint = {"--lengths": "; video and audio take --durations (e.g. 30s,10m,1h)",
                    "--haystack-file": f"; use --haystack-{modality}"}.get(flag, "")
            raise ValueError(f"{flag} is for --modality {' or '.join(modalities)} runs, not "
                             f"{modality}{hint}")


def _media_task(args: argparse.Namespace) -> media_tasks.SecretWord:
    options = dict(seed=args.seed, word=args.needle_word, question=args.question,
                   answer=args.answer)
    if args.modality == "audio":
        return media_tasks.AudioSecretWord(clip=args.needle_audio, **options)
    return media_tasks.VideoSecretWord(**options)


def _run_media(args: argparse.Namespace) -> int:
    """A video or audio grid: durations x depths, one built media per cell."""
    modality = args.modality
    try:
        deps.check(modality)
    except deps.MissingDependency as e:
        print(f"ringserve niah: {e}", file=sys.stderr)
        return 2
    from ringserve.niah.ffmpeg import BuildError
    from ringserve.niah.media_runner import AUDIO_SYNTHS, MediaHaystack, MediaRunner
    try:
        task = _media_task(args)
        grid = Grid(args.durations or parse_durations(DEFAULT_DURATIONS), args.depths,
                    args.trials)
        scorer = args.score or task.scorer
        if scorer == "first-integer":
            raise ValueError("--score first-integer is for the passkey task; the secret word is "
                             "scored with contains (default) or exact")
        path = args.haystack_video if modality == "video" else args.haystack_audio
        synth = "noise"
        if path in AUDIO_SYNTHS:
            path, synth = None, path
        hay = MediaHaystack(modality, path, args.frame_size or DEFAULT_FRAME_SIZE, synth)
        settings = Settings(out=args.out, scorer=scorer,
                            max_output_tokens=args.max_output_tokens or task.max_output_tokens)
        with Client.from_args(args) as client:
            MediaRunner(client, task, hay, settings, work_dir=args.work_dir).run(grid)
    except (ValueError, OSError, BuildError) as e:
        # a bad option, an unreadable haystack or clip, no espeak-ng (the answers got before a
        # failure are in --out)
        print(f"ringserve niah: {e}", file=sys.stderr)
        return 2
    keys = {(duration, depth) for duration in grid.lengths for depth in grid.depths}
    rows = [row for row in results.read_rows(args.out) if row["task"] == task.name
            and (results.column(row), float(row["depth"])) in keys and row["trial"] < grid.trials]
    _report(rows, args.heatmap, _title(task.name, rows))
    return 0
