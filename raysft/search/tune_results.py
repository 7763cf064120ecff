"""Tune's results as plain values: a trial's metrics, sampled config, cause of failure, failed
attempts and reported history, read from its ``Result`` and Tune's own files."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from raysft.search import redact, tracking
from raysft.search import results as res
from raysft.search.space import trial_output_dir
from raysft.search.trial import ATTEMPTS_FILE, TrialFailure, read_attempts

log = logging.getLogger(__name__)


def result_of(result: Any, exp_dir: Path) -> dict[str, Any]:
    """A Tune result as plain values (no Ray types past this point), with the trial's cause of
    failure (not Ray's wrapper) and its failed attempts."""
    m = dict(result.metrics or {})
    trial_id = trial_id_of(result) or Path(result.path).name
    error = None
    if result.error is not None:
        error = res.error_cause(result.error).removeprefix(f"{TrialFailure.__name__}: ")
        # An exception may quote a token or a URL with its password: scrubbed as logged params
        # are, before it reaches summary.json and MLflow tags.
        error = redact.redact("error", error)
    attempts_file = Path(trial_output_dir(exp_dir, trial_id)) / ATTEMPTS_FILE
    attempts = [
        {**a, "error": redact.redact("error", a["error"])} if isinstance(a.get("error"), str) else a
        for a in read_attempts(attempts_file)
    ]
    return {
        "trial_id": trial_id,
        "number": trial_number(Path(result.path).name, trial_id),
        "metrics": m,
        "sampled": dict(result.config),
        "error": error,
        "attempts": attempts,
        "history": _history_of(result),
    }


# Tune names a trial's directory TRAINABLE_{trial_id}_{N}_{values}_{date}; its trial ids are 8
# hex digits (``Trial.generate_id``).
_DIR_TRIAL_ID = re.compile(r"_([0-9a-f]{8})_\d+(?:_|$)")


def trial_id_of(result: Any) -> str | None:
    """A Tune result's trial id: from its reports, else (a trial that never reported) from
    the name of its directory; None where neither holds it."""
    trial_id = (result.metrics or {}).get("trial_id")
    if isinstance(trial_id, str) and trial_id:
        return trial_id
    m = _DIR_TRIAL_ID.search(Path(str(result.path or "")).name)
    return m[1] if m else None


def _history_of(result: Any) -> list[dict[str, Any]] | None:
    """Every record a trial reported (``tracking.trial_history``), from Tune's own file of its
    reports; None where it cannot be read (MLflow's copy is then all there is)."""
    path = f"{result.path}/result.json"
    fs = getattr(result, "filesystem", None)  # pyarrow's, where Tune's storage is not local
    try:
        if fs is None:
            text = Path(path).read_text(encoding="utf-8")
        else:
            with fs.open_input_stream(path) as fh:
                text = fh.read().decode("utf-8")
        return tracking.trial_history(text.splitlines())
    except (OSError, ValueError) as err:
        log.debug("trial history %s not read: %s", path, err)
        return None


def trial_number(dirname: str, trial_id: str) -> int | None:
    """Tune's creation counter of a trial (1, 2, ...), from its directory name
    ``TRAINABLE_{trial_id}_{N}_{values}_{date}``; None when the name does not hold it."""
    m = re.search(rf"_{re.escape(trial_id)}_(\d+)(?:_|$)", dirname)
    return int(m[1]) if m else None
