"""MLflow: one parent run per search, one nested child run per trial.

Only the driver talks to MLflow (through a Tune callback fed by trial results,
``raysft.search.callback``, and at the search's finish), so workers need no tracking
credentials and a SQLite store never sees concurrent writers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raysft.config import Config, SearchSpec
from raysft.search.notes import NOTE_TAG, experiment_note
from raysft.search.notes import run_name as run_name
from raysft.search.redact import flatten, redact
from raysft.search.redact import scrubbed as scrubbed
from raysft.search.space import describe_param
from raysft.search.tracking_requests import callback_requests as callback_requests
from raysft.search.tracking_requests import note_callback_failure as note_callback_failure
from raysft.search.tracking_requests import out_of_reach as out_of_reach
from raysft.search.tracking_store import artifact_root
from raysft.train.metrics import METRICS, REPLAYED

# Imported "as" themselves: run_name, scrubbed, callback_requests, note_callback_failure and
# out_of_reach were defined here once, and a trials' callback pickled by a search begun then
# (Tune's state, unpickled by --resume) calls them by their names in this module.

log = logging.getLogger(__name__)

STATUS_TAG = "raysft.status"  # a TrialStatus value, or lost_trials.LOST
# MLflow 3 opens an experiment without this tag on its GenAI overview (traces); this value
# marks it as model training, so the UI opens on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PROMOTION_TAG = "raysft.promotion"  # the parent run's promotion record (JSON)
# (trial_id, sampled values) -> that trial's own resolved config
TrialResolver = Callable[[str, dict[str, Any]], Config]


def experiment_id(mlc: Any, name: str, *, uri: str | None = None) -> str:
    """The experiment's id, created if new; marked as model training unless its kind is set,
    and described (``experiment_note``) unless it has a description. ``uri``: the tracking
    store, whose artifacts a new experiment keeps beside it (``artifact_root``)."""
    exp = mlc.get_experiment_by_name(name)
    if exp is None:
        exp_id = str(
            mlc.create_experiment(
                name,
                artifact_location=artifact_root(uri) if uri else None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        )
        mlc.set_experiment_tag(exp_id, NOTE_TAG, experiment_note(exp_id))
        return exp_id
    exp_id = str(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older raysft or by hand
        mlc.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if NOTE_TAG not in exp.tags:  # a user's own description is kept
        mlc.set_experiment_tag(exp_id, NOTE_TAG, experiment_note(exp_id))
    return exp_id


def config_params(cfg: Config) -> dict[str, str]:
    """A trial's resolved config as MLflow params (search, tracking, promote: the parent's)."""
    return flatten(cfg.model_dump(mode="json", exclude={"search", "tracking", "promote"}))


def trial_params(resolve: TrialResolver, trial_id: str, sampled: dict[str, Any]) -> dict[str, str]:
    """A trial run's params: its own resolved config, and its sampled values again under
    ``sampled.*`` to tell the searched ones apart."""
    return {
        **config_params(resolve(trial_id, sampled)),
        **{f"sampled.{k}": str(v) for k, v in sampled.items()},
    }


def start_parent(mlc: Any, exp_id: str, *, name: str, cfg: SearchSpec, spec_path: str) -> str:
    """The search's parent run, its params and spec logged. One that cannot be written whole
    (an artifact store the client cannot reach, most often) is marked FAILED before the error
    is raised: a start that failed leaves no RUNNING run behind."""
    run = mlc.create_run(exp_id, run_name=name, tags={"raysft.kind": "search"})
    rid = run.info.run_id
    params = flatten(cfg.model_dump(mode="json", exclude={"search"}))
    # A searched setting's value in the spec is no trial's: the runs table would show the
    # parent's lora.r 8 beside trials of 4 and 16. It shows what was searched there instead.
    params.update({k: f"searched: {describe_param(p)}" for k, p in cfg.search.params.items()})
    params.update(
        {f"search.{k}": v for k, v in flatten(cfg.search.model_dump(mode="json")).items()}
    )
    try:
        log_params(mlc, rid, params)
        mlc.log_artifact(rid, spec_path, artifact_path="spec")
    except BaseException:
        with contextlib.suppress(Exception):
            mlc.set_terminated(rid, "FAILED")
        raise
    return rid


def log_params(mlc: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact(k, v)) for k, v in params.items()]  # flatten's, and sampled.*
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlc.log_batch(run_id, params=items[i : i + 100])


# A trials' callback pickled by a search begun before 2026-12-06 (Tune's state, unpickled by
# --resume) calls this module's functions by their names then.
_log_params = log_params


def metric_points(record: dict[str, Any]) -> list[Any]:
    """Every finite registry metric of one trial report as MLflow points, at the report's own
    step and time (``timestamp``, in seconds)."""
    from mlflow.entities import Metric

    step = int(record.get("step", 0))
    ts = int(record.get("timestamp", 0) * 1000)
    return [
        Metric(k, float(v), ts, step)
        for k, v in record.items()
        if k in METRICS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    ]


def log_metrics(mlc: Any, run_id: str, result: dict[str, Any]) -> None:
    """Every registry metric in a trial's result, at the trial's own step. (What the trials'
    callback of a search begun before 2026-12-06 calls, by name, after --resume.)"""
    log_records(mlc, run_id, [result])


def log_records(mlc: Any, run_id: str, records: Sequence[dict[str, Any]]) -> None:
    """Every registry metric of ``records`` (one per step), in as few requests as MLflow takes
    (a report carries the steps since the last one)."""
    points = [m for record in records for m in metric_points(record)]
    for i in range(0, len(points), 1000):  # MLflow caps a batch at 1000 metrics
        mlc.log_batch(run_id, metrics=points[i : i + 1000])


def report_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A trial's report as its records, in step order: the earlier ones it carries
    (``REPLAYED``: its steps since the last report, a resumed trial's replay), then its own."""
    own = {k: v for k, v in report.items() if k != REPLAYED}
    return [*(report.get(REPLAYED) or []), own]


