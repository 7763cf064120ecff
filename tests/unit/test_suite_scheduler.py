"""The suite's own xdist scheduler (tests/conftest.py), run for real on a small test tree: the
integration tests in two lanes, each on a worker of its own, its modules one after the other in
INTEGRATION_LANES order, the two lanes side by side, then the unit tests. If it broke, one lane's
tests would overlap (the load test beside a `ray start` cluster's start-up, which must finish in
Ray's fixed 30 s) or the lanes would queue behind each other and `make test` take longer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each test appends "worker start end run-id name" to LOG; it sleeps so that the two lanes overlap.
_BODY = textwrap.dedent(
    """
    import os, time

    def _record(name, seconds):
        t0 = time.time()
        time.sleep(seconds)
        run = os.environ.get("RAYSFT_IT_RUN", "-")
        line = f"{os.environ.get('PYTEST_XDIST_WORKER', '-')} {t0} {time.time()} {run} {name}\\n"
        with open(os.environ["SCHED_LOG"], "a") as f:
            f.write(line)
    """
)


def _tree(root: Path) -> None:
    (root / "tests" / "integration").mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\n")  # rootdir here: node ids start with tests/
    (root / "tests" / "unit").mkdir()
    (root / "tests" / "conftest.py").write_text(
        (ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"), encoding="utf-8"
    )
    # Collected in alphabetical order; the scheduler must run them in INTEGRATION_LANES order.
    for name in (
        "test_backend",
        "test_faults",
        "test_job_submit",
        "test_load",
        "test_search_local",
    ):
        tests = "".join(
            f"\ndef test_{name}_{i}():\n    _record('{name}_{i}', 0.4)\n" for i in range(2)
        )
        (root / "tests" / "integration" / f"{name}.py").write_text(_BODY + tests)
    for m in range(4):
        tests = "".join(f"\ndef test_u{m}_{i}():\n    _record('u{m}_{i}', 0.3)\n" for i in range(2))
        (root / "tests" / "unit" / f"test_u{m}.py").write_text(_BODY + tests)


def test_integration_tests_run_in_two_ordered_lanes_side_by_side(tmp_path: Path):
    pytest.importorskip("xdist")
    _tree(tmp_path)
    log = tmp_path / "sched.log"
    # Not this run's xdist worker id or options (`make test` runs this test on a worker).
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "RAYSFT_IT_RUN"
    }
    env["SCHED_LOG"] = str(log)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line.split(" ", 4) for line in log.read_text().splitlines()]
    runs = [(w, float(start), float(end), name) for w, start, end, _run, name in rows]
    assert len(runs) == 18, runs
    assert "-" not in {r[0] for r in runs}, "a test ran outside xdist's workers"
    # Every worker got the one id of this pytest run: how a lane tells its sibling's Ray.
    ids = {row[3] for row in rows}
    assert len(ids) == 1 and "-" not in ids, ids

    lanes = []
    for names in (
        ["test_faults", "test_search_local", "test_backend"],
        ["test_job_submit", "test_load"],
    ):
        lane = sorted((r for r in runs if r[3].rsplit("_", 1)[0] in names), key=lambda r: r[1])
        assert len({r[0] for r in lane}) == 1, f"a lane on two workers: {lane}"
        order = [r[3].rsplit("_", 1)[0] for r in lane]
        assert order == [name for name in names for _ in range(2)], order
        # One after the other, never two of a lane at once.
        assert all(a[2] <= b[1] for a, b in zip(lane, lane[1:], strict=False)), lane
        lanes.append((lane[0][0], lane[0][1], lane[-1][2]))
    (w0, start0, end0), (w1, start1, end1) = lanes
    assert w0 != w1, "the two lanes ran on one worker"
    assert start1 < end0 and start0 < end1, f"the lanes did not run side by side: {lanes}"
    assert sorted(r[3] for r in runs if r[3].startswith("u")) == [
        f"u{m}_{i}" for m in range(4) for i in range(2)
    ]
