"""The video and audio tasks: a secret word shown in one frame of a video, or spoken in a sound
track, as in the Gemini 1.5 report's video and audio haystacks.

They are `tasks.Task`s over a grid of durations: `contexts(duration_s, depths, trials)` gives one
`Context` per depth and trial, whose `length` is the duration in seconds and whose one needle
holds the phrase shown or spoken. The media itself is built by the runner (`media_runner`) from
the context; `contents` puts the built media and the question in one user turn.

The word is `word` when given, else drawn from the key nouns with the seed and the cell, so each
cell and trial gets its own word, the same on every run.
"""

from __future__ import annotations

import dataclasses

from ringserve.media import Media
from ringserve.niah.tasks import _NOUNS, CLASSIC_SYSTEM, Context, Needle, Question, Task, _rng

VIDEO_QUESTION = "What is the secret word shown in the video?"
AUDIO_QUESTION = "What is the secret word spoken in the audio?"


@dataclasses.dataclass(frozen=True)
class SecretWord(Task):
    """A secret word hidden in media: subclasses say which modality and how it is phrased."""

    seed: int = 0
    word: str | None = None  # the same word in every cell; None: a seeded word per cell
    question: str | None = None  # None: the modality's default question
    answer: str | None = None  # what counts as right; None: the word

    scorer = "contains"
    max_output_tokens = 16
    modality = ""  # "video" or "audio": the row's modality, and the haystack to build
    default_question = ""

    def __post_init__(self) -> None:
        if self.word is not None and not self.word.strip():
            raise ValueError("the needle word is empty; give a word such as --needle-word lantern")
        if self.answer is not None and not self.answer.strip():
            raise ValueError("--answer is empty; give the words the needle says")

    def phrase(self, word: str) -> str:
        """What the needle shows or says."""
        raise NotImplementedError

    def cell_word(self, duration_s: int, depth: float, trial: int) -> str:
        if self.word is not None:
            return self.word.strip()
        return _rng(self.seed, self.name, duration_s, depth, trial).choice(_NOUNS)

    def contexts(self, length: int, depths: list[float], trials: int) -> list[Context]:
        """One context per depth and trial; `length` is the duration in seconds."""
        ask = (("user", self.question or self.default_question),)
        out = []
        for depth in depths:
            for trial in range(trials):
                word = self.cell_word(length, depth, trial)
                out.append(Context(self.name, length, CLASSIC_SYSTEM, "", "",
                                   (Needle(self.phrase(word), depth / 100),),
                                   (Question(depth, trial, ask, (self.answer or word,), 0),)))
        return out

    @staticmethod
    def contents(media: Media, question: Question) -> list:
        """The prompt after the system instruction: one user turn, the media then the question."""
        ((role, text),) = question.turns
        return [(role, [media, text])]


@dataclasses.dataclass(frozen=True)
class VideoSecretWord(SecretWord):
    """The needle is one frame reading "The secret word is: <word>" (`frames.needle_frame`)."""

    name = "video"
    modality = "video"
    default_question = VIDEO_QUESTION

    def phrase(self, word: str) -> str:
        return f"The secret word is: {word}"


@dataclasses.dataclass(frozen=True)
class AudioSecretWord(SecretWord):
    """The needle is "The secret word is <word>" spoken by espeak-ng, or the user's `clip`
    (then `answer`, what the clip says, is required)."""

    clip: str | None = None  # the user's needle clip, any format ffmpeg reads

    name = "audio"
    modality = "audio"
    default_question = AUDIO_QUESTION

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip is not None and self.answer is None:
            raise ValueError(f"--needle-audio {self.clip} needs --answer TEXT: the words the clip "
                             "says, which an answer must contain")

    def phrase(self, word: str) -> str:
        return f"The secret word is {word}" if self.clip is None else f"[{self.clip}]"

    def cell_word(self, duration_s: int, depth: float, trial: int) -> str:
        if self.clip is not None:
            return self.answer.strip()  # the clip says what it says, in every cell
        return super().cell_word(duration_s, depth, trial)


MEDIA_TASKS: dict[str, type[SecretWord]] = {"video": VideoSecretWord, "audio": AudioSecretWord}
