"""What a search produced: trial status, trial rows, the best trial, the table and summary.json.

Pure (no Ray import): the driver hands in Tune's results as plain values. Trial status is defined
here once and judged by each trial's own resolved config, so a searched ``train.max_steps`` is
honoured; the MLflow callback uses the same classifier.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from raysft.errors import SearchStateError
from raysft.paths import replace_text
from raysft.train.metrics import METRICS

log = logging.getLogger(__name__)

# ray.tune.integration.ray_train's key for a trial's checkpoint in its reported metrics (a copy:
# this module imports no Ray; tests/unit/test_trial.py checks that the two agree).
CHECKPOINT_PATH_KEY = "checkpoint_path"

SUMMARY_FILE = "summary.json"


class TrialStatus(str, Enum):
    FINISHED = "finished"  # trained its own max_steps
    STOPPED_EARLY = "stopped_early"  # stopped by the scheduler (ASHA) before its last step
    FAILED = "failed"  # raised inside its worker
    DIVERGED = "diverged"  # reported a NaN/inf metric: stopped at once, never ranked

    @property
    def mlflow(self) -> str:
        """MLflow run status. An ASHA stop ended as the search meant it to: FINISHED (the UI
        draws KILLED as a failure), told apart by the ``raysft.status`` tag and the run's
        description (``notes.trial_note``); KILLED is left to interrupted runs. A diverged
        trial is FAILED, told apart by the tag too."""
        return {
            "finished": "FINISHED",
            "stopped_early": "FINISHED",
            "failed": "FAILED",
            "diverged": "FAILED",
        }[self.value]


def classify(
    *, last_step: int | None, max_steps: int, error: bool, diverged: bool = False
) -> TrialStatus:
    """The status of an ended trial from its last reported step and its own ``max_steps``.

    ``diverged``: some report held a non-finite metric (``is_diverged``). An error still wins:
    a trial that raised is failed whatever it reported before.
    """
    if error:
        return TrialStatus.FAILED
    if diverged:
        return TrialStatus.DIVERGED
    if last_step is not None and last_step >= max_steps:
        return TrialStatus.FINISHED
    return TrialStatus.STOPPED_EARLY


def is_diverged(result: Mapping[str, Any]) -> bool:
    """Whether one report holds a NaN or infinite value of a searchable metric.

    Every searchable metric counts, not only the objective: a NaN ``train_loss`` means NaN
    weights, so every later score of that trial (exact match included) is meaningless.
    """
    return any(
        name in result and _number(result[name]) and not math.isfinite(result[name])
        for name, metric in METRICS.items()
        if metric.searchable
    )


class DivergedStopper:
    """Tune stop condition: stop a trial at its first report with a non-finite metric.

    A plain callable ``(trial_id, result) -> bool`` (picklable, no Ray import): pass it as
    ``ray.tune.RunConfig(stop=DivergedStopper())``; Tune wraps it in its ``FunctionStopper``.
    ASHA alone never stops such a trial: NaN compares false with every rung's cutoff.
    """

    def __call__(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        return is_diverged(result)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_or_none(value: Any) -> float | None:
    """A metric value usable for ranking: a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts and lists) replaced by None.

    summary.json is strict JSON (``allow_nan=False``): sampled values and metrics pass here.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def trial_row(
    *,
    trial_id: str,
    metrics: dict[str, Any],
    sampled: dict[str, Any],
    max_steps: int,
    objective: str,
    error: str | None,
    mlflow_run_id: str | None,
    diverged: bool = False,
) -> dict[str, Any]:
    """One trial's line of summary.json: status, objective, every registry metric it reported.

    ``diverged``: an earlier report of the trial held a non-finite metric (its last one is
    checked here too). Every value is JSON-safe: a non-finite number becomes null.
    """
    status = classify(
        last_step=metrics.get("step"),
        max_steps=max_steps,
        error=error is not None,
        diverged=diverged or is_diverged(metrics),
    )
    return {
        "trial_id": trial_id,
        "status": status.value,
        "metric": finite_or_none(metrics.get(objective)),
        "step": json_safe(metrics.get("step")),
        "max_steps": max_steps,
        "exact_match": finite_or_none(metrics.get("exact_match")),
        "metrics": {
            k: v for k, v in metrics.items() if k in METRICS and finite_or_none(v) is not None
        },
        "sampled": json_safe(sampled),
        "checkpoint": metrics.get(CHECKPOINT_PATH_KEY),
        "mlflow_run_id": mlflow_run_id,
        "error": error,
    }


_RANK_GROUP = {TrialStatus.FINISHED.value: 0, TrialStatus.STOPPED_EARLY.value: 1}


