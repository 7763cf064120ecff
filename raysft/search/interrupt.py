"""How a search's trials ended, and a search stopped short: the trial runs and ends known after
``fit``, the trials an interrupted search left open (their runs and the parent KILLED, ``--resume``
said), and SIGTERM/SIGHUP taken as Ctrl-C."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysft.config import SearchSpec
from raysft.search import redact, tracking, tracking_requests

log = logging.getLogger(__name__)


def known_trial_runs(
    mlc: Any, exp_id: str, parent_id: str, callback: Any, failures: list[str]
) -> tuple[dict[str, tuple[str | None, str | None]], str | None]:
    """trial_id -> (run id, status tag) of the search's trial runs just after its trials, and
    the step that found the tracking server out of reach (the finish then does not ask
    again, and the process asks once from then on), if it did. MLflow is asked: after
    --resume, Tune drives its restored copy of the callback, not ``callback``, so the trial
    runs of earlier starts are only known to MLflow.
    Where it cannot answer, the callback's record stands in and the failure joins
    ``failures``."""
    try:
        return dict(tracking.trial_runs(mlc, exp_id, parent_id)), None
    except Exception as err:
        reason = redact.scrubbed(err)
        log.warning("MLflow: could not read the search's trial runs (%s)", reason)
        failures.append(f"MLflow: reading the search's trial runs: {reason}")
        known = {t: (r, callback.status.get(t)) for t, r in callback.runs.items()}
        if not tracking_requests.out_of_reach(err):
            return known, None
        # Out of reach: what follows asks once (closing a Ctrl-C'd search's runs, one request
        # per open run and the parent, took the driver's 3 retries of 30 s each).
        tracking_requests.ask_once_from_now()
        return known, "MLflow: reading the search's trial runs"


def stop_if_interrupted(
    grid: Any,
    known: dict[str, tuple[str | None, str | None]],
    mlc: Any,
    parent_id: str,
    *,
    exp_dir: Path,
    cfg: SearchSpec,
) -> None:
    """Raises KeyboardInterrupt, the open runs marked KILLED, where a trial did not end (a
    Ctrl-C during ``fit``: ``interrupted_trials``)."""
    # Trials Tune created but never started (pending when Ctrl-C came) have no run at all.
    never_started = len(grid) - grid.num_terminated - grid.num_errors
    unended = interrupted_trials(
        known,
        created=len(grid),
        num_samples=cfg.search.num_samples,
        never_started=never_started,
    )
    if unended is not None:
        stop_interrupted(
            mlc, parent_id, known, unended, exp_dir=exp_dir, num_samples=cfg.search.num_samples
        )


def close_parent(mlc: Any, run_id: str, status: str) -> None:
    """Mark the parent run (or an open trial run) ended, as a search that did not finish; a
    tracking server out of reach is said, and the error that ended the search stays the one
    raised."""
    try:
        mlc.set_terminated(run_id, status)
    except Exception as err:
        log.warning("MLflow: could not mark run %s %s (%s)", run_id, status, redact.scrubbed(err))


def close_open_trial_runs(mlc: Any, callback: Any, status: str) -> None:
    """Mark ``status`` the trial runs ``callback`` (``MlflowTrials``) opened and never closed,
    where Tune's run of the trials ended without ending them (it raised). A run of an earlier
    start whose trial had ended stays as it is."""
    for trial_id, run_id in getattr(callback, "runs", {}).items():
        if trial_id in getattr(callback, "status", {}):
            continue  # closed by the callback
        try:
            open_now = mlc.get_run(run_id).info.status == "RUNNING"
        except Exception as err:
            log.warning("MLflow: could not read run %s (%s)", run_id, redact.scrubbed(err))
            continue
        if open_now:
            close_parent(mlc, run_id, status)


def stops_as_ctrl_c() -> dict[int, Any]:
    """SIGTERM (``kill``, ``docker stop``, Slurm, ``ray job stop``) and SIGHUP (a closed
    terminal) end the search as Ctrl-C does: its trials stopped, their runs KILLED, and
    ``--resume`` said. Ray's driver aborts on them otherwise (glog's handler, which
    ``ray.init`` installs: a C++ stack dump, exit 134), leaving the MLflow runs RUNNING.
    Returns the handlers replaced; none outside the main thread (signals are its alone)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            before = signal.signal(sig, lambda *_: signal.raise_signal(signal.SIGINT))
            replaced[sig] = before if before is not None else signal.SIG_DFL
    return replaced


