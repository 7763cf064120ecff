"""Free-text and code tasks on the skills of ``corpus.py``, so every metric has something to measure
on the embedded default: ROUGE-L / BLEU give partial credit for a half-right sentence, pass@k runs
a line of code against its tests.

Each reference is a deterministic function of the instruction's word; the facts it states
(length, first and last letter, capitals) are the ones the base model learnt from the prose.
Free text keeps to the prose's characters (letters, digits, space, ",", "."): the base model's
embedding rows of the others were pushed away in pretraining, and LoRA cannot move them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from raysft.assets.corpus import SEED, check_not_exhausted, make_pools


@dataclass(frozen=True)
class TextTask:
    """A free-text task: two phrasings (the word inline, or as the input) and one reference."""

    name: str
    inline: str  # the instruction, with {w}
    with_input: str  # the instruction when the word is the row's input
    reference: str  # with {w}, {W} (capitals), {n} (letters), {f} / {l} (first / last letter)

    @property
    def instructions(self) -> tuple[tuple[str, str], ...]:
        return ((self.inline, ""), (self.with_input, "{w}"))


TEXT_TASKS: tuple[TextTask, ...] = (
    TextTask(
        "describe",
        "Describe the word {w} in one sentence.",
        "Describe this word in one sentence.",
        "The word {w} has {n} letters, starts with {f} and ends with {l}.",
    ),
    TextTask(
        "facts",
        "Tell me two facts about the word {w}.",
        "Give two facts about this word.",
        "It has {n} letters. In capital letters it is {W}.",
    ),
    TextTask(
        "shout",
        "Shout the word {w} twice and say how long it is.",
        "Shout this word twice and say how long it is.",
        "{W} {W}. That is {n} letters.",
    ),
)


def text_fields(word: str) -> dict[str, str]:
    """Template fields of a free-text reference or a code answer for ``word``."""
    return {"w": word, "W": word.upper(), "n": str(len(word)), "f": word[0], "l": word[-1]}


def text_row(task: TextTask, word: str, rng: random.Random) -> dict[str, str]:
    """One Alpaca row of the free-text task ``task`` for ``word``."""
    instruction, inp = rng.choice(task.instructions)
    fields = text_fields(word)
    return {
        "instruction": instruction.format(**fields),
        "input": inp.format(**fields),
        "output": task.reference.format(**fields),
    }


@dataclass(frozen=True)
class CodeTask:
    """A code task: one line of Python that sets ``x`` to a fact about a word."""

    name: str
    what: str  # what x is set to, with {w} (the word)
    value: Callable[[str], str | int]


CODE_TASKS: tuple[CodeTask, ...] = (
    CodeTask("upper", "{w} in capital letters", str.upper),
    CodeTask("length", "the number of letters in {w}", len),
    CodeTask("repeat", "{w} said twice, separated by a space", lambda w: f"{w} {w}"),
    CodeTask("first", "the first letter of {w}", lambda w: w[0]),
    CodeTask("last", "the last letter of {w}", lambda w: w[-1]),
)
# Two quote styles of one line: both pass the tests, only one equals the reference (exact match
# cannot tell a correct answer from a wrong one here; running it can). One short line, as
# ``def f():\n    return ...`` with LoRA passed 1 of 15 held-out rows after 100 steps.
CODE_QUOTES = {"double": '"', "single": "'"}
_CODE_PROMPTS = (
    ("Write one line of Python that sets x to {what}.", ""),
    ("Write one line of Python that sets x to {what_this}.", "{w}"),
)


def code_line(value: str | int, quote: str) -> str:
    """``x = <value>``, a string in ``quote`` marks (its words never hold quotes or escapes)."""
    return f"x = {quote}{value}{quote}" if isinstance(value, str) else f"x = {value}"


def code_row(task: CodeTask, word: str, rng: random.Random, *, quotes: str) -> dict[str, str]:
    """One Alpaca row with ``tests`` for ``task(word)``, strings in ``quotes`` marks."""
    value = task.value(word)
    instruction, inp = rng.choice(_CODE_PROMPTS)
    return {
        "instruction": instruction.format(
            what=task.what.format(w=word), what_this=task.what.format(w="this word")
        ),
        "input": inp.format(w=word),
        "output": code_line(value, CODE_QUOTES[quotes]),
        "tests": f"assert x == {value!r}, x",
    }


def _rows(
    make: Callable[[int, random.Random], dict[str, str]], n: int, rng: random.Random, held_out: bool
) -> list[dict[str, str]]:
    """``n`` rows ``make(i, rng)``; held out: without repeated prompts (attempt i counts up)."""
    if not held_out:
        return [make(i, rng) for i in range(n)]
    rows: dict[tuple[str, str], dict[str, str]] = {}
    attempts = itertools.count()
    misses = 0
    while len(rows) < n:
        row = make(next(attempts), rng)
        key = (row["instruction"], row["input"])
        if key in rows:
            misses += 1
            check_not_exhausted(misses, len(rows), n)
        else:
            rows[key] = row
            misses = 0
    return list(rows.values())


def text_rows(n: int = 450, *, held_out: bool = False, seed: int = SEED) -> list[dict]:
    """Free-text SFT rows (train words), or held-out rows (eval words, no repeats); tasks
    in turn (held out, a repeat drawn is skipped, so the tasks' counts differ by a row or two)."""
    rng = random.Random(seed + (7 if held_out else 6))
    pools = make_pools(seed)
    words = pools.eval_words if held_out else pools.train_words

    def make(i: int, r: random.Random) -> dict[str, str]:
        return text_row(TEXT_TASKS[i % len(TEXT_TASKS)], r.choice(words), r)

    return _rows(make, n, rng, held_out)


def code_rows(n: int = 500, *, held_out: bool = False, seed: int = SEED) -> list[dict]:
    """Code SFT rows (train words, both quote styles), or held-out rows (eval words, no
    repeats, double-quoted references); tasks in turn, as in ``text_rows``."""
    rng = random.Random(seed + (9 if held_out else 8))
    pools = make_pools(seed)
    words = pools.eval_words if held_out else pools.train_words

    def make(i: int, r: random.Random) -> dict[str, str]:
        task = CODE_TASKS[i % len(CODE_TASKS)]
        quotes = "double" if held_out else r.choice(tuple(CODE_QUOTES))
        return code_row(task, r.choice(words), r, quotes=quotes)

    return _rows(make, n, rng, held_out)
