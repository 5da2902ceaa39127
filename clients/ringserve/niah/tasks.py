"""The NIAH tasks: what goes into a haystack, what is asked, and what counts as right.

A task turns one grid column (a context length, all depths, all trials) into `Context`s: one
haystack with its needles and the questions asked of it. Whenever several questions share one
identical context the runner can compute that context once (a named cache), so tasks put them in
one `Context` where the design allows:

- classic (gkamradt): one needle per depth; the trials ask the same question of the same context.
- passkey (Mohtashami & Jaggi): one pass key per depth and trial, answered after an open model
  turn "The pass key is"; scored by the first integer of the answer.
- multikey (RULER niah_multikey): per trial, one context with a needle "One of the special magic
  numbers for {key} is: {value}." at every requested depth plus `distractors` more at random
  depths; each depth's question asks for the key of its own needle, the others distract.
- multivalue (RULER niah_multivalue): per depth and trial, `values` needles for one key, the first
  at the depth and the rest at random depths; scored by the share of the values named.

Random values come from `random.Random` seeded with a string of the seed and the cell, so a cell
gets the same values on every run and whatever else the grid holds.
"""

from __future__ import annotations

import dataclasses
import random

from ringserve.niah import scoring

Turn = tuple[str, str]  # (role, text)

CLASSIC_NEEDLE = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores "
                  "Park on a sunny day.")
CLASSIC_QUESTION = "What is the best thing to do in San Francisco?"
CLASSIC_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
CLASSIC_SYSTEM = ("You are a helpful AI bot that answers questions for a user. Keep your response "
                  "short and direct.")
RULER_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize it. I will quiz you about the numbers afterwards.\n\n")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n\n")

_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy",
               "jolly", "keen", "lucky", "mellow", "noble", "odd", "pale", "quiet", "rapid",
               "silent", "tidy", "urban", "vivid", "wary", "young", "zesty", "bold", "crisp",
               "damp", "early", "fancy", "grand", "humble")
_NOUNS = ("anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor",
          "island", "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pebble",
          "quarry", "river", "saddle", "tunnel", "valley", "walnut", "yard", "zephyr", "bridge",
          "canyon", "dragon", "ember", "forest", "glacier", "helmet", "igloo")


@dataclasses.dataclass(frozen=True)
class Needle:
    text: str
    depth: float  # where it goes: the share (0 to 1) of the haystack's tokens before it


@dataclasses.dataclass(frozen=True)
class Question:
    depth: float  # the grid's depth in percent: the row this question fills
    trial: int
    turns: tuple[Turn, ...]  # sent after the context: the question, perhaps an open model turn
    expected: tuple[str, ...]
    needle: int  # index in `Context.needles` of the needle this question asks about


@dataclasses.dataclass(frozen=True)
class Context:
    """One haystack with its needles, and every question asked of that identical context.

    The prompt is `system` plus the user turn `intro + haystack-with-needles + outro`, then a
    question's turns. The runner picks how much haystack fills the target length.
    """

    task: str
    length: int  # the target prompt length in tokens
    system: str | None
    intro: str
    outro: str
    needles: tuple[Needle, ...]
    questions: tuple[Question, ...]


@dataclasses.dataclass(frozen=True)
class Task:
    """What every task has; subclasses add their options and `contexts`."""

    name = ""
    haystack = "stdlib"  # the default haystack: "stdlib" or "passkey"
    scorer = "contains"  # the default scorer, a key of scoring.SCORERS
    max_output_tokens = 32

    def contexts(self, length: int, depths: list[float], trials: int) -> list[Context]:
        raise NotImplementedError


def _rng(*parts: object) -> random.Random:
    # A str seed is hashed with SHA-512: the same on every run, whatever PYTHONHASHSEED is.
    return random.Random("/".join(str(p) for p in parts))


def _keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct two-word keys such as "quiet-harbor"."""
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), count)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def _magic(key: str, value: int) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _ruler_ask(key: str, several: bool) -> tuple[Turn, ...]:
    """RULER's question for `key`, and the open answer the model continues."""
    noun = "special magic numbers" if several else "special magic number"
    return (("user", f"What {'are all' if several else 'is'} the {noun} for {key} mentioned in "
                     "the provided text?"),
            ("model", f"The {noun} for {key} mentioned in the provided text "
                      f"{'are' if several else 'is'}"))


