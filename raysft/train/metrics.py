"""The metric registry: every number a trial reports, defined once.

The recipe computes and reports them, spec validation checks ``search.metric`` against them, the
MLflow callback logs them and the summary rows read them. Adding a metric is one entry in
``METRICS`` plus its function. Pure: no torch import (the spec is validated before torch loads).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Cadence = Literal["step", "eval", "final"]
Mode = Literal["min", "max"]


@dataclass(frozen=True)
class EvalOutputs:
    """What one held-out evaluation produced, for the metric functions to read."""

    loss_sum: float  # summed token cross-entropy over the eval set's response tokens
    tokens: int  # response tokens scored
    samples: list[dict[str, str]] | None = None  # greedy answers: prompt, expected, generated


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    # step: every optimizer step (the loop fills it in); eval: every eval; final: last eval only.
    cadence: Cadence
    mode: Mode | None = None  # better when lower/higher; None: reported, never an objective
    generates: bool = False  # needs greedy decoding of the eval set
    compute: Callable[[EvalOutputs], float] | None = None  # None: the training loop fills it in
    # Whether a config reports it at all (e.g. exact match only with train.exact_match).
    enabled: Callable[[Any], bool] = lambda cfg: True

    @property
    def searchable(self) -> bool:
        return self.mode is not None

    @property
    def per_eval(self) -> bool:
        """Reported at every eval, so a scheduler (ASHA) can compare trials mid-way."""
        return self.cadence in ("step", "eval")


def normalize_answer(text: str) -> str:
    """Exact-match normalization: surrounding whitespace stripped, nothing else (case counts)."""
    return text.strip()


def _eval_loss(out: EvalOutputs) -> float:
    return out.loss_sum / out.tokens if out.tokens else math.nan


def _perplexity(out: EvalOutputs) -> float:
    loss = _eval_loss(out)
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def _exact_match(out: EvalOutputs) -> float:
    samples = out.samples or []
    hits = sum(normalize_answer(s["generated"]) == normalize_answer(s["expected"]) for s in samples)
    return hits / len(samples) if samples else math.nan


def _generates(cfg: Any) -> bool:
    return bool(cfg.train.exact_match)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("train_loss", "Mean loss over the step's trained tokens.", "step", "min"),
        Metric("lr", "Learning rate the step used.", "step"),
        Metric("tokens", "Real (non-padding) tokens in the step.", "step"),
        Metric("elapsed_s", "Seconds since the trial started.", "eval"),
        Metric(
            "eval_loss",
            "Held-out mean cross-entropy on response tokens.",
            "eval",
            "min",
            compute=_eval_loss,
        ),
        Metric(
            "perplexity",
            "exp(eval_loss): held-out perplexity of the response tokens.",
            "eval",
            "min",
            compute=_perplexity,
        ),
        Metric(
            "exact_match",
            "Share of held-out conversations whose greedy answer equals the reference "
            "(surrounding whitespace stripped).",
            "final",
            "max",
            generates=True,
            compute=_exact_match,
            enabled=_generates,
        ),
        Metric(
            "base_exact_match",
            "exact_match of the untrained base model on the same rows.",
            "final",
            generates=True,
            enabled=lambda cfg: _generates(cfg) and cfg.train.eval_base,
        ),
    )
}


def reported(cfg: Any) -> list[Metric]:
    """The metrics a trial of ``cfg`` reports."""
    return [m for m in METRICS.values() if m.enabled(cfg)]


def computed_at(cfg: Any, *, final: bool) -> list[Metric]:
    """Metrics the evaluator computes at an eval (``final``: the last one, generation included)."""
    return [
        m
        for m in reported(cfg)
        if m.compute is not None and (m.cadence == "eval" or (final and m.cadence == "final"))
    ]


def objective_mode(metric: str, mode: Mode | None) -> Mode:
    """The search's direction: as given, else the metric's own (a spec's null ``search.mode``)."""
    if mode is not None:
        return mode
    own = METRICS[metric].mode if metric in METRICS else None
    if own is None:
        raise ValueError(f"{metric!r} is not a searchable metric")
    return own


def is_better(new: float, old: float, mode: Mode) -> bool:
    """Strictly better; NaN is never better and anything finite beats a NaN."""
    if math.isnan(new):
        return False
    if math.isnan(old):
        return True
    return new < old if mode == "min" else new > old
