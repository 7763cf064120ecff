"""The embedded default as a user runs it, and a data-parallel (2-worker) trial."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from .conftest import (
    PYTHON,
    assert_no_other_ray,
    render_spec,
    run_cmd,
    run_tune,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_default_lora_run_lifts_exact_match_by_30_points(tmp_path: Path) -> None:
    # The shipped default exactly (search section ignored), as `python -m raysft.train`.
    ran = run_cmd(
        [
            PYTHON,
            "-m",
            "raysft.train",
            str(ROOT / "search_spaces" / "lora.yaml"),
            "--set",
            f"output_dir={tmp_path / 'out'}",
        ],
        log=tmp_path / "train.log",
        cwd=tmp_path,
        timeout=600,
    )
    assert ran.rc == 0, ran.explain()
    final = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))["final"]
    assert final["base_exact_match"] <= 0.05  # a base model: it continues text, does not answer
    assert final["exact_match"] - final["base_exact_match"] >= 0.30
    printed = re.search(r"held-out exact match: ([\d.]+)% \(base model ([\d.]+)%", ran.output)
    assert printed, ran.tail()
    assert float(printed.group(1)) == pytest.approx(final["exact_match"] * 100, abs=0.05)


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
