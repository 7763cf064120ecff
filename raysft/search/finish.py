"""What follows a search's trials: their rows ranked, their MLflow runs made whole, the best
metric and adapter logged, base vs tuned, plots, promotion, and summary.json, the parent run
closed last (``finish_search``).

Every step that reports on the search rather than decides it runs through ``FinishSteps``: one
that fails is recorded in summary.json's ``failed_steps`` and the rest goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from raysft.config import SearchSpec
from raysft.search import compare, notes, plots, redact, tracking
from raysft.search import results as res
from raysft.search.experiment import recorded_digests
from raysft.search.finish_steps import FinishSteps
from raysft.search.promote import promote
from raysft.search.space import TrialConfigs
from raysft.train.metrics import objective_mode

log = logging.getLogger(__name__)


def _outcome_tags(row: dict[str, Any]) -> dict[str, str]:
    """A trial run's failures as MLflow tags: the cause, and every failed attempt (retried or
    not); none for a trial that ended without one, or without a run."""
    tags = {}
    if row["mlflow_run_id"] and row["error"]:
        tags["raysft.error"] = row["error"][:5000]
    if row["mlflow_run_id"] and row["attempts"]:
        tags["raysft.retries"] = str(sum(a["retried"] for a in row["attempts"]))
        tags["raysft.attempts"] = json.dumps(row["attempts"])[:5000]
    return tags


def _tag_outcome(mlc: Any, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    mlc.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])  # one request


def check_checkpoint(row: dict[str, Any]) -> None:
    """A row names no checkpoint that is gone. Train keeps a trial's 2 newest; a stopped trial
    whose worker got 2 checkpoints past the report ASHA stopped it on has lost that one."""
    path = row["checkpoint"]
    if path and not Path(path).is_dir():
        log.warning(
            "trial %s: its checkpoint at step %s was replaced by later ones Tune never read "
            "(the trial was stopped meanwhile): %s",
            row["trial_id"], row["step"], path,
        )  # fmt: skip
        row["checkpoint"] = None


def _rows(
    results: list[dict[str, Any]],
    cfg: SearchSpec,
    *,
    tracked: dict[str, Any],
    resolve: TrialConfigs,
) -> list[dict[str, Any]]:
    """summary.json's trial rows, ranked."""
    s = cfg.search
    rows = []
    for r in results:
        row = res.trial_row(
            trial_id=r["trial_id"],
            metrics=r["metrics"],
            sampled=r["sampled"],
            max_steps=resolve(r["trial_id"], r["sampled"]).train.max_steps,
            objective=s.metric,
            error=r["error"],
            mlflow_run_id=tracked["runs"].get(r["trial_id"]),
            diverged=r["trial_id"] in tracked["diverged"],
        )
        row["attempts"] = r["attempts"]  # failed attempts: cause, and whether it was retried
        row["number"] = r.get("number")  # creation order (the plots' trial number)
        check_checkpoint(row)
        rows.append(row)
    return res.rank(rows, objective_mode(s.metric, s.mode))


def complete_trial_runs(
    cfg: SearchSpec,
    exp_dir: Path,
    rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    tracked: dict[str, Any],
    resolve: TrialConfigs,
) -> int:
    """The trials' MLflow runs made whole from the trials' own reports
    (``tracking.complete_trial_run``), run ids set on their rows; the number of fields written.
    Every run is checked where a write of the trials' callback failed (this start, or an
    earlier one: ``tracking.GAPS_FILE``), else only the runs with no end status (cheap: a
    search whose callback wrote everything asks MLflow nothing more). Raises on the first
    failure (MLflow still out of reach): the rest would fail alike."""
    history = {r["trial_id"]: r.get("history") for r in results}
    order = list(cfg.search.params)
    gaps = exp_dir / tracking.GAPS_FILE
    every = bool(tracked.get("tracking_failures")) or gaps.exists()
    statuses = tracked.get("statuses", {})
    written, unread = 0, []
    for row in rows:
        tid, sampled = row["trial_id"], row["sampled"]
        if not every and row["mlflow_run_id"] and statuses.get(tid):
            continue
        if history.get(tid) is None:
            unread.append(tid)
        status = res.TrialStatus(row["status"])
        row["mlflow_run_id"], n = tracking.complete_trial_run(
            tracked["mlc"],
            exp_id=tracked["exp_id"],
            parent_id=tracked["parent_id"],
            run_id=row["mlflow_run_id"],
            trial_id=tid,
            name=notes.trial_run_name(sampled, order, tid),
            params=functools.partial(tracking.trial_params, resolve, tid, sampled),
            history=history.get(tid) or [],
            status=status.value,
            mlflow_status=status.mlflow,
        )
        tracked["runs"][tid] = row["mlflow_run_id"]
        written += n
    if unread:  # their runs may still lack metric points: not whole, so not said to be
        raise RuntimeError(
            f"the reports of trial(s) {', '.join(unread)} could not be read from Tune's "
            "result.json: their MLflow runs may lack metric points"
        )
    gaps.unlink(missing_ok=True)
    return written


