"""``python -m raysft.promote EXPERIMENT_DIR``: re-run the champion gate for a finished search.

The gate itself lives in ``raysft.search.promote``; this is the command-line edge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NoReturn

from raysft.cli import run_cli, setup_logging
from raysft.config import validate_spec
from raysft.errors import SearchStateError
from raysft.search.promote import promote
from raysft.search.results import SUMMARY_FILE, read_summary, write_summary
from raysft.search.tracking import client


def _main() -> int:

    parser = argparse.ArgumentParser(prog="python -m raysft.promote", description=__doc__)
    parser.add_argument("experiment_dir", help="the search.experiment_dir of a finished search")
    args = parser.parse_args()
    setup_logging()
    exp_dir = Path(args.experiment_dir)
    summary = read_summary(exp_dir, sections=("resolved_spec", "mlflow"))
    if summary is None:
        raise SearchStateError(
            f"{exp_dir / SUMMARY_FILE}: not found (is {exp_dir} a finished search's experiment "
            "dir?)"
        )
    cfg = validate_spec(summary["resolved_spec"], source=str(exp_dir / SUMMARY_FILE))
    mlc = client(summary["mlflow"]["tracking_uri"])
    record = promote(mlc=mlc, cfg=cfg, best=summary.get("best"), exp_dir=exp_dir)
    summary["promotion"] = record
    write_summary(exp_dir, summary)
    print(json.dumps(record, indent=2))
    return 0


def main() -> NoReturn:
    """Entry point (``python -m raysft.promote`` and the ``raysft-promote`` script)."""
    run_cli(_main)


if __name__ == "__main__":
    main()
