"""Where trials run: node discovery, the resource plan (how many trials at once), the memory
plan (does a trial fit its GPU; how many trials share one; each process's cap). Starting or
joining Ray: ``ray_start.py``; waiting for an autoscaling cluster's nodes: ``autoscale.py``.

Pure but for the node probes (torch for this machine, Ray's node table for a cluster) and the
process cap, which import torch or ray only when called. The estimate itself: ``memory.py``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysft.config import ResourcesSection, SearchSection, SearchSpec
from raysft.search.memory import CUDA_CONTEXT, GIB, SHARE_HEADROOM, Estimate, gib

log = logging.getLogger(__name__)

# The Tune trial only hosts Ray Train V2's controller: it reserves no CPU, only a token of
# memory (Ray refuses an empty resource bundle), so N workers x 1 CPU fill N cores exactly.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"CPU": 0, "memory": float(1 << 20)}

Node = dict[str, float]  # {"CPU": n, "GPU": n, "gpu_memory_gib": GiB of its smallest GPU}
# GiB of one GPU of Ray's accelerator types, about what torch reports (the smaller model where a
# name covers two: V100 16 GB, A100 40 GB). Ray labels a node with its GPUs' type.
ACCELERATOR_GIB = {
    "T4": 14.5, "V100": 15.7, "A10G": 22.0, "A10": 22.0, "L4": 22.0, "L40S": 44.3,
    "A100": 39.3, "A100-40G": 39.3, "A100-80G": 79.1, "H100": 79.1, "H20": 94.9,
    "H200": 139.8, "B200": 178.3,
}  # fmt: skip
_ACCELERATOR_LABEL = "ray.io/accelerator-type"


@dataclass(frozen=True)
class ResourcePlan:
    cpus_per_trial: float
    gpus_per_trial: float
    concurrent: int
    nodes: str  # where the numbers came from
    memory: MemoryPlan | None = None  # when an estimate was given

    def describe(self, search: SearchSection) -> str:
        r = search.resources
        per_worker = self.gpus_per_trial / r.workers
        return (
            f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, "
            f"{per_worker:g} GPU  (= {self.cpus_per_trial:g} CPU, "
            f"{self.gpus_per_trial:g} GPU)\n"
            f"concurrent trials: {self.concurrent} of {search.num_samples} ({self.nodes})"
        )


CGROUP = Path("/sys/fs/cgroup")  # where a container's or Slurm job's CPU quota is read


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity (taskset, Slurm's cpuset), capped by a
    cgroup CPU quota (a container's --cpus), as Ray counts them; ``os.cpu_count`` is the
    host's, so a local Ray told it would run more trials than there are CPUs."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.floor(quota))) if quota else n


def _cgroup_quota() -> float | None:
    """CPUs a cgroup quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None for none."""
    try:
        if (CGROUP / "cpu.max").is_file():
            quota, period = (CGROUP / "cpu.max").read_text().split()[:2]
        else:
            quota = (CGROUP / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (CGROUP / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def local_nodes() -> list[Node]:
    """What a laptop-mode Ray would see: this machine's usable CPUs and CUDA GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    node = {"CPU": float(usable_cpus()), "GPU": float(gpus)}
    if gpus:
        sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(gpus)]
        node["gpu_memory_gib"] = min(sizes) / GIB
    return [node]


