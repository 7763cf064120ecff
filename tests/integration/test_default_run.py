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
    base_env,
    render_spec,
    run_cmd,
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


@pytest.mark.parametrize(
    ("method", "wrapped"),
    [
        ("lora", "Wrapping provided model in DistributedDataParallel"),
        ("full", "FSDP: every decoder layer sharded over 2 workers"),
    ],
)
def test_two_worker_trial_trains_data_parallel(
    tmp_path: Path, ray_tmp: Path, method: str, wrapped: str
) -> None:
    # lora: DDP; full: FSDP (strategy auto), parameters, gradients and AdamW state sharded.
    assert_no_other_ray()
    updates = {
        "method": method,
        "search.experiment_dir": str(tmp_path / "exp"),
        "search.num_samples": 1,
        "search.resources.workers": 2,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    if method == "full":
        updates["search.params"] = {"train.learning_rate": {"type": "choice", "values": [1e-4]}}
    spec = render_spec("job_small.yaml", tmp_path / "spec.yaml", updates)
    ran = run_cmd(
        [PYTHON, "-m", "raysft.tune", str(spec)],
        log=tmp_path / "tune.log",
        cwd=tmp_path,
        env=base_env(RAY_TMPDIR=str(ray_tmp)),
        timeout=400,
    )
    assert ran.rc == 0, ran.explain()
    assert wrapped in ran.output
    workers = set(re.findall(r"RayTrainWorker pid=(\d+)", ran.output))
    assert len(workers) == 2, workers
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text(encoding="utf-8"))
    assert [t["status"] for t in summary["trials"]] == ["finished"]
    (trial,) = summary["trials"]
    assert math.isfinite(trial["metric"]), trial
    export = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert Path(trial["checkpoint"], export).is_file(), trial
    assert summary["promotion"]["promoted"] is True
