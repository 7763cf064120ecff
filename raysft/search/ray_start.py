"""Starting Ray, or joining a cluster: whether this driver joins one (``attaching_to_cluster``),
a quick check of ``RAY_ADDRESS``, and ``init_ray`` with what every trial's processes need in
their environment. A local Ray whose node times out at its start is started once more
(``start_local_ray``); ``stop_ray`` ends a local Ray with all its processes. Imports ray only
when called.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from raysft.assets import BUNDLED_BASE, absolute_if_local
from raysft.environ import environ
from raysft.errors import ConfigError, RayStartError
from raysft.train.hub import HUB_TOKEN_VAR, TOKEN_VARS, job_runtime_env, worker_env

log = logging.getLogger(__name__)


def attaching_to_cluster() -> bool:
    """``ray job submit`` and RAY_ADDRESS both mean: join an existing cluster."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def check_ray_address(timeout_s: float = 5.0) -> None:
    """Fail at once when RAY_ADDRESS names a host:port nobody listens on: ``ray.init`` was
    still retrying when killed after 100 s (measured). ``auto``, ``local`` and Ray Client
    (``ray://``) addresses are left to Ray."""
    import socket

    address = os.environ.get("RAY_ADDRESS", "")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(
            "RAY_ADDRESS",
            [
                f"{address}: no Ray cluster answers there ({err}); start one "
                "(`ray start --head`), fix the address, or unset RAY_ADDRESS for a local Ray"
            ],
        ) from None


