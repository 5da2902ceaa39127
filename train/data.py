"""Seeded synthetic long-context examples for training the default model: text needles in haystacks.

Every example is one chat exchange rendered by preprocess/prompt.py, exactly as the server renders a
prompt: the user turn holds an intro, the haystack with its needles, a blank line and the question;
the model turn is the answer followed by <end_of_turn> (a stop token, so greedy decoding ends
there). Only the answer tokens and that <end_of_turn> are trained on (`loss_mask`).

Tasks (the texts of clients/ringserve/niah/tasks.py, so training and `ringserve niah` agree):
- passkey: "The pass key is 12345. Remember it. 12345 is the pass key." (Mohtashami & Jaggi);
- classic: "The best thing to do in {city} is {activity}." (gkamradt's needle, with the city and
  activity drawn, San Francisco among them, so the answer cannot be memorised), optional distractor
  cities;
- multikey: RULER's "One of the special magic numbers for {key} is: {value}." with distractor keys;
- multivalue: several values for one key, answered in the order they appear.
Haystacks: the passkey filler ("The grass is green. ...") or the redistributable corpus of
preprocess/corpus.py, cut into sentences; needles go in at sentence boundaries.

Exact token accounting: the tokenizer splits words at spaces (split_by_whitespace, no dummy
prefix), so text cut just before a space encodes as the sum of its parts. Sentences and needles are
counted once as " " + text, the filler is sized to the requested length by those counts (the last
sentence cut by words), and the needles' token offsets come from encoding the text before them.

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

FILLERS = ('passkey', 'corpus')
_CITIES = ('San Francisco', 'Paris', 'Tokyo', 'Cairo', 'Lima', 'Oslo', 'Nairobi', 'Toronto', 'Madrid',
           'Seoul', 'Dublin', 'Prague', 'Lisbon', 'Sydney', 'Mumbai', 'Denver', 'Havana', 'Vienna',
           'Manila', 'Boston', 'Athens', 'Santiago', 'Helsinki', 'Montreal')
_ACTIVITIES = ('eat a sandwich and sit in Dolores Park on a sunny day', 'walk along the river at dawn',
               'visit the old market', 'climb the hill behind the harbor', 'ride a bicycle by the lake',
               'read a book in the public library', 'listen to jazz in a small cafe',
               'watch the sunset from the bridge', 'swim in the cold sea', 'buy bread at the corner bakery',
               'take the night train to the coast', 'paint the rooftops from a balcony',
               'play chess in the square', 'drink tea in the botanical garden')
_ADJECTIVES = ('amber', 'brave', 'calm', 'dusty', 'eager', 'faint', 'gentle', 'hollow', 'icy', 'jolly', 'keen',
               'lucky', 'mellow', 'noble', 'odd', 'pale', 'quiet', 'rapid', 'silent', 'tidy', 'urban', 'vivid',
               'wary', 'young', 'zesty', 'bold', 'crisp', 'damp', 'early', 'fancy', 'grand', 'humble', 'green',
               'sharp', 'soft', 'warm')
_NOUNS = ('anchor', 'badger', 'candle', 'desert', 'engine', 'falcon', 'garden', 'harbor', 'island', 'jacket',
          'kettle', 'lantern', 'meadow', 'needle', 'orchard', 'pebble', 'quarry', 'river', 'saddle', 'tunnel',
          'valley', 'walnut', 'yard', 'zephyr', 'bridge', 'canyon', 'dragon', 'ember', 'forest', 'glacier',
          'helmet', 'igloo', 'mirror', 'rocket', 'violin', 'window')


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered exchange. Token offsets index `input_ids`."""

    task: str
    input_ids: np.ndarray  # i32[T]: prompt, answer, <end_of_turn>
    loss_mask: np.ndarray  # bool[T]: True on the answer tokens and the <end_of_turn>
    prompt_len: int  # input_ids[:prompt_len] is what the server would be sent
    needles: tuple[str, ...]  # needle texts, in the order the task made them
    needle_offsets: tuple[int, ...]  # token offset of each needle's first token
    asked: int  # index in `needles` of the needle the question is about
    answer: str

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
# Haystack text, counted in tokens.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Filler:
    sentences: tuple[str, ...]
    tokens: np.ndarray  # i32[sentences]: tokens of " " + sentence


@functools.cache
def _filler(name: str, tokenizer: Tokenizer) -> _Filler:
    if name == 'passkey':
        text = niah_haystack.PASSKEY_FILLER
    elif name == 'corpus':
        text = corpus.corpus_text()
    else:
        raise ValueError(f'filler {name!r}: use one of {FILLERS}.')
    sentences = tuple(unit.strip() for unit in niah_haystack.split_units(text) if unit.strip())
    counts = np.array([len(tokenizer.encode(' ' + s)) for s in sentences], np.int32)
    return _Filler(sentences, counts)