def _eval_curves(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """trial_id -> [{step, eval_loss}] in step order, as ``plots.histories_from_mlflow`` gives
    them, for the trials whose reports were read (``tune_results._history_of``)."""
    return {
        r["trial_id"]: [
            {"step": h["step"], "eval_loss": h["eval_loss"]}
            for h in r["history"]
            if "eval_loss" in h
        ]
        for r in results
        if r.get("history") is not None
    }


def _log_best_adapter(mlc: Any, run_id: str, checkpoint: str) -> None:
    """The best checkpoint as the parent run's ``best_adapter`` artifact, without its training
    state (``serving_files``)."""
    from raysft.train.state import CONFIG_FILE, serving_files

    for item in serving_files(checkpoint):
        if item.is_dir():
            mlc.log_artifacts(run_id, str(item), artifact_path=f"best_adapter/{item.name}")
        elif item.name == CONFIG_FILE:
            # Written redacted since 2026-12-07; an older checkpoint's may hold a password.
            with tempfile.TemporaryDirectory() as tmp:
                clean = Path(tmp) / CONFIG_FILE
                tree = yaml.safe_load(item.read_text(encoding="utf-8"))
                clean.write_text(
                    yaml.safe_dump(redact.redact_tree(tree), sort_keys=False, allow_unicode=True),
                    encoding="utf-8",
                )
                mlc.log_artifact(run_id, str(clean), artifact_path="best_adapter")
        else:
            mlc.log_artifact(run_id, str(item), artifact_path="best_adapter")


def finish_search(
    spec_path: str,
    cfg: SearchSpec,
    exp_dir: Path,
    results: list[dict[str, Any]],
    *,
    tracked: dict[str, Any],
    resolve: TrialConfigs,
    t0: float,
    resolved_spec: dict[str, Any],
    earlier_starts: tuple[int, float] = (0, 0.0),
) -> dict[str, Any]:
    """Rows, the best trial, promotion, plots, summary.json; the parent run is closed last.
    Only ranking and writing the summary may raise (``FinishSteps`` for the rest).

    ``t0``: when this start began (``time.perf_counter``); ``resolved_spec``: the spec as
    raysft_state.json keeps it; ``earlier_starts``: (count, seconds) of the search's starts
    before this one."""
    t_finish = time.perf_counter()
    mlc, parent_id = tracked["mlc"], tracked["parent_id"]
    steps = FinishSteps(tracked.get("unreachable"))  # the read of the trial runs just before
    rows = _rows(results, cfg, tracked=tracked, resolve=resolve)
    best = res.pick_best(rows)
    _make_trial_runs_whole(
        steps, cfg, exp_dir, rows, results, tracked=tracked, resolve=resolve, best=best
    )
    res.drop_untracked_checkpoints(
        exp_dir, {str(Path(r["checkpoint"]).resolve()) for r in rows if r["checkpoint"]}
    )
    if best:
        value = float(best["metric"])
        steps.mlflow(
            "MLflow: the best metric", mlc.log_metric, parent_id, f"best_{cfg.search.metric}", value
        )
        steps.upload(
            "MLflow: the best adapter", _log_best_adapter, mlc, parent_id, best["checkpoint"]
        )
    # Base vs tuned scores on the cluster while the driver draws; promotion waits for it: a
    # best trial that does not beat the base model is not promoted.
    scores = best_cfg = None
    if best and cfg.train.eval_base:
        best_cfg = resolve(best["trial_id"], best["sampled"])
        scores = steps.run("base vs tuned", compare.start, cfg, best_cfg, best["checkpoint"])
    drawn = _plots(steps, cfg, exp_dir, rows, results, tracked)
    comparison = None
    if scores is not None and best:
        comparison = _base_vs_tuned(steps, scores, best_cfg, best, exp_dir, tracked)
    promotion = _promotion(steps, cfg, best, exp_dir, comparison, tracked)
    summary = {
        "spec": spec_path,
        "experiment_dir": str(exp_dir),
        "metric": cfg.search.metric,
        "mode": cfg.search.mode,
        "best": best,
        "trials": rows,
        "counts": res.counts(rows),
        # Begun just before an earlier start's driver was killed, unknown to Tune's saved
        # state, so never continued nor ranked (``lost_trials``).
        "lost_trials": tracked.get("lost", []),
        "mlflow": {
            "tracking_uri": redact.redact("tracking_uri", tracked["uri"]),
            "experiment": cfg.tracking.experiment,
            "experiment_id": tracked["exp_id"],
            "parent_run_id": parent_id,
        },
        "promotion": promotion,
        "base_vs_tuned": res.json_safe(comparison),
        "plots": [str(p) for p in drawn],
        "wall_seconds": round(time.perf_counter() - t0, 1),  # this start's
        # With the earlier starts of a resumed search (each counted when it ended).
        "starts": earlier_starts[0] + 1,
        "wall_seconds_all_starts": round(earlier_starts[1] + time.perf_counter() - t0, 1),
        # Where the driver's wall time went (the trials' own split: their setup_s, step_s, ...).
        "timing": {
            **{k: round(v, 2) for k, v in tracked["timing"].items()},
            "finish_s": round(time.perf_counter() - t_finish, 2),
        },
        "resolved_spec": resolved_spec,
        # What the spec's relative paths are relative to: raysft.promote reads them from here.
        "working_dir": os.getcwd(),
        "failed_steps": steps.failures,
    }
    _write_summary(steps, exp_dir, summary, tracked)
    return summary


def _make_trial_runs_whole(
    steps: FinishSteps,
    cfg: SearchSpec,
    exp_dir: Path,
    rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    tracked: dict[str, Any],
    resolve: TrialConfigs,
    best: dict[str, Any] | None,
) -> None:
    """What the trials' callback could not write to MLflow while they ran (callback.py) is
    written now, from the trials' own reports; its failures stay failures only if that fails
    too. Then each trial run gets its description (how it ended) and its failures as tags."""
    missed = list(tracked.get("tracking_failures", ()))
    written = steps.mlflow(
        "MLflow: the trials' runs",
        complete_trial_runs, cfg, exp_dir, rows, results, tracked=tracked, resolve=resolve,
    )  # fmt: skip
    if written is None:
        steps.failures[:0] = missed
    elif written:
        log.info(
            "MLflow: the trials' runs lacked %d fields (a tracking server out of reach while "
            "they ran): written now",
            written,
        )
    best_id = (best or {}).get("trial_id")
    for row in rows:
        if not row["mlflow_run_id"]:
            continue
        note = notes.trial_note(
            row,
            metric=cfg.search.metric,
            scheduler=cfg.search.scheduler.type.upper(),
            best=row["trial_id"] == best_id,
        )
        tags = {notes.NOTE_TAG: note, **_outcome_tags(row)}
        what = f"MLflow tags of trial {row['trial_id']}"
        steps.mlflow(what, _tag_outcome, tracked["mlc"], row["mlflow_run_id"], tags)


def _plots(
    steps: FinishSteps,
    cfg: SearchSpec,
    exp_dir: Path,
    rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    tracked: dict[str, Any],
) -> list[Path]:
    """The search's plots, drawn in the experiment dir and logged to the parent run; the eval
    curves from the trials' own reports, else from MLflow's copy. The files drawn."""
    mlc = tracked["mlc"]
    histories = _eval_curves(results)
    unread = {t: run for t, run in tracked["runs"].items() if t not in histories and run}
    if unread:
        from_mlflow = steps.mlflow(
            "MLflow: the trials' eval curves",
            plots.histories_from_mlflow, mlc, unread, "eval_loss",
        )  # fmt: skip
        histories.update(from_mlflow or {})
    drawn = steps.run("plots", plots.write_plots, exp_dir, cfg, rows, histories or {}) or []
    steps.upload("MLflow: the plots", plots.log_plots, mlc, tracked["parent_id"], drawn)
    return drawn


def _base_vs_tuned(
    steps: FinishSteps,
    scores: Any,
    best_cfg: Any,
    best: dict[str, Any],
    exp_dir: Path,
    tracked: dict[str, Any],
) -> dict[str, Any] | None:
    """The base vs tuned scoring collected (``compare.start`` began it), written and logged; a
    failed one is a failed step and a tag on the parent run."""
    mlc, parent_id = tracked["mlc"], tracked["parent_id"]
    comparison = steps.run(
        "base vs tuned", compare.collect, scores, best_cfg, best["checkpoint"], exp_dir
    )
    if comparison and comparison.get("failed"):
        steps.failures.append(f"base vs tuned: {comparison['reason']}")
        failed_tag = f"failed: {comparison['reason']}"[:5000]
        steps.mlflow(
            "MLflow: the base vs tuned tag",
            mlc.set_tag, parent_id, "raysft.base_vs_tuned", failed_tag,
        )  # fmt: skip
    elif comparison:
        steps.upload(
            "MLflow: base vs tuned",
            compare.log_comparison, mlc, parent_id, exp_dir, comparison,
        )  # fmt: skip
    return comparison


def _promotion(
    steps: FinishSteps,
    cfg: SearchSpec,
    best: dict[str, Any] | None,
    exp_dir: Path,
    comparison: dict[str, Any] | None,
    tracked: dict[str, Any],
) -> dict[str, Any]:
    """The best trial promoted (``promote``: its gates, the registry, the export) and the
    outcome tagged on the parent run; the promotion record."""
    mlc, parent_id = tracked["mlc"], tracked["parent_id"]
    promotion = steps.run(
        "promotion",
        promote, mlc=mlc, cfg=cfg, best=best, exp_dir=exp_dir,
        base_value=compare.base_value(comparison, cfg.search.metric),
        unreachable=steps.unreachable, recorded=recorded_digests(exp_dir),
    )  # fmt: skip
    if promotion is None:  # promote records its own failures; this one escaped it
        reason = steps.failures[-1].split(": ", 1)[1]
        promotion = {"promoted": False, "failed": True, "reason": reason}
    elif promotion.get("failed"):
        steps.failures.append(f"promotion: {promotion['reason']}")
        if promotion.get("out_of_reach"):  # the registry is the tracking server
            steps.found_out_of_reach("promotion")
    if comparison is not None and comparison.get("failed") and promotion.get("promoted"):
        # Promoted without the gate against the base model: said, not left to be assumed.
        promotion["base_gate"] = f"not checked: base vs tuned failed ({comparison['reason']})"
        log.warning("promotion: %s", promotion["base_gate"])
    steps.mlflow(
        "MLflow: the promotion tag",
        mlc.set_tag, parent_id, tracking.PROMOTION_TAG, json.dumps(promotion)[:5000],
    )  # fmt: skip
    return promotion


def _write_summary(
    steps: FinishSteps, exp_dir: Path, summary: dict[str, Any], tracked: dict[str, Any]
) -> None:
    """The parent run's description, summary.json written and logged, the parent run closed.
    Failures after the write are added to it, and it is written again."""
    mlc, parent_id = tracked["mlc"], tracked["parent_id"]
    steps.mlflow("MLflow: the parent run's description", notes.describe_parent, mlc, parent_id,
                 summary)  # fmt: skip
    path = res.write_summary(exp_dir, summary)
    closing = FinishSteps(steps.unreachable)
    closing.upload("MLflow: summary.json", mlc.log_artifact, parent_id, str(path))
    closing.mlflow("MLflow: closing the parent run", mlc.set_terminated, parent_id, "FINISHED")
    if closing.failures:
        steps.failures.extend(closing.failures)
        res.write_summary(exp_dir, summary)