def alive_node_entries() -> list[dict[str, Any]]:
    """Ray's node table rows of the alive nodes of the cluster Ray is connected to."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def ray_nodes() -> list[Node]:
    """The alive nodes of the cluster Ray is connected to."""
    return [node_of(n) for n in alive_node_entries()]


def node_of(entry: dict[str, Any]) -> Node:
    """A node of Ray's node table: its CPUs, GPUs and, from the GPUs' accelerator type (a node
    label, or an ``accelerator_type:X`` resource), their memory when the type is known."""
    res = entry.get("Resources") or {}
    node = {"CPU": res.get("CPU", 0.0), "GPU": res.get("GPU", 0.0)}
    kind = (entry.get("Labels") or {}).get(_ACCELERATOR_LABEL)
    if kind is None:
        types = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        kind = types[0] if types else None
    if node["GPU"] and kind in ACCELERATOR_GIB:
        node["gpu_memory_gib"] = ACCELERATOR_GIB[kind]
    return node


def trials_on(search: SearchSection, nodes: list[Node], share: float | None = None) -> int:
    """Whole trials the nodes hold at once, each worker taking ``share`` GPU (default
    ``resources.gpus``: ``gpus_per_worker: auto`` counted as one GPU)."""
    r = search.resources
    g = r.gpus if share is None else share
    return sum(_workers_on(n, r.cpus_per_worker, g) for n in nodes) // r.workers


def wanted_trials(search: SearchSection) -> int:
    return min(search.max_concurrent or search.num_samples, search.num_samples)


def meant_for_a_cluster(search: SearchSection, nodes: list[Node]) -> bool:
    """A spec that asks for GPUs, checked on a machine without any: a cluster spec."""
    return search.resources.gpus > 0 and not any(n.get("GPU") for n in nodes)


def plan_resources(
    search: SearchSection,
    nodes: list[Node],
    *,
    where: str,
    estimate: Estimate | str | None = None,
) -> tuple[ResourcePlan | None, list[str]]:
    """Check every worker fits on some node and work out how many trials run at once.

    Given a trial's memory ``estimate`` (or why there is none), a GPU trial is also checked
    against the nodes' GPU memory, and ``gpus_per_worker: auto`` becomes the GPU share it fits.
    """
    r = search.resources
    memory = plan_memory(search, estimate, nodes, where=where) if estimate is not None else None
    share = memory.gpus_per_worker if memory else r.gpus
    problems = list(memory.problems) if memory else []
    if not any(_workers_on(n, r.cpus_per_worker, share) for n in nodes):
        have = (
            "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes) or "none"
        )
        problems.append(
            f"search.resources: no node has {r.cpus_per_worker:g} CPU and "
            f"{share:g} GPU for one worker ({where}: {have})"
        )
        return None, problems
    cpus = r.workers * r.cpus_per_worker
    gpus = r.workers * share
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    # A worker runs on one node: count the workers each node holds, then whole trials.
    slots = sum(_workers_on(n, r.cpus_per_worker, share) for n in nodes)
    fits = slots // r.workers
    if fits < 1:
        problems.append(
            f"search.resources: one trial needs {r.workers} worker(s) of "
            f"{r.cpus_per_worker:g} CPU, {share:g} GPU (= {cpus:g} CPU, {gpus:g} GPU); "
            f"the cluster holds {slots} such worker(s) ({where}: {total_cpu:g} CPU, "
            f"{total_gpu:g} GPU)"
        )
        return None, problems
    concurrent = min(fits, search.max_concurrent or fits, search.num_samples)
    if problems:
        return None, problems
    return ResourcePlan(cpus, gpus, concurrent, where, memory), problems


def _workers_on(node: Node, cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPU and ``gpus`` GPU fit on one node.

    Floor division of floats undercounts fractions (``1.0 // 0.2 == 4.0``); Ray itself adds
    fractional resources up in units of 1e-4, so five 0.2-GPU workers share one GPU. A
    fractional request takes its share of one GPU, never of two: 0.4 GPU fits twice per GPU,
    four times on two.
    """

    def times(have: float, need: float) -> int:
        return math.floor(have / need + 1e-6)

    n = times(node.get("CPU", 0), cpus)
    if not gpus:
        return n
    have = node.get("GPU", 0)
    per_gpu = times(have, gpus) if gpus >= 1 else math.floor(have + 1e-6) * times(1.0, gpus)
    return min(n, per_gpu)


# ---------------------------------------------------------------- the memory plan


