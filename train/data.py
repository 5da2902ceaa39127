"""Seeded synthetic long-context examples for training the default model, built by `ringserve niah`'s
own code so that a training prompt is, id for id, what `ringserve niah` sends.

An example is made the way the niah runner makes a prompt:
1. a niah task (`Passkey`, `MultiKey`, `MultiValue` with a random seed; `Classic` with a drawn city
   and activity, optionally plus distractor needles for other cities) builds a `Context` and its
   `Question` (ringserve/niah/tasks.py: intros, needles, questions, open model turns, system);
2. a niah `Haystack` (ringserve/niah/haystack.py), read from a random unit on, is fitted to the
   token budget by niah's `Sizer` (ringserve/niah/sizing.py), counting with `LocalCounter`: the
   server's chat template (`preprocess.prompt.render`, whose length CountTokens returns), offline;
3. the prompt ids are `prompt.render(sized.contents(question), context.system, tokenizer)`.
No prompt text lives here: only the drawn cities and activities for the classic needle.

The target follows the prompt: the answer the niah scorer accepts, then <end_of_turn> (a stop
token, so greedy decoding ends there); only those tokens are trained on (`loss_mask`). Where the
question ends in an open model turn ("The pass key is", RULER's "... mentioned in the provided text
is"), the answer continues it after a space: " 12345."; the tokenizer splits words at spaces, so
`encode(" 12345.")` is exactly what greedy decoding there produces. Classic opens a new model turn
and the answer is the activity: "eat a sandwich and sit in Dolores Park on a sunny day.".
Multivalue's answer lists the values comma-separated in the order they appear in the haystack.

The budget: niah sizes a context so its prompt holds at most `Context.length` tokens; here that is
`length` minus the answer's tokens, so prompt + answer + <end_of_turn> never exceed `length` and
fall short of it by less than one haystack unit (a sentence).

Fillers (haystacks): 'passkey' (Mohtashami & Jaggi's five sentences), 'stdlib' (the standard
library's docs, niah's default), 'corpus' (preprocess/corpus.py's text). `sample_batch` gives the
passkey task its filler always, as niah does, and the other tasks one of the other fillers asked for
(the passkey filler only if it is the only one asked for).

Speed: `LocalCounter` counts each space-separated word once (memoised) and sums, which is exact for
a tokenizer that splits at spaces (checked against the real encoding on every example).

Media needles (a video frame with a rendered word, a spoken phrase or tones in audio) come with the
media training slice; this module makes text examples only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np

from preprocess import corpus, prompt
from preprocess.tokenizer import Tokenizer
from ringserve.niah import haystack as niah_haystack
from ringserve.niah import tasks as niah_tasks
from ringserve.niah.sizing import SizedContext, Sizer

FILLERS = ('passkey', 'stdlib', 'corpus')

# The classic needle's city and activity are drawn, so the answer has to be read from the haystack.
# The eval's own needle (San Francisco, the sandwich) is one of the pairs; the needle and question
# texts are niah's with the city and activity replaced.
_EVAL_CITY = 'San Francisco'
_CITIES = (_EVAL_CITY, 'Paris', 'Tokyo', 'Cairo', 'Lima', 'Oslo', 'Nairobi', 'Toronto', 'Madrid',
           'Seoul', 'Dublin', 'Prague', 'Lisbon', 'Sydney', 'Mumbai', 'Denver', 'Havana', 'Vienna',
           'Manila', 'Boston', 'Athens', 'Santiago', 'Helsinki', 'Montreal')
_ACTIVITIES = (niah_tasks.CLASSIC_ANSWER, 'walk along the river at dawn',
               'visit the old market', 'climb the hill behind the harbor', 'ride a bicycle by the lake',
               'read a book in the public library', 'listen to jazz in a small cafe',
               'watch the sunset from the bridge', 'swim in the cold sea', 'buy bread at the corner bakery',
               'take the night train to the coast', 'paint the rooftops from a balcony',
               'play chess in the square', 'drink tea in the botanical garden')
assert _EVAL_CITY in niah_tasks.CLASSIC_NEEDLE and _EVAL_CITY in niah_tasks.CLASSIC_QUESTION
assert niah_tasks.CLASSIC_ANSWER in niah_tasks.CLASSIC_NEEDLE


@dataclasses.dataclass(frozen=True)
class Origin:
    """What `ringserve niah` needs to send the same prompt itself."""

    # E.g. Passkey(seed=...): task.contexts(context.length, [question.depth], 1)[0] is `context`
    # (classic's distractor needles aside: niah's Classic has none).
    task: niah_tasks.Task
    context: niah_tasks.Context  # its length is the prompt's token budget: `length` less the answer's
    filler: str  # a name in FILLERS
    start: int  # the haystack's first unit: `haystack(filler, start)`

    @property
    def question(self) -> niah_tasks.Question:
        return self.context.questions[0]


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered exchange. Token offsets index `input_ids`."""

    task: str
    input_ids: np.ndarray  # i32[T]: prompt, answer, <end_of_turn>
    loss_mask: np.ndarray  # bool[T]: True on the answer tokens and the <end_of_turn>
    prompt_len: int  # input_ids[:prompt_len] is what `ringserve niah` sends
    needles: tuple[str, ...]  # needle texts, in the context's order
    needle_offsets: tuple[int, ...]  # token offset of each needle's first token
    asked: int  # index in `needles` of the needle the question is about
    answer: str  # the target text, without the space that joins it to an open model turn
    expected: tuple[str, ...]  # what niah's scorer looks for in the answer
    origin: Origin

    @property
    def needle_offset(self) -> int:
        """Where the asked needle starts (token offset)."""
        return self.needle_offsets[self.asked]

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.input_ids[:self.prompt_len]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Examples padded to one length T with the pad id; padding is never trained on."""

    tokens: np.ndarray  # i32[B, T]
    loss_mask: np.ndarray  # bool[B, T]: token t is a target (predicted from tokens < t)
    examples: tuple[Example, ...]


# ------------------------------------------------------------------------------------------------
# Counting tokens offline, as the server's CountTokens does.
# ------------------------------------------------------------------------------------------------
class LocalCounter:
    """A `ringserve.niah.sizing.TokenCounter` without a server: `len(prompt.render(contents,
    system_instruction, tokenizer))`, what CountTokens returns for text.

    Fast: render runs with a stand-in tokenizer whose `encode` only counts. The sentencepiece
    tokenizer starts a word at every space that follows a non-space (split_by_whitespace, no dummy
    prefix, no whitespace folding), so a text's count is the sum of its " word" pieces' counts; each
    piece is encoded once and remembered. Texts with runs of spaces are encoded whole.
    """

    _MAX_MEMO = 500_000  # words remembered before the memo starts over (bounds memory)

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._counting = _CountingTokenizer(tokenizer, self.count_text)
        self._spaced: dict[str, int] = {}  # word -> tokens of " " + word
        self._first: dict[str, int] = {}  # word -> tokens of the word alone (a text's first)

    def count_tokens(self, contents, system_instruction=None, *, cached_content=None) -> int:
        if cached_content is not None:
            raise ValueError('LocalCounter counts whole prompts; cached_content needs a server.')
        return len(prompt.render(contents, system_instruction, self._counting))

    def count_text(self, text: str) -> int:
        """len(tokenizer.encode(text))."""
        if '  ' in text:
            return len(self.tokenizer.encode(text))
        first, *words = text.split(' ')
        spaced = self._spaced
        try:
            total = sum(map(spaced.__getitem__, words))
        except KeyError:
            if len(spaced) > self._MAX_MEMO:
                spaced.clear()
            for word in words:
                if word not in spaced:
                    spaced[word] = len(self.tokenizer.encode(' ' + word))
            total = sum(map(spaced.__getitem__, words))
        if first not in self._first:
            if len(self._first) > self._MAX_MEMO:
                self._first.clear()
            self._first[first] = len(self.tokenizer.encode(first))
        return total + self._first[first]


class _CountingTokenizer:
    """Enough of a Tokenizer for prompt.render: real special ids, text "encoded" as its count."""

    def __init__(self, tokenizer: Tokenizer, count: Callable[[str], int]):
        self.bos_id = tokenizer.bos_id
        self.token_id = tokenizer.token_id
        self.chat_template = tokenizer.chat_template  # None: ringserve's built-in template
        self._count = count

    def encode(self, text: str) -> list[int]:
        return [0] * self._count(text)


@functools.cache
def _counter(tokenizer: Tokenizer) -> LocalCounter:
    return LocalCounter(tokenizer)


# ------------------------------------------------------------------------------------------------
# Haystacks: niah's, read from a random unit on.
# ------------------------------------------------------------------------------------------------
@functools.cache
def _haystack(filler: str) -> niah_haystack.Haystack:
    if filler == 'passkey':
        return niah_haystack.passkey_filler()
    if filler == 'stdlib':
        return niah_haystack.stdlib()
    if filler == 'corpus':
        return niah_haystack.from_text('preprocess-corpus', corpus.corpus_text())
    raise ValueError(f'filler {filler!r}: use one of {FILLERS}.')


def haystack(filler: str, start: int = 0) -> niah_haystack.Haystack:
    """The niah haystack `filler` read from unit `start` on (it still repeats endlessly): the same
    units rotated, which niah's Sizer fills from unit 0 like any haystack."""
    base = _haystack(filler)
    start %= len(base.units)
    if start == 0:
        return base
    return niah_haystack.Haystack(f'{base.name}@{start}', base.units[start:] + base.units[:start])


