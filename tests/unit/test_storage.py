"""Is search.experiment_dir storage every node sees (raysft/search/storage.py): the decision,
with the per-node probe given. The real probe on a real Ray: tests/integration/test_storage.py."""

from __future__ import annotations

from pathlib import Path

from raysft.search.storage import (
    MARKER_PREFIX,
    ClusterNode,
    read_and_answer,
    storage_problems,
)

FIX = "mount shared storage (NFS/EFS) at the same path on every node"


def _cluster_probe(elsewhere: Path, calls: list[list[str]]):
    """A probe as on a cluster of four nodes: ``a`` mounts the driver's directory, ``b`` has
    a directory of its own at that path (``elsewhere``), ``c`` never answers (a hung mount),
    and ``d`` reads the marker through a cache but writes its answer to its own disk."""

    def probe(nodes, marker, token, timeout_s):
        calls.append([n.node_id for n in nodes])
        out = {"a": read_and_answer(str(marker), token, "a")}
        out["b"] = read_and_answer(str(elsewhere / marker.name), token, "b")
        out["d"] = None
        return out

    return probe


def test_each_node_that_does_not_see_the_experiment_dir_is_named(tmp_path: Path) -> None:
    exp, elsewhere = tmp_path / "exp", tmp_path / "node-b"
    exp.mkdir()
    elsewhere.mkdir()
    nodes = [ClusterNode(i, f"10.0.0.{n}") for n, i in enumerate("abcd", start=1)]
    calls: list[list[str]] = []
    problems = storage_problems(exp, nodes, _cluster_probe(elsewhere, calls), timeout_s=60)
    assert calls == [["a", "b", "c", "d"]]  # one probe of every node, at once
    assert problems[0].startswith(
        f"search.experiment_dir {exp} is not visible from node 10.0.0.2 (b): "
        f"it finds no {elsewhere}/{MARKER_PREFIX}"
    )
    assert problems[0].endswith(f"; {FIX}")
    assert problems[1:] == [
        f"search.experiment_dir {exp} is not visible from node 10.0.0.3 (c): no answer within "
        f"60 s; {FIX}",
        f"search.experiment_dir {exp} is not visible from node 10.0.0.4 (d): the file it wrote "
        f"there is not seen by the driver; {FIX}",
    ]
    assert list(exp.iterdir()) == []  # marker and answers removed


def test_a_node_with_another_file_at_the_path_is_caught(tmp_path: Path) -> None:
    marker = tmp_path / f"{MARKER_PREFIX}x"
    marker.write_text("someone else's", encoding="utf-8")
    why = read_and_answer(str(marker), "token", "n1")
    assert why == f"its {marker} is another file than the driver's (a directory of its own)"
    assert not (tmp_path / f"{marker.name}.n1").exists()


def test_nodes_that_all_see_it_pass(tmp_path: Path) -> None:
    def shared(nodes, marker, token, timeout_s):
        return {n.node_id: read_and_answer(str(marker), token, n.node_id) for n in nodes}

    nodes = [ClusterNode("a", "10.0.0.1"), ClusterNode("b", "10.0.0.2")]
    assert storage_problems(tmp_path, nodes, shared) == []
    assert list(tmp_path.iterdir()) == []


def test_one_node_is_not_checked(tmp_path: Path) -> None:
    """The laptop's local Ray, or a one-node cluster: no probe, no file, no time."""

    def probe(*args):
        raise AssertionError("probed")

    assert storage_problems(tmp_path, [ClusterNode("a", "127.0.0.1")], probe) == []
    assert storage_problems(tmp_path, [], probe) == []
    assert list(tmp_path.iterdir()) == []