def _draw_filler(filler: _Filler, budget: int, rng: np.random.Generator,
                 tokenizer: Tokenizer) -> tuple[list[str], list[int]]:
    """Sentences from a random start, cycling, totalling at most `budget` tokens (the last one cut
    at a word so the total is within a word of the budget); returns (sentences, token counts)."""
    out, counts, total = [], [], 0
    i = int(rng.integers(len(filler.sentences)))
    while total < budget:
        sentence, count = filler.sentences[i], int(filler.tokens[i])
        if total + count > budget:
            kept = []
            for word in sentence.split(' '):  # " word" pieces also encode additively
                n = len(tokenizer.encode(' ' + word))
                if total + n > budget:
                    break
                kept.append(word)
                total += n
            if kept:
                out.append(' '.join(kept))
                counts.append(len(tokenizer.encode(' ' + out[-1])))
            break
        out.append(sentence)
        counts.append(count)
        total += count
        i = (i + 1) % len(filler.sentences)
    return out, counts


def compose(task: str, length: int, intro: str, needles: Sequence[tuple[str, float]], question: str, answer: str,
            filler: str, rng: np.random.Generator, tokenizer: Tokenizer | None = None, asked: int = 0) -> Example:
    """An example of about `length` tokens (never more; short by at most a word's tokens).

    `needles` are (text, depth) with depth in [0, 1]: the share of haystack tokens before the
    needle, rounded to a sentence boundary; needles at one boundary keep their order here.
    `needles[asked]` is the one the question is about.
    """
    tokenizer = tokenizer or Tokenizer.default()
    end = tokenizer.token_id(prompt.END_OF_TURN)
    answer_ids = tokenizer.encode(answer) + [end]
    bare = intro + ' '.join(text for text, _ in needles) + '\n\n' + question
    overhead = len(prompt.render([(prompt.USER, bare)], None, tokenizer)) + len(answer_ids)
    if length < overhead:
        raise ValueError(f'length={length} is too short for a {task} example: its needles, question and answer '
                         f'alone take {overhead} tokens; ask for at least {overhead}.')
    state = rng.bit_generator.state
    budget = length - overhead
    while True:
        # The first piece's missing space can cost a token; then draw the same filler a token shorter.
        rng.bit_generator.state = state
        example = _build(task, intro, needles, question, answer_ids, answer, filler, budget, rng, tokenizer, asked)
        if len(example.input_ids) <= length or budget == 0:
            return example
        budget = max(0, budget - (len(example.input_ids) - length))


def _build(task, intro, needles, question, answer_ids, answer, filler, budget, rng, tokenizer, asked) -> Example:
    sentences, counts = _draw_filler(_filler(filler, tokenizer), budget, rng, tokenizer)
    boundaries = np.concatenate([[0], np.cumsum(counts)])  # tokens before sentence i
    # Needle i goes before sentence slot[i]; ties keep the needles' order.
    slots = [int(np.argmin(np.abs(boundaries - depth * boundaries[-1]))) for _, depth in needles]
    pieces: list[tuple[str, int | None]] = []  # (text without its leading space, needle index or None)
    for s in range(len(sentences) + 1):
        pieces += [(needles[n][0], n) for n in range(len(needles)) if slots[n] == s]
        if s < len(sentences):
            pieces.append((sentences[s], None))
    text, char_at = intro, {}
    for index, (piece, needle) in enumerate(pieces):
        if needle is not None:
            char_at[needle] = len(text)
        text += piece if index == 0 else ' ' + piece
    text += '\n\n' + question
    prompt_ids = prompt.render([(prompt.USER, text)], None, tokenizer)
    # The turn is <s><start_of_turn> then "user\n" + text encoded whole; text before a needle ends
    # just before the space that starts it, so it encodes to exactly the ids before the needle.
    lead = (1 if tokenizer.bos_id >= 0 else 0) + 1
    offsets = tuple(lead + len(tokenizer.encode(f'{prompt.USER}\n' + text[:char_at[n]])) for n in range(len(needles)))
    ids = np.asarray(prompt_ids + answer_ids, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return Example(task, ids, mask, len(prompt_ids), tuple(t for t, _ in needles), offsets, asked, answer)


# ------------------------------------------------------------------------------------------------
# Tasks. Each: (length, depth or None for a random one, rng) -> Example.
# ------------------------------------------------------------------------------------------------
def _depth(depth: float | None, rng: np.random.Generator) -> float:
    if depth is None:
        return float(rng.random())
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f'depth={depth}: must be in [0, 1] (the share of the haystack before the needle), '
                         'or None for a random depth.')
    return float(depth)


