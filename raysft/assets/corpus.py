"""Deterministic generators of the embedded instruction tasks and the pretraining prose.

Every task has a short answer that can be checked by exact match. The pretraining prose states
the same facts in plain sentences (no chat markup), so the base model learns the skills; the
instruction data only has to teach the chat format (the LIMA idea).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SEED = 1234

# Real words keep the demos readable; pseudo-words pad the list to a few hundred.
_REAL_WORDS_TEXT = (
    "hello world stone apple river house green light water bread cloud table chair music "
    "paper happy smile dream night earth plant train horse tiger lemon honey sugar salt "
    "storm sound quiet brave clear sweet round sharp bright grass field glass metal wood "
    "bird fish moon star rain snow wind fire tree leaf rock sand lake hill road door book "
    "pen cup box hat bag dog cat sun sky sea king queen child heart voice story magic "
    "ocean forest garden island window candle pencil rabbit turtle orange silver yellow "
    "purple winter summer spring autumn morning evening planet rocket bottle basket"
)
REAL_WORDS = tuple(_REAL_WORDS_TEXT.split())
_SYLLABLE_PARTS = (
    "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl st tr sh ch th",  # onsets
    "a e i o u a e i o ai ea oo",  # vowels
    "- - - n r l s t m k nd st",  # codas, "-" = none
)
_ONSETS, _VOWELS, _CODAS = (tuple(p.replace("-", "").split(" ")) for p in _SYLLABLE_PARTS)


def make_words(n: int = 320, seed: int = SEED) -> list[str]:
    """Return ``n`` distinct lowercase words of 3-7 letters (real words first)."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    for w in REAL_WORDS:
        if 3 <= len(w) <= 7 and w not in seen:
            seen.add(w)
            words.append(w)
    while len(words) < n:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.randint(1, 3))
        )
        if 3 <= len(word) <= 7 and word not in seen:
            seen.add(word)
            words.append(word)
    return words[:n]


@dataclass(frozen=True)
class Task:
    """One task kind: how to answer a word, and how prose and instructions phrase it."""

    name: str
    answer: Callable[[str], str]
    prose: tuple[str, ...]  # sentences with {w} (the word) and {ans} (the answer)
    # (instruction, input) templates; an empty input puts the word in the instruction.
    instructions: tuple[tuple[str, str], ...]

    def fields(self, word: str) -> dict[str, str]:
        """Template fields for ``word``."""
        return {"w": word, "ans": self.answer(word)}


TASKS: tuple[Task, ...] = (
    Task(
        name="upper",
        answer=str.upper,
        prose=(
            "In capital letters, {w} is {ans}.",
            "Written in capitals, {w} becomes {ans}.",
            "The uppercase form of {w} is {ans}.",
            "When you shout the word {w}, you write {ans}.",
            "The word {w} in upper case is {ans}.",
        ),
        instructions=(
            ("Write the word in capital letters.", "{w}"),
            ("Convert this word to uppercase.", "{w}"),
            ("Give me {w} in all caps.", ""),
        ),
    ),
    Task(
        name="length",
        answer=lambda w: str(len(w)),
        prose=(
            "The word {w} has {ans} letters.",
            "Counting its letters, the word {w} has {ans}.",
            "If you count the letters of {w}, you get {ans}.",
        ),
        instructions=(
            ("How many letters does this word have?", "{w}"),
            ("Count the letters in the word {w}.", ""),
        ),
    ),
    Task(
        name="repeat",
        answer=lambda w: f"{w} {w}",
        prose=(
            "Said twice, {w} is {ans}.",
            "Saying {w} two times gives {ans}.",
            "The word {w} repeated twice is {ans}.",
        ),
        instructions=(
            ("Repeat the word twice, separated by a space.", "{w}"),
            ("Say {w} two times.", ""),
        ),
    ),
    Task(
        name="first",
        answer=lambda w: w[0],
        prose=(
            "The word {w} starts with the letter {ans}.",
            "The first letter of {w} is {ans}.",
            "If you look at the word {w}, its first letter is {ans}.",
        ),
        instructions=(
            ("What is the first letter of this word?", "{w}"),
            ("Which letter does {w} start with?", ""),
        ),
    ),
    Task(
        name="last",
        answer=lambda w: w[-1],
        prose=(
            "The word {w} ends with the letter {ans}.",
            "The last letter of {w} is {ans}.",
            "If you look at the word {w}, its last letter is {ans}.",
        ),
        instructions=(
            ("What is the last letter of this word?", "{w}"),
            ("Which letter does {w} end with?", ""),
        ),
    ),
)

TASKS_BY_NAME = {t.name: t for t in TASKS}

_FILLER_PARTS = (
    "the farmer|a small child|my neighbour|the old king|a tired teacher|the baker",
    "walked to|looked at|painted|found|talked about|cleaned|carried|sold",
    "the river|a red door|the market|an old book|the garden|a wooden box|the hill",
    "in the morning|at night|after lunch|every day|last winter|on sunday",
)
_SUBJECTS, _VERBS, _OBJECTS, _TIMES = (tuple(p.split("|")) for p in _FILLER_PARTS)
_FILLER = (
    "{s} {V} {O} {T}.",
    "{T}, {s} {V} {O}.",
    "Nobody knew why {s} {V} {O}.",
    "It was quiet when {s} {V} {O}.",
)


