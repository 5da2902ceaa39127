"""Runs a video or audio NIAH grid (durations x depths) against a server, one cell at a time.

1. Plan: `runner.plan` over the task's contexts, minus the cells the results file holds. Nothing
   left means no RPC at all.
2. Skip durations past the server's `max_media_duration` (GetModelInfo), and everything when the
   model takes no media of this kind.
3. Per cell, in order of duration then depth: build the media (or find it built in the work
   dir, keyed by everything that shapes it), upload it (UploadMedia, in chunks), count the prompt
   with CountTokens (a prompt past `input_token_limit` minus the output tokens is skipped), ask
   with greedy decoding, delete the upload, score, and append the row.

Every cell is its own media, so no prompt shares a prefix with another and a named cache would
save nothing: none is made. The media builders need NumPy, Pillow, imageio-ffmpeg (and soundfile
for audio), imported when a runner is made (`deps.check` says what is missing first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

from ringserve.media import Audio, Video
from ringserve.niah import deps, results, scoring
from ringserve.niah.media_tasks import SecretWord
from ringserve.niah.progress import Progress
from ringserve.niah.runner import Grid, Settings, plan
from ringserve.niah.tasks import Context, Question

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


AUDIO_SYNTHS = ("noise", "speech")  # the generated audio haystacks


@dataclasses.dataclass(frozen=True)
class MediaHaystack:
    """Where a media haystack comes from: the user's file, or generated."""

    modality: str  # "video" or "audio"
    path: str | None = None  # the user's video or sound file; None: generated
    frame_size: int = 256  # video: pixels on a side of every frame
    synth: str = "noise"  # audio without a path: "noise" or "speech" (`speech`: other voices)

    def __post_init__(self) -> None:
        if self.modality not in ("video", "audio"):
            raise ValueError(f"a media haystack is video or audio, not {self.modality!r}")
        if self.synth not in AUDIO_SYNTHS or (self.synth != "noise" and (
                self.modality != "audio" or self.path is not None)):
            raise ValueError(f"a generated audio haystack is {' or '.join(AUDIO_SYNTHS)}, in "
                             f"place of a file; got {self.synth!r} for a {self.modality} haystack"
                             + (f" with the file {self.path}" if self.path else ""))
        if self.path is not None and not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file (the {self.modality} haystack)")
        if self.modality == "video" and (self.frame_size < 16 or self.frame_size % 2):
            raise ValueError(f"--frame-size must be an even number of pixels >= 16, got "
                             f"{self.frame_size}")

    @property
    def name(self) -> str:
        if self.path is not None:
            return os.path.basename(self.path)
        return "generated-frames" if self.modality == "video" else f"synthesised-{self.synth}"


@dataclasses.dataclass(frozen=True)
class Built:
    """A cell's media on disk, and where its needle is."""

    path: pathlib.Path
    needle_s: float  # when the needle starts, seconds
    needle_length_s: float  # how long it lasts


def _identity(path: str | None) -> list | None:
    """What tells a file's versions apart for the cache key: its real path, size and mtime."""
    if path is None:
        return None
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


