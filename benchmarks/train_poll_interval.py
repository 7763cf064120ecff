"""What Ray Train's controller poll interval costs a trial: bare Ray Train runs, no raysft.

    python benchmarks/train_poll_interval.py [--intervals 2.0 0.25] [--runs 3] [--out F.json]

Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's
default 2 s), and takes a worker's waiting report only then: the worker's report queue holds
one. Each interval runs in a fresh local Ray (2 CPUs, dashboard on, no PreemptionWatcher, as
raysft's local Ray), ``--runs`` times each of:

- ``one_report``: a 1-worker Train run whose function reports once; start to end of ``fit()``,
  the Train run's own fixed cost.
- ``ten_reports``: 1 worker, 1 torch thread, the same CPU work (10 x 1500 tanh(256x256
  matmuls)) with a synchronous ``ray.train.report`` after each tenth; the function's own wall
  and CPU time, and ``fit()``'s.

- ``idle_poll_cpu``: what polling costs. A 1-worker run whose function sleeps 30 s; the CPU
  time of every process on the machine (Ray's daemons, the controller, the worker, this one)
  over 15 s of it, as a share of one core.

Prints one JSON object (with the host); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raysft.bench.measure import machine

ROOT = Path(__file__).resolve().parents[1]


def _one_report(config: dict[str, Any]) -> None:
    import ray.train

    ray.train.report({"x": 1})


def _ten_reports(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(10):
        for _ in range(1500):
            a = torch.tanh(a @ a)
        ray.train.report({"step": step})
    # A file, not a report: a report without a checkpoint never reaches Result.metrics.
    Path(config["out"]).write_text(
        json.dumps({"fn_wall_s": time.perf_counter() - wall, "fn_cpu_s": time.process_time() - cpu})
    )


def _sleep(config: dict[str, Any]) -> None:
    time.sleep(30)


def _all_cpu_s() -> float:
    import psutil

    total = 0.0
    for proc in psutil.process_iter():
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _idle_poll_cpu(trainer: Any) -> float:
    """Share of one core all processes use over 15 s of ``trainer``'s sleeping run."""
    import threading

    window: list[tuple[float, float]] = []

    def sample() -> None:
        time.sleep(12)  # the worker group is up and its function sleeps
        window.append((time.perf_counter(), _all_cpu_s()))
        time.sleep(15)
        window.append((time.perf_counter(), _all_cpu_s()))

    sampler = threading.Thread(target=sample)
    sampler.start()
    trainer.fit()
    sampler.join()
    (t0, c0), (t1, c1) = window
    return round((c1 - c0) / (t1 - t0), 4)


def _child(interval: str, runs: int, scratch: Path) -> dict[str, Any]:
    """This process: one interval, in a Ray of its own."""
    import ray
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval,
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # as raysft's local Ray
    }
    ray.init(num_cpus=2, runtime_env={"env_vars": env})
    out: dict[str, Any] = {"one_report_fit_s": [], "ten_reports": [], "idle_poll_cpu": []}
    try:
        for i in range(runs):
            for name, fn in (("one", _one_report), ("ten", _ten_reports), ("idle", _sleep)):
                record = scratch / f"{name}-{i}.json"
                trainer = DataParallelTrainer(
                    fn,
                    train_loop_config={"out": str(record)},
                    scaling_config=ray.train.ScalingConfig(
                        num_workers=1, resources_per_worker={"CPU": 1}
                    ),
                    run_config=ray.train.RunConfig(
                        name=f"{name}-{i}", storage_path=str(scratch / "storage")
                    ),
                )
                if name == "idle":
                    out["idle_poll_cpu"].append(_idle_poll_cpu(trainer))
                    continue
                t0 = time.perf_counter()
                trainer.fit()
                fit_s = round(time.perf_counter() - t0, 2)
                if name == "one":
                    out["one_report_fit_s"].append(fit_s)
                else:
                    fn_times = json.loads(record.read_text())
                    fn_times = {k: round(v, 2) for k, v in fn_times.items()}
                    out["ten_reports"].append({"fit_s": fit_s, **fn_times})
    finally:
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intervals", nargs="+", default=["2.0", "0.25"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one interval, in this process
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.runs, args.scratch)))
        return 0

    import tempfile

    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/train_poll_interval.py", *sys.argv[1:]]),
        "host": machine(),
        "by_interval_s": {},
    }
    for interval in args.intervals:
        with tempfile.TemporaryDirectory(prefix="poll-") as scratch:
            cmd = [sys.executable, __file__, "--child", interval, "--runs", str(args.runs)]
            ran = subprocess.run(
                [*cmd, "--scratch", scratch],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval},
                check=False,
            )
        if ran.returncode != 0:
            print(ran.stderr[-3000:], file=sys.stderr)
            return ran.returncode
        result["by_interval_s"][interval] = json.loads(ran.stdout.strip().splitlines()[-1])
        print(interval, result["by_interval_s"][interval], flush=True)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
