"""Runs a NIAH grid against a server: plan, size, order, ask, score, save.

1. Plan: the task's contexts for every length, minus the questions the results file already
   answers. Nothing left means no RPC at all.
2. Skip lengths the server cannot take (GetModelInfo's input_token_limit minus the output
   tokens) and size the rest with CountTokens (`sizing.Sizer`).
3. Order the prompts by their first needle's position, then by size: neighbours then share the
   longest haystack prefix, which the server's automatic prefix cache computes only once.
4. Ask. A context with several pending questions is put in a named cache (CreateCache, a short
   TTL) and each question sent alone with it; the cache is deleted after its last question.
   A single question goes as one whole prompt. Greedy decoding throughout.
5. Score each answer and append its row to the results file at once.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence

from ringserve.errors import FailedPrecondition
from ringserve.niah import results, scoring
from ringserve.niah.haystack import Haystack
from ringserve.niah.progress import Progress
from ringserve.niah.sizing import SizedContext, Sizer
from ringserve.niah.tasks import Context, Question, Task


@dataclasses.dataclass(frozen=True)
class Grid:
    lengths: tuple[int, ...]  # target prompt lengths, tokens
    depths: tuple[float, ...]  # needle depths, percent of the haystack's tokens
    trials: int = 1

    def __post_init__(self) -> None:
        if not self.lengths or not self.depths:
            raise ValueError("the grid needs at least one length and one depth")
        if any(n <= 0 for n in self.lengths):
            raise ValueError(f"lengths must be positive, got {list(self.lengths)}")
        if any(not 0 <= d <= 100 for d in self.depths):
            raise ValueError(f"depths are percentages from 0 to 100, got {list(self.depths)}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")


@dataclasses.dataclass(frozen=True)
class Settings:
    out: str | os.PathLike  # the JSON-lines results file (read to resume, appended to)
    scorer: str  # a key of scoring.SCORERS
    max_output_tokens: int
    named_cache: bool = True  # cache a context that gets several questions
    cache_ttl: float = 600.0  # seconds; refreshed while its questions run, deleted after


def plan(task: Task, grid: Grid, done: set[results.Key]) -> list[Context]:
    """The task's contexts over the grid, each keeping only its unanswered questions."""
    pending = []
    for length in grid.lengths:
        for context in task.contexts(length, list(grid.depths), grid.trials):
            left = tuple(q for q in context.questions
                         if (task.name, length, float(q.depth), q.trial) not in done)
            if left:
                pending.append(dataclasses.replace(context, questions=left))
    return pending


class Runner:
    """One task over one grid against one client (a `ringserve.Client` or anything alike)."""

    def __init__(self, client, task: Task, haystack: Haystack, settings: Settings, *,
                 log: Callable[[str], None] | None = None, progress_stream=None):
        self.client = client
        self.task = task
        self.haystack = haystack
        self.settings = settings
        self.sizer = Sizer(client, haystack)
        self._log = log or (lambda message: print(f"niah: {message}", file=sys.stderr))
        self._progress_stream = progress_stream
        self._score = scoring.SCORERS[settings.scorer]
        self._named_cache = settings.named_cache  # off for good once the server refuses one
        self._model = ""

    def run(self, grid: Grid) -> list[results.Row]:
        """Answers every pending cell of `grid`; returns the new rows (also saved)."""
        done = {results.key(row) for row in results.read_rows(self.settings.out)}
        contexts = plan(self.task, grid, done)
        if not contexts:
            self._log(f"all {self.task.name} cells are already in {self.settings.out}")
            return []
        info = self.client.model_info()
        self._model = info.name
        limit = info.input_token_limit - self.settings.max_output_tokens
        for length in sorted({c.length for c in contexts if c.length > limit}):
            self._log(f"skipping length {length}: above the server's input_token_limit "
                      f"{info.input_token_limit} minus {self.settings.max_output_tokens} "
                      "output tokens")
        sized = self._size([c for c in contexts if c.length <= limit])
        sized.sort(key=lambda s: (min(s.boundaries), s.units))
        progress = Progress(sum(len(s.context.questions) for s in sized), f"niah {self.task.name}",
                            self._progress_stream)
        rows: list[results.Row] = []
        try:
            for item in sized:
                rows += self._ask(item, progress)
        finally:
            progress.close()
        return rows

    def _size(self, contexts: Sequence[Context]) -> list[SizedContext]:
        progress = Progress(len(contexts), "sizing", self._progress_stream)
        out, reasons = [], {}
        try:
            for context in contexts:
                sized = self.sizer.size(context)
                if isinstance(sized, str):
                    reasons[sized] = None
                else:
                    out.append(sized)
                progress.step(f"length {results.format_length(context.length)}")
        finally:
            progress.close()
        for reason in reasons:  # after the bar's line; once each, not once per depth
            self._log(f"skipping {reason}")
        return out

    def _ask(self, item: SizedContext, progress: Progress) -> list[results.Row]:
        questions = item.context.questions
        if len(questions) < 2 or not self._named_cache:
            return [self._answer(item, q, progress, None) for q in questions]
        try:
            cache = self.client.create_cache(
                list(item.turns), system_instruction=item.context.system,
                ttl=self.settings.cache_ttl, display_name=f"niah {self.task.name}")
        except FailedPrecondition as e:  # e.g. a server running without prefix caching
            self._log(f"named caches unavailable ({e.details}); sending whole prompts")
            self._named_cache = False
            return [self._answer(item, q, progress, None) for q in questions]
        refreshed = time.monotonic()
        try:
            rows = []
            for question in questions:
                if time.monotonic() - refreshed > self.settings.cache_ttl / 2:
                    self.client.update_cache(cache, ttl=self.settings.cache_ttl)
                    refreshed = time.monotonic()
                rows.append(self._answer(item, question, progress, cache))
            return rows
        finally:
            self.client.delete_cache(cache)

    def _answer(self, item: SizedContext, question: Question, progress: Progress,
                cache) -> results.Row:
        context = item.context
        if cache is None:
            request = dict(contents=item.contents(question), system_instruction=context.system)
        else:
            request = dict(contents=list(question.turns), cached_content=cache)
        start = time.perf_counter()
        result = self.client.generate_text(
            **request, max_output_tokens=self.settings.max_output_tokens, temperature=0)
        latency = time.perf_counter() - start
        needle = question.needle
        row = {
            "task": self.task.name, "length": context.length, "depth": question.depth,
            "trial": question.trial,
            "prompt_tokens": result.usage.prompt_token_count if result.usage
            else item.prompt_tokens,
            "haystack_tokens": item.haystack_tokens,
            "needle_depth_tokens": item.needle_tokens[needle],
            "needle_depth_percent": round(
                100 * item.needle_tokens[needle] / max(item.haystack_tokens, 1), 2),
            "needles": len(context.needles),
            "expected": list(question.expected), "answer": result.text,
            "score": self._score(result.text, question.expected), "scorer": self.settings.scorer,
            "latency_s": round(latency, 4), "time_to_first_token_s": result.time_to_first_token,
            "finish_reason": result.finish_reason,
            "cached_tokens": result.usage.cached_content_token_count if result.usage else None,
            "named_cache": cache is not None, "model": self._model,
            "haystack": self.haystack.name, "seed": getattr(self.task, "seed", None),
        }
        results.append_row(self.settings.out, row)
        progress.step(f"length {results.format_length(context.length)} depth "
                      f"{results.format_depth(question.depth)} score {row['score']:.2f}")
        return row
