"""Waiting for an autoscaling cluster's nodes (``scale_up``): a cluster launched from
``cluster.yaml`` starts with its head alone, so the driver asks the autoscaler for room for the
trials it wants at once and plans on the nodes that come up. Ray is imported only when called.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from raysft.config import SearchSection
from raysft.search.resources import Node, ray_nodes, trials_on, wanted_trials

log = logging.getLogger(__name__)

# The autoscaler has launched nothing, and no new node has come up, for this long: it is done
# (no node type fits, or it is at max_workers). Its update loop runs every 5 s by default.
AUTOSCALER_SETTLE_S = 60.0
AUTOSCALER_POLL_S = 2.0


def autoscaler_launching() -> int | None:
    """Nodes the cluster's autoscaler is launching (asked for, or still starting), or None when
    the cluster has no autoscaler (nodes started by hand). The cluster launcher's autoscaler
    (v1) writes its status into the GCS at every update; v2 (KubeRay) answers through its SDK."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if raw:
        report = json.loads(raw).get("autoscaler_report") or {}
        if not launches_nodes(report):
            return None
        launches = report.get("pending_launches") or {}
        return int(sum(launches.values())) + len(report.get("pending_nodes") or [])
    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        return v2_launching(get_cluster_status(ray.get_runtime_context().gcs_address))
    return None


def autoscaler_failures() -> list[str]:
    """What the cluster's autoscaler says went wrong: launches the cloud refused (v2, with its
    reason: quota, capacity) and nodes that failed while starting (v1 and v2)."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if raw:
        return v1_failures(json.loads(raw).get("autoscaler_report") or {})
    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        return v2_failures(get_cluster_status(ray.get_runtime_context().gcs_address))
    return []


def v1_failures(report: dict[str, Any]) -> list[str]:
    """A v1 autoscaler report's failed nodes (``[ip, node type]``), as ``ray status`` words them."""
    return [f"{kind}: node {ip} terminated" for ip, kind in report.get("failed_nodes") or []]


def v2_failures(status: Any) -> list[str]:
    """An autoscaler v2 ``ClusterStatus``'s failed launch requests and failed nodes."""
    launches = [
        f"{r.ray_node_type_name}: {r.count} launch(es) failed"
        + (f" ({r.details})" if r.details else "")
        for r in status.failed_launches
    ]
    nodes = [
        f"{n.ray_node_type_name}: node {n.instance_id} failed"
        + (f" ({why})" if (why := n.failure_detail or n.details) else "")
        for n in status.failed_nodes
    ]
    return launches + nodes


def v2_launching(status: Any) -> int:
    """Nodes an autoscaler v2 ``ClusterStatus`` says are on their way: its pending launch
    requests (failed ones are listed apart) and the nodes still starting."""
    return sum(r.count for r in status.pending_launches) + len(status.pending_nodes)


def launches_nodes(report: dict[str, Any]) -> bool:
    """Whether a v1 autoscaler report comes from one that launches nodes. ``ray start --head``
    without ``--autoscaling-config`` runs a read-only autoscaler too (for ``ray status``): it
    makes every node a node type of its own, named ``node_<node id>``, and launches nothing. A
    launcher config names its types (``head``, ``gpu_a10g``), the head's among them."""
    mapping = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def request_nodes(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for room for ``bundles`` (``[]`` withdraws the request)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _failures(failures: Callable[[], list[str]]) -> list[str]:
    """``failures()``, or none when the autoscaler's status cannot be read."""
    try:
        return failures()
    except Exception as err:  # an RPC error of Ray's autoscaler SDK: the wait's result stands
        log.warning("could not read what the cluster autoscaler says failed (%s)", err)
        return []


def _launching(launching: Callable[[], int | None]) -> int | None:
    """``launching()``, or None (no autoscaler to wait for) when its status cannot be read."""
    try:
        return launching()
    except Exception as err:  # an RPC error of Ray's autoscaler SDK: plan on the nodes up
        log.warning("could not read the cluster autoscaler's status (%s): not waiting for it", err)
        return None


def scale_up(
    search: SearchSection,
    nodes: Callable[[], list[Node]] = lambda: ray_nodes(),
    launching: Callable[[], int | None] = autoscaler_launching,
    request: Callable[[list[dict[str, float]]], None] = request_nodes,
    failures: Callable[[], list[str]] = autoscaler_failures,
    *,
    share: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[Node], str]:
    """The cluster's nodes to plan on, once its autoscaler (if any) has added what it can.

    A cluster launched from ``cluster.yaml`` starts with a CPU head alone: planned on the nodes
    up, a GPU search would be refused, and one with a worker up would run one trial at a time.
    When the nodes up hold fewer trials than wanted, the autoscaler is asked for room for them
    (``request_resources``) and the driver waits until they fit, until the autoscaler has
    launched nothing and no node has come up for ``AUTOSCALER_SETTLE_S``, or until
    ``search.resources.scale_up_timeout_s``. The request is then withdrawn: Tune's own demand
    keeps the nodes its trials use. Returns the nodes and how long it waited ("" if not), with
    what the autoscaler says failed when the nodes hold fewer trials than wanted.
    """
    r = search.resources
    up, wanted = nodes(), wanted_trials(search)
    g = r.gpus if share is None else share  # auto: the share the memory plan gives, if known
    have = trials_on(search, up, g)
    if have >= wanted or r.scale_up_timeout_s <= 0 or _launching(launching) is None:
        return up, ""
    worker = {"CPU": r.cpus_per_worker, **({"GPU": g} if g else {})}
    log.info(
        "the cluster's nodes hold %d of the %d trial(s) wanted at once: asking its autoscaler "
        "for nodes (waiting up to %g s, search.resources.scale_up_timeout_s)",
        have, wanted, r.scale_up_timeout_s,
    )  # fmt: skip
    start = changed = clock()
    request([dict(worker) for _ in range(r.workers * wanted)])
    try:
        while clock() - start < r.scale_up_timeout_s:
            sleep(AUTOSCALER_POLL_S)
            up = nodes()
            now = trials_on(search, up, g)
            if now >= wanted:
                break
            if now != have or _launching(launching):
                have, changed = now, clock()
            elif clock() - changed >= AUTOSCALER_SETTLE_S:
                break
    finally:
        request([])
    waited = clock() - start
    held = trials_on(search, up, g)
    log.info("after %.0f s, the cluster's nodes hold %d trial(s) at once", waited, held)
    said = f"after {waited:.0f} s of its autoscaler"
    if held < wanted and (failed := _failures(failures)):
        # Why the nodes did not come: a refusal of the search then says it, not only the wait.
        log.warning(
            "the cluster's autoscaler reports failures (its log on the head: "
            "/tmp/ray/session_latest/logs/monitor.*): %s", "; ".join(failed),
        )  # fmt: skip
        said += f", which reports: {'; '.join(failed)}"
    return up, said