def init_ray(plan_cpus: int | None, *, scratch: str | None = None) -> None:
    """Join the cluster, or start a local Ray of ``plan_cpus`` CPUs.

    ``scratch`` (local mode): TMPDIR of every process of the local Ray (raylet, agents, workers),
    removed by the caller after the search. Ray ends them without running their exit handlers,
    so temp files they made would stay.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {
        "worker_process_setup_hook": "raysft.search.trial.pin_ray_address"
    }
    # HF_TOKEN, if set: gated models load on every worker.
    env_vars = {**trial_env(os.environ), **worker_env(os.environ)}
    joining = attaching_to_cluster()
    if joining:  # a local Ray's workers inherit this process's environment and home directory
        env_vars = {**hub_env(os.environ), **env_vars}
    else:
        env_vars = {**local_ray_env(os.environ), **env_vars}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if joining:
        ray.init(runtime_env=runtime_env)  # num_cpus would raise when joining a cluster
    else:
        notice = running_cluster_notice(running_clusters())
        if notice:
            log.warning("%s", notice)
        # TMPDIR: inherited by the Ray processes started here.
        with environ({"TMPDIR": scratch} if scratch else {}):
            # address="local": start our own, never silently join a cluster someone left
            # running. The dashboard stays on: its State API is what releases finished trials.
            start_local_ray(
                lambda: ray.init(
                    address="local",
                    num_cpus=plan_cpus,
                    include_dashboard=True,
                    runtime_env=runtime_env,
                )
            )


def running_clusters() -> tuple[list[str], str | None]:
    """The GCS addresses of the Ray clusters with a node on this machine (Ray's own search:
    the raylet processes' ``--gcs-address``), and the one ``RAY_ADDRESS=auto`` would join
    (the latest ``ray start``'s, in Ray's ray_current_cluster file), or None. Nothing, said
    at debug level, when Ray's internals cannot tell: this only informs a warning."""
    try:
        from ray._private import services, utils

        found = sorted(services.find_gcs_addresses())
        latest = utils.read_ray_address()
    except Exception as err:  # a Ray that moved them, a process table we may not read
        log.debug("could not look for a running Ray cluster: %s", err)
        return [], None
    return found, latest


def running_cluster_notice(clusters: tuple[list[str], str | None]) -> str | None:
    """What a driver starting its own local Ray says when a Ray cluster already runs on this
    machine (``running_clusters``): run on a cluster's head without RAY_ADDRESS, a search
    would train on a second Ray of this machine alone, beside the cluster it was meant for.
    Not refused: a local search may run beside someone else's Ray."""
    found, latest = clusters
    if not found:
        return None
    join = (
        "RAY_ADDRESS=auto"
        if latest in found or len(found) == 1 and latest is None
        else f"RAY_ADDRESS={found[0]}"
    )
    named = ", ".join(found)
    return (
        f"a Ray cluster already runs on this machine (GCS {named}), but this search starts a "
        f"local Ray of its own beside it; to run the search on that cluster, set {join} (or "
        "submit it with `ray job submit`)"
    )


def job_working_dir(environ: Mapping[str, str]) -> str | None:
    """The ``--working-dir`` of the Ray job this driver runs in (its URI), or None."""
    wd = job_runtime_env(environ).get("working_dir")
    return str(wd) if wd else None


def inside_job_copy(
    outputs: Mapping[str, Path | None], environ: Mapping[str, str], cwd: Path
) -> list[str]:
    """Problems of output paths (setting -> resolved path) that would land in the Ray job's copy
    of its ``--working-dir``: the driver runs in that copy, which Ray unpacks into a temporary
    directory of the head node. What is written there is not where the user looks, other nodes
    never see it, and Ray removes it with the job's runtime env. Outside a job: none."""
    if job_working_dir(environ) is None:
        return []
    copy = cwd.resolve()
    return [
        f"{setting}: {path} is inside the job's copy of --working-dir ({copy}), a temporary "
        "directory of the head node that other nodes never see and Ray removes; give "
        f"{_ELSEWHERE.get(setting, 'an absolute path on storage every node sees')}"
        for setting, path in outputs.items()
        if path is not None and _within(path, copy)
    ]


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def base_in_job_copy(name_or_path: str, environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The base model's directory when it lies inside the Ray job's copy of its
    ``--working-dir`` (``cwd``), which Ray removes after the job; None for a hub id,
    ``embedded:NAME``, a directory elsewhere, or outside a job."""
    if job_working_dir(environ) is None:
        return None
    path = Path(absolute_if_local(name_or_path))
    copy = cwd.resolve()
    return path if path.is_dir() and _within(path, copy) else None


def base_in_job_copy_notice(name_or_path: str, environ: Mapping[str, str], cwd: Path) -> str | None:
    """What the driver says at its start when the base model lies inside the job's copy of
    ``--working-dir`` (``base_in_job_copy``): the trials load it there, the champion's export
    carries a copy of it (``BUNDLED_BASE``), but the trials' checkpoints name it by a path
    that is gone after the job. None otherwise."""
    path = base_in_job_copy(name_or_path, environ, cwd)
    if path is None:
        return None
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return (
        f"model.name_or_path: {path} is inside the job's copy of --working-dir ({cwd.resolve()}), "
        f"which Ray removes after the job: the champion's export will carry a copy of it "
        f"({size / 2**20:.1f} MiB, in its {BUNDLED_BASE}/), and the trials' checkpoints name it by "
        "this path (score one later with raysft.evaluate --base-model); to keep one copy, put "
        "the base on storage every node sees (--set model.name_or_path=/mnt/shared/MODEL)"
    )


_ELSEWHERE = {
    "search.experiment_dir": "an absolute path on storage every node sees "
    "(--set search.experiment_dir=/mnt/shared/runs/NAME)",
    "promote.export_dir": "an absolute path (--set promote.export_dir=/mnt/shared/champion)",
    "tracking.uri": "an MLflow server (--set tracking.uri=http://127.0.0.1:5000, the head's in "
    "cluster.yaml) or an absolute path (sqlite:////mnt/shared/mlflow.db)",
}


# Ray gives a local node 30 s to register with its GCS, a constant in its code
# (ray/_private/node.py, "The current node timed out during startup"). On 2 busy cores it once
# took longer (a CI run with other searches beside it): the search ended in Ray's traceback before
# it began. Such a start is tried once more, after the first try's processes are ended.
NODE_START_TIMEOUT = "The current node timed out during startup"
RAY_START_TRIES = 2


# The processes ``start_local_ray`` started (GCS, raylet, dashboard, ...; psutil), for stop_ray.
_STARTED: list[Any] = []

# How long stop_ray lets the local Ray's processes exit on their own after ray.shutdown(). Ray
# ends its GCS and raylet itself, but each worker and actor runs in a process group of its own
# and exits when it sees its raylet gone: beside another search on 2 cores, one was still alive
# 90 s after its driver had exited (CI run of 2026-12-07, a search whose Train worker was
# killed), using the CPU of whatever ran next.
SHUTDOWN_GRACE_S = 10.0


def start_local_ray(start: Callable[[], Any]) -> None:
    """``start()`` (a local ``ray.init``), once more if Ray's node timed out at its start."""
    import psutil

    me = psutil.Process()
    for attempt in range(1, RAY_START_TRIES + 1):
        before = {p.pid for p in me.children()}
        try:
            start()
            _STARTED[:] = [p for p in me.children() if p.pid not in before]
            return
        except Exception as err:
            if NODE_START_TIMEOUT not in str(err):
                raise
            import ray

            ray.shutdown()
            # What this try started (GCS, raylet, dashboard, ...) and theirs; not the new
            # children of processes that were there before.
            new = [p for p in me.children() if p.pid not in before]
            _end(new + [d for p in new for d in _descendants(p)])
            if attempt == RAY_START_TRIES:
                load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
                raise RayStartError(
                    f"Ray's local node did not register with its GCS within Ray's 30 s, "
                    f"{RAY_START_TRIES} times (load average {load}): the machine is too busy "
                    "to start Ray; run the search when it is quieter"
                ) from None
            log.warning(
                "Ray's local node took over 30 s to start (a busy machine?): starting it again"
            )


def stop_ray() -> None:
    """``ray.shutdown()``; then, where this process started a local Ray, whatever of it is
    still running ``SHUTDOWN_GRACE_S`` later is ended (terminated, then killed): its workers
    and actors, which Ray does not end itself. A Ray this process joined is left alone."""
    import ray

    started, _STARTED[:] = list(_STARTED), []
    # Taken before the shutdown: once the raylet is gone, its workers are no one's children.
    ours = started + [d for p in started for d in _descendants(p)]
    try:
        ray.shutdown()
    finally:
        alive = _still_running(ours, SHUTDOWN_GRACE_S)
        if alive:
            log.info(
                "%d process(es) of the local Ray still ran %.0f s after its shutdown: ending "
                "them (%s)",
                len(alive), SHUTDOWN_GRACE_S, ", ".join(_named(p) for p in alive),
            )  # fmt: skip
            _end(alive)


def _named(process: Any) -> str:
    import psutil

    try:
        return f"{process.pid} {process.name()}"
    except psutil.Error:
        return str(process.pid)


def _descendants(process: Any) -> list[Any]:
    import psutil

    try:
        return list(process.children(recursive=True))
    except psutil.Error:  # gone already
        return []


def _end(processes: Iterable[Any]) -> None:
    """Terminate ``processes`` (psutil), then kill what is left of them after 5 s."""
    import psutil

    procs = list(processes)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    alive = _still_running(procs, 5.0)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _still_running(alive, 5.0)


def _still_running(processes: list[Any], timeout: float) -> list[Any]:
    """Those of ``processes`` still running after up to ``timeout`` s. A zombie has ended:
    psutil's ``wait_procs`` waits out its timeout on one that is not this process's child and
    that nobody reaps (an orphan in a container whose PID 1 does not reap)."""
    import psutil

    def running(p: Any) -> bool:
        try:
            return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    while True:
        for p in processes:  # reaps those that are this process's children
            with contextlib.suppress(psutil.Error):
                p.wait(timeout=0)
        alive = [p for p in processes if running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


# Ray Train starts a PreemptionWatcher actor (a Python process) for every Train run, to hear of
# nodes being drained (spot instances). A local Ray we started ourselves is one node that nobody
# drains, and on a laptop each process is seconds of CPU. Measured on 2 cores, a search of 8
# 2-step trials, 4 at a time: 140, 144 and 153 s of trials without it, 152 and 171 s with it.
_LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_ray_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings for the workers of a local Ray we start; the user's own environment wins.

    Their TMPDIR is the search's scratch directory, removed after the search, and torch keeps
    its compile cache under TMPDIR: every search's first `train.compile` trial compiled cold
    (56-115 s on 2 cores, against about 20 s warm; benchmarks/RESULTS.md). The cache stays where
    torch would keep it without the scratch directory.
    """
    env = {k: v for k, v in _LOCAL_RAY_ENV.items() if k not in environ}
    if "TORCHINDUCTOR_CACHE_DIR" not in environ:
        env["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache_dir()
    return env


def _inductor_cache_dir() -> str:
    """torch's default (torch/_inductor/runtime/cache_dir_utils.py ``default_cache_dir``, whose
    import loads inductor: 1.7 s here), under the temp dir of this process, not the scratch."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return os.path.join(
        tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)
    )


