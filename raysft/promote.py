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
from raysft.search.results import SUMMARY_FILE, write_summary
from raysft.search.tracking import client


def _main() -> int:

    parser = argparse.ArgumentParser(prog="python -m raysft.promote", description=__doc__)
    parser.add_argument("experiment_dir", help="the search.experiment_dir of a finished search")
    args = parser.parse_args()
    setup_logging()
    exp_dir = Path(args.experiment_dir)
    summary_path = exp_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise SearchStateError(
            f"{summary_path}: not found (is {exp_dir} a finished search's experiment dir?)"
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SearchStateError(f"{summary_path}: not valid JSON: {err}") from None
    if not isinstance(summary, dict) or not all(
        isinstance(summary.get(key), dict) for key in ("resolved_spec", "mlflow")
    ):
        raise SearchStateError(
            f"{summary_path}: not a raysft summary (no resolved_spec and mlflow sections)"
        )
    cfg = validate_spec(summary["resolved_spec"], source=str(summary_path))
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