def haystack_units(filler: str) -> int:
    """How many units one pass of `filler` holds (the range of `start`)."""
    return len(_haystack(filler).units)


# ------------------------------------------------------------------------------------------------
# One niah context -> one example.
# ------------------------------------------------------------------------------------------------
def from_niah(task: niah_tasks.Task, length: int, depth: float, *, filler: str, start: int = 0,
              distractors: Sequence[niah_tasks.Needle] = (), tokenizer: Tokenizer | None = None) -> Example:
    """The example `ringserve niah` makes of `task` at `depth` (0 to 1) for a prompt of at most
    `length` tokens less the answer's: `task.contexts(budget, [100 * depth], 1)[0]` and its first
    question, `distractors` appended to its needles, sized in `haystack(filler, start)`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f'depth={depth}: must be in [0, 1] (the share of the haystack before the needle).')
    tokenizer = tokenizer or Tokenizer.default()
    counter = _counter(tokenizer)
    hay = haystack(filler, start)
    end = tokenizer.token_id(prompt.END_OF_TURN)
    budget = length
    while True:
        context = task.contexts(budget, [100 * depth], 1)[0]
        context = dataclasses.replace(context, needles=context.needles + tuple(distractors),
                                      questions=context.questions[:1])
        question = context.questions[0]
        # The answer with the values in listed order: its tokens before sizing (the order only
        # matters to multivalue, whose comma-separated digits count the same in any order).
        guess = len(_answer_ids(_answer(context, range(len(context.needles))), question, tokenizer)) + 1
        if budget + guess > length and budget > 1:  # else the Sizer says what the minimum is
            budget = max(1, min(budget - 1, length - guess))
            continue
        sizer = Sizer(counter, hay)
        sized = sizer.size(context)
        if isinstance(sized, str):
            empty = counter.count_tokens([('user', sizer.render(context, 0, sizer.place(context, 0))),
                                          *question.turns], context.system)
            _too_short(task, length, empty + guess)
        order = sorted(range(len(context.needles)), key=lambda i: sized.boundaries[i])  # as they appear
        answer = _answer(context, order)
        answer_ids = _answer_ids(answer, question, tokenizer) + [end]
        over = sized.prompt_tokens + len(answer_ids) - length
        if over <= 0:
            break
        budget -= over
    prompt_ids = prompt.render(sized.contents(question), context.system, tokenizer)
    if len(prompt_ids) != sized.prompt_tokens:
        raise ValueError(f'{tokenizer!r} counts the prompt as {len(prompt_ids)} tokens, LocalCounter as '
                         f'{sized.prompt_tokens}: the tokenizer must split words at spaces (sentencepiece '
                         'split_by_whitespace, no dummy prefix, no whitespace folding).')
    ids = np.asarray(prompt_ids + answer_ids, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return Example(context.task, ids, mask, len(prompt_ids), tuple(n.text for n in context.needles),
                   _needle_offsets(sized, hay, order, counter), question.needle, answer, question.expected,
                   Origin(task, context, filler, start))


def _too_short(task: niah_tasks.Task, length: int, minimum: int):
    raise ValueError(f'length={length} is too short for a {task.name} example: its template, needles, '
                     f'question and answer alone take {minimum} tokens; ask for at least {minimum}.')


def _answer(context: niah_tasks.Context, order: Sequence[int]) -> str:
    """The expected values as a sentence: one, or several (multivalue: expected[i] is needle i's)
    comma-separated in `order`, the needles' order of appearance."""
    expected = context.questions[0].expected
    if len(expected) > 1:
        if len(expected) != len(context.needles):
            raise ValueError(f'{context.task}: {len(expected)} expected values for {len(context.needles)} '
                             'needles; several values need one needle each to order them.')
        expected = [expected[i] for i in order]
    return ', '.join(expected) + '.'


def _answer_ids(answer: str, question: niah_tasks.Question, tokenizer: Tokenizer) -> list[int]:
    """The answer's ids after the prompt: an open model turn goes on after a space."""
    open_turn = question.turns[-1][0] == prompt.MODEL
    return tokenizer.encode(' ' + answer if open_turn else answer)


def _needle_offsets(sized: SizedContext, hay: niah_haystack.Haystack, order: Sequence[int],
                    counter: LocalCounter) -> tuple[int, ...]:
    """Token offset of each needle's first token in the prompt.

    The prompt opens with <s><start_of_turn> and then "user\\n" + (system + "\\n\\n") + the context
    turn, encoded whole (prompt.py). A needle follows a space (which its first token holds) or a
    line break; the text before it, cut before that space, encodes to exactly the ids before it.
    """
    context, text = sized.context, sized.text
    lead = f'{prompt.USER}\n' + (f'{context.system}\n\n' if context.system else '')
    specials = (1 if counter.tokenizer.bos_id >= 0 else 0) + 1
    offsets = [0] * len(context.needles)
    at = 0
    for i in order:  # in order of appearance; the needle is no earlier than its boundary's unit
        needle = context.needles[i].text
        at = text.index(needle, max(at, len(context.intro) + hay.chars(sized.boundaries[i])))
        cut = at - 1 if at and text[at - 1] == ' ' else at
        offsets[i] = specials + counter.count_text(lead + text[:cut])
        at += len(needle)
    return tuple(offsets)


# ------------------------------------------------------------------------------------------------
# Tasks. Each: (length, depth or None for a random one, rng, *, filler, tokenizer) -> Example.
# ------------------------------------------------------------------------------------------------
def _depth(depth: float | None, rng: np.random.Generator) -> float:
    if depth is None:
        return float(rng.random())
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f'depth={depth}: must be in [0, 1] (the share of the haystack before the needle), '
                         'or None for a random depth.')
    return float(depth)


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def _start(filler: str, rng: np.random.Generator) -> int:
    return int(rng.integers(haystack_units(filler)))