@contextlib.contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Tune's ``fit`` installs a SIGINT (and SIGUSR1) handler that ends the trials and lets
    ``fit`` return, and leaves it in place when no signal came: after ``fit``, Ctrl-C would
    only log "ending Ray Tune run" while ranking, scoring and promotion went on to exit 0.
    The handlers from before ``fit`` are put back (signals are the main thread's alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    before = {sig: signal.getsignal(sig) for sig in names}
    try:
        yield
    finally:
        for sig, handler in before.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, handler)


def with_local_ends(
    known: dict[str, tuple[str | None, str | None]], exp_dir: Path, trial_ids: list[Any]
) -> dict[str, tuple[str | None, str | None]]:
    """MLflow's trial runs and end statuses, completed by the ends the trials' callback noted in
    the experiment dir (``tracking.ENDED_FILE``: written when MLflow could not take them), and
    every trial of Tune's grid without either as open (no run, no end)."""
    known = dict(known)
    for trial_id, status in tracking.ended_trials(exp_dir / tracking.ENDED_FILE).items():
        run, tag = known.get(trial_id, (None, None))
        known[trial_id] = (run, tag or status)
    for trial_id in trial_ids:
        if isinstance(trial_id, str):  # None: a trial that never reported
            known.setdefault(trial_id, (None, None))
    return known


def interrupted_trials(
    known: dict[str, tuple[str | None, str | None]],
    *,
    created: int,
    num_samples: int,
    never_started: int = 0,
) -> list[str] | None:
    """The trial runs a search left open (no status tag: the callback never saw them end), or
    None when it ran to its end. Tune's SIGINT/SIGUSR1 handler ends ``fit()`` early and returns
    normally, its running trials torn down without a callback (Tune marks them TERMINATED), the
    trials it had created but not started still pending (``never_started``: no run yet), and the
    rest never created."""
    open_runs = sorted(t for t, (_, status) in known.items() if status is None)
    return open_runs if open_runs or created < num_samples or never_started > 0 else None


def stop_interrupted(
    mlc: Any,
    parent_id: str,
    known: dict[str, tuple[str | None, str | None]],
    unended: list[str],
    *,
    exp_dir: Path,
    num_samples: int,
) -> None:
    """An interrupted search is not finished: no ranking, promotion or summary; its open runs
    and the parent are KILLED (``--resume`` reopens them), and the CLI says it was interrupted."""
    from raysft.search.ray_start import stop_ray

    for trial_id in unended:
        run_id = known[trial_id][0]
        if run_id:
            close_parent(mlc, run_id, "KILLED")
    close_parent(mlc, parent_id, "KILLED")
    stop_ray()
    ended = sum(1 for _, status in known.values() if status)
    log.warning(
        "search interrupted: %d of its %d trials ended, %d stopped while running, %d not "
        "started; %s",
        ended, num_samples, len(unended), max(num_samples - ended - len(unended), 0),
        continue_it(exp_dir),
    )  # fmt: skip
    raise KeyboardInterrupt(continue_it(exp_dir))


def continue_it(exp_dir: Path) -> str:
    """What to run next: ``--resume`` where Tune saved the search (``tune/``), else the same
    command again (a start interrupted before its tuner was saved has nothing to resume, and
    ``--resume`` would be refused; a start without it begins anew)."""
    if (exp_dir / "tune").exists():
        return f"continue it with --resume (search.experiment_dir {exp_dir})"
    return (
        "no trial had started: run the same command again, without --resume "
        f"(search.experiment_dir {exp_dir})"
    )
