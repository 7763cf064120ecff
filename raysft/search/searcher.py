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

import os
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from raysft.config import Config, SearchSection
from raysft.search.space import build_sampler, build_space
from raysft.train.metrics import METRICS, objective_mode

STRICT_METRIC_CHECKING = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


class FinalMetricOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch``, passing Optuna only the results that carry the objective.

    Optuna's intermediate values are for its pruners, which Ray never calls (early stopping is
    ASHA's), so nothing is lost. The final result, which has the objective, is told on
    completion as before; a trial stopped or failed before it is told PRUNED or FAIL.
    """

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)


def build_searcher(cfg: Config, search: SearchSection, *, concurrent: int) -> OptunaSearch:
    """The searcher of a search; for an objective reported only at a trial's end, also lets Tune
    accept the reports before it (``STRICT_METRIC_CHECKING``, in this driver process only)."""
    if not METRICS[search.metric].per_eval:
        os.environ[STRICT_METRIC_CHECKING] = "1"
    return FinalMetricOptunaSearch(
        space=build_space(cfg, search),
        metric=search.metric,
        mode=objective_mode(search.metric, search.mode),  # null: the metric's own
        sampler=build_sampler(search, concurrent=concurrent),
    )