def _keys(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct keys such as "quiet-harbor"."""
    picks = rng.choice(len(_ADJECTIVES) * len(_NOUNS), size=count, replace=False)
    return [f'{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}' for p in picks]


def passkey(length: int, depth: float | None, rng: np.random.Generator, *, filler: str = 'passkey',
            tokenizer: Tokenizer | None = None) -> Example:
    """One five-digit pass key in the filler; answer: the key."""
    depth = _depth(depth, rng)
    key = int(rng.integers(10000, 100000))
    needle = f'The pass key is {key}. Remember it. {key} is the pass key.'
    return compose('passkey', length, niah_tasks.PASSKEY_INTRO, [(needle, depth)], 'What is the pass key?',
                   str(key), filler, rng, tokenizer)


def classic(length: int, depth: float | None, rng: np.random.Generator, *, distractors: int = 0,
            filler: str = 'corpus', tokenizer: Tokenizer | None = None) -> Example:
    """"The best thing to do in {city} is {activity}." with `distractors` other cities at random
    depths; answer: the asked city's activity."""
    depth = _depth(depth, rng)
    cities = rng.choice(len(_CITIES), size=distractors + 1, replace=False)
    activities = rng.choice(len(_ACTIVITIES), size=distractors + 1, replace=False)
    needles = [(f'The best thing to do in {_CITIES[c]} is {_ACTIVITIES[a]}.', depth if i == 0 else float(rng.random()))
               for i, (c, a) in enumerate(zip(cities, activities))]
    return compose('classic', length, '', needles, f'What is the best thing to do in {_CITIES[cities[0]]}?',
                   _ACTIVITIES[activities[0]], filler, rng, tokenizer)


def multikey(length: int, depth: float | None, rng: np.random.Generator, *, distractors: int = 3,
             filler: str = 'corpus', tokenizer: Tokenizer | None = None) -> Example:
    """RULER niah_multikey: the asked key's magic number at `depth`, `distractors` other keys at
    random depths; answer: the seven-digit number."""
    depth = _depth(depth, rng)
    keys = _keys(rng, distractors + 1)
    values = rng.integers(1_000_000, 10_000_000, size=len(keys))
    needles = [(f'One of the special magic numbers for {k} is: {v}.', depth if i == 0 else float(rng.random()))
               for i, (k, v) in enumerate(zip(keys, values))]
    return compose('multikey', length, niah_tasks.RULER_INTRO, needles,
                   f'What is the special magic number for {keys[0]} mentioned in the provided text?',
                   str(values[0]), filler, rng, tokenizer)


def multivalue(length: int, depth: float | None, rng: np.random.Generator, *, values: int = 4,
               filler: str = 'corpus', tokenizer: Tokenizer | None = None) -> Example:
    """RULER niah_multivalue: `values` numbers for one key, the first at `depth`, the others at
    random depths; answer: all of them, comma-separated, in the order they appear."""
    depth = _depth(depth, rng)
    (key,) = _keys(rng, 1)
    numbers = rng.choice(np.arange(1_000_000, 10_000_000), size=values, replace=False)
    spots = [depth] + [float(rng.random()) for _ in range(values - 1)]
    # Needles sorted by depth appear in list order (compose keeps ties in order), so the answer
    # lists the values as they appear.
    order = sorted(range(values), key=lambda i: spots[i])
    needles = [(f'One of the special magic numbers for {key} is: {numbers[i]}.', spots[i]) for i in order]
    return compose('multivalue', length, niah_tasks.RULER_INTRO, needles,
                   f'What are all the special magic numbers for {key} mentioned in the provided text?',
                   ', '.join(str(numbers[i]) for i in order), filler, rng, tokenizer, asked=order.index(0))


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
    """`batch` examples of `length` tokens (random task, filler and depth each), padded to `length`."""
    tokenizer = tokenizer or Tokenizer.default()
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f'task {name!r}: use some of {sorted(TASKS)}.')
    examples = []
    for _ in range(batch):
        task = TASKS[tasks[int(rng.integers(len(tasks)))]]
        filler = fillers[int(rng.integers(len(fillers)))]
        examples.append(task(length, None, rng, filler=filler, tokenizer=tokenizer))
    return pad_batch(examples, length, max(tokenizer.pad_id, 0))
