"""Is ``search.experiment_dir`` storage that every node of the cluster sees?

Tune keeps its experiment there and Ray Train each trial's checkpoints (``exp_dir/train``). A
path that exists on the head alone (not a shared mount) made every trial fail late, with Ray's
"Unable to set up cluster storage", which looked like a fault and was retried from step 0.
Checked once joined, before any trial: the driver writes a random marker into the directory,
and one task pinned to each alive node reads it and writes an answer back, which the driver
must then see. A single node (the laptop's local Ray) is not checked: nothing to share.

Imports ray only in the real probe (``probe_nodes``); the decision (``storage_problems``) takes
the probe as an argument, so it is tested without several nodes.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER_PREFIX = ".raysft-storage-check-"
# One small read and write per node; a hung NFS mount must not hold the driver for ever.
PROBE_TIMEOUT_S = 60.0
_FIX = "mount shared storage (NFS/EFS) at the same path on every node"


@dataclass(frozen=True)
class ClusterNode:
    node_id: str
    ip: str


# probe(nodes, marker, token, timeout_s) -> node id -> None (it read the token and wrote its
# answer) or why not; a node missing from the answer did not answer within timeout_s.
Probe = Callable[[list[ClusterNode], Path, str, float], dict[str, str | None]]


def alive_nodes() -> list[ClusterNode]:
    """The alive nodes of the cluster Ray is connected to, by id and address."""
    from raysft.search.resources import alive_node_entries

    return [
        ClusterNode(str(n["NodeID"]), str(n.get("NodeManagerAddress", "?")))
        for n in alive_node_entries()
    ]


def answer_path(marker: Path, node_id: str) -> Path:
    """Where the task on ``node_id`` writes its answer: beside the marker."""
    return marker.with_name(f"{marker.name}.{node_id}")


def storage_problems(
    exp_dir: Path,
    nodes: list[ClusterNode],
    probe: Probe,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> list[str]:
    """One problem per node that does not see ``exp_dir`` as the driver does; none on a single
    node (nothing is written or started then). The marker and the answers are removed."""
    if len(nodes) <= 1:
        return []
    token = secrets.token_hex(16)
    marker = exp_dir / f"{MARKER_PREFIX}{token[:8]}"
    marker.write_text(token, encoding="utf-8")
    try:
        answers = probe(nodes, marker, token, timeout_s)
        problems = []
        for node in nodes:
            why = answers.get(node.node_id, f"no answer within {timeout_s:g} s")
            if why is None and not _answered(answer_path(marker, node.node_id), token):
                why = "the file it wrote there is not seen by the driver"
            if why is not None:
                problems.append(
                    f"search.experiment_dir {exp_dir} is not visible from node {node.ip} "
                    f"({node.node_id}): {why}; {_FIX}"
                )
        return problems
    finally:
        for path in [marker, *(answer_path(marker, n.node_id) for n in nodes)]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _answered(path: Path, token: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == token
    except OSError:
        return False


def read_and_answer(marker: str, token: str, node_id: str) -> str | None:
    """On a node: None when ``marker`` holds ``token`` and the answer beside it was written,
    else why not. Never raises: the driver reports what it returns."""
    try:
        found = Path(marker).read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"it finds no {marker}"
    except OSError as err:
        return f"it cannot read {marker} ({err})"
    if found != token:
        return f"its {marker} is another file than the driver's (a directory of its own)"
    try:
        answer_path(Path(marker), node_id).write_text(token, encoding="utf-8")
    except OSError as err:
        return f"it cannot write there ({err})"
    return None


def probe_nodes(
    nodes: list[ClusterNode], marker: Path, token: str, timeout_s: float
) -> dict[str, str | None]:
    """The real probe: one ``read_and_answer`` task (no CPU: it runs on a node whose CPUs the
    trials hold, or a head with ``CPU: 0``) pinned to each node; those not done within
    ``timeout_s`` are cancelled and left out of the answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(read_and_answer)
    refs: dict[Any, str] = {
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
        ).remote(str(marker), token, node.node_id): node.node_id
        for node in nodes
    }
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    answers: dict[str, str | None] = {}
    for ref in done:
        try:
            answers[refs[ref]] = ray.get(ref)
        except Exception as err:  # the node died, or Ray could not run the task there
            answers[refs[ref]] = f"its check failed ({type(err).__name__}: {err})".split("\n")[0]
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    return answers


def check_shared_storage(
    exp_dir: Path,
    *,
    nodes: Callable[[], list[ClusterNode]] = alive_nodes,
    probe: Probe = probe_nodes,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> list[str]:
    """``storage_problems`` of the cluster Ray is connected to."""
    up = nodes()
    if len(up) > 1:
        log.info("checking that %d nodes see search.experiment_dir %s", len(up), exp_dir)
    return storage_problems(exp_dir, up, probe, timeout_s=timeout_s)
