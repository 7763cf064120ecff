"""The suite's own xdist scheduler (tests/conftest.py), run for real on a small test tree: every
integration test on one worker, one after the other, in INTEGRATION_ORDER, and unit tests on the
other worker meanwhile. If it broke, two Ray instances would meet in `make test`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each test appends "worker start end nodeid" to LOG; it sleeps so that the two lanes overlap.
_BODY = textwrap.dedent(
    """
    import os, time

    def _record(name, seconds):
        t0 = time.time()
        time.sleep(seconds)
        line = f"{os.environ.get('PYTEST_XDIST_WORKER', '-')} {t0} {time.time()} {name}\\n"
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
    # Collected in alphabetical order; the scheduler must run them in INTEGRATION_ORDER.
    for name in ("test_backend", "test_faults", "test_load", "test_search_local"):
        tests = "".join(
            f"\ndef test_{name}_{i}():\n    _record('{name}_{i}', 0.4)\n" for i in range(2)
        )
        (root / "tests" / "integration" / f"{name}.py").write_text(_BODY + tests)
    for m in range(4):
        tests = "".join(f"\ndef test_u{m}_{i}():\n    _record('u{m}_{i}', 0.3)\n" for i in range(2))
        (root / "tests" / "unit" / f"test_u{m}.py").write_text(_BODY + tests)


def test_integration_tests_run_on_one_worker_in_order_beside_the_unit_tests(tmp_path: Path):
    pytest.importorskip("xdist")
    _tree(tmp_path)
    log = tmp_path / "sched.log"
    # Not this run's xdist worker id or options (`make test` runs this test on a worker).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
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
    rows = [line.split(" ", 3) for line in log.read_text().splitlines()]
    runs = [(worker, float(start), float(end), name) for worker, start, end, name in rows]
    assert len(runs) == 16, runs
    integration = sorted((r for r in runs if not r[3].startswith("u")), key=lambda r: r[1])
    unit = [r for r in runs if r[3].startswith("u")]

    assert "-" not in {r[0] for r in runs}, "a test ran outside xdist's workers"
    assert len({r[0] for r in integration}) == 1, f"integration tests on two workers: {runs}"
    order = [r[3].rsplit("_", 1)[0] for r in integration]
    expected = ["test_faults", "test_search_local", "test_backend", "test_load"]
    assert order == [name for name in expected for _ in range(2)], order
    # One after the other, never two at once.
    assert all(a[2] <= b[1] for a, b in zip(integration, integration[1:], strict=False))
    # The other worker ran unit tests while the integration lane was busy.
    lane = (integration[0][1], integration[-1][2])
    beside = [r for r in unit if r[0] != integration[0][0] and r[1] < lane[1] and r[2] > lane[0]]
    assert beside, f"no unit test ran beside the integration lane: {runs}"
