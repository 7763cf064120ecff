"""What a search produced: trial status, trial rows, the best trial, the table and summary.json.

Pure (no Ray import): the driver hands in Tune's results as plain values. Trial status is defined
here once and judged by each trial's own resolved config, so a searched ``train.max_steps`` is
honoured; the MLflow callback uses the same classifier.
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Any

from raysft.train.metrics import METRICS

SUMMARY_FILE = "summary.json"


class TrialStatus(str, Enum):
    FINISHED = "finished"  # trained its own max_steps
    STOPPED_EARLY = "stopped_early"  # stopped by the scheduler (ASHA) before its last step
    FAILED = "failed"  # raised inside its worker

    @property
    def mlflow(self) -> str:
        """MLflow run status: an ASHA stop shows as KILLED, distinct from FAILED."""
        return {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}[self.value]


def classify(*, last_step: int | None, max_steps: int, error: bool) -> TrialStatus:
    """The status of an ended trial from its last reported step and its own ``max_steps``."""
    if error:
        return TrialStatus.FAILED
    if last_step is not None and last_step >= max_steps:
        return TrialStatus.FINISHED
    return TrialStatus.STOPPED_EARLY


def finite_or_none(value: Any) -> float | None:
    """A metric value usable for ranking: a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def trial_row(
    *,
    trial_id: str,
    metrics: dict[str, Any],
    sampled: dict[str, Any],
    max_steps: int,
    objective: str,
    error: str | None,
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    """One trial's line of summary.json: status, objective, every registry metric it reported."""
    status = classify(last_step=metrics.get("step"), max_steps=max_steps, error=error is not None)
    return {
        "trial_id": trial_id,
        "status": status.value,
        "metric": finite_or_none(metrics.get(objective)),
        "step": metrics.get("step"),
        "max_steps": max_steps,
        "exact_match": finite_or_none(metrics.get("exact_match")),
        "base_exact_match": finite_or_none(metrics.get("base_exact_match")),
        "metrics": {
            k: v for k, v in metrics.items() if k in METRICS and finite_or_none(v) is not None
        },
        "sampled": sampled,
        "checkpoint": metrics.get("checkpoint_path"),
        "mlflow_run_id": mlflow_run_id,
        "error": error,
    }


def rank(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first; trials without a (finite) metric last, in their given order."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda t: (t["metric"] is None, sign * (t["metric"] or 0.0)))


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Best finished trial of ranked ``rows``; ASHA-stopped ones trained less, so they come next."""
    for wanted in (TrialStatus.FINISHED.value, TrialStatus.STOPPED_EARLY.value):
        for row in rows:
            if row["status"] == wanted and row["metric"] is not None and row["checkpoint"]:
                return row
    return None


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {s.value: sum(r["status"] == s.value for r in rows) for s in TrialStatus}


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """The trials as an aligned text table, in the order given."""
    keys = sorted({k for r in rows for k in r["sampled"]})
    head = ["trial", "status", "step", metric, "exact_match", *keys]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r["trial_id"],
                r["status"],
                _fmt(r["step"]),
                _fmt(r["metric"]),
                _fmt(r["exact_match"]),
                *[_fmt(r["sampled"].get(k)) for k in keys],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def write_summary(exp_dir: Path, summary: dict[str, Any]) -> Path:
    """summary.json as strict JSON (a NaN anywhere is a bug, not a number to write)."""
    path = exp_dir / SUMMARY_FILE
    text = json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
