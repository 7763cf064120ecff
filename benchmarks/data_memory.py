"""What a trial's worker pays to take a search's data from its driver: the driver's object
(``raysft.data.shared.read_once``, the bytes Ray's object store holds), the seconds to unpickle
it and the memory the unpickled data holds for the whole trial (tracemalloc), on the 50,000
rows of ``benchmarks/shared_data.py`` (``--rows`` for another count). With ``--before``, an
older checkout measured the same way, in a process of its own, e.g. 2026-12-06's lists of ints:

    git worktree add /tmp/before b3b7bce
    python benchmarks/data_memory.py --before /tmp/before --workdir runs/data-memory --rows 100000

Prints one JSON line per checkout. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

_MEASURE = "--measure"


def _measure(workdir: Path) -> dict[str, object]:
    """In this process: read the rows as the driver does, then take them as a worker does."""
    from raysft.config import load_config
    from raysft.data.shared import read_once
    from raysft.train.model import training_tokenizer

    cfg = load_config(
        None,
        {
            "data.train": [str(workdir / "big.jsonl")],
            "data.eval": "embedded:tasks-eval.jsonl",
            "data.max_seq_len": 256,
            "output_dir": str(workdir / "out"),
        },
    )
    shared = read_once(cfg, training_tokenizer(cfg), seed_searched=False)
    gc.collect()
    t0 = time.perf_counter()
    data = shared.prepared()
    unpickle_s = time.perf_counter() - t0
    del data
    gc.collect()
    tracemalloc.start()
    data = shared.prepared()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    samples = data.train + data.eval
    return {
        "samples": len(samples),
        "tokens": sum(len(e.input_ids) for e in samples),
        "object_mib": round(len(shared.payload) / 2**20, 1),
        "unpickle_s": round(unpickle_s, 2),
        "held_mib": round(held / 2**20, 1),
    }


def _run(workdir: Path, variant: str, pythonpath: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, __file__, _MEASURE, str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {"variant": variant, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    if sys.argv[1:2] == [_MEASURE]:
        print(json.dumps(_measure(Path(sys.argv[2]))))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from shared_data import _prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="an older checkout to measure too")
    parser.add_argument("--workdir", default="runs/data-memory")
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    _prepare(workdir, rows=args.rows)
    here = str(Path(__file__).resolve().parent.parent)
    for variant, path in (("this", here), ("before", args.before)):
        if path:
            print(json.dumps(_run(workdir, variant, str(Path(path).resolve()))), flush=True)


if __name__ == "__main__":
    main()
