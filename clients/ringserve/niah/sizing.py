"""Sizing a context to a token length with the server's CountTokens, and placing its needles.

Every count comes from the server, so sizes hold for whatever tokenizer and chat template it runs.

- P(k): tokens of the user turn `intro + the first k haystack units` alone (no needles). H(k) =
  P(k) - P(0) is the haystack's tokens before unit boundary k: the depth of a needle put there.
- F(n): tokens of the whole prompt: system, the context turn holding n units and the needles,
  the question.

A context gets the largest n with F(n) <= length: F(n+1) > length, so not one more sentence would
fit. Needle i goes at the boundary k in [0, n] whose H(k) is nearest to depth_i * H(n).

Both searches gallop from a guess and then bisect, and every P is remembered, so a grid costs
few RPCs: the depths and trials of one length share most P values, and F is probed only around
the n that P predicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from ringserve.niah.haystack import Haystack
from ringserve.niah.tasks import Context, Question, Turn


class TokenCounter(Protocol):
    """The part of `ringserve.Client` sizing needs."""

    def count_tokens(self, contents, system_instruction=None, *, cached_content=None) -> int: ...


@dataclasses.dataclass(frozen=True)
class SizedContext:
    """A context filled to its length: the text to send and where its needles ended up."""

    context: Context
    units: int  # haystack units in the prompt
    boundaries: tuple[int, ...]  # the unit boundary of each needle, in `context.needles` order
    haystack_tokens: int  # H(units)
    needle_tokens: tuple[int, ...]  # H(boundary) of each needle: its depth in haystack tokens
    prompt_tokens: int  # F(units), with the longest question
    text: str  # the context turn

    @property
    def turns(self) -> tuple[Turn, ...]:
        """The context alone: what a named cache holds."""
        return (("user", self.text),)

    def contents(self, question: Question) -> list[Turn]:
        """The whole prompt's turns for one question (the system instruction aside)."""
        return [*self.turns, *question.turns]


def last_fitting(fits: Callable[[int], bool], guess: int, lo: int = 0,
                 hi: int | None = None) -> int | None:
    """The largest x in [lo, hi] with fits(x), where fits is true up to some x and false after;
    None when fits(lo) is false. Probes guess, gallops away from it by doubling steps, then
    bisects: about 2 log2(error of the guess) calls. When the answer x < hi, fits(x + 1) was
    called (and was false)."""
    x = max(lo, guess if hi is None else min(guess, hi))
    if fits(x):
        good, step = x, 1
        while True:
            bad = good + step
            if hi is not None and bad > hi:
                bad = hi + 1
                if good == hi:
                    return good
                break
            if not fits(bad):
                break
            good, step = bad, step * 2
    else:
        bad, step = x, 1
        while True:
            good = bad - step
            if good <= lo:
                if not fits(lo):
                    return None
                good = lo
                break
            if fits(good):
                break
            bad, step = good, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


class Sizer:
    """Sizes contexts against one haystack through a server's CountTokens.

    Prefix counts P(k) are remembered for the sizer's life, so share one sizer across a grid.
    `requests` counts the CountTokens calls made.
    """

    def __init__(self, counter: TokenCounter, haystack: Haystack):
        self._counter = counter
        self.haystack = haystack
        self._prefix: dict[tuple[str, int], int] = {}
        self._chars_per_token = 4.0  # refined from every P(k) counted
        self.requests = 0

    def _count(self, system: str | None, turns: Sequence[Turn]) -> int:
        self.requests += 1
        return self._counter.count_tokens(list(turns), system_instruction=system)

    def haystack_tokens(self, intro: str, k: int) -> int:
        """H(k): tokens of the first k units, after `intro`, measured as P(k) - P(0)."""
        for i in {0, k}:
            if (intro, i) not in self._prefix:
                text = (intro + self.haystack.text(0, i)).rstrip()
                if not text:
                    raise ValueError("a context needs a non-empty intro to measure depths from")
                self._prefix[intro, i] = self._count(None, [("user", text)])
        tokens = self._prefix[intro, k] - self._prefix[intro, 0]
        if k and tokens > 0:
            self._chars_per_token = self.haystack.chars(k) / tokens
        return tokens

    def place(self, context: Context, units: int) -> tuple[int, ...]:
        """The boundary of each needle in a haystack of `units` units: nearest its depth."""
        total = self.haystack_tokens(context.intro, units)
        out = []
        for needle in context.needles:
            target = needle.depth * total
            k = last_fitting(lambda k: self.haystack_tokens(context.intro, k) <= target,
                             round(needle.depth * units), 0, units)
            if k < units and (self.haystack_tokens(context.intro, k + 1) - target
                              < target - self.haystack_tokens(context.intro, k)):
                k += 1
            out.append(k)
        return tuple(out)

    def render(self, context: Context, units: int, boundaries: Sequence[int]) -> str:
        """The context turn: intro, the haystack with each needle before its boundary's unit
        (needles at one boundary in their listed order), outro."""
        pieces, start = [context.intro], 0
        for k, needle in sorted(zip(boundaries, context.needles), key=lambda pair: pair[0]):
            pieces += [self.haystack.text(start, k), needle.text, " "]
            start = k
        pieces.append(self.haystack.text(start, units))
        return "".join(pieces).rstrip() + context.outro

    def _longest_question(self, context: Context) -> Question:
        """The question whose turns add the most tokens: if it fits, the others do."""
        distinct = {q.turns: q for q in context.questions}
        if len(distinct) == 1:
            return context.questions[0]
        head = [("user", context.intro.rstrip() or ".")]
        return max(distinct.values(), key=lambda q: self._count(context.system, head + [*q.turns]))

    def size(self, context: Context) -> SizedContext | str:
        """The context filled to its length, or why it cannot be (a message)."""
        question = self._longest_question(context)
        full: dict[int, int] = {}

        def prompt_tokens(units: int) -> int:  # F(units)
            if units not in full:
                text = self.render(context, units, self.place(context, units))
                full[units] = self._count(context.system, [("user", text), *question.turns])
            return full[units]

        empty = prompt_tokens(0)
        if empty > context.length:
            return (f"length {context.length}: the prompt holds {empty} tokens before any "
                    "haystack (template, needles, question)")
        budget = context.length - empty
        guess = last_fitting(lambda k: self.haystack_tokens(context.intro, k) <= budget,
                             self.haystack.units_for_chars(int(budget * self._chars_per_token)))
        units = last_fitting(lambda n: prompt_tokens(n) <= context.length, guess or 0)
        boundaries = self.place(context, units)
        return SizedContext(
            context=context, units=units, boundaries=boundaries,
            haystack_tokens=self.haystack_tokens(context.intro, units),
            needle_tokens=tuple(self.haystack_tokens(context.intro, k) for k in boundaries),
            prompt_tokens=prompt_tokens(units), text=self.render(context, units, boundaries))
