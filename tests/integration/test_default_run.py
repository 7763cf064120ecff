"""A data-parallel (2-worker) trial of each strategy. (The embedded default as a user trains it:
tests/unit/test_default_run.py, which needs no Ray.)"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from .conftest import (
    assert_no_other_ray,
    render_spec,
    run_tune,
)

pytestmark = pytest.mark.integration


def test_two_worker_trials_train_data_parallel_ddp_and_fsdp(tmp_path: Path, ray_tmp: Path) -> None:
    # One search, two trials of 2 workers each: method lora trains with DDP, method full with
    # FSDP (strategy auto): parameters, gradients and AdamW state sharded. TPE (seed 0) samples
    # full, then lora.
    assert_no_other_ray()
    spec = render_spec(
        "job_small.yaml",
        tmp_path / "spec.yaml",
        {
            "search.params": {"method": {"type": "choice", "values": ["lora", "full"]}},
            "search.experiment_dir": str(tmp_path / "exp"),
            "search.resources.workers": 2,
            "train.learning_rate": 1e-3,
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    ran = run_tune(spec, tmp_path, ray_tmp, timeout=400)
    assert ran.rc == 0, ran.explain()
    assert "Wrapping provided model in DistributedDataParallel" in ran.output
    assert "FSDP: every decoder layer sharded over 2 workers" in ran.output
    workers = set(re.findall(r"RayTrainWorker pid=(\d+)", ran.output))
    assert len(workers) == 4, workers  # 2 per trial
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text(encoding="utf-8"))
    trials = {t["sampled"]["method"]: t for t in summary["trials"]}
    assert sorted(trials) == ["full", "lora"], summary["trials"]
    for method, trial in trials.items():
        assert trial["status"] == "finished", trial
        assert math.isfinite(trial["metric"]), trial
        export = "model.safetensors" if method == "full" else "adapter_model.safetensors"
        assert Path(trial["checkpoint"], export).is_file(), trial
    assert summary["promotion"]["promoted"] is True
