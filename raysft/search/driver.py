"""Run a search on Ray: Ray started or joined and the search planned on it, the parent run, the
trials, an interrupted search; the tuner is ``raysft.search.tuner``, how its trials ended
``raysft.search.interrupt``, and what follows its trials (promotion, base vs tuned, summary.json)
``raysft.search.finish``.

Optuna TPE proposes configs, ASHA stops bad trials on the per-eval metric, each trial runs the
SFT recipe under Ray Train (its torch backend; ``raysft.search.backend`` for one worker) launched
from a Tune function trainable (Train V2), the driver mirrors every trial into MLflow, and the
best adapter is promoted.
"""

from __future__ import annotations

import functools
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysft.config import SearchSpec
from raysft.data.digest import Digests, data_digests
from raysft.data.shared import SharedData
from raysft.errors import ConfigError, SearchStateError
from raysft.paths import missing_dirs, remove_if_unused
from raysft.search import redact, tracking, tracking_requests, tracking_store
from raysft.search.autoscale import scale_up
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
from raysft.search.interrupt import (
    close_open_trial_runs,
    close_parent,
    continue_it,
    known_trial_runs,
    own_signal_handlers,
    stop_if_interrupted,
    stops_as_ctrl_c,
    with_local_ends,
)
from raysft.search.lost_trials import set_lost_apart
from raysft.search.ray_start import (
    attaching_to_cluster,
    check_ray_address,
    init_ray,
    stop_ray,
)
from raysft.search.resources import (
    ResourcePlan,
    local_nodes,
    plan_memory,
    plan_resources,
    ray_nodes,
    resolve_auto_share,
)
from raysft.search.space import (
    TrialConfigs,
    describe_sampler,
    describe_space,
)
from raysft.search.spec import trial_memory
from raysft.search.storage import check_shared_storage
from raysft.search.tune_results import result_of, trial_id_of
from raysft.search.tuner import build_tuner, quiet_tune_output, search_trainable, share_data

log = logging.getLogger(__name__)


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


def store_failed(spec_path: str, uri: str, what: str, err: Exception) -> ConfigError:
    """A tracking store that stopped answering, or refused a write, after the check before Ray
    started: one line naming ``tracking.uri`` (credentials hidden), not MLflow's traceback,
    whose message holds the request's address, password and all."""
    where = f"tracking.uri: {redact.redact('tracking_uri', uri)}"
    return ConfigError(spec_path, [f"{where}: {what} ({redact.scrubbed(err)})"])


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
        try:
            mlc.update_run(parent_id, status="RUNNING")
        except Exception as err:
            raise store_failed(spec_path, uri, "the parent run could not be reopened", err) from err
        return parent_id
    try:
        parent_id = tracking.start_parent(
            mlc, exp_id, name=exp_dir.name, cfg=cfg, spec_path=spec_path
        )
    except Exception as err:
        raise store_failed(
            spec_path, uri, "the search's parent run could not be written", err
        ) from err
    state = {
        "parent_run_id": parent_id,
        "tracking_uri": redact.redact("tracking_uri", uri),  # --resume checks it is the same
        "spec": spec_record(cfg),
        # --resume checks the bytes too: those the trials train on, where the driver has them
        "data": data_digests(cfg.data) if digests is None else digests,
    }
    write_state(exp_dir, state)
    return parent_id


