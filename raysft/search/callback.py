"""The Tune callback that mirrors every trial into a nested MLflow run while the trials run
(``make_callback``). What it could not write is noted (``tracking_requests.note_callback_failure``,
and ``tracking.GAPS_FILE`` in the experiment dir) and written at the search's finish.

Tune pickles the callback with the search's state and drives that copy after ``--resume``: its
records of what failed therefore live in module-level functions of ``tracking_requests``, which a
pickled copy reaches by reference.

Imports Ray: the driver imports this module only once the search starts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raysft.search.notes import trial_run_name
from raysft.search.redact import scrubbed
from raysft.search.results import classify, is_diverged
from raysft.search.tracking import (
    GAPS_FILE,
    STATUS_TAG,
    TrialResolver,
    log_params,
    log_records,
    note_trial_end,
    report_records,
    trial_params,
    trial_runs,
)
from raysft.search.tracking_requests import (
    QUIET_S,
    callback_requests,
    note_callback_failure,
    out_of_reach,
)

log = logging.getLogger(__name__)


def make_callback(
    mlc: Any,
    *,
    exp_id: str,
    parent_id: str,
    resolve_trial: TrialResolver,
    order: Sequence[str] = (),
    ended_file: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> MlflowTrials:
    """A Tune callback that mirrors every trial into a nested MLflow run.

    ``resolve_trial`` gives each trial's own config: its params (output_dir included) and the
    ``max_steps`` its status is judged by. Runs are named by their sampled values, in ``order``.
    ``clock`` times the quiet periods after the tracking server is found out of reach.
    """
    return MlflowTrials(
        mlc, exp_id=exp_id, parent_id=parent_id, resolve_trial=resolve_trial, order=order,
        ended_file=ended_file, clock=clock,
    )  # fmt: skip


class MlflowTrials(Callback):
    """A Tune callback that mirrors every trial into a nested MLflow run (``make_callback``)."""

    def __init__(
        self,
        mlc: Any,
        *,
        exp_id: str,
        parent_id: str,
        resolve_trial: TrialResolver,
        order: Sequence[str],
        ended_file: Path | None,
        clock: Callable[[], float],
    ) -> None:
        self.mlc, self.exp_id, self.parent_id = mlc, exp_id, parent_id
        self.resolve_trial, self.order = resolve_trial, order
        self.ended_file, self.clock = ended_file, clock
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.status: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.diverged: set[str] = set()  # trials that reported a non-finite metric
        self.logged_step: dict[str, int] = {}  # trial_id -> last step logged to MLflow
        # While the tracking server is out of reach: how long MLflow is left alone, and
        # until when (``clock``); set again by each start (setup).
        self.quiet_s = self.quiet_until = 0.0
        self.picked_up = True  # the trial runs of earlier starts are known
        self.unstarted: set[str] = set()  # trials whose run was not made or reopened yet

    def _mlflow(self, what: str, call: Callable[[], Any]) -> bool:
        """One MLflow step of the callback. A failure (a tracking server out of reach past
        MLflow's own retries) is logged and noted (``note_callback_failure``), and the search
        goes on: raised from a callback, Tune would end every running trial. A server out
        of reach is left alone for a while (``QUIET_S``): every trial's report waits for
        this loop, and a server that never answers would hold each one up to a timeout.
        What is not written then is written at the finish, as failed writes are. Returns
        False when the write is left for later (MLflow left alone, or out of reach)."""
        if self.quiet():
            again = time.localtime(time.time() + self.quiet_until - self.clock())
            note_callback_failure(
                f"MLflow: {what}: not tried (the tracking server was out of reach; asked "
                f"again from {time.strftime('%H:%M:%S', again)})"
            )
            self._note_gap()
            return False
        try:
            with callback_requests():
                call()
        except Exception as err:
            reason = scrubbed(err)
            note_callback_failure(f"MLflow: {what}: {reason}")
            self._note_gap()
            if not out_of_reach(err):  # it answered: the next failure waits from the start
                self.quiet_s = 0.0
                log.warning("MLflow: %s failed (%s); the trials go on", what, reason)
                return True
            wait = min(2 * self.quiet_s, QUIET_S[1]) or QUIET_S[0]
            self.quiet_s, self.quiet_until = wait, self.clock() + wait
            log.warning(
                "MLflow: %s failed (%s); the trials go on, and MLflow is left alone for "
                "%.0f s (what goes unwritten is written at the search's finish)",
                what, reason, wait,
            )  # fmt: skip
            return False
        else:
            self.quiet_s = 0.0
        return True

    def quiet(self) -> bool:
        """Whether MLflow is being left alone now (the server was found out of reach)."""
        return self.clock() < self.quiet_until

    def _note_gap(self) -> None:
        if self.ended_file is not None:
            with contextlib.suppress(OSError):
                (self.ended_file.parent / GAPS_FILE).touch()

    def setup(self, *args: Any, **info: Any) -> None:
        # A start of the search (--resume included: a wait timed by another start's clock
        # means nothing here).
        self.quiet_s = self.quiet_until = 0.0
        self.picked_up = False
        self.unstarted = set()
        self._mlflow("reading the search's trial runs", self._pick_up)

    def _pick_up(self) -> None:
        # --resume restores the copy of this callback pickled when the search began: pick
        # up the trial runs created since, so resumed trials keep their run, and the last
        # step each logged, so a report repeated after a restart is not logged twice.
        for trial_id, (run_id, status) in trial_runs(self.mlc, self.exp_id, self.parent_id).items():
            self.runs.setdefault(trial_id, run_id)
            if status:
                self.status.setdefault(trial_id, status)
            history = self.mlc.get_metric_history(run_id, "train_loss")
            if history:
                self.logged_step[trial_id] = max(m.step for m in history)
        self.picked_up = True

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)

    def _start(self, trial: Any) -> None:
        """Make or reopen a trial's run; when that is left for later (the server out of
        reach), again at a later report of the trial (``unstarted``), so the trial is
        followed live once the server is back."""
        tid = trial.trial_id
        if tid in self.runs:  # restarted after --resume
            run_id = self.runs[tid]  # KILLED if it was stopped
            done = self._mlflow(f"reopening trial {tid}'s run", lambda: self._reopen(run_id))
        else:
            done = self._mlflow(f"creating trial {tid}'s run", lambda: self._create(trial))
        if done:
            self.unstarted.discard(tid)
        else:
            self.unstarted.add(tid)

    def _create(self, trial: Any) -> None:
        if not self.picked_up:  # the search's start could not read the runs of earlier ones
            try:
                self._pick_up()
            except Exception as err:
                if out_of_reach(err):
                    raise
                self.picked_up = True  # refused, not away: make the run as before
            if trial.trial_id in self.runs:  # a resumed trial's run: not made twice
                self._reopen(self.runs[trial.trial_id])
                return
        run = self.mlc.create_run(
            self.exp_id,
            run_name=trial_run_name(dict(trial.config), self.order, trial.trial_id),
            tags={
                "mlflow.parentRunId": self.parent_id,
                "raysft.kind": "trial",
                "raysft.trial_id": trial.trial_id,
            },
        )
        self.runs[trial.trial_id] = run.info.run_id
        params = trial_params(self.resolve_trial, trial.trial_id, dict(trial.config))
        log_params(self.mlc, run.info.run_id, params)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        *earlier, result = report_records(result)
        self.last[trial.trial_id] = result
        if is_diverged(result):
            self.diverged.add(trial.trial_id)
        if trial.trial_id in self.unstarted and not self.quiet():
            self._start(trial)  # its start came while MLflow was left alone
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:  # its run could not be created
            return
        ts = result.get("timestamp", 0)
        # The report's earlier records first: its steps since the last report, or a resumed
        # trial's replay. A step logged before (a restart from an earlier checkpoint) is not
        # logged again.
        done = self.logged_step.get(trial.trial_id, 0)
        new = [
            {**record, "timestamp": ts}
            for record in [*earlier, result]
            if int(record.get("step", 0)) > done
        ]
        if not new:
            return
        first, last = int(new[0].get("step", 0)), int(new[-1].get("step", 0))
        self.logged_step[trial.trial_id] = last
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        self._mlflow(
            f"trial {trial.trial_id}'s metrics at {steps}",
            functools.partial(log_records, self.mlc, run_id, new),
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, error=True)

    def _end(self, trial: Any, *, error: bool) -> None:
        max_steps = self.resolve_trial(trial.trial_id, dict(trial.config)).train.max_steps
        last = self.last.get(trial.trial_id, {}).get("step")
        diverged = trial.trial_id in self.diverged
        status = classify(last_step=last, max_steps=max_steps, error=error, diverged=diverged)
        self.status[trial.trial_id] = status.value
        if self.ended_file is not None:
            note_trial_end(self.ended_file, trial.trial_id, status.value)
        run_id = self.runs.get(trial.trial_id)
        if run_id:
            self._mlflow(
                f"closing trial {trial.trial_id}'s run",
                lambda: self._close(run_id, status.value, status.mlflow),
            )

    def _reopen(self, run_id: str) -> None:
        self.mlc.update_run(run_id, status="RUNNING")

    def _close(self, run_id: str, status: str, mlflow_status: str) -> None:
        self.mlc.set_tag(run_id, STATUS_TAG, status)
        self.mlc.set_terminated(run_id, mlflow_status)
