"""A search joining a cluster that starts as ``cluster.yaml``'s does: a head with no CPU for
trials and worker nodes from zero, launched by a real Ray autoscaler (v1: ``ray start --head
--autoscaling-config``) through Ray's fake multi-node provider, which starts each node it
launches as a Ray node on this machine.

Autoscaler v2, which ``ray up`` runs by default since Ray 2.50, cannot run this way from the
Ray 2.60 wheel: its monitor fills the fake provider's defaults from
``autoscaler/_private/fake_multi_node/example.yaml``, which the wheel does not ship (the monitor
exits with FileNotFoundError). Its status reading is unit-tested (tests/unit/test_search.py).

The head runs in its own process group and everything it starts (the autoscaler's monitor, the
nodes it launches) carries this module's MARK_VAR, by which it is stopped: never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import (
    MARK_VAR,
    _wait_http_ok,
    assert_no_other_ray,
    base_env,
    cmdline,
    kill_all,
    kill_group,
    marked_pids,
    new_mark,
    ray_head_command,
    render_spec,
    run_tune,
    start_ray,
    wait_gone,
)

pytestmark = pytest.mark.integration


@dataclass
class Head:
    proc: subprocess.Popen
    mark: str
    gcs_port: int
    client_env: dict[str, str]  # token auth (Ray's default for local clusters since 2.59)


def autoscaling_config(gcs_port: int) -> dict:
    """A cluster launcher config for the fake provider: a head with 0 CPU, and up to two
    1-CPU workers, none at the start (``min_workers: 0``, as cluster.yaml's GPU workers)."""
    return {
        "cluster_name": "raysft-it-autoscale",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu1": {
                "resources": {"CPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, ray_tmp: Path) -> Iterator[Head]:
    assert_no_other_ray()
    root = tmp_path_factory.mktemp("autoscale")
    config = root / "autoscaling.json"
    cmd, gcs, dash = ray_head_command(
        ray_tmp, "--num-cpus=0", "--num-gpus=0", f"--autoscaling-config={config}"
    )
    config.write_text(json.dumps(autoscaling_config(gcs)))
    token_file = root / "auth_token"
    token_file.write_text(token := secrets.token_hex(32))
    token_file.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    mark = new_mark()
    env = base_env(
        **{MARK_VAR: mark},
        **auth,
        RAY_FAKE_CLUSTER="1",  # the fake provider refuses to run without it
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    log = root / "ray-start.log"
    proc = start_ray(cmd, env, root, log)
    try:
        url = f"http://127.0.0.1:{dash}/api/version"
        _wait_http_ok(url, proc, log, timeout=120, Authorization=f"Bearer {token}")
        yield Head(proc, mark, gcs, auth)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        # The nodes the autoscaler launched outlive their head's `ray start`: no grace here.
        left = wait_gone(5, pgid=proc.pid, mark=mark)
        if left:
            kill_group(proc.pid)
            kill_all(left)
            wait_gone(10, pgid=proc.pid, mark=mark)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_a_search_on_a_head_alone_waits_for_the_nodes_the_autoscaler_launches(
    head: Head, tmp_path: Path, ray_tmp: Path
) -> None:
    # Nothing but the head (0 CPU) is up: planned on it, the search would be refused.
    spec = render_spec(
        "job_small.yaml",
        tmp_path / "spec.yaml",
        {
            "search.experiment_dir": str(tmp_path / "exp"),
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            # Short trials: what is tested is where they run.
            "train.max_steps": 2,
            "train.eval_every": 2,
            "train.exact_match": False,
            "search.metric": "eval_loss",
        },
    )
    t0 = time.monotonic()
    ran = run_tune(
        spec,
        tmp_path,
        ray_tmp,
        env={**head.client_env, "RAY_ADDRESS": f"127.0.0.1:{head.gcs_port}"},
        timeout=300,
    )
    assert ran.rc == 0, ran.explain()
    assert "hold 0 of the 2 trial(s) wanted at once: asking its autoscaler" in ran.output
    # Both trials at once, on the two nodes it launched.
    planned = re.search(
        rf"concurrent trials: 2 of 2 \(cluster [\d.]+:{head.gcs_port}, after (\d+) s of its "
        r"autoscaler\)",
        ran.output,
    )
    assert planned, ran.tail(200)
    assert int(planned.group(1)) < time.monotonic() - t0
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"], summary
    assert summary["promotion"]["promoted"] is True
    # The nodes are the autoscaler's: Ray processes of this cluster beyond the head's.
    raylets = [p for p in marked_pids(head.mark) if cmdline(p).split(" ")[0].endswith("raylet")]
    assert len(raylets) == 3, raylets  # the head's and two launched
