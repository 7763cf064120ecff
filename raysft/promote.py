"""``python -m raysft.promote EXPERIMENT_DIR``: re-run the champion gate for a finished search.

The gate itself lives in ``raysft.search.promote``; this is the command-line edge.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from raysft.cli import EXIT_FINISH_FAILED, run_command, setup_logging
from raysft.config import validate_spec
from raysft.errors import ConfigError, SearchStateError
from raysft.search import notes, tracking
from raysft.search.compare import base_value
from raysft.search.experiment import recorded_digests
from raysft.search.finish_steps import FinishSteps
from raysft.search.promote import promote
from raysft.search.redact import redact, scrubbed
from raysft.search.results import SUMMARY_FILE, read_summary, write_summary
from raysft.search.tracking_requests import FAST_REQUESTS, bound_retries, capped_environ
from raysft.search.tracking_store import client, local_store
from raysft.train.metrics import objective_mode

log = logging.getLogger(__name__)


def _main() -> int:

    parser = argparse.ArgumentParser(prog="python -m raysft.promote", description=__doc__)
    parser.add_argument("experiment_dir", help="the search.experiment_dir of a finished search")
    parser.add_argument(
        "--tracking-uri",
        help="the MLflow tracking URI (default: the search's, from summary.json; needed when "
        "its password was redacted there)",
    )
    args = parser.parse_args()
    setup_logging()
    bound_retries()  # a search's retries and timeouts, not MLflow's minutes per request
    # Absolute: the gate runs in the search's working dir (below), not necessarily this one.
    exp_dir = Path(args.experiment_dir).resolve()
    if not exp_dir.is_dir():
        what = "a file" if exp_dir.exists() else "no such directory"
        raise SearchStateError(f"{exp_dir}: {what}; give a finished search's experiment dir")
    summary = read_summary(exp_dir, sections=("resolved_spec", "mlflow"))
    if summary is None:
        raise SearchStateError(
            f"{exp_dir / SUMMARY_FILE}: not found (is {exp_dir} a finished search's experiment "
            "dir?)"
        )
    source = str(exp_dir / SUMMARY_FILE)
    cfg = validate_spec(summary["resolved_spec"], source=source)
    try:
        objective_mode(cfg.search.metric, cfg.search.mode)
    except ValueError as err:
        raise ConfigError(source, [f"resolved_spec: search.metric: {err}"]) from None
    if args.tracking_uri:
        mlc = _registry(args.tracking_uri, "--tracking-uri")
    else:
        mlc = _registry(summary["mlflow"].get("tracking_uri"), f"{source}: mlflow.tracking_uri")
    best = summary.get("best")
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("trial_id"), str)):
        raise SearchStateError(f"{source}: best: not a trial's record (no trial_id)")
    if best is not None and not isinstance(best.get("checkpoint"), str | None):
        raise SearchStateError(f"{source}: best.checkpoint: not a path (a string)")
    # The spec's relative paths (data.eval, promote.export_dir) as the search read them.
    with contextlib.chdir(_search_dir(summary, source)):
        record = promote(
            mlc=mlc, cfg=cfg, best=best, exp_dir=exp_dir,
            base_value=base_value(summary.get("base_vs_tuned"), cfg.search.metric),
            recorded=recorded_digests(exp_dir),  # what the trials were scored on
        )  # fmt: skip
    unwritten: list[str] = []
    if record.get("failed") and summary.get("promotion"):
        pass  # a failed retry keeps the record it would have replaced
    elif record.get("failed"):
        summary["promotion"] = record
        write_summary(exp_dir, summary)
    else:
        summary["promotion"] = record
        unwritten = _tell_the_parent_run(mlc, exp_dir, summary)
    print(json.dumps(record, indent=2))
    if record.get("failed"):
        raise SearchStateError(f"{exp_dir}: promotion failed: {record['reason']}")
    if unwritten:
        for line in unwritten:
            print(f"error: {line}", file=sys.stderr)
        outcome = "promoted" if record.get("promoted") else f"not promoted ({record['reason']})"
        print(
            f"error: {outcome}, but the parent run still says what the search's finish left; "
            f"{exp_dir / SUMMARY_FILE} holds this outcome (run this command again to retry)",
            file=sys.stderr,
        )
        return EXIT_FINISH_FAILED
    return 0


# What the finish wrote about the promotion on the parent run, and its failed step's name.
_PARENT_STEPS = (
    "MLflow: the promotion tag",
    "MLflow: the parent run's description",
    "MLflow: summary.json",
)


def _tell_the_parent_run(mlc: Any, exp_dir: Path, summary: dict[str, Any]) -> list[str]:
    """summary.json, then the parent run, say what this promotion did: its tag, description
    and summary.json artifact still said what the finish's failed promotion left. The failures
    this retries leave failed_steps; any step that fails again is put back, and returned."""
    parent = summary["mlflow"].get("parent_run_id")
    retried = ("promotion: ", *(f"{what}: " for what in _PARENT_STEPS))
    summary["failed_steps"] = [
        f for f in summary.get("failed_steps") or [] if not str(f).startswith(retried)
    ]
    if not isinstance(parent, str):  # a summary from before raysft kept it: summary.json alone
        write_summary(exp_dir, summary)
        return []
    # The finish's own steps (one that fails is recorded, and none is tried once the server is
    # found out of reach), in the finish's order: tag and description, then summary.json.
    steps = FinishSteps()
    tag = json.dumps(summary["promotion"])[:5000]
    steps.mlflow(_PARENT_STEPS[0], mlc.set_tag, parent, tracking.PROMOTION_TAG, tag)
    steps.mlflow(_PARENT_STEPS[1], notes.describe_parent, mlc, parent, summary)
    summary["failed_steps"] += steps.failures
    path = write_summary(exp_dir, summary)
    closing = FinishSteps(steps.unreachable)
    closing.upload(_PARENT_STEPS[2], mlc.log_artifact, parent, str(path))
    if closing.failures:
        summary["failed_steps"] += closing.failures
        write_summary(exp_dir, summary)
    return steps.failures + closing.failures


def _search_dir(summary: dict[str, Any], source: str) -> str:
    """The directory the search ran in (summary.json's ``working_dir``), or this one for a
    summary written before raysft kept it, or when it is gone (said once)."""
    where = summary.get("working_dir")
    if not isinstance(where, str):
        return "."
    if not Path(where).is_dir():
        log.warning(
            "%s: working_dir: %s, where the search ran, is gone: the spec's relative paths are "
            "read from %s",
            source,
            where,
            Path.cwd(),
        )
        return "."
    return where


def _registry(uri: Any, where: str) -> Any:
    """The MLflow client of the search's registry, reached before anything is decided. A
    SQLite store that is not there is refused: MLflow would make a new, empty one and find no
    champion in it."""
    if not isinstance(uri, str) or not uri:
        raise SearchStateError(f"{where}: missing")
    shown = redact("tracking_uri", uri)  # the URI given may hold a password
    if "***" in uri:
        raise SearchStateError(
            f"{where}: {uri}: its password was redacted when saved; pass the real URI with "
            "--tracking-uri"
        )
    db = local_store(uri) if uri.startswith("sqlite:///") else None
    if db is not None and db.name != ":memory:" and not db.is_file():
        raise SearchStateError(f"{where}: {shown}: no such database file")
    try:
        mlc = client(uri)
        with capped_environ(FAST_REQUESTS):  # asked once: a server down is said at once
            mlc.search_registered_models(max_results=1)
    except Exception as err:
        raise SearchStateError(
            f"{where}: {shown}: cannot reach the model registry ({scrubbed(err)})"
        ) from None
    return mlc


def main() -> NoReturn:
    """Entry point (``python -m raysft.promote`` and the ``raysft-promote`` script)."""
    run_command(_main)


if __name__ == "__main__":
    main()
