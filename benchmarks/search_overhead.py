"""Where a laptop search's wall time goes, against the bare training of its trials.

    python benchmarks/search_overhead.py [SPEC] [--out benchmarks/search_overhead.json]

1. Runs ``python -m raysft.tune SPEC`` (default: search_spaces/lora.yaml) into a temp dir and
   times it; reads the driver's split from summary.json (Ray start, MLflow setup, trials,
   finish: promotion, base vs tuned, plots) and each trial's own (setup_s, step_s, eval_s,
   checkpoint_s; elapsed_s for the ones ASHA stopped).
2. Bare training: each trial's own config, trained again in this process one after another,
   with the same threads, for the steps that trial actually ran, with no checkpoints, no Ray
   and no base scoring. Its step_s + eval_s is the work the search had to do. "The same
   threads": a trial's ``train.num_threads``, else what Ray gives a worker of
   ``cpus_per_worker`` CPUs (OMP_NUM_THREADS = that number, hence torch's thread count).
3. Prints the split and the ratio search wall / bare training. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raysft.bench.measure import machine

ROOT = Path(__file__).resolve().parents[1]


def _search(spec: Path, tmp: Path) -> tuple[dict[str, Any], float]:
    cmd = [
        sys.executable, "-m", "raysft.tune", str(spec),
        "--set", f"search.experiment_dir={tmp / 'exp'}",
        "--set", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "--set", "promote.registered_model=raysft-bench-overhead",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return json.loads((tmp / "exp" / "summary.json").read_text()), wall


def _bare(summary: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Each trial's config again, in-process, for the steps it ran: the training work alone."""
    from raysft.config import load_config
    from raysft.search.space import trial_config
    from raysft.train.recipe import run_trial

    out = []
    resources = summary["resolved_spec"]["search"]["resources"]
    for t in summary["trials"]:
        trial_dir = Path(summary["experiment_dir"]) / "trials" / t["trial_id"]
        cfg_file = trial_dir / "config.yaml"
        overrides = {"output_dir": str(tmp / "bare" / t["trial_id"]), "train.eval_base": False}
        if cfg_file.is_file():
            cfg = load_config(cfg_file, overrides)
        else:  # stopped by ASHA: no outputs; rebuild its config from the spec and its values
            cfg = trial_config(
                summary["resolved_spec"], t["sampled"], output_dir=overrides["output_dir"]
            )
        threads = cfg.train.num_threads or max(1, int(resources["cpus_per_worker"]))
        cfg.train.num_threads = threads
        steps = int(t["step"] or 0)
        if steps < cfg.train.max_steps:  # same LR schedule length does not change the time
            cfg = cfg.model_copy(
                update={"train": cfg.train.model_copy(update={"max_steps": steps})}
            )
            cfg.train.exact_match = False  # the stopped trial never generated
        result = run_trial(cfg)
        f = result.final
        out.append(
            {
                "trial_id": t["trial_id"],
                "threads": threads,
                "steps": steps,
                "step_s": f.get("step_s", 0.0),
                "eval_s": f.get("eval_s", 0.0),
                "setup_s": f.get("setup_s", 0.0),
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", nargs="?", default=str(ROOT / "search_spaces" / "lora.yaml"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raysft-overhead-") as d:
        tmp = Path(d)
        summary, wall = _search(Path(args.spec).resolve(), tmp)
        bare = _bare(summary, tmp)
    work = sum(b["step_s"] + b["eval_s"] for b in bare)
    trials = [
        {
            "trial_id": t["trial_id"],
            "status": t["status"],
            "step": t["step"],
            **{k: t["metrics"].get(k) for k in ("elapsed_s", "setup_s", "step_s", "eval_s")},
            **{k: t["metrics"].get(k) for k in ("checkpoint_s",)},
        }
        for t in summary["trials"]
    ]
    report = {
        "machine": machine(),  # CPU model and bf16 support: the hosts of this VM differ
        "command": " ".join(["python benchmarks/search_overhead.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "spec": args.spec,
        "search_wall_s": round(wall, 1),
        "driver_split_s": summary.get("timing"),
        "trials": trials,
        "bare": bare,
        "bare_training_s": round(work, 1),
        "bare_setup_s": round(sum(b["setup_s"] for b in bare), 1),
        "ratio_search_to_bare_training": round(wall / work, 2) if work else None,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
