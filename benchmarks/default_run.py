"""Headline numbers of the embedded default, measured side by side in one process.

    python benchmarks/default_run.py [--out benchmarks/results.json]

1. The default LoRA run (search_spaces/lora.yaml without its search section): wall time, base and
   trained held-out exact match.
2. Packing vs padding on the same data and steps: real tokens per second of training and the
   share of computed tokens that are real (packing efficiency).
Prints what it measured and on which machine; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from raysft.config import load_config
from raysft.train.recipe import run_trial

ROOT = Path(__file__).resolve().parents[1]


def _run(overrides: dict, tmp: Path, name: str) -> dict:
    cfg = load_config(
        ROOT / "search_spaces" / "lora.yaml", {**overrides, "output_dir": str(tmp / name)}
    )
    t0 = time.perf_counter()
    result = run_trial(cfg)
    wall = time.perf_counter() - t0
    tokens = sum(h["tokens"] for h in result.history)
    return {"wall_seconds": round(wall, 1), "tokens": tokens, **result.final, "data": result.data}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tmp", default="runs/bench")
    args = parser.parse_args()
    tmp = Path(args.tmp)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}"
    default = _run({}, tmp, "default")
    # Same steps and rows per step; packed rows hold more samples, so compare real tokens/second.
    short = {"train.max_steps": 30, "train.eval_every": 30, "train.exact_match": False}
    rows = {}
    for packing in (True, False):
        r = _run({**short, "data.packing": packing}, tmp, f"packing-{packing}")
        rows["packed" if packing else "padded"] = {
            "train_seconds": r["train_seconds"],
            "real_tokens": r["tokens"],
            "real_tokens_per_second": round(r["tokens"] / r["train_seconds"], 1),
            "eval_loss": r["eval_loss"],
            "packing_efficiency": r["data"]["packing_efficiency"],
        }
    out = {
        "machine": machine,
        "default_lora_run": {
            k: default[k]
            for k in (
                "wall_seconds",
                "train_seconds",
                "base_exact_match",
                "exact_match",
                "exact_match_gain",
                "eval_loss",
            )
        },
        "packing_vs_padding_30_steps": rows,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