def passkey(length: int, depth: float | None, rng: np.random.Generator, *, filler: str = 'passkey',
            tokenizer: Tokenizer | None = None) -> Example:
    """niah's Passkey (a seeded five-digit key, "The pass key is" left open); answer: the key."""
    depth = _depth(depth, rng)
    task = niah_tasks.Passkey(seed=_seed(rng))
    return from_niah(task, length, depth, filler=filler, start=_start(filler, rng), tokenizer=tokenizer)


def classic(length: int, depth: float | None, rng: np.random.Generator, *, distractors: int | None = None,
            filler: str = 'stdlib', tokenizer: Tokenizer | None = None) -> Example:
    """niah's Classic with a drawn city and activity (the eval's San Francisco needle among the
    pairs) and `distractors` needles for other cities and activities at random depths (None: 0 to 3
    drawn); answer: the asked city's activity."""
    depth = _depth(depth, rng)
    if distractors is None:
        distractors = int(rng.integers(4))
    if not 0 <= distractors < min(len(_CITIES), len(_ACTIVITIES)):
        raise ValueError(f'distractors={distractors}: must be in [0, {min(len(_CITIES), len(_ACTIVITIES)) - 1}] '
                         '(each needs its own city and activity).')
    cities = rng.choice(len(_CITIES), size=distractors + 1, replace=False)
    activities = rng.choice(len(_ACTIVITIES), size=distractors + 1, replace=False)
    needles = [_classic_needle(_CITIES[c], _ACTIVITIES[a]) for c, a in zip(cities, activities)]
    task = niah_tasks.Classic(needle=needles[0],
                              question=niah_tasks.CLASSIC_QUESTION.replace(_EVAL_CITY, _CITIES[cities[0]]),
                              answer=_ACTIVITIES[activities[0]])
    others = tuple(niah_tasks.Needle(text, float(rng.random())) for text in needles[1:])
    return from_niah(task, length, depth, filler=filler, start=_start(filler, rng), distractors=others,
                     tokenizer=tokenizer)