def _filler(rng: random.Random) -> str:
    subject = rng.choice(_SUBJECTS)
    text = rng.choice(_FILLER).format(
        s=subject, V=rng.choice(_VERBS), O=rng.choice(_OBJECTS), T=rng.choice(_TIMES)
    )
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class Pools:
    """Word pools: pretraining sees all words, SFT and eval get disjoint ones."""

    words: tuple[str, ...]
    train_words: tuple[str, ...]
    eval_words: tuple[str, ...]


def make_pools(seed: int = SEED, n_eval_words: int = 60) -> Pools:
    """Split the words into SFT-train and held-out eval words."""
    rng = random.Random(seed + 1)
    words = make_words(seed=seed)
    # A few demo words stay on the eval side so demos show knowledge from pretraining.
    pinned = ["hello", "stone", "world"]
    rest = [w for w in words if w not in pinned]
    rng.shuffle(rest)
    eval_words = pinned + rest[: n_eval_words - len(pinned)]
    train_words = rest[n_eval_words - len(pinned) :]
    return Pools(
        words=tuple(words),
        train_words=tuple(sorted(train_words)),
        eval_words=tuple(sorted(eval_words)),
    )


def prose_sentence(task: Task, word: str, rng: random.Random) -> str:
    """One plain-text sentence stating the fact ``task(word)``."""
    text = rng.choice(task.prose).format(**task.fields(word))
    return text[0].upper() + text[1:]


def pretraining_documents(
    tasks: tuple[Task, ...] = TASKS,
    seed: int = SEED,
    filler_prob: float = 0.15,
) -> Iterator[str]:
    """Endless stream of plain-text paragraphs mixing task facts and filler sentences."""
    rng = random.Random(seed + 2)
    words = make_pools(seed).words
    while True:
        sentences = []
        for _ in range(rng.randint(3, 8)):
            if rng.random() < filler_prob:
                sentences.append(_filler(rng))
            else:
                sentences.append(prose_sentence(rng.choice(tasks), rng.choice(words), rng))
        yield " ".join(sentences)


def instruction_row(task: Task, word: str, rng: random.Random) -> dict[str, str]:
    """One Alpaca row for ``task(word)``."""
    instruction, inp = rng.choice(task.instructions)
    fields = task.fields(word)
    return {
        "instruction": instruction.format(**fields),
        "input": inp.format(**fields),
        "output": fields["ans"],
    }


def user_text(row: dict[str, str]) -> str:
    """Render an Alpaca row's prompt as one user message."""
    return f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]


def alpaca_rows(n: int = 600, tasks: tuple[Task, ...] = TASKS, seed: int = SEED) -> list[dict]:
    """SFT training rows in Alpaca format (train words only), tasks balanced."""
    rng = random.Random(seed + 3)
    words = make_pools(seed).train_words
    rows = [instruction_row(tasks[i % len(tasks)], rng.choice(words), rng) for i in range(n)]
    rng.shuffle(rows)
    return rows


def eval_rows(n: int = 100, tasks: tuple[Task, ...] = TASKS, seed: int = SEED) -> list[dict]:
    """Held-out rows in Alpaca format (eval words only), tasks balanced, no duplicates."""
    rng = random.Random(seed + 4)
    words = make_pools(seed).eval_words
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    misses = 0
    while len(rows) < n:
        row = instruction_row(tasks[len(rows) % len(tasks)], rng.choice(words), rng)
        key = (row["instruction"], row["input"])
        if key in seen:
            misses += 1
            check_not_exhausted(misses, len(rows), n)
            continue
        seen.add(key)
        rows.append(row)
        misses = 0
    return rows


# Draws in a row that found only prompts already taken, before a held-out generator gives up.
_MAX_MISSES = 20_000


def check_not_exhausted(misses: int, found: int, wanted: int) -> None:
    """Raise once ``misses`` draws in a row repeated a prompt: the pool holds about ``found``
    distinct ones, not ``wanted`` (the loop would never end)."""
    if misses >= _MAX_MISSES:
        raise ValueError(
            f"asked for {wanted} held-out rows without repeats, but {_MAX_MISSES} draws in a "
            f"row found none new after {found}: the eval words and templates give about {found}"
        )


def sharegpt_rows(n: int = 200, tasks: tuple[Task, ...] = TASKS, seed: int = SEED) -> list[dict]:
    """SFT training rows in ShareGPT format with one or two independent turns."""
    rng = random.Random(seed + 5)
    words = make_pools(seed).train_words
    rows = []
    for _ in range(n):
        conversation = []
        for _ in range(rng.choice((1, 1, 2))):
            row = instruction_row(rng.choice(tasks), rng.choice(words), rng)
            conversation.append({"from": "human", "value": user_text(row)})
            conversation.append({"from": "gpt", "value": row["output"]})
        rows.append({"conversations": conversation})
    return rows
