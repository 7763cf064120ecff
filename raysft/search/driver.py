"""Run a search on Ray: the tuner and the run; what follows its trials (promotion, base vs
tuned, summary.json) is ``raysft.search.finish``.

Optuna TPE proposes configs, ASHA stops bad trials on the per-eval metric, each trial runs the
SFT recipe under Ray Train (its torch backend; ``raysft.search.backend`` for one worker) launched
from a Tune function trainable (Train V2), the driver mirrors every trial into MLflow, and the
best adapter is promoted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysft.config import SearchSpec
from raysft.data.digest import Digests, data_digests
from raysft.data.shared import SharedData
from raysft.environ import environ
from raysft.errors import ConfigError, SearchStateError
from raysft.paths import LOCK_FILE
from raysft.search import redact, tracking, tracking_requests, tracking_store
from raysft.search import results as res
from raysft.search.callback import make_callback
from raysft.search.experiment import (
    count_start,
    hold_experiment_dir,
    open_experiment,
    read_earlier_starts,
    read_state,
    spec_record,
    write_state,
)
from raysft.search.finish import finish_search
from raysft.search.ray_start import (
    attaching_to_cluster,
    check_ray_address,
    init_ray,
)
from raysft.search.resources import (
    TRIAL_DRIVER_RESOURCES,
    ResourcePlan,
    local_nodes,
    plan_memory,
    plan_resources,
    ray_nodes,
    resolve_auto_share,
    scale_up,
)
from raysft.search.space import (
    TrialConfigs,
    describe_sampler,
    describe_space,
    trial_output_dir,
)
from raysft.search.spec import trial_memory
from raysft.search.storage import check_shared_storage
from raysft.search.trial import ATTEMPTS_FILE, TrialFailure, read_attempts, run_trial_on_ray
from raysft.train.metrics import REPLAYED

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- driver


def _trainable(tree: dict[str, Any], exp_dir: Path, shared: Any = None) -> Any:
    """The Tune trainable of a search: ``run_trial_on_ray`` bound to the spec and resources,
    and to ``shared``, the reference of the data the driver read (in a list: Ray hands a
    bare reference over as its value, in every trial process)."""
    import ray.tune

    trainable = ray.tune.with_parameters(
        run_trial_on_ray, tree=tree, exp_dir=str(exp_dir), shared=[shared]
    )
    return ray.tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)


_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # read by Tuner.fit, in this process


@contextlib.contextmanager
def _quiet_tune_output(*, loggers_off: bool) -> Iterator[None]:
    """While the trials run, what Tune prints and logs beyond raysft's use: a report's earlier
    records (``REPLAYED``, the steps since the last report) left out of the result tables it
    prints, as Tune leaves out its own bookkeeping; with ``loggers_off``, no CSV or TensorBoard
    logger (the latter warns of every non-number, and names a log dir in the run's scratch Ray
    dir, gone after it). Not for a restored tuner: one saved before raysft passed its own JSON
    logger (``build_tuner``) would then write no result.json, which the finish reads."""
    try:
        from ray.tune.experimental.output import BLACKLISTED_KEYS
    except ImportError:  # another layout of Tune's: the tables show the records
        BLACKLISTED_KEYS = set()
    BLACKLISTED_KEYS.add(REPLAYED)
    try:
        with environ({_AUTO_LOGGERS: "1"} if loggers_off else {}):
            yield
    finally:
        BLACKLISTED_KEYS.discard(REPLAYED)


def build_tuner(
    tree: dict[str, Any],
    cfg: SearchSpec,
    plan: ResourcePlan,
    exp_dir: Path,
    callbacks: list,
    shared: Any = None,
) -> Any:
    import ray.tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raysft.search.searcher import build_searcher

    s = cfg.search
    searcher = build_searcher(cfg, s, concurrent=plan.concurrent)
    if s.scheduler.type == "asha":
        # Time is the trial's own optimizer step (reported with every eval), not Tune's report
        # count: a trial restarted from a checkpoint then keeps its place on the rungs.
        every, steps = cfg.train.eval_every, cfg.train.max_steps
        scheduler: Any = ASHAScheduler(
            time_attr="step",
            max_t=steps,
            grace_period=min(s.scheduler.grace_period * every, steps),
            reduction_factor=s.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return ray.tune.Tuner(
        _trainable(tree, exp_dir, shared),
        tune_config=ray.tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=plan.concurrent,
        ),
        run_config=ray.tune.RunConfig(
            name="tune",
            storage_path=str(exp_dir),
            # Tune's result.json (read at the finish) alone: its CSV and TensorBoard loggers
            # are off (_quiet_tune_output), raysft's curves are in MLflow and the plots.
            callbacks=[*callbacks, JsonLoggerCallback()],
            # ASHA never stops a NaN trial (NaN compares false with every cutoff): this does.
            stop=res.DivergedStopper(),
            verbose=1,
        ),
    )


def _connect(
    spec_path: str, tree: dict[str, Any], cfg: SearchSpec, exp_dir: Path, *, scratch: str
) -> ResourcePlan:
    """Start (laptop) or join (cluster) Ray and plan the search on the nodes it has. Joining,
    ``gpus_per_worker: auto`` is resolved here into ``tree`` and ``cfg`` (load_spec left it),
    and ``exp_dir`` must be storage every node sees."""
    import ray

    s = cfg.search
    joining = attaching_to_cluster()
    if joining:
        check_ray_address()
        init_ray(None)
        where = f"cluster {ray.get_runtime_context().gcs_address}"
        # Checked here, once the cluster's GPUs are known (load_spec could not see them).
        estimate = trial_memory(cfg) if s.resources.gpus else None
        share = None  # gpus_per_worker auto: ask for the share a trial needs, not a whole GPU
        if estimate is not None and s.resources.gpus_per_worker == "auto":
            share = plan_memory(s, estimate, ray_nodes(), where=where).gpus_per_worker
        nodes, waited = scale_up(s, share=share)
        where += f", {waited}" if waited else ""
        plan, problems = plan_resources(s, nodes, where=where, estimate=estimate)
        if plan is not None and not problems:
            resolve_auto_share(
                tree, cfg, plan.memory.gpus_per_worker if plan.memory else s.resources.gpus
            )
    else:
        nodes = local_nodes()
        plan, problems = plan_resources(s, nodes, where="this machine")
        if plan is not None:
            init_ray(int(nodes[0]["CPU"]), scratch=scratch)
    if problems or plan is None:
        raise ConfigError(spec_path, problems)
    if joining:  # before any trial: on a head-local path each would fail late, and retry
        unshared = check_shared_storage(exp_dir)
        if unshared:
            raise ConfigError(spec_path, unshared)
    log.info(
        "search space:\n  %s\n%s\n%s",
        "\n  ".join(describe_space(s)),
        describe_sampler(s, concurrent=plan.concurrent),
        plan.describe(s),
    )
    return plan


def _parent_run(
    mlc: Any,
    exp_id: str,
    exp_dir: Path,
    cfg: SearchSpec,
    spec_path: str,
    *,
    uri: str,
    digests: Digests | None = None,
    state: dict[str, Any],
) -> str:
    """The search's parent MLflow run: created once, reopened by ``--resume`` (``state``: the
    experiment's raysft_state.json, ``{}`` for a start that is no resume). A start that is no
    resume (no ``tune/`` yet: one interrupted before its tuner was saved) begins anew: its
    state file, spec record and parent run are this start's."""
    if state:
        parent_id: str = state["parent_run_id"]
        mlc.update_run(parent_id, status="RUNNING")
        return parent_id
    parent_id = tracking.start_parent(mlc, exp_id, name=exp_dir.name, cfg=cfg, spec_path=spec_path)
    state = {
        "parent_run_id": parent_id,
        "tracking_uri": redact.redact("tracking_uri", uri),  # --resume checks it is the same
        "spec": spec_record(cfg),
        # --resume checks the bytes too: those the trials train on, where the driver has them
        "data": data_digests(cfg.data) if digests is None else digests,
    }
    write_state(exp_dir, state)
    return parent_id


