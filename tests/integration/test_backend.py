"""A one-worker trial's Train run (raysft.search.backend) on a real local Ray: the worker gets
what Ray's torch backend gives it, and torch is imported nowhere else."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from .conftest import PYTHON, assert_no_other_ray, base_env, run_cmd

pytestmark = pytest.mark.integration

# Runs in a subprocess, as Tune's function trainable runs: it builds the Train run, so torch must
# stay out of it; the worker reads its own environment and the controller's memory map.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import ray, ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from raysft.search.ray_start import start_local_ray, stop_ray
    from raysft.search.trial import backend_config

    out, storage = sys.argv[1], sys.argv[2]

    def worker(config):
        import torch
        import torch.distributed
        from ray.util.state import list_actors

        alive = [("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]
        [ctl] = list_actors(filters=alive)
        with open(f"/proc/{ctl.pid}/maps") as maps:
            controller_has_torch = "libtorch" in maps.read()
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "ACCELERATE_TORCH_DEVICE")
        with open(config["out"], "w") as f:
            json.dump({
                "env": {k: os.environ.get(k) for k in keys},
                "process_group": torch.distributed.is_initialized(),
                "controller_has_torch": controller_has_torch,
            }, f)

    # As raysft.tune starts a local Ray: each worker's State API pinned to this cluster, not to
    # the latest one on the machine (another test's, in the other lane).
    # Started as raysft starts it: once more if its node is slow to register (a busy machine).
    start_local_ray(lambda: ray.init(
        num_cpus=1,
        runtime_env={"worker_process_setup_hook": "raysft.search.trial.pin_ray_address"},
    ))
    DataParallelTrainer(
        worker,
        train_loop_config={"out": out},
        backend_config=backend_config(1),  # what a one-worker trial gets
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="one", storage_path=storage),
    ).fit()
    print("driver imported torch:", "torch" in sys.modules)
    stop_ray()
    """
)


def test_one_worker_backend_sets_the_worker_up_and_keeps_torch_out_of_the_rest(
    tmp_path: Path, ray_tmp: Path
) -> None:
    assert_no_other_ray()
    script, out = tmp_path / "one_worker.py", tmp_path / "worker.json"
    script.write_text(SCRIPT, encoding="utf-8")
    ran = run_cmd(
        [PYTHON, str(script), str(out), str(tmp_path / "storage")],
        log=tmp_path / "run.log",
        cwd=tmp_path,
        env=base_env(RAY_TMPDIR=str(ray_tmp)),
        timeout=180,
    )
    assert ran.rc == 0, ran.explain()
    assert "driver imported torch: False" in ran.output, ran.tail()
    seen = json.loads(out.read_text())
    assert seen["env"] == {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "NODE_RANK": "0",
        "ACCELERATE_TORCH_DEVICE": "cpu",
    }, seen
    assert seen["process_group"] is False  # one worker: nothing to communicate with
    assert seen["controller_has_torch"] is False
    assert not ran.leftovers, f"processes left behind: {ran.leftovers}"