def check_resources(
    tree: dict[str, Any],
    spec: SearchSpec,
    memory: Estimate | str | None,
    nodes: list[Node] | None,
    *,
    dry_run: bool,
) -> tuple[list[str], bool]:
    """Resource and GPU-memory problems of a spec (``memory``: its trials' estimate, or why
    there is none; ``nodes``: this machine's, None when joining a cluster), and whether they
    were checked against this machine.

    A cluster spec (joining one, or a GPU spec dry-run on a GPU-less machine) gets the memory
    check alone, against ``gpu_memory_gib``. ``gpus_per_worker: auto`` is resolved into ``tree``
    and ``spec`` (the share each trial gets), so every trial reads a number; except when
    joining a cluster, where it stays ``auto``: the driver resolves it from the cluster's nodes
    once joined (``resolve_auto_share``), whose GPUs take precedence over ``gpu_memory_gib``
    and over this machine's (a cluster's head may have none).
    """
    s = spec.search
    problems = gpu_sharing_problems(s.resources)
    here = nodes is not None and not (dry_run and meant_for_a_cluster(s, nodes))
    plan: MemoryPlan | None = None
    if nodes is not None and here:
        resources, more = plan_resources(s, nodes, where="this machine", estimate=memory)
        plan = resources.memory if resources else None
    elif memory is not None:
        plan = plan_memory(s, memory, None, where="the cluster's GPUs: unknown before joining it")
        more = plan.problems
        if not plan.checked and not dry_run:
            log.warning("%s", " / ".join(plan.lines()))
    else:
        more = []
    problems += more
    if plan is not None and nodes is not None and not problems:
        resolve_auto_share(tree, spec, plan.gpus_per_worker)
    return problems, nodes is None or here


def resolve_auto_share(tree: dict[str, Any], spec: SearchSpec, share: float) -> None:
    """``gpus_per_worker: auto`` becomes ``share`` in ``spec`` and in ``tree`` (what every trial
    validates again); a number is left as it is."""
    if spec.search.resources.gpus_per_worker != "auto":
        return
    tree.setdefault("search", {}).setdefault("resources", {})
    tree["search"]["resources"]["gpus_per_worker"] = share
    spec.search.resources.gpus_per_worker = share


def gpu_sharing_problems(r: ResourcesSection) -> list[str]:
    """A fraction of a GPU per worker needs ``workers: 1``: Ray may place two ranks of one trial
    on the same GPU, and NCCL refuses two ranks on one GPU (duplicate GPU)."""
    g = r.gpus
    problems = []
    if r.workers > 1 and 0 < g < 1:
        problems.append(
            f"search.resources: gpus_per_worker {g:g} with workers {r.workers}: Ray may place two "
            "ranks of one trial on one GPU and NCCL fails on them (duplicate GPU); use whole "
            "GPUs per worker (gpus_per_worker: 1) or workers: 1 to share GPUs between trials"
        )
    if g > 1 and not float(g).is_integer():
        problems.append(f"search.resources: gpus_per_worker {g:g}: above 1, whole GPUs only")
    return problems


@dataclass(frozen=True)
class MemoryPlan:
    """A trial's peak memory against the GPUs it may land on, and the GPU share it gets."""

    estimate: Estimate | None
    why_not: str | None  # no estimate: why
    # (largest, smallest) GPU in bytes of the nodes that can host a worker; None: unknown
    gpu: tuple[float, float] | None
    gpu_source: str
    gpus_per_worker: float  # resolved: auto -> 1/n
    problems: list[str] = field(default_factory=list)

    @property
    def checked(self) -> bool:
        return self.estimate is not None and (self.gpu is not None or self.estimate.device == "cpu")

    def lines(self) -> list[str]:
        """What --dry-run prints: the estimate, its breakdown, and the GPU check."""
        e = self.estimate
        if e is None:
            return [f"memory per trial: not estimated ({self.why_not}): memory check skipped"]
        kind = "GPU memory" if e.device == "gpu" else "host memory (a CPU trial: not checked)"
        others = [_phase(p, v) for p, v in e.phases.items() if p != e.peak_phase]
        out = [
            f"memory per trial: ~{gib(e.peak)} of {kind} at its peak ({e.peak_phase})",
            "  " + ", ".join(f"{k} {gib(v)}" for k, v in e.breakdown.items()),
            f"  other phases: {', '.join(others)}",
            f"  for: {e.assumptions}",
        ]
        if e.device == "gpu":
            out.append(self._gpu_line())
        return out

    def _gpu_line(self) -> str:
        if self.gpu is None:
            return (
                f"GPU memory: unknown ({self.gpu_source}); set search.resources.gpu_memory_gib "
                "to check it here: memory check skipped"
            )
        largest, smallest = self.gpu
        sizes = gib(smallest) if largest == smallest else f"{gib(smallest)} to {gib(largest)}"
        head = f"GPU memory: {sizes} ({self.gpu_source})"
        g = self.gpus_per_worker
        if self.problems:
            return f"{head}: does not fit"
        if g >= 1:
            return f"{head}: one trial per GPU"
        cap = memory_fraction(g, self.gpu[1]) * self.gpu[1]
        return (
            f"{head}: {math.floor(1 / g + 1e-6)} trials per GPU (gpus_per_worker {g:g}), "
            f"each process capped at {gib(cap)}"
        )