class MediaRunner:
    """A video or audio task over one grid against one client (a `ringserve.Client`).

    work_dir: where built media are kept, keyed by what shapes them, for later runs to reuse;
    None: a temporary directory, removed when the run ends (each file right after its cell).
    """

    def __init__(self, client, task: SecretWord, haystack: MediaHaystack, settings: Settings, *,
                 work_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None, progress_stream=None):
        if task.modality != haystack.modality:
            raise ValueError(f"a {task.modality} task needs a {task.modality} haystack, not "
                             f"{haystack.modality}")
        deps.check(task.modality)
        # Imported here, not at the top: they need the optional packages deps.check vouched for.
        self.builder = importlib.import_module(f"ringserve.niah.{task.modality}")
        self._ffmpeg = importlib.import_module("ringserve.niah.ffmpeg")
        self.client = client
        self.task = task
        self.haystack = haystack
        self.settings = settings
        self.work_dir = pathlib.Path(work_dir) if work_dir is not None else None
        self._log = log or (lambda message: print(f"niah: {message}", file=sys.stderr))
        self._progress_stream = progress_stream
        self._score = scoring.SCORERS[settings.scorer]
        self._model = ""

    def run(self, grid: Grid) -> list[results.Row]:
        """Answers every pending cell of `grid` (lengths are durations in seconds); returns the
        new rows (also saved)."""
        done = {results.key(row) for row in results.read_rows(self.settings.out)}
        contexts = plan(self.task, grid, done)
        if not contexts:
            self._log(f"all {self.task.name} cells are already in {self.settings.out}")
            return []
        self.check(min(c.length for c in contexts))
        info = self.client.model_info()
        self._model = info.name
        kind = self.task.modality.upper()
        if kind not in info.supported_modalities:
            self._log(f"skipping every cell: {info.name} takes no {self.task.modality} (it takes "
                      f"{', '.join(info.supported_modalities)})")
            return []
        longest = info.max_media_duration
        if longest is not None:
            for duration in sorted({c.length for c in contexts if c.length > longest}):
                self._log(f"skipping duration {results.format_duration(duration)}: above the "
                          f"server's max_media_duration {longest:g} s")
            contexts = [c for c in contexts if c.length <= longest]
        limit = info.input_token_limit - self.settings.max_output_tokens
        cells = sorted(((c, q) for c in contexts for q in c.questions),
                       key=lambda cq: (cq[0].length, cq[1].depth, cq[1].trial))
        temporary = self.work_dir is None
        work_dir = pathlib.Path(tempfile.mkdtemp(prefix="niah-")) if temporary else self.work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        progress = Progress(len(cells), f"niah {self.task.name}", self._progress_stream)
        rows: list[results.Row] = []
        skipped: dict[str, None] = {}
        try:
            for context, question in cells:
                built = self._build(context, question, work_dir)
                try:
                    row = self._answer(context, question, built, limit, skipped)
                finally:
                    if temporary:
                        built.path.unlink(missing_ok=True)
                progress.step(f"{results.format_duration(context.length)} depth "
                              f"{results.format_depth(question.depth)}"
                              + ("" if row is None else f" score {row['score']:.2f}"))
                if row is not None:
                    rows.append(row)
        finally:
            progress.close()
            if temporary:
                shutil.rmtree(work_dir, ignore_errors=True)
        for reason in skipped:  # after the bar's line; once each
            self._log(f"skipping {reason}")
        return rows

    def check(self, shortest_s: int) -> None:
        """Fails before any RPC on what would fail every cell: a haystack file ffmpeg cannot
        read (`ffmpeg.BuildError`), no espeak-ng and no clip (FileNotFoundError), a needle clip
        longer than the shortest duration (ValueError)."""
        if self.haystack.path is not None:
            first = (self._ffmpeg.decode_frames(self.haystack.path, size=16, count=1)
                     if self.task.modality == "video"
                     else self._ffmpeg.decode_audio(self.haystack.path, samples=1))
            try:
                next(first)
            finally:
                first.close()
        if self.task.modality == "audio":
            if self.haystack.synth == "speech" and not self.builder.can_speak():
                raise FileNotFoundError(self.builder.SPEECH_MISSING)
            if self.task.clip is None:
                if not self.builder.can_speak():
                    raise FileNotFoundError(self.builder.ESPEAK_MISSING)
            else:
                clip = len(self.builder.load_clip(self.task.clip))
                self.builder.needle_start(shortest_s * self.builder.SAMPLE_RATE, clip, 0)

    # ---- building ------------------------------------------------------------------------

    def _word(self, context: Context, question: Question) -> str:
        return self.task.cell_word(context.length, question.depth, question.trial)

    def _spec(self, context: Context, question: Question, work_dir: pathlib.Path):
        """The builder's spec for a cell, and the facts its cache key adds (file versions)."""
        if self.task.modality == "video":
            spec = self.builder.VideoSpec(
                duration_s=context.length,
                needle_second=self.builder.needle_second(context.length, question.depth),
                word=self._word(context, question), seed=self.task.seed, trial=question.trial,
                frame_size=self.haystack.frame_size, haystack=self.haystack.path)
            return spec, [_identity(self.haystack.path)]
        clip = self.task.clip
        if clip is None:
            clip = str(self.builder.speak(context.needles[0].text, work_dir))
        hay = self.haystack.path
        if self.haystack.synth == "speech":  # made once per (seed, trial, duration), then a file
            from ringserve.niah import speech
            hay = str(speech.track(self.task.seed, question.trial, context.length, work_dir))
        spec = self.builder.AudioSpec(duration_s=context.length, depth=question.depth,
                                      needle=clip, seed=self.task.seed, trial=question.trial,
                                      haystack=hay)
        return spec, [_identity(hay), _identity(clip)]

    def _build(self, context: Context, question: Question, work_dir: pathlib.Path) -> Built:
        """The cell's media in `work_dir`: built now, or found from an earlier build."""
        spec, versions = self._spec(context, question, work_dir)
        fields = dataclasses.asdict(spec)
        digest = hashlib.sha256(json.dumps([fields, versions], sort_keys=True).encode())
        word = _UNSAFE.sub("_", self._word(context, question))[:24]
        stem = (f"{self.task.modality}-{results.format_duration(context.length)}-"
                f"d{results.format_depth(question.depth)}-seed{self.task.seed}-t{question.trial}-"
                f"{word}-{digest.hexdigest()[:12]}")
        path = work_dir / (stem + self.builder.SUFFIX)
        meta = path.with_suffix(".json")  # where the needle went, written after the media
        if not (path.exists() and meta.exists()):
            tmp = path.with_name(f".{path.name}.{os.getpid()}{self.builder.SUFFIX}")
            try:
                start, length = self.builder.build(spec, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, path)
            meta.write_text(json.dumps({"needle_s": start, "needle_length_s": length}))
        placed = json.loads(meta.read_text())
        return Built(path, placed["needle_s"], placed["needle_length_s"])

    # ---- asking --------------------------------------------------------------------------

    def _answer(self, context: Context, question: Question, built: Built, limit: int,
                skipped: dict[str, None]) -> results.Row | None:
        media = self.client.upload_media(
            built.path, self.builder.MIME_TYPE,
            display_name=f"niah {self.task.name} {built.path.name}")
        try:
            part = (Video if self.task.modality == "video" else Audio).from_upload(media)
            contents = self.task.contents(part, question)
            counted = self.client.count_tokens_detail(contents, context.system)
            if counted.total_tokens > limit:
                skipped[f"duration {results.format_duration(context.length)}: the prompt holds "
                        f"{counted.total_tokens} tokens, above the server's input_token_limit "
                        f"minus {self.settings.max_output_tokens} output tokens ({limit})"] = None
                return None
            start = time.perf_counter()
            result = self.client.generate_text(
                contents, system_instruction=context.system,
                max_output_tokens=self.settings.max_output_tokens, temperature=0)
            latency = time.perf_counter() - start
        finally:
            self.client.delete_media(media)
        usage = result.usage
        details = usage.prompt_tokens_details if usage and usage.prompt_tokens_details \
            else counted.prompt_tokens_details
        movable = context.length - built.needle_length_s  # where a needle's start can go
        row = {
            "task": self.task.name, "modality": self.task.modality,
            "duration_s": context.length, "depth": question.depth, "trial": question.trial,
            "prompt_tokens": usage.prompt_token_count if usage else counted.total_tokens,
            "prompt_tokens_details": details,
            "media_tokens": sum(n for m, n in details.items() if m != "TEXT"),
            "needle_s": round(built.needle_s, 4),
            "needle_length_s": round(built.needle_length_s, 4),
            "needle_depth_percent": round(100 * built.needle_s / movable, 2) if movable > 0
            else 0.0,
            "expected": list(question.expected), "answer": result.text,
            "score": self._score(result.text, question.expected), "scorer": self.settings.scorer,
            "latency_s": round(latency, 4), "time_to_first_token_s": result.time_to_first_token,
            "finish_reason": result.finish_reason, "media_bytes": media.size_bytes,
            "model": self._model, "haystack": self.haystack.name, "seed": self.task.seed,
        }
        results.append_row(self.settings.out, row)
        return row
