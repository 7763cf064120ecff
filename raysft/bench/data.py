"""Benchmark data: Alpaca-style rows generated from a seed, in the seed's prompt format.

Answer lengths are lognormal (median ``MEDIAN_ANSWER`` characters; the embedded tokenizer is
byte-level, so characters are tokens), like Alpaca's long tail of answers. The text is a seeded
word-level Markov chain, so a model can learn it and held-out loss means something.

Every contender sees the same token ids: the seed's text ``prompt + output`` (its own recipe
adds no EOS), TRL's prompt-completion rows (it appends EOS) and raysft's messages rows rendered
by ``CHAT_TEMPLATE`` (which appends EOS). Held-out loss scores ``output + EOS`` given the prompt.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

from raysft.data.tokens import IGNORE, Example

MEDIAN_ANSWER = 120  # tokens (= characters for the byte-level embedded tokenizer)
SIGMA = 0.7  # lognormal shape: p90 ~ 2.5x the median, a few answers near the cap
MAX_ANSWER = 440  # keeps prompt + answer within 512 tokens for almost every row
_MARKOV_FANOUT = 3  # likely successors per word: learnable, not trivial

# The seed's preprocess() (SEED.md section 6), with and without an input.
_PROMPT_WITH_INPUT = "### Instruction:\n{inst}\n\n### Input:\n{inp}\n\n### Response:\n"
_PROMPT_NO_INPUT = "### Instruction:\n{inst}\n\n### Response:\n"

# raysft's `tokenizer` template renders a messages row as exactly the seed's text + EOS.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'] }}{%- endif %}"
    "{%- endfor %}"
)

_INSTRUCTIONS = (
    "Write a short note about the {a} and the {b}.",
    "Describe the {a} in a few sentences.",
    "Tell a story that starts with the {a}.",
    "Explain how the {a} relates to the {b}.",
    "Continue the text below.",
    "Summarise what happens to the {a}.",
)


def _words() -> list[str]:
    from raysft.assets.corpus import make_words

    return make_words(200, seed=7)


class _Chain:
    """Word-level Markov chain: each word has a few preferred successors (80%), else any."""

    def __init__(self, words: list[str], rng: random.Random):
        self.words = words
        self.next = {w: rng.sample(words, _MARKOV_FANOUT) for w in words}

    def text(self, rng: random.Random, first: str, n_chars: int) -> str:
        out, word, size, since_stop = [first.capitalize()], first, len(first), 0
        while size < n_chars:
            word = rng.choice(self.next[word]) if rng.random() < 0.8 else rng.choice(self.words)
            since_stop += 1
            end = since_stop >= 6 and rng.random() < 0.25
            token = word + ("." if end else "")
            out.append(token.capitalize() if out[-1].endswith(".") else token)
            since_stop = 0 if end else since_stop
            size += len(token) + 1
        return " ".join(out)[:n_chars].rstrip()


def make_rows(n: int, *, seed: int) -> list[dict[str, str]]:
    """``n`` Alpaca rows ``{instruction, input, output}``; the same ``seed`` gives the same rows."""
    rng = random.Random(seed)
    words = _words()
    chain = _Chain(words, random.Random(1))  # one language for every split and seed
    rows = []
    for _ in range(n):
        a, b = rng.sample(words, 2)
        inst = rng.choice(_INSTRUCTIONS).format(a=a, b=b)
        has_input = inst.startswith("Continue") or rng.random() < 0.3
        inp = chain.text(rng, a, rng.randint(20, 80)) if has_input else ""
        length = round(math.exp(rng.gauss(math.log(MEDIAN_ANSWER), SIGMA)))
        output = chain.text(rng, a, min(max(length, 8), MAX_ANSWER))
        rows.append({"instruction": inst, "input": inp, "output": output})
    return rows


def train_eval_rows(
    n_train: int, n_eval: int, *, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training rows and a disjoint held-out set (its own seed stream), both deterministic."""
    return make_rows(n_train, seed=seed), make_rows(n_eval, seed=seed + 1_000_003)


def prompt_text(row: dict[str, str]) -> str:
    """The seed's prompt: everything before the answer."""
    if row["input"]:
        return _PROMPT_WITH_INPUT.format(inst=row["instruction"], inp=row["input"])
    return _PROMPT_NO_INPUT.format(inst=row["instruction"])


def seed_text(row: dict[str, str]) -> str:
    """The seed's training text: prompt + answer, no EOS (as its preprocess() writes it)."""
    return prompt_text(row) + row["output"]


def eval_examples(rows: list[dict[str, str]], tokenizer: Any, *, max_len: int) -> list[Example]:
    """Held-out examples: the prompt untrained, ``output + EOS`` trained, cut at ``max_len``."""
    out = []
    for row in rows:
        prompt = tokenizer(prompt_text(row), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_len]
        labels = ([IGNORE] * len(prompt) + answer)[:max_len]
        out.append(Example(ids, labels, len(prompt) + len(answer) > max_len))
    return out


def write_messages(rows: list[dict[str, str]], path: Path) -> Path:
    """raysft's input: one messages row per sample, the user turn holding the seed's prompt."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            msgs = [
                {"role": "user", "content": prompt_text(row)},
                {"role": "assistant", "content": row["output"]},
            ]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def install_chat_template(model_dir: Path) -> None:
    """Make ``model_dir``'s tokenizer render the seed's format (for raysft's template)."""
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def copy_model_dir(src: Path, dst: Path) -> Path:
    """A private copy of a (small) model dir whose chat template the benchmark may replace."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    install_chat_template(dst)
    return dst


def length_summary(examples: list[Example]) -> dict[str, float]:
    """Median and mean sample length and trained-token count, for the report."""
    lengths = sorted(e.n_tokens for e in examples)
    trained = sorted(e.n_trained for e in examples)
    mid = len(lengths) // 2
    return {
        "samples": len(lengths),
        "median_tokens": lengths[mid] if lengths else 0,
        "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1),
        "median_answer_tokens": trained[mid] if trained else 0,
        "max_tokens": lengths[-1] if lengths else 0,
    }
