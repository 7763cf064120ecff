"""The search's Optuna searcher for Ray Tune, with the objective reported only at a trial's end.

Imports Ray: the driver imports this module lazily, when it builds the tuner.

A trial reports every eval (eval loss, perplexity) and, at its last eval only, the metrics that
need generation (exact match, ROUGE-L, BLEU, pass@k). With one of those as ``search.metric``,
Ray Tune as shipped fails the search at the first intermediate report, twice over: its
controller refuses a result without the objective (unless ``TUNE_DISABLE_STRICT_METRIC_CHECKING``
is set), and ``OptunaSearch.on_trial_result`` reads ``result[metric]`` (a KeyError). Tune's own
docs leave final-only objectives to that environment variable; the searcher is mended here.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from optuna.trial import TrialState, create_trial
from ray.tune.search.optuna import OptunaSearch

from raysft.config import Config, SearchSection
from raysft.search.space import build_sampler, build_space
from raysft.train.metrics import METRICS, objective_mode

log = logging.getLogger(__name__)

STRICT_METRIC_CHECKING = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


class FinalMetricOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch``, passing Optuna only the results that carry the objective, and
    telling it how each trial ended.

    Optuna's intermediate values are for its pruners, which Ray never calls (early stopping is
    ASHA's), so nothing is lost. A trial that ran to ``max_steps`` is told COMPLETE with its
    final value. One stopped before (ASHA) is told PRUNED, its last value as its intermediate
    value at its step: Ray tells it COMPLETE with the value of the rung where it stopped, so TPE
    weighed an eval loss at step 30 as the equal of one at step 150. One that diverged (its
    objective NaN) is told PRUNED at NaN at step 0, which TPE ranks below every finished trial
    and every one pruned at a later step (Ray's tell of a NaN value fails, and left it RUNNING:
    TPE never learned where trials diverge). One that failed is told FAIL (Ray: COMPLETE when
    its last report carried the objective). A failed trial that ``--resume`` runs again is told
    as a new Optuna trial with the same values when it ends: Optuna takes no second tell of a
    trial it has (Ray's own dropped it with a warning).

    It keeps the search's limit of trials at once itself (``set_max_concurrency``): Ray's
    ``ConcurrencyLimiter`` passes on the end of a trial it suggested only, so that rerun, which
    Tune queues again without asking the searcher, was never told.
    """

    def __init__(self, *args: Any, max_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_steps = max_steps
        self.trial_max_steps: dict[str, int] = {}  # where train.max_steps is searched
        self.failed_trials: set[str] = set()  # told FAIL: a --resume may run them again

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Ray asks before it wraps the searcher in its limiter; True: this one limits."""
        self.max_concurrent: int | None = max_concurrent
        return True

    def restore(self, checkpoint_path: str) -> None:
        """A searcher saved by a raysft before it kept its own limit (no ``max_concurrent`` in
        it) belongs to a search whose Ray limiter is restored limiting too: the limit stays
        Ray's alone, or a rerun's end, which that limiter drops, would hold a slot for good."""
        self.__dict__.pop("max_concurrent", None)
        super().restore(checkpoint_path)
        if "max_concurrent" not in self.__dict__:
            self.max_concurrent = None

    def _live(self) -> set[str]:
        # A searcher pickled before it kept its own limit (an older search's) has none.
        self.live_trials: set[str] = getattr(self, "live_trials", set())
        return self.live_trials

    def suggest(self, trial_id: str) -> Any:
        live, limit = self._live(), getattr(self, "max_concurrent", None)
        if limit is not None and len(live) >= limit:
            return None  # Tune asks again once a trial ended
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            live.add(trial_id)
            if config.get("train.max_steps") is not None:
                self.trial_max_steps[trial_id] = int(config["train.max_steps"])
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Nothing for Optuna: its intermediate values are for its pruners, which Ray never
        calls, and Ray's keyed them by eval count, which TPE then ranked a trial's last step
        by (a diverged trial's earlier evals outranked a trial ASHA stopped at a later step).
        A failed trial run again by --resume counts as running from its first result."""
        if trial_id in getattr(self, "failed_trials", ()) and getattr(self, "max_concurrent", None):
            self._live().add(trial_id)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        # A searcher pickled before max_steps was kept (a --resume of an older search) has none.
        max_steps = getattr(self, "trial_max_steps", {}).get(
            trial_id, getattr(self, "max_steps", None)
        )
        self._live().discard(trial_id)
        step = (result or {}).get("step")
        value = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        early = (
            isinstance(max_steps, int)
            and isinstance(step, int)
            and step < max_steps
            and isinstance(value, int | float)
            and math.isfinite(value)
        )
        # A diverged trial ends with a NaN objective (or an infinite perplexity), which Optuna
        # refuses as a value (Ray's tell would leave it RUNNING for good), or took for a
        # finished trial's: told PRUNED at NaN, which TPE ranks worst.
        diverged = not error and isinstance(value, float) and not math.isfinite(value)
        # A searcher pickled before failed trials were kept (an older search's) has none.
        self.failed_trials = getattr(self, "failed_trials", set())
        if trial_id in self.failed_trials:
            if not error:
                self._tell_rerun(trial_id, value=value, step=step, early=early or diverged)
            return
        if trial_id in self._completed_trials or not (error or early or diverged):
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        trial, study = self._ot_trials[trial_id], self._ot_study
        assert study is not None  # made with the searcher's space, before any trial
        try:  # as Ray's own: a tell Optuna refuses (a trial it already has) must not end the search
            if error:
                study.tell(trial, state=TrialState.FAIL)
                self.failed_trials.add(trial_id)
            else:
                at = _told_step(step, value)
                trial.report(float(value) if at else math.nan, at)  # type: ignore[arg-type]
                study.tell(trial, state=TrialState.PRUNED)
        except Exception as exc:
            log.warning("Optuna: trial %s not told: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _tell_rerun(self, trial_id: str, *, value: Any, step: Any, early: bool) -> None:
        """A failed trial run again (``--resume``) that ended: a new Optuna trial with its
        values, told how it ended; its first stays FAIL."""
        first, study = self._ot_trials[trial_id], self._ot_study
        assert study is not None
        told: dict[str, Any] = {"state": TrialState.FAIL}
        if early:  # or diverged (not finite)
            at = _told_step(step, value)
            reported = float(value) if at else math.nan
            told = {"state": TrialState.PRUNED, "intermediate_values": {at: reported}}
        elif isinstance(value, int | float) and math.isfinite(value):
            told = {"state": TrialState.COMPLETE, "value": float(value)}
        try:
            study.add_trial(
                create_trial(params=first.params, distributions=first.distributions, **told)
            )
        except Exception as exc:
            log.warning("Optuna: the rerun of trial %s not told: %s", trial_id, exc)
        self.failed_trials.discard(trial_id)


def _told_step(step: Any, value: Any) -> int:
    """The step a PRUNED trial's value is told at: its own, or 0 for a value that is not finite
    (then told as NaN). TPE ranks pruned trials by their last step first (a later one is
    better), then by value (NaN worst): a trial that diverged at step 150 would rank above
    every trial ASHA stopped at 30."""
    if isinstance(value, float) and not math.isfinite(value) or not isinstance(step, int):
        return 0
    return step


def allow_final_only_objective(search: SearchSection) -> None:
    """For an objective reported only at a trial's end, let Tune accept the reports before it
    (``STRICT_METRIC_CHECKING``, in this driver process only). Set for a fresh search and for a
    ``--resume`` alike: a restored tuner does not build its searcher again."""
    if not METRICS[search.metric].per_eval:
        os.environ[STRICT_METRIC_CHECKING] = "1"


def build_searcher(cfg: Config, search: SearchSection, *, concurrent: int) -> OptunaSearch:
    """The searcher of a search (``allow_final_only_objective`` too)."""
    allow_final_only_objective(search)
    return FinalMetricOptunaSearch(
        space=build_space(cfg, search),
        metric=search.metric,
        mode=objective_mode(search.metric, search.mode),  # null: the metric's own
        sampler=build_sampler(search, concurrent=concurrent),
        max_steps=cfg.train.max_steps,
    )
