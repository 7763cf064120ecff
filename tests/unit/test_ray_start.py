"""Starting or joining Ray (raysft/search/ray_start.py): what every trial's processes get in
their environment, and a local Ray whose node is slow to start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_trials_keep_the_working_dir_unless_the_user_or_the_job_says_otherwise():
    from raysft.search.ray_start import trial_env

    every = {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # Train's controller takes reports sooner
    }
    assert trial_env({}) == every
    rest = {k: v for k, v in every.items() if k != "RAY_CHDIR_TO_TRIAL_DIR"}
    assert trial_env({"RAY_CHDIR_TO_TRIAL_DIR": "1"}) == rest
    job = {"runtime_env": {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "1"}}}
    assert trial_env({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}) == rest
    mine = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}  # Ray's default, set by the user: theirs
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in trial_env(mine)


def test_a_cluster_gets_the_drivers_hub_settings_and_its_login_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from raysft.search.ray_start import hub_env

    token_file = tmp_path / "token"  # what `hf auth login` writes, on the driver's machine only
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "https://mirror.example", "HF_HOME": "/x"}
    assert hub_env(offline) == {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "https://mirror.example"}
    token_file.write_text("hf_from_login\n")
    assert hub_env({}) == {"HF_TOKEN": "hf_from_login"}
    assert hub_env({"HUGGING_FACE_HUB_TOKEN": "hf_env"}) == {}  # worker_env passes that one
    job = {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_job", "HF_HUB_OFFLINE": "1"}}}
    assert hub_env({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job), "HF_HUB_OFFLINE": "1"}) == {}


def test_a_search_joining_a_cluster_keeps_its_trials_in_the_working_dir(monkeypatch):
    """ray.init is replaced here only to read its arguments: joining a cluster is tested end to
    end in tests/integration/test_job_submit.py (relative data paths on two nodes)."""
    import ray

    from raysft.search import ray_start

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_start, "attaching_to_cluster", lambda: True)
    for var in ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_CHDIR_TO_TRIAL_DIR", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "HF_OIDC_RESOURCE",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")  # no login here
    ray_start.init_ray(None)
    (kwargs,) = calls
    assert "num_cpus" not in kwargs  # Ray refuses it when joining
    assert kwargs["runtime_env"]["env_vars"] == {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }


def test_a_local_rays_workers_keep_torchs_compile_cache_out_of_the_scratch_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from raysft.search.ray_start import local_ray_env

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this process's temp dir
    want = default_cache_dir()  # torch's own, with no TMPDIR of the search's
    assert want.startswith(str(tmp_path))
    assert local_ray_env({})["TORCHINDUCTOR_CACHE_DIR"] == want
    assert "TORCHINDUCTOR_CACHE_DIR" not in local_ray_env({"TORCHINDUCTOR_CACHE_DIR": "/mine"})


# ---------------------------------------------------------------- a local Ray that starts slowly


class _SlowNode:
    """A start whose first ``failures`` tries fail as Ray's does when its node takes over 30 s
    to register, each leaving a process behind as a half-started Ray would, with a child of its
    own (a raylet's worker); ``grandchildren`` holds the pid files of those children."""

    def __init__(
        self,
        tmp: Path,
        failures: int,
        error: str = "The current node timed out during startup.",
    ):
        self.tmp, self.failures, self.error = tmp, failures, error
        self.left: list[subprocess.Popen] = []
        self.grandchildren: list[Path] = []

    def __call__(self) -> None:
        if len(self.left) < self.failures:
            pid_file = self.tmp / f"grandchild-{len(self.left)}"
            code = (
                "import subprocess, sys, time\n"
                "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
                "time.sleep(60)\n"
            )
            self.left.append(subprocess.Popen([sys.executable, "-c", code]))
            _wait_for(pid_file)
            self.grandchildren.append(pid_file)
            raise Exception(f"{self.error} This could happen because some of the raylet failed")


def _wait_for(path: Path) -> None:
    for _ in range(200):
        if path.is_file() and path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_local_ray_that_timed_out_at_its_start_is_started_once_more(tmp_path: Path) -> None:
    from raysft.search.ray_start import start_local_ray

    # A process of the caller's, there before: not the failed start's to end.
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _SlowNode(tmp_path, failures=1)
        start_local_ray(start)
        assert len(start.left) == 1
        assert start.left[0].poll() is not None  # the first try's process was ended
        assert not _alive(int(start.grandchildren[0].read_text()))  # and its child
        assert mine.poll() is None
    finally:
        mine.kill()
        mine.wait()


def test_a_local_ray_that_times_out_twice_is_one_clear_error(tmp_path: Path) -> None:
    from raysft.errors import RayStartError
    from raysft.search.ray_start import start_local_ray

    start = _SlowNode(tmp_path, failures=5)
    with pytest.raises(RayStartError, match=r"within Ray's 30 s, 2 times \(load average [\d.]+"):
        start_local_ray(start)
    assert len(start.left) == 2 and all(p.poll() is not None for p in start.left)
    assert not any(_alive(int(f.read_text())) for f in start.grandchildren)


def test_other_errors_of_a_local_ray_start_are_not_retried(tmp_path: Path) -> None:
    from raysft.search.ray_start import start_local_ray

    start = _SlowNode(tmp_path, failures=5, error="Address already in use.")
    with pytest.raises(Exception, match="Address already in use"):
        start_local_ray(start)
    assert len(start.left) == 1 and start.left[0].poll() is None  # not the start's to end
    os.kill(int(start.grandchildren[0].read_text()), signal.SIGKILL)
    start.left[0].kill()
    start.left[0].wait()


# ---------------------------------------------------------------- outputs under `ray job submit`


def test_outputs_inside_the_jobs_working_dir_copy_are_refused(tmp_path: Path) -> None:
    from raysft.search.ray_start import inside_job_copy

    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}
    environ = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    copy = tmp_path / "_ray_pkg_0123"
    outputs = {
        "search.experiment_dir": copy / "runs" / "search",
        "promote.export_dir": tmp_path / "shared" / "champion",
        "tracking.uri": copy / "mlflow.db",
        "unset": None,
    }
    problems = inside_job_copy(outputs, environ, copy)
    assert [p.split(":", 1)[0] for p in problems] == ["search.experiment_dir", "tracking.uri"]
    assert f"is inside the job's copy of --working-dir ({copy})" in problems[0]
    assert inside_job_copy(outputs, {}, copy) == []  # not a job: the user's own directory
    no_copy = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})}
    assert inside_job_copy(outputs, no_copy, copy) == []


