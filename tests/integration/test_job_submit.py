"""``ray job submit`` of a search to a real token-auth cluster of two nodes on this machine:
a head (``ray start --head --block``, 1 CPU) and a second node (``ray start --address``, 1 CPU).

The cluster is this module's: its own ports, auth token, temp dir and process groups. Each node
is stopped by SIGTERM to its own ``ray start`` process only (``ray stop`` would kill every Ray
instance on the machine), and the last test checks that nothing of it is left.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import (
    BIN_DIR,
    MARK_VAR,
    _wait_http_ok,
    assert_no_other_ray,
    asset_dir,
    asset_ref,
    base_env,
    cmdline,
    group_pids,
    kill_all,
    kill_group,
    lower_cpu_share,
    marked_pids,
    new_mark,
    node_port_flags,
    ray_head_command,
    render_spec,
    run_cmd,
    start_ray,
    wait_gone,
)

pytestmark = pytest.mark.integration

DEFAULT_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


@dataclass
class Cluster:
    proc: subprocess.Popen  # the head's `ray start`
    node: subprocess.Popen | None  # the second node's `ray start`
    mark: str  # MARK_VAR of `ray start`, inherited by every process of the cluster
    temp_dir: Path  # --temp-dir: session dirs, sockets, logs, unpacked working dirs
    root: Path
    gcs_port: int
    dashboard: str
    client_env: dict[str, str]  # what `ray job submit` needs: token auth on, the token file
    log: Path
    stopped: bool = False
    stop_report: dict[str, Any] = field(default_factory=dict)

    def processes(self) -> list[int]:
        """Every live process of this cluster: its process group, plus what carries its mark
        (workers run in process groups of their own, job drivers in sessions of their own)."""
        groups = set(group_pids(self.proc.pid))
        if self.node is not None:
            groups |= set(group_pids(self.node.pid))
        return sorted(groups | set(marked_pids(self.mark)))

    def stop(self) -> dict[str, Any]:
        """SIGTERM to ``ray start --block`` alone, which takes its cluster down; then wait
        until no process of the cluster is left, SIGKILLing what outlives 30 s."""
        if self.stopped:
            return self.stop_report
        self.stopped = True
        t0 = time.monotonic()
        report: dict[str, Any] = {"sigkill": []}
        if self.node is not None and self.node.poll() is None:  # the second node first
            self.node.send_signal(signal.SIGTERM)
            try:
                self.node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                report["sigkill"].append("the second node's ray start did not exit in 30s")
            left = wait_gone(30, pgid=self.node.pid)
            if left:
                report["sigkill"] += [f"{p}: {cmdline(p)[:200]}" for p in left]
                kill_group(self.node.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                report["sigkill"].append("ray start did not exit in 30s")
        left = wait_gone(30, pgid=self.proc.pid, mark=self.mark)
        if left:
            report["sigkill"] += [f"{p}: {cmdline(p)[:200]}" for p in left]
            kill_group(self.proc.pid)
            kill_all(left)
            wait_gone(10, pgid=self.proc.pid, mark=self.mark)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        report["left"] = self.processes()
        report["seconds"] = round(time.monotonic() - t0, 1)
        # The address file went to --temp-dir; the machine-wide default must not name us.
        if DEFAULT_ADDRESS_FILE.is_file():
            held = DEFAULT_ADDRESS_FILE.read_text().strip()
            if held.endswith(f":{self.gcs_port}"):
                report["default_address_file"] = held
                DEFAULT_ADDRESS_FILE.unlink(missing_ok=True)
        self.stop_report = report
        return report


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, ray_tmp: Path) -> Iterator[Cluster]:
    assert_no_other_ray()
    root = tmp_path_factory.mktemp("ray-cluster")
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    mark = new_mark()
    start_env = {
        **env,
        MARK_VAR: mark,
        # On SIGTERM `ray start` first drains the node for up to 30 s, waiting on leases that
        # detached actors (Train's placement-group cleaner, job supervisors) never give back.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    cmd, gcs, dash = ray_head_command(ray_tmp, "--num-cpus=1", "--num-gpus=0")
    log = root / "ray-start.log"
    proc = start_ray(cmd, start_env, root, log)
    dashboard = f"http://127.0.0.1:{dash}"
    c = Cluster(proc, None, mark, ray_tmp, root, gcs, dashboard, env, log)
    try:
        auth = {"Authorization": f"Bearer {token}"}
        _wait_http_ok(f"{dashboard}/api/version", proc, log, timeout=120, **auth)
        _wait_http_ok(f"{dashboard}/api/jobs/", proc, log, timeout=60, **auth)
        # Its own temp dir: two nodes sharing one would garbage-collect each other's unpacked
        # job working dirs (each node's runtime-env agent counts only its own references).
        c.node = _start_second_node(start_env, gcs, root, ray_tmp / "n2")
        _wait_for_nodes(dashboard, token, 2, c.node, root / "ray-node.log")
        for node in (c.proc, c.node):  # both up: their jobs' trials yield to others' Ray starts
            lower_cpu_share(node.pid)
        yield c
    finally:
        c.stop()


def _start_second_node(env: dict[str, str], gcs: int, root: Path, temp: Path) -> subprocess.Popen:
    """A second Ray node on this machine, joining the head, with its own ports and 1 CPU."""
    cmd = [
        str(BIN_DIR / "ray"),
        "start",
        f"--address=127.0.0.1:{gcs}",
        "--block",
        "--node-ip-address=127.0.0.1",
        *node_port_flags(),
        "--num-cpus=1",
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    return start_ray(cmd, env, root, root / "ray-node.log")


def _state_api(dashboard: str, token: str, path: str) -> list[dict[str, Any]]:
    """Ray's state API (the dashboard's REST face of ``ray.util.state``)."""
    import urllib.request

    req = urllib.request.Request(
        f"{dashboard}/api/v0/{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]["result"]


def _wait_for_nodes(dashboard: str, token: str, n: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"second node exited rc {proc.returncode}:\n{log.read_text()[-3000:]}")
        alive = [x for x in _state_api(dashboard, token, "nodes") if x["state"] == "ALIVE"]
        if len(alive) >= n:
            return
        time.sleep(0.5)
    pytest.fail(f"{n} nodes not alive after 120 s:\n{log.read_text()[-3000:]}")


def _submit(cluster: Cluster, workdir: Path, log: Path, submission_id: str):
    return run_cmd(
        [
            str(BIN_DIR / "ray"),
            "job",
            "submit",
            "--address",
            cluster.dashboard,
            "--working-dir",
            str(workdir),
            "--submission-id",
            submission_id,
            "--",
            "python",
            "-m",
            "raysft.tune",
            "spec.yaml",
        ],
        log=log,
        env=cluster.client_env,
        cwd=cluster.root,
        timeout=480,  # ~75 s for the search alone; 125-150 s beside the other lane
        settle=5,
    )


def test_token_auth_is_enforced(cluster: Cluster) -> None:
    import urllib.error
    import urllib.request

    # What is checked is the answer, not how soon it comes: a dashboard just started on a
    # loaded machine (the other lane's searches) may not answer within a request's timeout.
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{cluster.dashboard}/api/version", timeout=30)
        except urllib.error.HTTPError as err:  # an answer
            assert err.code == 401, err
            return
        except (urllib.error.URLError, TimeoutError, ConnectionError):  # none yet
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
        else:
            pytest.fail("the dashboard answered a request without the cluster's token")


def test_job_submit_runs_the_search_on_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    workdir, exp_dir, db = tmp_path / "job", tmp_path / "exp", tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"  # db is absolute: sqlite:////...
    # The base model and training rows by paths relative to the job's working dir, which Ray
    # unpacks on each node: the driver reads the rows there (its trials get them from it), and
    # every trial loads the model there (Ray used to move a trial into a directory of its own).
    (workdir / "data").mkdir(parents=True)
    shutil.copy(asset_dir("tasks-alpaca.jsonl"), workdir / "data" / "alpaca.jsonl")
    shutil.copytree(asset_dir("tiny-base"), workdir / "base")
    render_spec(
        "job_small.yaml",
        workdir / "spec.yaml",
        {
            "search.experiment_dir": str(exp_dir),
            "tracking.uri": uri,
            "model.name_or_path": "base",
            "data.train": ["data/alpaca.jsonl", asset_ref("tasks-sharegpt.jsonl")],
        },
    )
    ran = _submit(cluster, workdir, tmp_path / "submit.log", "raysft-it-ok")
    assert ran.rc == 0, ran.explain()
    assert "Job 'raysft-it-ok' succeeded" in ran.output, ran.tail()
    # Its base lies in the job's copy of --working-dir, which Ray removes: said at the start.
    assert "model.name_or_path: " in ran.output
    assert "the champion's export will carry a copy of it" in ran.output
    # It joined this cluster (not a Ray of its own) and planned with the cluster's 2 CPUs.
    assert re.search(
        rf"concurrent trials: 2 of 2 \(cluster [\d.]+:{cluster.gcs_port}\)", ran.output
    ), ran.tail(200)

    summary = json.loads((exp_dir / "summary.json").read_text())
    trials = summary["trials"]
    assert [t["status"] for t in trials] == ["finished", "finished"], trials
    assert all(t["step"] == 8 for t in trials)
    assert summary["counts"] == {"finished": 2, "stopped_early": 0, "failed": 0, "diverged": 0}
    assert summary["mlflow"]["tracking_uri"] == uri
    promo = summary["promotion"]
    assert promo["promoted"] is True and str(promo["version"]) == "1", promo
    assert promo["reason"] == "first champion"
    assert Path(promo["export_dir"], "adapter_model.safetensors").is_file()
    # ... and the export carries it, so it loads once the job's copy is gone.
    assert promo["base_bundled_from"].endswith("/base"), promo
    adapter = json.loads(Path(promo["export_dir"], "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "base-model"
    assert Path(promo["export_dir"], "base-model", "model.safetensors").is_file()

    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = mlc.get_experiment_by_name("raysft-it-job")
    runs = mlc.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.run_id == summary["mlflow"]["parent_run_id"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.info.run_id for r in children) == sorted(t["mlflow_run_id"] for t in trials)
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:  # eval loss at every eval; the objective, exact match, at the last
        history = {
            key: [m.step for m in mlc.get_metric_history(run.info.run_id, key)]
            for key in ("eval_loss", "exact_match")
        }
        assert history == {"eval_loss": [4, 8], "exact_match": [8]}, history
    assert summary["best"]["metric"] == max(t["metric"] for t in trials)
    champ = mlc.get_model_version_by_alias("raysft-it-job", "champion")
    assert str(champ.version) == "1" and champ.run_id == summary["best"]["mlflow_run_id"]
    for t in trials:  # every trial's checkpoint is complete
        assert Path(t["checkpoint"], "adapter_model.safetensors").is_file(), t
        assert Path(t["checkpoint"], "training_state.pt").is_file(), t

    # Ray's state API: the trials' Train workers ran on both nodes.
    token = Path(cluster.client_env["RAY_AUTH_TOKEN_PATH"]).read_text()
    workers = _state_api(
        cluster.dashboard,
        token,
        "actors?detail=true&limit=1000&filter_keys=class_name&filter_predicates=%3D"
        "&filter_values=RayTrainWorker",
    )
    nodes = {a["node_id"] for a in workers}
    alive = {x["node_id"] for x in _state_api(cluster.dashboard, token, "nodes")}
    assert len(workers) >= 2 and len(nodes) == 2 and nodes <= alive, workers


def test_job_submit_of_a_bad_spec_fails_with_a_clear_message(
    cluster: Cluster, tmp_path: Path
) -> None:
    workdir, exp_dir, db = tmp_path / "job", tmp_path / "exp", tmp_path / "mlflow.db"
    render_spec(
        "job_small.yaml",
        workdir / "spec.yaml",
        {
            "search.experiment_dir": str(exp_dir),
            "tracking.uri": f"sqlite:///{db}",
            # Checked against the cluster once the job has joined it: no node has a GPU.
            "search.resources.gpus_per_worker": 1,
        },
    )
    ran = _submit(cluster, workdir, tmp_path / "submit.log", "raysft-it-bad")
    assert ran.rc != 0, ran.explain()
    out = ran.output
    assert re.search(
        r"error: spec\.yaml: search\.resources: no node has 1 CPU and 1 GPU for one worker "
        rf"\(cluster [\d.]+:{cluster.gcs_port}: 1 CPU, 0 GPU; 1 CPU, 0 GPU\)",
        out,
    ), out[-4000:]
    # Nodes started by hand: a read-only autoscaler, which launches nothing, so no wait for it.
    assert "asking its autoscaler" not in out, out[-4000:]
    assert "Job entrypoint command failed with exit code 2" in out, out[-2000:]
    assert "Traceback" not in out, out[-4000:]
    assert not (exp_dir / "summary.json").exists()
    assert not db.exists(), "a rejected spec must not touch MLflow"


def test_job_submit_refuses_outputs_inside_its_working_dir_copy(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The shipped laptop specs write to runs/... and sqlite:///mlflow.db, relative: under
    `ray job submit --working-dir` that is Ray's temporary copy of the working dir on the head."""
    workdir = tmp_path / "job"
    spec = render_spec("job_small.yaml", workdir / "spec.yaml", {})
    tree = yaml.safe_load(spec.read_text(encoding="utf-8"))
    tree["search"]["experiment_dir"] = "runs/search"
    del tree["tracking"]["uri"]  # the default: sqlite:///mlflow.db
    spec.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    ran = _submit(cluster, workdir, tmp_path / "submit.log", "raysft-it-copy")
    assert ran.rc != 0, ran.explain()
    out = ran.output
    for setting, path in (("search.experiment_dir", "runs/search"), ("tracking.uri", "mlflow.db")):
        assert re.search(
            rf"error: spec\.yaml: {re.escape(setting)}: /\S+/{re.escape(path)} is inside the "
            r"job's copy of --working-dir \(/\S+\), a temporary directory of the head node",
            out,
        ), out[-4000:]
    assert "Job entrypoint command failed with exit code 2" in out, out[-2000:]
    assert "Traceback" not in out, out[-4000:]


def test_cluster_stops_by_its_own_process_group(cluster: Cluster) -> None:
    running = cluster.processes()
    names = " ".join(cmdline(p) for p in running)
    for part in ("gcs_server", "raylet", "dashboard.py"):
        assert part in names, f"{part} is not among the cluster's processes"
    report = cluster.stop()
    assert cluster.proc.returncode is not None
    assert report["sigkill"] == [], f"needed SIGKILL: {report}"
    assert report["left"] == [], report
    # --temp-dir kept the machine-wide address file (read by other Ray users) off this cluster.
    assert "default_address_file" not in report, report