def _classic_needle(city: str, activity: str) -> str:
    return niah_tasks.CLASSIC_NEEDLE.replace(_EVAL_CITY, city).replace(niah_tasks.CLASSIC_ANSWER, activity)


def multikey(length: int, depth: float | None, rng: np.random.Generator, *, distractors: int = 3,
             filler: str = 'stdlib', tokenizer: Tokenizer | None = None) -> Example:
    """niah's MultiKey (RULER niah_multikey): the asked key's magic number at `depth`, `distractors`
    other keys at random depths; answer: the seven-digit number."""
    depth = _depth(depth, rng)
    task = niah_tasks.MultiKey(seed=_seed(rng), distractors=distractors)
    return from_niah(task, length, depth, filler=filler, start=_start(filler, rng), tokenizer=tokenizer)


def multivalue(length: int, depth: float | None, rng: np.random.Generator, *, values: int = 4,
               filler: str = 'stdlib', tokenizer: Tokenizer | None = None) -> Example:
    """niah's MultiValue (RULER niah_multivalue): `values` numbers for one key, the first at `depth`,
    the others at random depths; answer: all of them, comma-separated, in the order they appear."""
    depth = _depth(depth, rng)
    task = niah_tasks.MultiValue(seed=_seed(rng), values=values)
    return from_niah(task, length, depth, filler=filler, start=_start(filler, rng), tokenizer=tokenizer)


