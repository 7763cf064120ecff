"""Trials a killed driver leaves that its ``--resume`` cannot continue.

Tune saves the search's state (its trials, its searcher) at most once every 10 s, less often
under load (``TUNE_GLOBAL_CHECKPOINT_S``, "auto"). A driver killed with SIGKILL after Tune
started a trial, and raysft's callback opened its MLflow run, but before Tune saved its state
again leaves a trial that state never held. ``--resume`` restores that state: Tune cannot
continue the trial, and its searcher samples again in its place. The trial is lost, not
interrupted: before this module, its run stayed open and every later start ended as an
interrupted search (exit 130), for ever. Its run is closed (KILLED, ``raysft.status`` ``lost``),
its end noted in the experiment dir, and ``summary.json`` lists it apart from the ranked
trials; its checkpoints stay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raysft.search import redact, tracking
from raysft.search.notes import NOTE_TAG

log = logging.getLogger(__name__)

LOST = "lost"  # the raysft.status tag (and trials_ended.jsonl status) of a lost trial


def set_lost_apart(
    mlc: Any,
    known: dict[str, tuple[str | None, str | None]],
    run_ids: list[str | None],
    *,
    exp_dir: Path,
) -> tuple[dict[str, tuple[str | None, str | None]], list[dict[str, Any]]]:
    """``known`` (trial id -> (MLflow run, end status): ``interrupt.with_local_ends``) split
    into the trials of Tune's run (``run_ids``: its trials' ids) and the lost ones, as
    ``summary.json`` lists them. A lost trial's run still open is closed now. Nothing is set
    apart where a trial of Tune's run has no id to tell (None in ``run_ids``)."""
    if any(t is None for t in run_ids):
        return known, []
    in_run = set(run_ids)
    lost = {t: v for t, v in known.items() if t not in in_run}
    for trial_id, (run_id, status) in lost.items():
        if status in (None, LOST):  # open; or noted lost, its run perhaps not closed then
            _close(mlc, trial_id, run_id, exp_dir, noted=status == LOST)
    if lost:
        log.warning(
            "lost: %s, begun by an earlier start of this search just before its driver was "
            "killed, before Tune saved its state; Tune could not continue %s and sampled again "
            "in %s place (checkpoints kept under %s)",
            ", ".join(sorted(lost)), "it" if len(lost) == 1 else "them",
            "its" if len(lost) == 1 else "their", exp_dir / "train",
        )  # fmt: skip
    records = [
        {"trial_id": t, "mlflow_run_id": run_id, "status": status or LOST}
        for t, (run_id, status) in sorted(lost.items())
    ]
    return {t: v for t, v in known.items() if t in in_run}, records


def lost_note(exp_dir: Path, trial_id: str) -> str:
    """The lost trial's run description (the MLflow UI shows it on the run's page)."""
    return (
        "**Lost.** This trial began just before the search's driver was killed, before Ray "
        "Tune saved the search's state. `--resume` restored that state, which never held this "
        "trial: Tune could not continue it, and its searcher sampled again in its place. It is "
        f"not ranked. Its checkpoints are kept under `{exp_dir / 'train' / f'train-{trial_id}'}`."
    )


def _close(mlc: Any, trial_id: str, run_id: str | None, exp_dir: Path, *, noted: bool) -> None:
    """Note the trial lost beside the search (a later start then knows, MLflow or not) and
    close its run; MLflow's failures are said, and the next start tries again."""
    if not noted:
        tracking.note_trial_end(exp_dir / tracking.ENDED_FILE, trial_id, LOST)
    if not run_id:
        return
    try:
        mlc.set_tag(run_id, tracking.STATUS_TAG, LOST)
        mlc.set_tag(run_id, NOTE_TAG, lost_note(exp_dir, trial_id))
        mlc.set_terminated(run_id, "KILLED")
    except Exception as err:
        log.warning(
            "MLflow: could not mark lost trial %s's run %s KILLED (%s); the next --resume "
            "tries again",
            trial_id, run_id, redact.scrubbed(err),
        )  # fmt: skip