def test_a_base_model_inside_the_jobs_working_dir_copy_is_said_at_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raysft.search.ray_start import base_in_job_copy_notice

    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}
    environ = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    copy = tmp_path / "_ray_pkg_0123"
    (copy / "base").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    monkeypatch.chdir(copy)  # the driver of a job runs in the copy
    (copy / "base" / "model.safetensors").write_bytes(b"w" * 3 * 2**20)
    warning = base_in_job_copy_notice("base", environ, copy)
    assert warning is not None and warning.startswith(f"model.name_or_path: {copy / 'base'} is")
    assert "the champion's export will carry a copy of it (3.0 MiB, in its base-model/)" in warning
    assert "score one later with raysft.evaluate --base-model" in warning
    assert base_in_job_copy_notice(str(tmp_path / "shared"), environ, copy) is None  # elsewhere
    assert base_in_job_copy_notice("embedded:tiny-base", environ, copy) is None
    assert base_in_job_copy_notice("org/model", environ, copy) is None  # a hub id
    assert base_in_job_copy_notice("base", {}, copy) is None  # not a job


def test_local_mlflow_stores_are_found_and_servers_are_not(tmp_path: Path, monkeypatch) -> None:
    from raysft.search.tracking_store import local_store

    monkeypatch.chdir(tmp_path)
    assert local_store("sqlite:///mlflow.db") == tmp_path / "mlflow.db"
    assert local_store("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert local_store("sqlite:///m.db?timeout=30") == tmp_path / "m.db"
    assert local_store("file:./mlruns") == tmp_path / "mlruns"
    assert local_store("file:///abs/mlruns") == Path("/abs/mlruns")
    assert local_store("mlruns") == tmp_path / "mlruns"
    for server in ("http://127.0.0.1:5000", "https://x", "databricks", "databricks://p",
                   "postgresql://u@h/db"):  # fmt: skip
        assert local_store(server) is None, server


# ---------------------------------------------------------------- a cluster already running here


def test_a_running_cluster_on_this_machine_is_named_with_how_to_join_it() -> None:
    from raysft.search.ray_start import running_cluster_notice

    assert running_cluster_notice(([], None)) is None
    assert running_cluster_notice(([], "10.0.0.1:6379")) is None  # a stale file: none runs
    head = running_cluster_notice((["10.0.0.1:6379"], "10.0.0.1:6379"))
    assert head == (
        "a Ray cluster already runs on this machine (GCS 10.0.0.1:6379), but this search starts "
        "a local Ray of its own beside it; to run the search on that cluster, set "
        "RAY_ADDRESS=auto (or submit it with `ray job submit`)"
    )
    # Two, and the latest `ray start` names neither: auto would not reach them, an address does.
    two = running_cluster_notice((["10.0.0.1:6379", "10.0.0.1:6380"], "10.0.0.9:6379"))
    assert two is not None and "(GCS 10.0.0.1:6379, 10.0.0.1:6380)" in two
    assert "set RAY_ADDRESS=10.0.0.1:6379 (or submit" in two


def test_a_local_search_beside_a_running_cluster_warns_and_still_starts_its_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ray.init is replaced to read its arguments; what Ray finds running is given."""
    import ray

    from raysft.search import ray_start

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_start, "attaching_to_cluster", lambda: False)
    monkeypatch.setattr(ray_start, "running_clusters", lambda: (["10.0.0.1:6379"], None))
    with caplog.at_level("WARNING", logger=ray_start.__name__):
        ray_start.init_ray(2)
    assert [kw["address"] for kw in calls] == ["local"]  # not refused, not joined
    (record,) = [r for r in caplog.records if r.name == ray_start.__name__]
    assert record.levelname == "WARNING"
    assert "GCS 10.0.0.1:6379" in record.getMessage()
    assert "set RAY_ADDRESS=auto" in record.getMessage()
    calls.clear()
    caplog.clear()
    monkeypatch.setattr(ray_start, "running_clusters", lambda: ([], None))
    ray_start.init_ray(2)
    assert len(calls) == 1 and not caplog.records


def test_rays_own_search_for_running_clusters_answers() -> None:
    """Ray's internals still answer where raysft reads them (a Ray that moved them would make
    the warning silently never fire)."""
    from raysft.search.ray_start import running_clusters

    found, latest = running_clusters()
    from ray._private import services, utils

    assert found == sorted(services.find_gcs_addresses())
    assert latest == utils.read_ray_address()


def test_environ_sets_for_the_block_and_puts_back_what_was_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from raysft.environ import environ

    monkeypatch.setenv("RAYSFT_T_SET", "before")
    monkeypatch.delenv("RAYSFT_T_UNSET", raising=False)
    with pytest.raises(RuntimeError), environ({"RAYSFT_T_SET": "in", "RAYSFT_T_UNSET": "in"}):
        assert os.environ["RAYSFT_T_SET"] == os.environ["RAYSFT_T_UNSET"] == "in"
        raise RuntimeError("the block failed")
    assert os.environ["RAYSFT_T_SET"] == "before"
    assert "RAYSFT_T_UNSET" not in os.environ


# ---------------------------------------------------------------- a local Ray's end

# Starts a local Ray as a search does, has an actor leave a process of Ray's behind (the
# grandchild of a worker, in a session of its own: out of reach of Ray's cleanup of a worker's
# children and process group), then ends Ray with stop_ray, or ray.shutdown alone (argv[2]).
# A process of the caller's, started before Ray, is not Ray's to end.
_LEFT_BEHIND = """
import json, subprocess, sys, time
import ray
from raysft.search import ray_start

