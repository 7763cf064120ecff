"""MLflow: one parent run per search, one nested child run per trial.

Only the driver talks to MLflow (through a Tune callback fed by trial results), so workers need
no tracking credentials and a SQLite store never sees concurrent writers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysft.config import Config, SearchSpec, TrackingSection
from raysft.search.results import classify
from raysft.train.metrics import METRICS

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
STATUS_TAG = "raysft.status"  # a TrialStatus value
# (trial_id, sampled values) -> that trial's own resolved config
TrialResolver = Callable[[str, dict[str, Any]], Config]


def tracking_uri(cfg: TrackingSection) -> str:
    """Spec, then $MLFLOW_TRACKING_URI, then a local SQLite file (absolute, so workers agree)."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``a.b.c: value`` params (MLflow params are strings, <= 6000 chars)."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = str(tree)[:6000]
    return out


def client(uri: str) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlc: Any, name: str) -> str:
    exp = mlc.get_experiment_by_name(name)
    return exp.experiment_id if exp else mlc.create_experiment(name)


def config_params(cfg: Config) -> dict[str, str]:
    """A trial's resolved config as MLflow params (search, tracking, promote: the parent's)."""
    return flatten(cfg.model_dump(mode="json", exclude={"search", "tracking", "promote"}))


def start_parent(mlc: Any, exp_id: str, *, name: str, cfg: SearchSpec, spec_path: str) -> str:
    run = mlc.create_run(exp_id, run_name=name, tags={"raysft.kind": "search"})
    rid = run.info.run_id
    params = flatten(cfg.model_dump(mode="json", exclude={"search"}))
    params.update(
        {f"search.{k}": v for k, v in flatten(cfg.search.model_dump(mode="json")).items()}
    )
    _log_params(mlc, rid, params)
    mlc.log_artifact(rid, spec_path, artifact_path="spec")
    return rid


def _log_params(mlc: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlc.log_batch(run_id, params=items[i : i + 100])


def log_metrics(mlc: Any, run_id: str, result: dict[str, Any]) -> None:
    """Every registry metric in a trial's result, at the trial's own step."""
    from mlflow.entities import Metric

    step = int(result.get("step", 0))
    ts = int(result.get("timestamp", 0) * 1000)
    metrics = [
        Metric(k, float(v), ts, step)
        for k, v in result.items()
        if k in METRICS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    ]
    if metrics:
        mlc.log_batch(run_id, metrics=metrics)


def trial_runs(mlc: Any, exp_id: str, parent_id: str) -> dict[str, tuple[str, str | None]]:
    """trial_id -> (run id, status tag) of the child runs a search has in MLflow so far."""
    runs = mlc.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    return {
        r.data.tags["raysft.trial_id"]: (r.info.run_id, r.data.tags.get(STATUS_TAG))
        for r in runs
        if "raysft.trial_id" in r.data.tags
    }


def make_callback(mlc: Any, *, exp_id: str, parent_id: str, resolve_trial: TrialResolver) -> Any:
    """A Tune callback that mirrors every trial into a nested MLflow run.

    ``resolve_trial`` gives each trial's own config: its params (output_dir included) and the
    ``max_steps`` its status is judged by.
    """
    from ray.tune import Callback

    class MlflowTrials(Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}  # trial_id -> run_id
            self.status: dict[str, str] = {}
            self.last: dict[str, dict[str, Any]] = {}

        def setup(self, *args: Any, **info: Any) -> None:
            # --resume restores the copy of this callback pickled when the search began: pick
            # up the trial runs created since, so resumed trials keep their run.
            for trial_id, (run_id, status) in trial_runs(mlc, exp_id, parent_id).items():
                self.runs.setdefault(trial_id, run_id)
                if status:
                    self.status.setdefault(trial_id, status)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if trial.trial_id in self.runs:  # restarted after --resume
                return
            run = mlc.create_run(
                exp_id,
                run_name=f"trial-{trial.trial_id}",
                tags={
                    "mlflow.parentRunId": parent_id,
                    "raysft.kind": "trial",
                    "raysft.trial_id": trial.trial_id,
                },
            )
            self.runs[trial.trial_id] = run.info.run_id
            # The trial's own resolved config, with the sampled values repeated under sampled.*
            # to tell the searched ones apart.
            own = config_params(resolve_trial(trial.trial_id, dict(trial.config)))
            sampled = {f"sampled.{k}": str(v) for k, v in trial.config.items()}
            _log_params(mlc, run.info.run_id, {**own, **sampled})

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            if trial.trial_id in self.runs:
                self.last[trial.trial_id] = result
                log_metrics(mlc, self.runs[trial.trial_id], result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, error=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, error=True)

        def _end(self, trial: Any, *, error: bool) -> None:
            max_steps = resolve_trial(trial.trial_id, dict(trial.config)).train.max_steps
            last = self.last.get(trial.trial_id, {}).get("step")
            status = classify(last_step=last, max_steps=max_steps, error=error)
            self.status[trial.trial_id] = status.value
            run_id = self.runs.get(trial.trial_id)
            if run_id:
                mlc.set_tag(run_id, STATUS_TAG, status.value)
                mlc.set_terminated(run_id, status.mlflow)

    return MlflowTrials()