Generator = Callable[..., Example]
TASKS: dict[str, Generator] = {'passkey': passkey, 'classic': classic, 'multikey': multikey,
                               'multivalue': multivalue}


# ------------------------------------------------------------------------------------------------
# Batches.
# ------------------------------------------------------------------------------------------------
def pad_batch(examples: Sequence[Example], length: int, pad_id: int = 0) -> Batch:
    """Right-pad every example to `length` (ValueError if one is longer)."""
    tokens = np.full((len(examples), length), pad_id, np.int32)  # [B, T]
    mask = np.zeros((len(examples), length), bool)  # [B, T]
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        if n > length:
            raise ValueError(f'example {b} ({ex.task}) has {n} tokens, more than the batch length {length}.')
        tokens[b, :n] = ex.input_ids
        mask[b, :n] = ex.loss_mask
    return Batch(tokens, mask, tuple(examples))


def sample_batch(rng: np.random.Generator, batch: int, length: int, tasks: Sequence[str] = tuple(TASKS),
                 fillers: Sequence[str] = FILLERS, tokenizer: Tokenizer | None = None) -> Batch:
    """`batch` examples of at most `length` tokens (random task, depth and haystack start each),
    padded to `length`. Passkey always uses the passkey filler (as niah does); the other tasks
    draw one of `fillers` other than it, or the passkey filler when it is the only one given."""
    tokenizer = tokenizer or Tokenizer.default()
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f'task {name!r}: use some of {sorted(TASKS)}.')
    for name in fillers:
        if name not in FILLERS:
            raise ValueError(f'filler {name!r}: use some of {FILLERS}.')
    if not tasks or not fillers:
        raise ValueError(f'sample_batch needs at least one task and one filler, got tasks={tuple(tasks)}, '
                         f'fillers={tuple(fillers)}.')
    others = [f for f in fillers if f != 'passkey'] or list(fillers)
    examples = []
    for _ in range(batch):
        name = tasks[int(rng.integers(len(tasks)))]
        filler = 'passkey' if name == 'passkey' else others[int(rng.integers(len(others)))]
        examples.append(TASKS[name](length, None, rng, filler=filler, tokenizer=tokenizer))
    return pad_batch(examples, length, max(tokenizer.pad_id, 0))