ray_start.SHUTDOWN_GRACE_S = 2.0
CHILD = (
    "import subprocess, sys, time\\n"
    "sleep = [sys.executable, '-c', 'import time; time.sleep(120)']\\n"
    "print(subprocess.Popen(sleep, start_new_session=True).pid, flush=True)\\n"
    "time.sleep(120)\\n"
)

@ray.remote(num_cpus=0)
class Spawner:
    def spawn(self):
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        return int(child.stdout.readline())

mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
ray_start.start_local_ray(lambda: ray.init(address="local", num_cpus=1, include_dashboard=True))
spawner = Spawner.remote()  # kept: an actor out of scope is ended, its child with it
left = ray.get(spawner.spawn.remote())
ray_start.stop_ray() if sys.argv[2] == "stop_ray" else ray.shutdown()
time.sleep(0.5)
json.dump({"left": left, "mine_alive": mine.poll() is None}, open(sys.argv[1], "w"))
mine.kill()
"""


@pytest.mark.parametrize("stop", ["stop_ray", "ray.shutdown"])
def test_stop_ray_ends_what_its_local_ray_left_running(tmp_path: Path, stop: str) -> None:
    import shutil
    import tempfile

    out = tmp_path / "pids.json"
    # Ray's socket paths must fit in 107 bytes: its temp dir cannot be under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="rsft-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LEFT_BEHIND, str(out), stop],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())
    left_alive = _alive(seen["left"])
    if left_alive:
        os.kill(seen["left"], signal.SIGKILL)
    assert seen["mine_alive"]
    # The control: Ray's shutdown alone leaves the process running.
    assert left_alive == (stop == "ray.shutdown")


def test_a_zombie_that_is_not_ours_to_reap_counts_as_ended(tmp_path: Path) -> None:
    """An ended process whose parent does not reap it (as an orphaned Ray worker under a PID 1
    that never reaps) is not waited on until the timeout."""
    import psutil

    from raysft.search.ray_start import _still_running

    pid_file = tmp_path / "zombie"
    code = (  # a parent that leaves its ended child unreaped
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'pass'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        _wait_for(pid_file)
        zombie = psutil.Process(int(pid_file.read_text()))
        for _ in range(100):
            if zombie.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        assert zombie.status() == psutil.STATUS_ZOMBIE
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        t0 = time.monotonic()
        assert _still_running([zombie], 30.0) == []
        assert time.monotonic() - t0 < 5
        assert _still_running([psutil.Process(sleeper.pid)], 0.5) == [psutil.Process(sleeper.pid)]
        sleeper.kill()
        sleeper.wait()
    finally:
        parent.kill()
        parent.wait()