def run_search(
    spec_path: str,
    tree: dict[str, Any],
    cfg: SearchSpec,
    *,
    resume: bool,
    shared: SharedData | None = None,
    read_s: float = 0.0,
) -> dict[str, Any]:
    """Run (or ``resume``) the search of a validated spec; returns summary.json's content.
    ``shared``: its data as ``read_spec`` read it, for the trials (else each reads its own).
    ``read_s``: the seconds that read took (the spec, its data and model checked), counted in
    this start's wall time."""
    t0 = time.perf_counter() - read_s
    # The directories this start creates, innermost first: removed again if it is refused.
    created = missing_dirs(Path(cfg.search.experiment_dir).resolve())
    digests = shared.digests if shared is not None else None  # read once, with the data
    exp_dir = open_experiment(spec_path, cfg, resume=resume, digests=digests)
    lock = hold_experiment_dir(spec_path, exp_dir)  # refused: another search's, left as it is
    begun: list[bool] = []  # set once the search has its parent run: a start that counts
    replaced: dict[int, Any] = {}  # the signal handlers _search replaced, put back at the end
    scratch = tempfile.mkdtemp(prefix="rsft-", dir=_short_temp_root())
    try:
        return _search(
            spec_path, tree, cfg, exp_dir,
            resume=resume, scratch=scratch, t0=t0, read_s=read_s, shared=shared, begun=begun,
            replaced=replaced,
        )  # fmt: skip
    except BaseException as err:
        # Refused before anything was written (Ray not reached, no plan): nothing left.
        remove_if_unused(exp_dir, created)
        if isinstance(err, KeyboardInterrupt) and begun and not str(err):
            # A Ctrl-C the driver did not see through (a second one, during the teardown): the
            # CLI's last line says what to do, not a bare "interrupted".
            raise KeyboardInterrupt(continue_it(exp_dir)) from None
        raise
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
        if begun:  # not a start refused before it began (Ray, the plan, the MLflow store)
            count_start(exp_dir, time.perf_counter() - t0)
        lock.close()  # releases it
        shutil.rmtree(scratch, ignore_errors=True)


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
    read_s: float,
    shared: SharedData | None,
    begun: list[bool],
    replaced: dict[int, Any],
) -> dict[str, Any]:
    uri = tracking_store.tracking_uri(cfg.tracking)
    tracking_requests.callback_failures(reset=True)
    tracking_requests.bound_retries()
    # Before Ray starts: MLflow would retry for minutes.
    unusable = tracking_store.spec_store_error(spec_path, cfg)
    if unusable:
        raise unusable
    state = read_state(spec_path, exp_dir) if resume else {}
    gone = tracking_store.unusable_run(uri, state["parent_run_id"]) if state else None
    if gone:
        raise SearchStateError(f"{spec_path}: --resume: {gone}")
    plan = _connect(spec_path, tree, cfg, exp_dir, scratch=scratch)
    replaced.update(stops_as_ctrl_c())  # after ray.init, whose driver aborts on them
    timing = {"preflight_s": read_s, "ray_start_s": time.perf_counter() - t0 - read_s}
    shared_ref = share_data(shared)  # held for the whole search: the object lives while it is
    mlc = tracking_store.client(uri)
    try:
        exp_id = tracking.experiment_id(mlc, cfg.tracking.experiment, uri=uri)
    except Exception as err:
        what = f"experiment {cfg.tracking.experiment!r} could not be read or set up"
        raise store_failed(spec_path, uri, what, err) from err
    digests = shared.digests if shared is not None else None
    resolve = TrialConfigs(tree, str(exp_dir))
    parent_id = _parent_run(
        mlc, exp_id, exp_dir, cfg, spec_path, uri=uri, digests=digests, state=state
    )
    begun.append(True)
    callback = None
    try:
        from raysft.search.callback import make_callback  # imports Ray's Tune

        callback = make_callback(
            mlc,
            exp_id=exp_id,
            parent_id=parent_id,
            resolve_trial=resolve,
            order=list(cfg.search.params),
            ended_file=exp_dir / tracking.ENDED_FILE,
        )
        grid = _run_trials(
            tree, cfg, plan, exp_dir, callback, shared_ref,
            resume=resume, timing=timing, setup_from=t0 + read_s,
        )  # fmt: skip
    except BaseException as err:
        # Before Tune's run, or Tune's run itself failed (its own Ctrl-C handling returns):
        # no run of it is left RUNNING; a Ctrl-C is KILLED, as everywhere else.
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        close_open_trial_runs(mlc, callback, status)
        close_parent(mlc, parent_id, status)
        if not isinstance(err, KeyboardInterrupt):
            log.error("the search failed before its trials ended; %s", continue_it(exp_dir))
        raise
    tracked = {"mlc": mlc, "uri": uri, "exp_id": exp_id, "parent_id": parent_id, "timing": timing}
    finish = functools.partial(
        _finish, spec_path, cfg, exp_dir, grid, callback, tracked=tracked, resolve=resolve, t0=t0
    )
    return _after_trials(finish, mlc=mlc, parent_id=parent_id, exp_dir=exp_dir)