# What every trial's processes get (the user's environment and the job's win):
# - RAY_CHDIR_TO_TRIAL_DIR=0. Ray Tune and Ray Train move each trial's processes into a
#   directory of the trial's own, where a spec's relative paths (`data.train: data/x.jsonl`) are
#   not: every trial failed with "file not found", retried twice, for a file the driver had just
#   checked. Off, a trial's processes keep the directory Ray starts its workers in: the driver's
#   own on a local Ray, the job's unpacked --working-dir on each node of a cluster. raysft writes
#   nothing to a relative path, so no trial needs a directory of its own.
# - RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1. Ray now leaves a process granted no GPU with the
#   node's CUDA_VISIBLE_DEVICES (its default since ray-project/ray#62492, April 2026; the Ray
#   2.60 installed here), so on a GPU machine a CPU trial (`gpus_per_worker: 0`, `train.device:
#   auto`) would train on GPU 0, as many at once as the CPU plan allows and without a memory
#   cap. With it, Ray hides the GPUs from such a process, as it did before, and the trial
#   trains on the CPU it was planned for.
# - RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25. A Train worker's reports wait in a queue of one,
#   which the Train controller empties only when it polls its workers: every 2 s by default,
#   and each step of the controller's start and teardown waits for a poll too. A trial whose
#   evals come faster than that falls behind (ASHA reads stale results) and, once its loop ends,
#   waits 2 s per report still queued before it can end. Measured on 2 cores
#   (benchmarks/train_poll_interval.py): a Train run of one report, start to end, 8.3-10.5 s at
#   2 s, 5.3-6.8 s at 0.25 s; 4 CPU-s of steps with 10 reports, 16.9 s of wall at 2 s, 3.8-4.1 s
#   at 0.25 s; the machine's CPU while a trial sleeps, 17% of a core either way. A poll is one
#   small call per worker; one slower than the interval is awaited at the next poll, not taken
#   for a fault (Ray fails a worker after 10 minutes of silence).
_TRIAL_ENV = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def _job_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in (``ray job submit --runtime-env-json``):
    the workers inherit them, and Ray refuses a ``ray.init`` runtime_env repeating one."""
    return dict(job_runtime_env(environ).get("env_vars") or {})


def trial_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings for the workers of every search; the user's environment and the job's win."""
    job_env = _job_env(environ)
    return {k: v for k, v in _TRIAL_ENV.items() if k not in environ and k not in job_env}


# Hub settings of the driver that a cluster's other nodes would not have: offline mode (the
# preflight passed from the driver's cache) and a mirror. HF_HOME is a path on each node: not
# passed.
_HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")


def hub_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What a cluster's workers need of the driver's Hugging Face settings: ``_HUB_VARS``, and
    the token of ``hf auth login`` (a file on this machine only) as HF_TOKEN when no token
    variable is set (``worker_env`` passes those)."""
    from huggingface_hub import get_token

    job_env = _job_env(environ)
    out = {k: environ[k] for k in _HUB_VARS if environ.get(k) and k not in job_env}
    if not any(environ.get(k) or k in job_env for k in TOKEN_VARS):
        token = get_token()
        if token:
            out[HUB_TOKEN_VAR] = token
    return out
