"""The storage probe (raysft/search/storage.py) on a real local Ray: the task pinned to the
node runs there with no CPU to spare, reads the driver's marker and writes its answer, which
the driver sees; a marker the node cannot find is said. Several nodes without shared storage
are simulated in tests/unit/test_storage.py."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from .conftest import PYTHON, assert_no_other_ray, base_env, run_cmd

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import ray
    from raysft.search.ray_start import start_local_ray
    from raysft.search.storage import alive_nodes, answer_path, probe_nodes

    exp, out = Path(sys.argv[1]), sys.argv[2]
    # One CPU, held by an actor as a trial's worker holds it: the probe needs none.
    start_local_ray(lambda: ray.init(num_cpus=1, include_dashboard=False))

    @ray.remote(num_cpus=1)
    class Busy:
        def ping(self):
            return 1

    busy = Busy.remote()
    ray.get(busy.ping.remote())
    nodes = alive_nodes()
    marker = exp / "marker"
    marker.write_text("tok", encoding="utf-8")
    t0 = time.monotonic()
    seen = probe_nodes(nodes, marker, "tok", 60.0)
    took = time.monotonic() - t0
    missing = probe_nodes(nodes, exp / "absent", "tok", 60.0)
    json.dump({
        "nodes": [[n.node_id, n.ip] for n in nodes],
        "seen": seen,
        "answer": answer_path(marker, nodes[0].node_id).read_text(encoding="utf-8"),
        "missing": missing,
        "took": took,
    }, open(out, "w"))
    ray.shutdown()
    """
)


def test_the_probe_reads_the_marker_and_answers_on_the_node(tmp_path: Path, ray_tmp: Path) -> None:
    assert_no_other_ray()
    script, out, exp = tmp_path / "probe.py", tmp_path / "out.json", tmp_path / "exp"
    exp.mkdir()
    script.write_text(SCRIPT, encoding="utf-8")
    ran = run_cmd(
        [PYTHON, str(script), str(exp), str(out)],
        log=tmp_path / "run.log",
        cwd=tmp_path,
        env=base_env(RAY_TMPDIR=str(ray_tmp)),
        timeout=180,
    )
    assert ran.rc == 0, ran.explain()
    got = json.loads(out.read_text())
    [[node_id, ip]] = got["nodes"]
    assert ip and len(node_id) == 56  # Ray's hex node id
    assert got["seen"] == {node_id: None}  # read the marker, wrote its answer
    assert got["answer"] == "tok"  # which the driver sees
    assert got["missing"] == {node_id: f"it finds no {exp / 'absent'}"}
    assert got["took"] < 30, got  # a CPU-less task is not queued behind the trials
