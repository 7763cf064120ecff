"""Scores of models on the same held-out rows, as text and JSON: a metrics table with one
column per model, their answers side by side, a strict-JSON record."""

from __future__ import annotations

import math
from typing import Any

from raysft.train.score_saved import ModelScore
from raysft.train.scoring import bleu_says_nothing


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def metrics_table(scores: dict[str, ModelScore]) -> str:
    """Metrics as rows, one column per scored model (e.g. base, tuned), and a note under a BLEU
    no answer can earn by a 4-gram match (the references the answers were scored against)."""
    names = list(dict.fromkeys(n for s in scores.values() for n in s.scores))
    head = ["metric", *scores]
    body = [[n, *(_fmt(s.scores.get(n)) for s in scores.values())] for n in names]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    table = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *body]
    )
    if len({s.rows for s in scores.values()}) > 1:  # a --base-model of another tokenizer
        counts = ", ".join(f"{name} {s.rows}" for name, s in scores.items())
        table += (
            f"\n(rows scored: {counts}: the models' tokenizers or templates keep different "
            "rows (data.on_error=skip, truncation), so the columns are not of the same rows)"
        )
    first = next(iter(scores.values()), None)
    references = [sample["expected"] for sample in first.samples] if first else []
    if "bleu" in names and bleu_says_nothing(references):
        table += (
            "\n(bleu: every reference answer is shorter than 4 tokens, so no answer can match a "
            "4-gram: BLEU is 0 for answers as short, and above 0 only through sacreBLEU's "
            "smoothing of answers of 4 tokens or more, which scores their length, not their "
            "match; read exact_match and rouge_l)"
        )
    return table


def side_by_side(scores: dict[str, ModelScore], *, n: int = 3) -> str:
    """The first ``n`` prompts with the reference and each model's first answer to that eval
    row, labelled by model (base, tuned) when there are several, else ``generated``; an answer
    cut by the generation cap is marked so."""
    first = next(iter(scores.values()))
    label = {name: name if len(scores) > 1 else "generated" for name in scores}
    by_row = {name: {_row(x, i): x for i, x in enumerate(s.samples)} for name, s in scores.items()}
    blocks = []
    for i, sample in enumerate(first.samples[:n]):
        lines = [
            f"--- {i + 1}: {_flat(sample['prompt'])}",
            f"expected: {sample['expected']!r}",
        ]
        for name in scores:
            answer = by_row[name].get(_row(sample, i))
            shown = repr(answer["generated"]) if answer else "(not answered: not among its rows)"
            if answer and (answer.get("capped") or [False])[0]:
                shown += " (cut at train.max_new_tokens)"
            lines.append(f"{label[name]}: {shown}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _row(sample: dict[str, Any], i: int) -> Any:
    """The eval row a sample answers (score_model numbers them), else its position."""
    return sample.get("row", ("position", i))


def _flat(prompt: str) -> str:
    """A prompt on one line, its end (the last user turn) kept when it is long."""
    flat = " ".join(prompt.split())
    return flat if len(flat) <= 160 else "..." + flat[-157:]


def as_json(scores: dict[str, ModelScore], *, n: int) -> dict[str, Any]:
    """Strict-JSON view (NaN and infinity -> null: a perplexity past exp(709) is inf)."""
    return {
        name: {
            "model": s.model,
            "rows": s.rows,
            "answered": len(s.samples),  # rows generated for (prompts that fit, max_prompts)
            "metrics": {k: v if math.isfinite(v) else None for k, v in s.scores.items()},
            "samples": s.samples[:n],
        }
        for name, s in scores.items()
    }