def _run_trials(
    tree: dict[str, Any],
    cfg: SearchSpec,
    plan: Any,
    exp_dir: Path,
    callback: Any,
    shared_ref: Any,
    *,
    resume: bool,
    timing: dict[str, float],
    setup_from: float,
) -> Any:
    """Tune's run of the trials, its ResultGrid: a new search's Tuner, or the one ``--resume``
    restores. ``timing`` gets the setup since ``setup_from`` (Ray's start, MLflow, the tuner)
    and the trials' own time."""
    import ray.tune

    if resume:
        from raysft.search.searcher import allow_final_only_objective

        allow_final_only_objective(cfg.search)
        log.info(
            "--resume: trials at once stay as the search's first start set them (Tune "
            "restores its limit); a changed search.resources applies to each trial's resources"
        )
        tuner = ray.tune.Tuner.restore(
            str(exp_dir / "tune"),
            search_trainable(tree, exp_dir, shared_ref),
            resume_errored=True,
        )
    else:
        tuner = build_tuner(tree, cfg, plan, exp_dir, [callback], shared_ref)
    timing["mlflow_setup_s"] = time.perf_counter() - setup_from - timing["ray_start_s"]
    t_fit = time.perf_counter()
    with own_signal_handlers(), quiet_tune_output(loggers_off=not resume):
        grid = tuner.fit()
    timing["trials_s"] = time.perf_counter() - t_fit
    return grid


def _after_trials(
    finish: Callable[[list[bool]], dict[str, Any]], *, mlc: Any, parent_id: str, exp_dir: Path
) -> dict[str, Any]:
    """What follows Tune's run (``finish``: ``_finish`` of this search), its failures told
    apart from those before every trial had ended, and Ray shut down whatever happens."""
    ended: list[bool] = []  # set once every trial ended (a Ctrl-C during fit() is told apart)
    summary: dict[str, Any] | None = None
    try:
        summary = finish(ended)
    except KeyboardInterrupt:
        close_parent(mlc, parent_id, "KILLED")  # again, if stop_interrupted did: the same
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
        close_parent(mlc, parent_id, "FAILED")
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
            stop_ray()  # flushes worker logs now, not after the summary table
        except KeyboardInterrupt:
            if summary is None:
                raise
            # Ctrl-C once all was done: the search finished, its summary is written.
            log.warning("Ray's shutdown interrupted; the search had finished")
    assert summary is not None  # set, or the try above raised
    return summary


def _finish(
    spec_path: str,
    cfg: SearchSpec,
    exp_dir: Path,
    grid: Any,
    callback: Any,
    ended: list[bool],
    *,
    tracked: dict[str, Any],
    resolve: TrialConfigs,
    t0: float,
) -> dict[str, Any]:
    """Every trial's end found (``stop_if_interrupted`` raises on a Ctrl-C during ``fit()``;
    ``ended`` set past it), then ``finish_search``: ranking, base vs tuned, promotion, summary."""
    mlc, exp_id, parent_id = tracked["mlc"], tracked["exp_id"], tracked["parent_id"]
    # This start's: reset at its start.
    tracking_failures = tracking_requests.callback_failures()
    known, unreachable = known_trial_runs(mlc, exp_id, parent_id, callback, tracking_failures)
    ids = [trial_id_of(grid[i]) for i in range(len(grid))]
    known, lost = set_lost_apart(mlc, with_local_ends(known, exp_dir, ids), ids, exp_dir=exp_dir)
    stop_if_interrupted(grid, known, mlc, parent_id, exp_dir=exp_dir, cfg=cfg)
    ended.append(True)
    runs = {t: run for t, (run, _) in known.items() if run}
    runs.update(callback.runs)
    tracked = {
        **tracked,
        "runs": runs,
        "statuses": {t: status for t, (_, status) in known.items()},
        "diverged": set(getattr(callback, "diverged", ())),
        "tracking_failures": tracking_failures,
        "unreachable": unreachable,
        "lost": lost,
    }
    results = [result_of(grid[i], exp_dir) for i in range(len(grid))]
    return finish_search(
        spec_path, cfg, exp_dir, results,
        tracked=tracked, resolve=resolve, t0=t0,
        resolved_spec=spec_record(cfg), earlier_starts=read_earlier_starts(exp_dir),
    )  # fmt: skip
