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

from raysft.data.references import sources_have_tests
from raysft.train import scoring

Cadence = Literal["step", "eval", "final"]
Mode = Literal["min", "max"]


@dataclass(frozen=True)
class EvalOutputs:
    """What one held-out evaluation produced, for the metric functions to read."""

    loss_sum: float  # summed token cross-entropy over the eval set's response tokens
    tokens: int  # response tokens scored
    # One per eval prompt: prompt, expected (the reference), answers (all n generated),
    # generated (the first), capped (per answer: ran to max_new_tokens without a stop), tests
    # (a code row's, or None) and, once run, passed (per answer).
    samples: list[dict[str, Any]] | None = None
    pass_k: int = 1  # the k of pass@k


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    # step: every optimizer step (the loop fills it in); eval: every eval; final: last eval only.
    cadence: Cadence
    mode: Mode | None = None  # better when lower/higher; None: reported, never an objective
    generates: bool = False  # needs answers generated for the eval set
    executes: bool = False  # runs the answers' code against the rows' tests (train/sandbox.py)
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


def _eval_loss(out: EvalOutputs) -> float:
    return out.loss_sum / out.tokens if out.tokens else math.nan


def _perplexity(out: EvalOutputs) -> float:
    loss = _eval_loss(out)
    if math.isnan(loss):  # no tokens, or a diverged model: no perplexity either
        return math.nan
    try:
        return math.exp(loss)
    except OverflowError:  # past ln(float max) ~ 709.78
        return math.inf


def _answers(sample: dict[str, Any]) -> list[str]:
    return sample.get("answers") or [sample["generated"]]


def _pairs(out: EvalOutputs) -> tuple[list[str], list[str]]:
    """(answer, reference) for every generated answer: n per prompt."""
    answers, refs = [], []
    for s in out.samples or []:
        for a in _answers(s):
            answers.append(a)
            refs.append(s["expected"])
    return answers, refs


def _exact_match(out: EvalOutputs) -> float:
    """An answer cut by ``train.max_new_tokens`` before it ended is no match, even when its
    text so far equals the reference: the model had not stopped there."""
    capped = [c for s in out.samples or [] for c in s.get("capped") or [False] * len(_answers(s))]
    return scoring.exact_match(*_pairs(out), capped=capped)


def _rouge_l(out: EvalOutputs) -> float:
    return scoring.rouge_l(*_pairs(out))


def _bleu(out: EvalOutputs) -> float:
    return scoring.bleu(*_pairs(out))


def _pass_at_k(out: EvalOutputs) -> float:
    results = [s["passed"] for s in out.samples or [] if s.get("tests") is not None]
    return scoring.mean_pass_at_k(results, out.pass_k)


def _generates(cfg: Any) -> bool:
    return bool(cfg.train.exact_match)


def _has_tests(cfg: Any) -> bool:

    d = cfg.data
    if d.eval is None:  # a seeded split of train
        return _generates(cfg) and sources_have_tests(d.train, "train")
    return _generates(cfg) and sources_have_tests(d.eval, "eval")


# Key of a report's earlier records, in step order (``recipe.train``): the steps since the last
# report (reports come at evals; MLflow logs every step's records), and in a resumed trial's first
# report the checkpoint's records before the one reported, for a driver that may have missed them
# (``tracking``). The name is kept: a search's pickled callback reads it by value.
REPLAYED = "replayed_records"

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("train_loss", "Mean loss over the step's trained tokens.", "step", "min"),
        Metric("lr", "Learning rate the step used.", "step"),
        Metric("tokens", "Real (non-padding) tokens in the step.", "step"),
        Metric(
            "epoch",
            "Epochs of the training data run after the step (1.5: one and a half).",
            "step",
        ),
        Metric(
            "grad_norm",
            "Total norm of the step's gradients, before clipping (`train.max_grad_norm`).",
            "step",
        ),
        Metric(
            "elapsed_s",
            "Seconds since the trial started; after a resume, up to its checkpoint plus since.",
            "eval",
        ),
        Metric(
            "setup_s", "Seconds of setup: data, model load, (resume) state; every start's.", "final"
        ),
        Metric("step_s", "Seconds in optimizer steps (forward, backward, update).", "final"),
        Metric("eval_s", "Seconds in held-out evaluation (loss and generation).", "final"),
        Metric(
            "checkpoint_s",
            "Seconds writing and reporting checkpoints (all but the last).",
            "final",
        ),
        Metric(
            "eval_loss",
            "Held-out mean cross-entropy on response tokens (a plain-text row's: all of them).",
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
            "Share of held-out answers equal to the reference after stripping surrounding "
            "whitespace (case, punctuation and inner spacing count); an answer cut by "
            "train.max_new_tokens before it ended is no match.",
            "final",
            "max",
            generates=True,
            compute=_exact_match,
            enabled=_generates,
        ),
        Metric(
            "rouge_l",
            "Mean ROUGE-L F1 of each held-out answer against the reference (rouge-score; "
            "lowercased words, each CJK character a word), 0..1.",
            "final",
            "max",
            generates=True,
            compute=_rouge_l,
            enabled=_generates,
        ),
        Metric(
            "bleu",
            "Corpus BLEU of the held-out answers against the references (sacrebleu, 13a "
            "tokenization, zh when a reference has CJK text), 0..100.",
            "final",
            "max",
            generates=True,
            compute=_bleu,
            enabled=_generates,
        ),
        Metric(
            "pass_at_k",
            "Unbiased pass@k (Chen et al. 2021) over eval rows with a `tests` field (Python "
            "asserts run after the answer's code, or its first fenced Python block, in a sandbox); "
            "n = eval.samples, k = eval.pass_k. Reported when a scored eval row has tests.",
            "final",
            "max",
            generates=True,
            executes=True,
            compute=_pass_at_k,
            enabled=_has_tests,
        ),
        Metric(
            "base_eval_loss",
            "eval_loss of the untrained base model on the same rows.",
            "final",
            enabled=lambda cfg: cfg.train.eval_base,
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