def _phase(name: str, parts: dict[str, float]) -> str:
    kv = parts.get("kv cache")
    return f"{name} {gib(sum(parts.values()))}" + (f" (kv cache {gib(kv)})" if kv else "")


def plan_memory(
    search: SearchSection, estimate: Estimate | str, nodes: list[Node] | None, *, where: str
) -> MemoryPlan:
    """Check a trial's estimate against the GPUs (of ``nodes``, else ``gpu_memory_gib``) and
    resolve ``gpus_per_worker: auto``: n trials per GPU when n of them fit in 90% of the
    smallest GPU, with workers 1; one whole GPU otherwise.

    Only the GPUs of nodes that can host a worker count (``worker_gpu_sizes``), and the trial
    must fit the smallest of them: Ray may place it on any, and a check against the largest
    passed trials that then ran out of memory on a smaller GPU of a mixed cluster."""
    r = search.resources
    if isinstance(estimate, str):
        return MemoryPlan(None, estimate, None, where, r.gpus)
    sizes = worker_gpu_sizes(r, nodes or [])
    if sizes:
        gpu: tuple[float, float] | None = (max(sizes), min(sizes))
        source = where
    elif r.gpu_memory_gib:
        size = r.gpu_memory_gib * GIB
        gpu, source = (size, size), "search.resources.gpu_memory_gib"
    else:
        gpu, source = None, f"{where}: no GPU visible" if nodes is not None else where
    share = r.gpus
    if estimate.device == "cpu" or gpu is None:
        return MemoryPlan(estimate, None, gpu, source, share)
    if r.gpus_per_worker == "auto" and r.workers == 1:
        n = math.floor(SHARE_HEADROOM * gpu[1] / estimate.peak)
        share = math.floor(1e4 / n) / 1e4 if n > 1 else 1.0  # Ray counts GPUs in 1e-4 units
    room = gpu[1] * min(share, 1.0)
    if estimate.peak <= room:
        return MemoryPlan(estimate, None, gpu, source, share)
    return MemoryPlan(
        estimate, None, gpu, source, share, [_too_big(estimate, share, gpu[1], source)]
    )


def worker_gpu_sizes(r: ResourcesSection, nodes: list[Node]) -> list[float]:
    """Bytes of the (smallest) GPU of each node that can host a worker: one with the CPUs and
    GPUs it asks for (``auto`` as a whole GPU) and a known GPU size. A GPU head that Ray gives
    no CPU (``CPU: 0``) never hosts one, so its GPU does not count."""
    return [
        n["gpu_memory_gib"] * GIB
        for n in nodes
        if "gpu_memory_gib" in n and n.get("GPU") and _workers_on(n, r.cpus_per_worker, r.gpus)
    ]


def _too_big(e: Estimate, share: float, smallest: float, source: str) -> str:
    parts = ", ".join(f"{k} {gib(v)}" for k, v in e.breakdown.items() if v)
    need = (
        f"search.resources: a trial needs ~{gib(e.peak)} of GPU memory at its peak "
        f"({e.peak_phase}: {parts})"
    )
    if share < 1:
        return (
            f"{need}; its share of a GPU (gpus_per_worker {share:g} of {gib(smallest)}, "
            f"{source}) is {gib(smallest * share)}"
        )
    return (
        f"{need}, the smallest GPU a worker may land on has {gib(smallest)} ({source}); "
        f"to lower it: {e.levers}"
    )


def memory_fraction(share: float, total: float) -> float:
    """The fraction of a GPU's memory torch's allocator may take for a process holding ``share``
    of the GPU: the share less the process's own CUDA context (outside the allocator), at least
    half the share."""
    return max(share - CUDA_CONTEXT / total, share / 2)


def cap_process_memory(share: float) -> float | None:
    """Cap this process's CUDA allocator at its share of the GPU (trials sharing a GPU), so one
    trial's cache cannot starve another's; the fraction set, or None when nothing is capped."""
    import torch

    if not 0 < share < 1 or not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = memory_fraction(share, total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
