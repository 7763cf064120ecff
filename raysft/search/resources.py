"""Where trials run: node discovery and the resource plan (how many trials at once).

Pure but for the node probes (torch for this machine, Ray's node table for a cluster), which are
imported only when called. The memory planner belongs here too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from raysft.config import SearchSection

# The Tune trial only hosts Ray Train V2's controller: it reserves no CPU, only a token of
# memory (Ray refuses an empty resource bundle), so N workers x 1 CPU fill N cores exactly.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"CPU": 0, "memory": float(1 << 20)}

Node = dict[str, float]  # {"CPU": n, "GPU": n}


@dataclass(frozen=True)
class ResourcePlan:
    cpus_per_trial: float
    gpus_per_trial: float
    concurrent: int
    nodes: str  # where the numbers came from

    def describe(self, search: SearchSection) -> str:
        r = search.resources
        return (
            f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, "
            f"{r.gpus_per_worker:g} GPU  (= {self.cpus_per_trial:g} CPU, "
            f"{self.gpus_per_trial:g} GPU)\n"
            f"concurrent trials: {self.concurrent} of {search.num_samples} ({self.nodes})"
        )


def attaching_to_cluster() -> bool:
    """``ray job submit`` and RAY_ADDRESS both mean: join an existing cluster."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def local_nodes() -> list[Node]:
    """What a laptop-mode Ray would see: this machine's CPUs and CUDA GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}]


def ray_nodes() -> list[Node]:
    """The alive nodes of the cluster Ray is connected to."""
    import ray

    return [
        {"CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def meant_for_a_cluster(search: SearchSection, nodes: list[Node]) -> bool:
    """A spec that asks for GPUs, checked on a machine without any: a cluster spec."""
    return search.resources.gpus_per_worker > 0 and not any(n.get("GPU") for n in nodes)


def plan_resources(
    search: SearchSection, nodes: list[Node], *, where: str
) -> tuple[ResourcePlan | None, list[str]]:
    """Check every worker fits on some node and work out how many trials run at once."""
    r = search.resources
    problems = []
    if not any(_workers_on(n, r.cpus_per_worker, r.gpus_per_worker) for n in nodes):
        have = (
            "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes) or "none"
        )
        problems.append(
            f"search.resources: no node has {r.cpus_per_worker:g} CPU and "
            f"{r.gpus_per_worker:g} GPU for one worker ({where}: {have})"
        )
        return None, problems
    cpus = r.workers * r.cpus_per_worker
    gpus = r.workers * r.gpus_per_worker
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    # A worker runs on one node: count the workers each node holds, then whole trials.
    slots = sum(_workers_on(n, r.cpus_per_worker, r.gpus_per_worker) for n in nodes)
    fits = slots // r.workers
    if fits < 1:
        problems.append(
            f"search.resources: one trial needs {r.workers} worker(s) of "
            f"{r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU (= {cpus:g} CPU, {gpus:g} GPU); "
            f"the cluster holds {slots} such worker(s) ({where}: {total_cpu:g} CPU, "
            f"{total_gpu:g} GPU)"
        )
        return None, problems
    concurrent = min(fits, search.max_concurrent or fits, search.num_samples)
    return ResourcePlan(cpus, gpus, concurrent, where), problems


def _workers_on(node: Node, cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPU and ``gpus`` GPU fit on one node.

    Floor division of floats undercounts fractions (``1.0 // 0.2 == 4.0``); Ray itself adds
    fractional resources up in units of 1e-4, so five 0.2-GPU workers share one GPU.
    """

    def times(have: float, need: float) -> int:
        return math.floor(have / need + 1e-6)

    n = times(node.get("CPU", 0), cpus)
    return min(n, times(node.get("GPU", 0), gpus)) if gpus else n