def _missing(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def run_search(
    spec_path: str,
    tree: dict[str, Any],
    cfg: SearchSpec,
    *,
    resume: bool,
    shared: SharedData | None = None,
) -> dict[str, Any]:
    """Run (or ``resume``) the search of a validated spec; returns summary.json's content.
    ``shared``: its data as ``read_spec`` read it, for the trials (else each reads its own)."""
    t0 = time.perf_counter()
    # The directories this start creates, innermost first: removed again if it is refused.
    created = _missing(Path(cfg.search.experiment_dir).resolve())
    digests = shared.digests if shared is not None else None  # read once, with the data
    exp_dir = open_experiment(spec_path, cfg, resume=resume, digests=digests)
    lock = hold_experiment_dir(spec_path, exp_dir)  # refused: another search's, left as it is
    begun: list[bool] = []  # set once the search has its parent run: a start that counts
    replaced: dict[int, Any] = {}  # the signal handlers _search replaced, put back at the end
    scratch = tempfile.mkdtemp(prefix="rsft-", dir=_short_temp_root())
    try:
        return _search(
            spec_path, tree, cfg, exp_dir,
            resume=resume, scratch=scratch, t0=t0, shared=shared, begun=begun, replaced=replaced,
        )  # fmt: skip
    except BaseException as err:
        if created and exp_dir.is_dir() and {p.name for p in exp_dir.iterdir()} <= {LOCK_FILE}:
            # Refused before anything was written (Ray not reached, no plan); another search
            # may have come in meanwhile: then the directory is its. So are parents it created
            # that are no longer empty (rmdir refuses those).
            with contextlib.suppress(OSError):
                (exp_dir / LOCK_FILE).unlink(missing_ok=True)
                for path in created:
                    path.rmdir()
        if isinstance(err, KeyboardInterrupt) and begun and not str(err):
            # A Ctrl-C the driver did not see through (a second one, during the teardown): the
            # CLI's last line says what to do, not a bare "interrupted".
            raise KeyboardInterrupt(_continue_it(exp_dir)) from None
        raise
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
        if begun:  # not a start refused before it began (Ray, the plan, the MLflow store)
            count_start(exp_dir, time.perf_counter() - t0)
        lock.close()  # releases it
        shutil.rmtree(scratch, ignore_errors=True)


def tracking_store_error(spec_path: str, cfg: SearchSpec) -> ConfigError | None:
    """The error a search gives when its MLflow store cannot be used
    (``tracking_store.store_problem``: nothing is made, a server is asked once) or its experiment
    was deleted; None when it can."""
    uri = tracking_store.tracking_uri(cfg.tracking)
    unusable = tracking_store.store_problem(uri)
    if unusable is None:
        gone = tracking_store.deleted_experiment(uri, cfg.tracking.experiment)
        return None if gone is None else ConfigError(spec_path, [f"tracking.experiment: {gone}"])
    where = (
        "tracking.uri"
        if cfg.tracking.uri or "MLFLOW_TRACKING_URI" not in os.environ
        else "tracking.uri (from $MLFLOW_TRACKING_URI)"
    )
    redacted = redact.redact("tracking_uri", uri)
    return ConfigError(spec_path, [f"{where}: {redacted}: {redact.redact('error', unusable)}"])


def _short_temp_root() -> str:
    """Where the local Ray's scratch goes: the temp dir, unless its path is too long for the
    unix sockets Ray's dashboard makes there (AF_UNIX paths stop at 107 bytes), then /tmp."""
    root = tempfile.gettempdir()
    return root if len(root) <= 40 else "/tmp"


def _search(
    spec_path: str,
    tree: dict[str, Any],
    cfg: SearchSpec,
    exp_dir: Path,
    *,
    resume: bool,
    scratch: str,
    t0: float,
    shared: SharedData | None,
    begun: list[bool],
    replaced: dict[int, Any],
) -> dict[str, Any]:
    import ray
    import ray.tune

    uri = tracking_store.tracking_uri(cfg.tracking)
    tracking_requests.callback_failures(reset=True)
    tracking_requests.bound_retries()
    unusable = tracking_store_error(spec_path, cfg)  # before Ray: MLflow would retry for minutes
    if unusable:
        raise unusable
    state = read_state(spec_path, exp_dir) if resume else {}
    gone = tracking_store.unusable_run(uri, state["parent_run_id"]) if state else None
    if gone:
        raise SearchStateError(f"{spec_path}: --resume: {gone}")
    plan = _connect(spec_path, tree, cfg, exp_dir, scratch=scratch)
    replaced.update(_stops_as_ctrl_c())  # after ray.init, whose driver aborts on them
    timing = {"ray_start_s": time.perf_counter() - t0}
    shared_ref = _share(shared)  # held for the whole search: the object lives while it is
    mlc = tracking_store.client(uri)
    exp_id = tracking.experiment_id(mlc, cfg.tracking.experiment, uri=uri)
    digests = shared.digests if shared is not None else None
    parent_id = _parent_run(
        mlc, exp_id, exp_dir, cfg, spec_path, uri=uri, digests=digests, state=state
    )
    begun.append(True)
    resolve = TrialConfigs(tree, str(exp_dir))
    callback = make_callback(
        mlc,
        exp_id=exp_id,
        parent_id=parent_id,
        resolve_trial=resolve,
        order=list(cfg.search.params),
        ended_file=exp_dir / tracking.ENDED_FILE,
    )
    try:
        if resume:
            from raysft.search.searcher import allow_final_only_objective

            allow_final_only_objective(cfg.search)
            log.info(
                "--resume: trials at once stay as the search's first start set them (Tune "
                "restores its limit); a changed search.resources applies to each trial's resources"
            )
            tuner = ray.tune.Tuner.restore(
                str(exp_dir / "tune"), _trainable(tree, exp_dir, shared_ref), resume_errored=True
            )
        else:
            tuner = build_tuner(tree, cfg, plan, exp_dir, [callback], shared_ref)
        timing["mlflow_setup_s"] = time.perf_counter() - t0 - timing["ray_start_s"]
        t_fit = time.perf_counter()
        with _own_signal_handlers(), _quiet_tune_output(loggers_off=not resume):
            grid = tuner.fit()
        timing["trials_s"] = time.perf_counter() - t_fit
    except BaseException:
        _close_parent(mlc, parent_id, "FAILED")
        raise
    ended = False  # whether every trial ended (a Ctrl-C during fit() is told apart below)
    summary: dict[str, Any] | None = None
    try:
        # This start's: reset at its start.
        tracking_failures = tracking_requests.callback_failures()
        known, unreachable = _known_trial_runs(mlc, exp_id, parent_id, callback, tracking_failures)
        ids = [(grid[i].metrics or {}).get("trial_id") for i in range(len(grid))]
        known = _with_local_ends(known, exp_dir, ids)
        _stop_if_interrupted(grid, known, mlc, parent_id, exp_dir=exp_dir, cfg=cfg)
        ended = True
        runs = {t: run for t, (run, _) in known.items() if run}
        runs.update(callback.runs)
        tracked = {
            "mlc": mlc,
            "uri": uri,
            "exp_id": exp_id,
            "parent_id": parent_id,
            "runs": runs,
            "statuses": {t: status for t, (_, status) in known.items()},
            "diverged": set(getattr(callback, "diverged", ())),
            "tracking_failures": tracking_failures,
            "unreachable": unreachable,
            "timing": timing,
        }
        results = [_result_of(grid[i], exp_dir) for i in range(len(grid))]
        summary = finish_search(
            spec_path, cfg, exp_dir, results,
            tracked=tracked, resolve=resolve, t0=t0,
            resolved_spec=spec_record(cfg), earlier_starts=read_earlier_starts(exp_dir),
        )  # fmt: skip
    except KeyboardInterrupt:
        _close_parent(mlc, parent_id, "KILLED")  # again, if _stop_interrupted did: the same
        if ended:
            # Ctrl-C while ranking, scoring or promoting (promotion is atomic): --resume runs
            # the finish again, its trials all ended.
            log.warning(
                "search interrupted after its trials ended, before its summary; finish it with "
                "--resume (search.experiment_dir %s)",
                exp_dir,
            )
        raise
    except Exception:
        _close_parent(mlc, parent_id, "FAILED")
        if ended:  # ranking or writing the summary failed (FinishSteps keeps the rest from it)
            log.error(
                "the search's trials all ended but its summary was not written; once the cause "
                "below is fixed, --resume finishes it without training again "
                "(search.experiment_dir %s)",
                exp_dir,
            )
        raise
    finally:
        try:
            ray.shutdown()  # flushes worker logs now, not after the summary table
        except KeyboardInterrupt:
            if summary is None:
                raise
            # Ctrl-C once all was done: the search finished, its summary is written.
            log.warning("Ray's shutdown interrupted; the search had finished")
    assert summary is not None  # set, or the try above raised
    return summary


def _known_trial_runs(
    mlc: Any, exp_id: str, parent_id: str, callback: Any, failures: list[str]
) -> tuple[dict[str, tuple[str | None, str | None]], str | None]:
    """trial_id -> (run id, status tag) of the search's trial runs just after its trials, and
    the step that found the tracking server out of reach (the finish then does not ask
    again), if it did. MLflow is asked: after --resume, Tune drives its restored copy of the
    callback, not ``callback``, so the trial runs of earlier starts are only known to MLflow.
    Where it cannot answer, the callback's record stands in and the failure joins
    ``failures``."""
    try:
        return dict(tracking.trial_runs(mlc, exp_id, parent_id)), None
    except Exception as err:
        reason = redact.scrubbed(err)
        log.warning("MLflow: could not read the search's trial runs (%s)", reason)
        failures.append(f"MLflow: reading the search's trial runs: {reason}")
        known = {t: (r, callback.status.get(t)) for t, r in callback.runs.items()}
        unreachable = "MLflow: reading the search's trial runs"
        return known, unreachable if tracking_requests.out_of_reach(err) else None


def _stop_if_interrupted(
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
        _stop_interrupted(
            mlc, parent_id, known, unended, exp_dir=exp_dir, num_samples=cfg.search.num_samples
        )


def _close_parent(mlc: Any, run_id: str, status: str) -> None:
    """Mark the parent run (or an open trial run) ended, as a search that did not finish; a
    tracking server out of reach is said, and the error that ended the search stays the one
    raised."""
    try:
        mlc.set_terminated(run_id, status)
    except Exception as err:
        log.warning("MLflow: could not mark run %s %s (%s)", run_id, status, redact.scrubbed(err))


def _share(shared: SharedData | None) -> Any:
    """The data the driver read, put in Ray's object store for the trials; None (each trial
    then reads its own, as it would without it) where the store cannot take it."""
    import ray

    if shared is None:
        return None
    try:
        return ray.put(shared)
    except Exception as err:  # ObjectStoreFullError, or spilling failed: never fatal here
        log.warning("trials read the data themselves: Ray's object store refused it (%s)", err)
        return None


def _stops_as_ctrl_c() -> dict[int, Any]:
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
def _own_signal_handlers() -> Iterator[None]:
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


def _with_local_ends(
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


def _stop_interrupted(
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
    import ray

    for trial_id in unended:
        run_id = known[trial_id][0]
        if run_id:
            _close_parent(mlc, run_id, "KILLED")
    _close_parent(mlc, parent_id, "KILLED")
    ray.shutdown()
    ended = sum(1 for _, status in known.values() if status)
    log.warning(
        "search interrupted: %d of its %d trials ended, %d stopped while running, %d not "
        "started; %s",
        ended, num_samples, len(unended), max(num_samples - ended - len(unended), 0),
        _continue_it(exp_dir),
    )  # fmt: skip
    raise KeyboardInterrupt(_continue_it(exp_dir))


def _continue_it(exp_dir: Path) -> str:
    return f"continue it with --resume (search.experiment_dir {exp_dir})"


def _result_of(result: Any, exp_dir: Path) -> dict[str, Any]:
    """A Tune result as plain values (no Ray types past this point), with the trial's cause of
    failure (not Ray's wrapper) and its failed attempts."""
    m = dict(result.metrics or {})
    trial_id = m.get("trial_id") or Path(result.path).name
    error = None
    if result.error is not None:
        error = res.error_cause(result.error).removeprefix(f"{TrialFailure.__name__}: ")
        # An exception may quote a token or a URL with its password: scrubbed as logged params
        # are, before it reaches summary.json and MLflow tags.
        error = redact.redact("error", error)
    attempts_file = Path(trial_output_dir(exp_dir, trial_id)) / ATTEMPTS_FILE
    attempts = [
        {**a, "error": redact.redact("error", a["error"])} if isinstance(a.get("error"), str) else a
        for a in read_attempts(attempts_file)
    ]
    return {
        "trial_id": trial_id,
        "number": trial_number(Path(result.path).name, trial_id),
        "metrics": m,
        "sampled": dict(result.config),
        "error": error,
        "attempts": attempts,
        "history": _history_of(result),
    }


def _history_of(result: Any) -> list[dict[str, Any]] | None:
    """Every record a trial reported (``tracking.trial_history``), from Tune's own file of its
    reports; None where it cannot be read (MLflow's copy is then all there is)."""
    path = f"{result.path}/result.json"
    fs = getattr(result, "filesystem", None)  # pyarrow's, where Tune's storage is not local
    try:
        if fs is None:
            text = Path(path).read_text(encoding="utf-8")
        else:
            with fs.open_input_stream(path) as fh:
                text = fh.read().decode("utf-8")
        return tracking.trial_history(text.splitlines())
    except (OSError, ValueError) as err:
        log.debug("trial history %s not read: %s", path, err)
        return None


def trial_number(dirname: str, trial_id: str) -> int | None:
    """Tune's creation counter of a trial (1, 2, ...), from its directory name
    ``TRAINABLE_{trial_id}_{N}_{values}_{date}``; None when the name does not hold it."""
    m = re.search(rf"_{re.escape(trial_id)}_(\d+)(?:_|$)", dirname)
    return int(m[1]) if m else None