def rank(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first, as promotion chooses (``pick_best``): finished trials by metric, then those
    ASHA stopped (they trained less), then failed and diverged ones (their last eval says
    nothing of a config that trains); within each, trials without a (finite) metric last, in
    their given order. So the first row of every table is the best trial, where one is."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(
        rows,
        key=lambda t: (
            _RANK_GROUP.get(t["status"], 2),
            t["metric"] is None,
            sign * (t["metric"] or 0.0),
        ),
    )


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Best finished trial of ranked ``rows``; ASHA-stopped ones trained less, so they come next."""
    for wanted in (TrialStatus.FINISHED.value, TrialStatus.STOPPED_EARLY.value):
        for row in rows:
            metric = finite_or_none(row["metric"])
            if row["status"] == wanted and metric is not None and row["checkpoint"]:
                return row
    return None


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {s.value: sum(r["status"] == s.value for r in rows) for s in TrialStatus}


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """The trials as an aligned text table, in the order given."""
    keys = sorted({k for r in rows for k in r["sampled"]})
    head = ["trial", "status", "step", metric, "exact_match", *keys]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r["trial_id"],
                r["status"],
                _fmt(r["step"]),
                _fmt(r["metric"]),
                _fmt(r["exact_match"]),
                *[_fmt(r["sampled"].get(k)) for k in keys],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def read_summary(
    exp_dir: Path, *, sections: tuple[str, ...] = (), objects: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """EXP_DIR/summary.json, None when there is none; a file that is not JSON, not an object,
    lacks one of ``sections`` (each an object) or holds one of ``objects`` that is neither an
    object nor null is one SearchStateError."""
    path = exp_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not text (UnicodeDecodeError)
        raise SearchStateError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(summary, dict):
        raise SearchStateError(f"{path}: not a raysft summary (not a JSON object)")
    # Only what is wrong: "no mlflow section", not every section asked for.
    absent = [k for k in sections if k not in summary]
    not_objects = [k for k in sections if k in summary and not isinstance(summary[k], dict)]
    not_objects += [
        k for k in objects
        if k not in sections and summary.get(k) is not None and not isinstance(summary[k], dict)
    ]  # fmt: skip
    why = [f"no {' and '.join(absent)} section{'s' * (len(absent) > 1)}"] if absent else []
    why += [f"{k} is not a JSON object" for k in not_objects]
    if why:
        raise SearchStateError(f"{path}: not a raysft summary ({'; '.join(why)})")
    return summary


def write_summary(exp_dir: Path, summary: dict[str, Any]) -> Path:
    """summary.json as strict JSON (a NaN anywhere is a bug, not a number to write)."""
    path = exp_dir / SUMMARY_FILE
    replace_text(path, json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False))
    return path


# ---------------------------------------------------------------- a failed trial's cause

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# ``pkg.mod.SomeError: message`` (or a bare ``SomeError``): the last line of a traceback.
_EXC_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure))(?::\s?(.*))?$"
)
# Ray's own wrappers around the exception a trial's code raised.
_WRAPPERS = {
    "RayTaskError",
    "RayActorError",
    "TuneError",
    "RayTrainError",
    "TrainingFailedError",
    "WorkerGroupError",
    "ControllerError",
}
_NOISE = re.compile(r"^(ray::\S.*\(pid=.*|\[Rank [\d,]+ Error Snippet\]:|Traceback \(most.*)$")
MAX_CAUSE_CHARS = 500


def error_cause(error: BaseException | str) -> str:
    """A failed trial's root cause, ``ExceptionType: message``, from Ray's wrapped error.

    Tune reports a trial's error as ``ray::ImplicitFunc.train() (pid=.., ip=..)`` followed by
    the traceback of Ray Train's ``WorkerGroupError``, which holds the worker's own traceback:
    the cause is the last ``SomethingError: message`` line that is not one of Ray's wrappers.
    When a worker died without raising (killed, out of host memory) there is no such line:
    the wrapper's type and the first lines of its text are the cause.
    """
    text = _ANSI.sub("", error if isinstance(error, str) else _exception_text(error))
    lines = [line.strip() for line in text.splitlines()]
    found, wrapper = None, None
    for i, line in enumerate(lines):
        m = _EXC_LINE.match(line)
        if m is None:
            continue
        if m[1] in _WRAPPERS:
            wrapper = (m[1], i)
        else:
            found = f"{m[1]}: {m[2]}" if m[2] else m[1]
    if found is None and wrapper is not None:
        name, at = wrapper
        rest = [ln for ln in lines[at + 1 :] if ln and not _NOISE.match(ln)]
        found = f"{name}: {' '.join(rest[:2])}" if rest else lines[at]
    if found is None:
        meaningful = [ln for ln in lines if ln and not _NOISE.match(ln)]
        found = meaningful[-1] if meaningful else (lines[0] if lines else "")
    return found[:MAX_CAUSE_CHARS]


def _exception_text(error: BaseException) -> str:
    """``Type: message``; a ``RayTaskError(Cause)``'s str is already the remote traceback."""
    name = type(error).__name__
    return str(error) if "(" in name else f"{name}: {error}"


def drop_untracked_checkpoints(exp_dir: Path, keep: set[str]) -> list[Path]:
    """Delete the checkpoints Ray Train wrote but no longer tracks, and return them.

    A run interrupted (Ctrl-C, a killed driver or worker) after a checkpoint was uploaded but
    before Train's snapshot of its checkpoints (``checkpoint_manager_snapshot.json``) named it
    leaves that one behind: the restarted run resumes from the snapshot's latest, and Train
    never deletes it (``num_to_keep`` counts tracked checkpoints only), so every interruption
    would keep one more copy of the model on disk for good. Called once every trial ended;
    ``keep``: resolved paths a trial's row names. A snapshot it cannot read deletes nothing."""
    dropped = []
    for run_dir in sorted((exp_dir / "train").glob("train-*")):
        try:
            snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
            tracked = {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}
            tracked.add((snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not there, or a layout this Ray version does not write
        for ckpt in sorted(run_dir.glob("checkpoint_*")):
            if ckpt.is_dir() and ckpt.name not in tracked and str(ckpt.resolve()) not in keep:
                try:
                    shutil.rmtree(ckpt)
                except OSError as err:  # a file still open on NFS: disk, never the search
                    log.warning("could not delete untracked checkpoint %s: %s", ckpt, err)
                    continue
                dropped.append(ckpt)
    if dropped:
        log.info(
            "deleted %d checkpoint(s) of interrupted runs that Ray Train no longer tracks: %s",
            len(dropped), ", ".join(str(p) for p in dropped),
        )  # fmt: skip
    return dropped