def _at_least(option: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{option} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class Classic(Task):
    needle: str = CLASSIC_NEEDLE
    question: str = CLASSIC_QUESTION
    answer: str = CLASSIC_ANSWER

    name = "classic"
    max_output_tokens = 48

    def contexts(self, length: int, depths: list[float], trials: int) -> list[Context]:
        ask = (("user", f"{self.question} Don't give information outside the document or "
                        "repeat your findings."),)
        return [Context("classic", length, CLASSIC_SYSTEM, "<context>\n", "\n</context>",
                        (Needle(self.needle, depth / 100),),
                        tuple(Question(depth, trial, ask, (self.answer,), 0)
                              for trial in range(trials)))
                for depth in depths]


@dataclasses.dataclass(frozen=True)
class SeededTask(Task):
    """A task whose needles hold random values, drawn from `seed` and the cell."""

    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Passkey(SeededTask):
    name = "passkey"
    haystack = "passkey"
    scorer = "first-integer"
    max_output_tokens = 16

    def contexts(self, length: int, depths: list[float], trials: int) -> list[Context]:
        out = []
        for depth in depths:
            for trial in range(trials):
                key = _rng(self.seed, self.name, length, depth, trial).randint(10000, 99999)
                needle = f"The pass key is {key}. Remember it. {key} is the pass key."
                ask = (("user", "What is the pass key?"), ("model", "The pass key is"))
                out.append(Context("passkey", length, None, PASSKEY_INTRO, "",
                                   (Needle(needle, depth / 100),),
                                   (Question(depth, trial, ask, (str(key),), 0),)))
        return out


@dataclasses.dataclass(frozen=True)
class MultiKey(SeededTask):
    distractors: int = 3

    name = "multikey"

    def __post_init__(self) -> None:
        _at_least("distractors", self.distractors, 0)

    def contexts(self, length: int, depths: list[float], trials: int) -> list[Context]:
        out = []
        for trial in range(trials):
            rng = _rng(self.seed, self.name, length, trial)
            keys = _keys(rng, len(depths) + self.distractors)
            values = [rng.randint(1_000_000, 9_999_999) for _ in keys]
            spots = [d / 100 for d in depths] + [rng.random() for _ in range(self.distractors)]
            needles = tuple(Needle(_magic(k, v), f) for k, v, f in zip(keys, values, spots))
            questions = tuple(Question(depth, trial, _ruler_ask(keys[i], False),
                                       (str(values[i]),), i)
                              for i, depth in enumerate(depths))
            out.append(Context("multikey", length, None, RULER_INTRO, "", needles, questions))
        return out


@dataclasses.dataclass(frozen=True)
class MultiValue(SeededTask):
    values: int = 4

    name = "multivalue"
    max_output_tokens = 64

    def __post_init__(self) -> None:
        _at_least("values", self.values, 1)

    def contexts(self, length: int, depths: list[float], trials: int) -> list[Context]:
        out = []
        for depth in depths:
            for trial in range(trials):
                rng = _rng(self.seed, self.name, length, depth, trial)
                (key,) = _keys(rng, 1)
                values = rng.sample(range(1_000_000, 10_000_000), self.values)
                spots = [depth / 100] + [rng.random() for _ in values[1:]]
                ask = _ruler_ask(key, True)
                out.append(Context(
                    "multivalue", length, None, RULER_INTRO, "",
                    tuple(Needle(_magic(key, v), f) for v, f in zip(values, spots)),
                    (Question(depth, trial, ask, tuple(map(str, values)), 0),)))
        return out


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classic, Passkey, MultiKey, MultiValue)}


def check_scorer(task: Task, scorer: str) -> None:
    """Refuses a scorer that cannot judge the task's answers (exact with several values)."""
    if scorer not in scoring.SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose from {', '.join(scoring.SCORERS)}")
    if scorer != "contains" and isinstance(task, MultiValue) and task.values > 1:
        raise ValueError(f"--score {scorer} needs one expected answer; multivalue expects "
                         f"{task.values} (use contains, the share of values found)")