def trial_history(lines: Sequence[str]) -> list[dict[str, Any]]:
    """A trial's reports (Tune's ``result.json``, one JSON object per line), with the earlier
    records each carries (``REPLAYED``), as ``{step, timestamp, registry metrics}`` per step in
    step order; a step reported twice (a restart from an earlier checkpoint) keeps its latest."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            report = json.loads(line)
        except ValueError:  # empty, or cut short by a kill while Tune wrote it
            continue
        ts = report.get("timestamp", 0)
        # A report's earlier records: its steps since the last one, a resumed trial's replay.
        for record in report_records(report):
            if not isinstance(record.get("step"), int):
                continue
            kept = {k: v for k, v in record.items() if k in METRICS}
            by_step[record["step"]] = {"step": record["step"], "timestamp": ts, **kept}
    return [by_step[step] for step in sorted(by_step)]


def complete_trial_run(
    mlc: Any,
    *,
    exp_id: str,
    parent_id: str,
    run_id: str | None,
    trial_id: str,
    name: str,
    params: Callable[[], dict[str, str]],
    history: Sequence[dict[str, Any]],
    status: str,
    mlflow_status: str,
) -> tuple[str, int]:
    """Make a trial's MLflow run whole after its trial ended: the run (made if the trials'
    callback could not make it), its params, every metric point of ``history`` it lacks, its
    status. The callback writes these as the trial runs; a tracking server out of reach then
    leaves gaps, filled here (or by a later ``--resume``). Returns the run id and the number of
    points and fields written; writes nothing to a run that is whole."""
    written = 0
    if run_id is None:  # none known to the driver: one may be there all the same
        same = mlc.search_runs(
            [exp_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent_id}' and tags.raysft.trial_id = '{trial_id}'"
            ),
            max_results=1,
        )
        run_id = same[0].info.run_id if same else None
    if run_id is None:
        run_id = mlc.create_run(
            exp_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": parent_id,
                "raysft.kind": "trial",
                "raysft.trial_id": trial_id,
            },
        ).info.run_id
        written += 1
    run = mlc.get_run(run_id)
    missing_params = {k: v for k, v in params().items() if k not in run.data.params}
    if missing_params:
        log_params(mlc, run_id, missing_params)
        written += len(missing_params)
    keys = sorted({k for record in history for k in record if k in METRICS})
    have = {k: {int(m.step) for m in mlc.get_metric_history(run_id, k)} for k in keys}
    points = [m for record in history for m in metric_points(record) if m.step not in have[m.key]]
    for i in range(0, len(points), 1000):  # MLflow caps a batch at 1000 metrics
        mlc.log_batch(run_id, metrics=points[i : i + 1000])
    written += len(points)
    if run.data.tags.get(STATUS_TAG) != status:
        mlc.set_tag(run_id, STATUS_TAG, status)
        written += 1
    if run.info.status != mlflow_status:
        mlc.set_terminated(run_id, mlflow_status)
        written += 1
    return run_id, written


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


# In the experiment dir: each trial's end as the trials' callback saw it, one JSON line per end.
# MLflow's status tags say the same, but a tracking server out of reach when a trial ended would
# make a finished trial look torn down by Ctrl-C (``interrupt.interrupted_trials``).
ENDED_FILE = "trials_ended.jsonl"
# Beside it while some write of the trials' callback has failed and the finish has not made the
# trials' runs whole since (``finish.complete_trial_runs``): it then checks every trial's run,
# else only the runs with no end status.
GAPS_FILE = "mlflow_gaps"


def note_trial_end(path: Path, trial_id: str, status: str) -> None:
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"trial_id": trial_id, "status": status}) + "\n")
    except OSError as err:  # MLflow's tag is then the only record
        log.warning("could not note trial %s's end in %s: %s", trial_id, path, err)


def ended_trials(path: Path) -> dict[str, str]:
    """trial_id -> status of every trial end noted in ``path`` (the last one counts)."""
    if not path.is_file():
        return {}
    ended = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            ended[record["trial_id"]] = record["status"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    return ended
