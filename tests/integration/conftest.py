"""Integration fixtures: real processes (Ray, ``mlflow server``, the raysft CLIs), no mocks.

Every process a test starts runs in its own process group (``start_new_session=True``) and is
stopped through that group, never by name: ``ray stop`` or ``pkill`` would also kill other
people's Ray instances on the machine. Every file a test writes lies under pytest's tmp_path.

Every Ray a test starts is its own, under a temp dir of its own, so the suite runs two
integration lanes at once (tests/conftest.py). ``ray start`` clusters get free ports
(``node_port_flags``); a local Ray that raysft starts takes Ray's own choice: random ports, the
dashboard on the first free one from 8265, and the dashboard agent's HTTP server on 52365, which
the second of two local Rays finds taken, so that agent runs without it (nothing here uses it;
Ray logs it and goes on). Each worker's State API is pinned to its own cluster
(``raysft.search.trial.pin_ray_address``). Processes are found by the
mark they inherit (``MARK_VAR``), never by name alone, so a lane never touches its sibling's. A
Ray instance the suite did not start (someone's ``gcs_server``) makes a test refuse to start:
the tests' figures and leftover checks assume the machine is theirs.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

SPECS_DIR = Path(__file__).resolve().parent / "specs"
PYTHON = sys.executable
BIN_DIR = Path(sys.executable).parent  # the venv's bin: `ray`, `python` of this interpreter
# Development only: a directory holding candidate embedded assets (tiny-base/, tasks-*.jsonl)
# that replaces `embedded:NAME` in the specs. Unset (as in CI), the shipped assets are used.
ASSETS_OVERRIDE_ENV = "RAYSFT_IT_ASSETS"
# Set to a fresh value for each process a test starts; every descendant inherits it, which is
# how a test finds all it started (Ray puts each worker in a process group of its own).
MARK_VAR = "RAYSFT_IT_MARK"
# This pytest run's id (tests/conftest.py sets it): the prefix of every mark.
SUITE_RUN_VAR = "RAYSFT_IT_RUN"


# ---------------------------------------------------------------- ports, processes


def train_checkpoints(exp_dir: Path, trial: str = "*") -> list[Path]:
    """Ray Train's checkpoint folders of a search's trials (``trial``: one trial id, or all),
    not the ``checkpoint_manager_snapshot.json`` Train writes beside them."""
    return sorted(p for p in exp_dir.glob(f"train/train-{trial}/checkpoint_*") if p.is_dir())


# Test servers take ports from 20000-32767: above the ports Ray gives its workers (10002-19999)
# and below the kernel's ephemeral range (from 32768), where Ray's own random choices and
# outgoing connections land. Each xdist lane draws from a band of its own, so the two lanes
# never pick the same port; within a process no port is handed out twice (a ``ray start``
# given one port for two servers refuses to start, and a probe socket once closed frees it).
_TEST_PORTS = range(20000, 32768)
_HANDED_OUT: set[int] = set()


def _lane_band() -> range:
    """This xdist lane's share of ``_TEST_PORTS`` (all of it outside xdist)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    lanes = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), 1)
    index = int(worker[2:]) % lanes if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = len(_TEST_PORTS) // lanes
    return range(_TEST_PORTS.start + index * width, _TEST_PORTS.start + (index + 1) * width)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports of this lane's band that bind now and that this process
    has not handed out before; each probe socket stays bound until all ``n`` are chosen."""
    band = _lane_band()
    chosen: list[int] = []
    with ExitStack() as stack:
        for port in random.sample(band, min(len(band), 200)):
            if port in _HANDED_OUT:
                continue
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == n:
                _HANDED_OUT.update(chosen)
                return chosen
    raise RuntimeError(f"found {len(chosen)} of {n} free ports in {band} after 200 tries")


def free_port() -> int:
    return free_ports(1)[0]


def _proc_stat(pid: str) -> tuple[int, str] | None:
    """(process group, state) of a pid from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return int(fields[2]), fields[0]


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            st = _proc_stat(pid)
            if st and st[0] == pgid and st[1] != "Z":
                out.append(int(pid))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def mark_of(pid: int) -> str | None:
    """The ``MARK_VAR`` a process inherited, or None (unmarked, gone, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{MARK_VAR}=".encode()
    for entry in environ:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def pids_matching(needle: str, *, mark: str) -> list[int]:
    """Processes carrying ``mark`` whose command line contains ``needle``."""
    return [pid for pid in marked_pids(mark) if needle in cmdline(pid)]


def gcs_server_pids(*, mark: str | None = None) -> set[int]:
    """``gcs_server`` processes carrying ``mark``; with ``mark=None``, every one on the machine."""
    pids = (
        marked_pids(mark)
        if mark is not None
        else [int(p) for p in os.listdir("/proc") if p.isdigit()]
    )
    return {pid for pid in pids if cmdline(pid).split(" ")[0].endswith("gcs_server")}


def marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries ``MARK_VAR=mark``: everything a command started,
    including Ray workers (each in a process group of its own) and job drivers (own session)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid() or mark_of(int(pid)) != mark:
            continue
        st = _proc_stat(pid)
        if st and st[1] != "Z":
            out.append(int(pid))
    return out


def wait_gone(timeout: float, *, pgid: int | None = None, mark: str | None = None) -> list[int]:
    """Wait until no live process is in group ``pgid`` or carries ``mark``; returns the pids
    still alive at the timeout (an empty list once all are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = set(group_pids(pgid) if pgid is not None else [])
        left |= set(marked_pids(mark) if mark is not None else [])
        if not left or time.monotonic() > deadline:
            return sorted(left)
        time.sleep(0.2)


def wait_group_empty(pgid: int, timeout: float) -> list[int]:
    return wait_gone(timeout, pgid=pgid)


def kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def node_port_flags() -> list[str]:
    """``ray start`` flags giving a node's own servers each a free port of its own."""
    nm, om, agent_grpc, agent_http, rtenv, metrics = free_ports(6)
    return [
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--runtime-env-agent-port={rtenv}",
        f"--metrics-export-port={metrics}",
    ]


def ray_head_command(temp_dir: Path, *extra: str) -> tuple[list[str], int, int]:
    """``ray start --head --block`` on loopback with every port its own free one, the dashboard
    on, under ``temp_dir``; ``extra`` flags (``--num-cpus=1``, ...) go last. Returns the command,
    the GCS port and the dashboard port."""
    gcs, dash, client = free_ports(3)
    cmd = [
        str(BIN_DIR / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        *node_port_flags(),
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *extra,
    ]
    return cmd, gcs, dash


def start_ray(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in a process group of its own, output to ``log``."""
    return subprocess.Popen(
        cmd,
        stdout=open(log, "w"),  # noqa: SIM115 - `ray start` owns it until it exits
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


# Ray gives a starting node fixed windows: the raylet aborts when its dashboard agent has not
# written its port file within about 15 s, the driver when the node has not registered within
# 30 s. The suite runs two lanes side by side on 2 cores (tests/conftest.py), and a search's
# Ray started beside the other lane's 4-trials-at-a-time load test missed them twice in a CI
# run (load average 30). Measured on the dev VM, 5 local Ray starts beside that search: 17-56 s
# each with the search at their priority, 3.5-10 s with its session 10 levels below them
# (alone: 3 s). So every search and cluster a test starts is lowered to LOWERED_NICE once its
# Ray is up: starts keep the CPU, searches that have started share the rest. Linux schedules
# each session as a group (autogroup, on here and in CI: every command a test starts is a
# session of its own), and a group's nice value weighs the whole session, the processes Ray
# goes on starting in it included. Without autogroup nothing is changed.
LOWERED_NICE = 10
RAY_UP_LINE = "search space:"  # what raysft.tune logs once its Ray is up (search/driver.py)


def lower_cpu_share(pid: int) -> bool:
    """Lower the CPU share of the session ``pid`` leads to ``LOWERED_NICE`` (autogroup);
    whether it was."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{LOWERED_NICE}\n")
    except OSError:  # no autogroup, or the session already gone
        return False
    return True


def _lower_once_up(proc: subprocess.Popen, log: Path, lowered: list[bool]) -> None:
    """Watch ``log`` until ``RAY_UP_LINE`` appears, then ``lower_cpu_share`` of ``proc``; say
    in ``lowered`` whether it was."""
    seen = ""
    with open(log, encoding="utf-8", errors="replace") as f:
        while proc.poll() is None:
            seen = (seen + f.read())[-len(RAY_UP_LINE) - 4096 :]
            if RAY_UP_LINE in seen:
                lowered.append(lower_cpu_share(proc.pid))
                return
            time.sleep(0.5)


def _run_prefix() -> str:
    """The start of every mark this pytest run makes: ``RUN-``."""
    return f"{os.environ.get(SUITE_RUN_VAR, 'solo')}-"


def new_mark() -> str:
    """A fresh mark, prefixed with this pytest run's id: ``RUN-UUID``."""
    return f"{_run_prefix()}{uuid.uuid4().hex}"


def assert_no_other_ray() -> None:
    """Refuse to start while a Ray instance this pytest run did not start is up (see the module
    docstring); the sibling lane's Rays carry this run's id in their mark and are let be."""
    ours = _run_prefix()

    def others() -> set[int]:
        return {pid for pid in gcs_server_pids() if not (mark_of(pid) or "").startswith(ours)}

    unknown = others()
    if unknown:  # a process shows an empty environment for a moment while it execs: look again
        time.sleep(1.0)
        unknown = others()
    if unknown:
        pytest.fail(
            "another Ray instance is running on this machine (gcs_server pids "
            f"{sorted(unknown)}); the integration tests need the machine to themselves"
        )


def base_env(**extra: str) -> dict[str, str]:
    """Environment of every subprocess: offline, no inherited cluster or tracking server."""
    env = dict(os.environ)
    for key in (
        "RAY_ADDRESS",
        "RAY_JOB_ID",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
        "MLFLOW_EXPERIMENT_NAME",
    ):
        env.pop(key, None)
    env.update(
        PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",  # `python`/`ray` = this venv's
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


@dataclass
class Ran:
    """A finished command: exit code, merged stdout+stderr, wall seconds, leftover pids."""

    cmd: list[str]
    rc: int
    output: str
    seconds: float
    pgid: int  # the command's process group
    mark: str  # the MARK_VAR value of everything it started
    leftovers: list[str] = field(default_factory=list)  # 'PID COMMAND LINE' of each
    lowered: bool = False  # its CPU share lowered once its Ray was up (lower_cpu_share)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])

    def explain(self) -> str:
        return f"{' '.join(self.cmd)} -> rc {self.rc} in {self.seconds:.0f}s\n{self.tail()}"


def run_tune(
    spec: Path, tmp_path: Path, ray_tmp: Path, *args: str, log: str = "tune.log", **kw: Any
) -> Ran:
    """``python -m raysft.tune SPEC ARGS`` as a user runs it, from ``tmp_path``, with this test's
    Ray temp dir; ``env`` adds variables, the rest goes to ``run_cmd``."""
    env = base_env(RAY_TMPDIR=str(ray_tmp), **kw.pop("env", {}))
    cmd = [PYTHON, "-m", "raysft.tune", str(spec), *args]
    return run_cmd(cmd, log=tmp_path / log, cwd=tmp_path, env=env, **kw)


def run_cmd(
    cmd: list[str],
    *,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
    settle: float | None = 90,
    on_start: Any = None,
) -> Ran:
    """Run ``cmd`` in its own process group, output to ``log``; kill what it started on a
    timeout.

    Everything the command starts inherits a fresh ``MARK_VAR``. A search's share of the CPU is
    lowered once its Ray is up (``lower_cpu_share``). After it exits, wait up to
    ``settle`` s for the rest (a local Ray it started) to go; whatever is still alive then is
    reported in ``leftovers`` and killed. 90 s: the search's processes run at a lowered CPU share,
    and beside the other lane's work one of them took more than 30 s to exit (a failed trial's
    Train controller, CI run of 2026-12-05); a process left behind for good outlives any wait.
    ``settle=None``: no wait, nothing killed; the caller checks later with
    ``wait_gone(pgid=ran.pgid, mark=ran.mark)``. ``on_start(popen, mark)`` is called once it
    runs, with the mark its processes carry.
    """
    mark = new_mark()
    env = {**(env or base_env()), MARK_VAR: mark}
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        lowered: list[bool] = []
        watcher = threading.Thread(target=_lower_once_up, args=(proc, log, lowered), daemon=True)
        watcher.start()
        try:
            if on_start is not None:
                on_start(proc, mark)
            rc = proc.wait(timeout=timeout)
        except BaseException:
            kill_group(proc.pid)
            kill_all(marked_pids(mark))
            proc.wait()
            text = log.read_text(encoding="utf-8", errors="replace")
            tail = "\n".join(text.splitlines()[-80:])
            pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s; log tail:\n{tail}")
    seconds = time.monotonic() - t0
    watcher.join()
    left = [] if settle is None else wait_gone(settle, pgid=proc.pid, mark=mark)
    leftovers = [f"{pid} {cmdline(pid)[:120]}" for pid in left]  # what each was, for the report
    if left:
        kill_group(proc.pid)
        kill_all(left)
        wait_gone(10, pgid=proc.pid, mark=mark)
    output = log.read_text(encoding="utf-8", errors="replace")
    return Ran(
        cmd,
        rc,
        output,
        seconds,
        pgid=proc.pid,
        mark=mark,
        leftovers=leftovers,
        lowered=any(lowered),
    )


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    """Root of Ray's session dirs for one module (``RAY_TMPDIR`` / ``--temp-dir``).

    Not under tmp_path: Ray's unix socket paths live below it and must fit in 107 bytes, which
    a pytest tmp_path is too deep for. Removed once the module is done, so nothing of the
    tests is left in /tmp/ray, and no /tmp/ray/ray_current_cluster ever names their clusters.
    """
    d = Path(tempfile.mkdtemp(prefix="rsft-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- specs and assets


def asset_ref(name: str) -> str:
    """How a spec names an embedded asset (``embedded:NAME``, or the dev override's path)."""
    override = os.environ.get(ASSETS_OVERRIDE_ENV)
    return str(Path(override) / name) if override else f"embedded:{name}"


def asset_dir(name: str) -> Path:
    """Local path of an embedded asset, for loading it outside raysft."""
    from raysft.assets import resolve

    return Path(resolve(asset_ref(name)))


def _swap_assets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _swap_assets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_swap_assets(v) for v in node]
    if isinstance(node, str) and node.startswith("embedded:"):
        return asset_ref(node.removeprefix("embedded:"))
    return node


def render_spec(template: str, out: Path, updates: dict[str, Any]) -> Path:
    """specs/TEMPLATE with dotted-path ``updates`` applied, written to ``out``."""
    from raysft.config import set_path

    tree = yaml.safe_load((SPECS_DIR / template).read_text(encoding="utf-8"))
    for key, value in updates.items():
        set_path(tree, key, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(_swap_assets(tree), sort_keys=False), encoding="utf-8")
    return out


@pytest.fixture(scope="session", autouse=True)
def _assets_present() -> None:
    """Fail early and clearly if the embedded default model or data are missing."""
    for name in ("tiny-base", "tasks-alpaca.jsonl", "tasks-sharegpt.jsonl", "tasks-eval.jsonl"):
        path = asset_dir(name)
        assert path.exists(), f"embedded asset {name} missing at {path}"


# ---------------------------------------------------------------- mlflow server


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen
    db: Path
    artifacts: Path
    log: Path
    startup_s: float


def _wait_http_ok(url: str, proc: subprocess.Popen, log: Path, timeout: float, **headers: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited rc {proc.returncode}:\n{log.read_text()[-3000:]}")
        req = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def stop_group_then_wait(proc: subprocess.Popen, grace: float = 15) -> list[int]:
    """SIGTERM the whole group, wait until the group is empty; SIGKILL what outlives ``grace``.

    Returns the pids that needed SIGKILL (an empty list is a clean stop).
    """
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    stubborn = wait_group_empty(pgid, grace)
    if stubborn:
        kill_group(pgid)
        wait_group_empty(pgid, 10)
    proc.wait(timeout=10)
    return stubborn


@contextmanager
def serve_mlflow(root: Path, port: int) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on 127.0.0.1:``port`` over ``root``'s SQLite store and proxied
    artifacts (a second one on the same ``root`` takes up where the first left off); stopped
    by its process group on exit, which fails if any of its processes outlives SIGKILL."""
    db, artifacts, log = root / "mlflow.db", root / "artifacts", root / "server.log"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=open(log, "a"),  # noqa: SIM115 - the server owns it until it exits
        stderr=subprocess.STDOUT,
        cwd=root,
        # The job runner (for GenAI jobs) adds eight processes that compete for 2 cores.
        env=base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        start_new_session=True,
    )
    try:
        _wait_http_ok(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
        yield MlflowServer(
            f"http://127.0.0.1:{port}", proc, db, artifacts, log, time.monotonic() - t0
        )
    finally:
        stop_group_then_wait(proc)  # SIGKILL after the grace period is fine, leftovers are not
        left = group_pids(proc.pid)
    assert not left, f"mlflow server processes outlived SIGKILL: {left}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` for one module."""
    with serve_mlflow(tmp_path_factory.mktemp("mlflow-server"), free_port()) as server:
        yield server
