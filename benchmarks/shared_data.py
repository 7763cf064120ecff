"""What reading a search's data once saves: a search of 3 one-at-a-time trials on a 50,000-row
training file, with this checkout and with an older one (``--before``, e.g. a ``git worktree``
of 1d87161, before ``raysft/data/shared.py``), runs alternating, each a fresh
``python -m raysft.tune`` (local Ray).

    git worktree add /tmp/before 1d87161
    python benchmarks/shared_data.py --before /tmp/before --workdir runs/shared-data --rounds 2

Prints one JSON line per run: wall time, the driver's split (summary.json ``timing``) and each
trial's ``setup_s`` and ``elapsed_s`` (its metrics.json). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from raysft.assets import resolve

ROWS = 50_000
SPEC = """\
model: {name_or_path: "embedded:tiny-base"}
method: lora
lora: {r: 4, alpha: 8, dropout: 0.0}
data:
  train: ["big.jsonl"]
  eval: "embedded:tasks-eval.jsonl"
  max_seq_len: 256
  max_eval_samples: 20
train: {learning_rate: 2.0e-3, warmup_ratio: 0.0, batch_size: 4, max_steps: 4, eval_every: 2,
        exact_match: false, eval_base: false, num_threads: 1}
search:
  params:
    lora.r: {type: choice, values: [4, 8, 16]}
  metric: eval_loss
  num_samples: 3
  seed: 0
  max_concurrent: 1
  scheduler: {type: none}
  resources: {workers: 1, cpus_per_worker: 1}
  experiment_dir: exp
tracking: {uri: "sqlite:///mlflow.db", experiment: shared-data}
promote: {enabled: false}
"""


def _prepare(workdir: Path, *, rows: int = ROWS) -> None:
    """``rows`` rows (50,000): the embedded Alpaca rows again and again, each instruction
    numbered."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines = Path(resolve("embedded:tasks-alpaca.jsonl")).read_text(encoding="utf-8").splitlines()
    alpaca = [json.loads(line) for line in lines if line.strip()]
    with (workdir / "big.jsonl").open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = dict(alpaca[i % len(alpaca)])
            row["instruction"] = f"{row['instruction']} (#{i})"
            f.write(json.dumps(row) + "\n")
    (workdir / "spec.yaml").write_text(SPEC, encoding="utf-8")


def _run(workdir: Path, variant: str, pythonpath: str | None) -> dict[str, object]:
    for name in ("exp", "mlflow.db"):
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    with (workdir / f"{variant}.log").open("w") as log:
        rc = subprocess.call(
            [sys.executable, "-m", "raysft.tune", "spec.yaml"],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wall = round(time.perf_counter() - t0, 1)
    trials = []
    for path in sorted((workdir / "exp" / "trials").glob("*/metrics.json")):
        final = json.loads(path.read_text())["final"]
        trials.append({"setup_s": final.get("setup_s"), "elapsed_s": final.get("elapsed_s")})
    summary = json.loads((workdir / "exp" / "summary.json").read_text()) if rc == 0 else {}
    return {"variant": variant, "rc": rc, "wall_s": wall, "timing": summary.get("timing"),
            "trials": trials}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="a checkout of the commit to compare with")
    p.add_argument("--workdir", default="runs/shared-data")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    workdir = Path(args.workdir).resolve()
    _prepare(workdir)
    for _ in range(args.rounds):
        for variant, path in (("this", None), ("before", str(Path(args.before).resolve()))):
            print(json.dumps(_run(workdir, variant, path)), flush=True)


if __name__ == "__main__":
    main()
