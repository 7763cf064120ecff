"""The embedded default as a user runs it: `python -m raysft.train search_spaces/lora.yaml`.

No Ray: it runs with the other unit tests, off the integration tests' lanes (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_lora_run_lifts_exact_match_by_30_points(tmp_path: Path) -> None:
    # The shipped default exactly (search section ignored), one thread as on a busy CI core.
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysft.train",
            str(ROOT / "search_spaces" / "lora.yaml"),
            "--set",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-4000:]
    final = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))["final"]
    assert final["base_exact_match"] <= 0.05  # a base model: it continues text, does not answer
    assert final["exact_match"] - final["base_exact_match"] >= 0.30
    assert final["base_eval_loss"] > 2 * final["eval_loss"]  # the base on the same rows
    shown = re.search(r"eval_loss: ([\d.]+) \(base model ([\d.]+)\)", output)
    assert shown and float(shown.group(2)) == pytest.approx(final["base_eval_loss"], abs=1e-4)
    printed = re.search(r"held-out exact match: ([\d.]+)% \(base model ([\d.]+)%", output)
    assert printed, output[-4000:]
    assert float(printed.group(1)) == pytest.approx(final["exact_match"] * 100, abs=0.05)
