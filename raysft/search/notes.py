"""What MLflow's UI shows of a search: run names made of the sampled values, the experiment's,
the parent run's and each trial run's descriptions (markdown)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from raysft.search.redact import redact
from raysft.train.metrics import objective_mode

NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (markdown)
# Short names in run names and plots; any other path goes by its last segment.
SHORT_NAMES = {
    "train.learning_rate": "lr",
    "lora.r": "r",
    "lora.alpha": "alpha",
    "train.neftune_alpha": "neft",
}


def clipped(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: cut at a space (a word or URL cut in the
    middle reads as another), the cut marked with "…"."""
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    if " " in head[limit // 2 :]:  # else one long word: cut inside it
        head = head.rsplit(" ", 1)[0]
    return head.rstrip() + "…"


def experiment_note(exp_id: str) -> str:
    """The experiment's description: MLflow 3.17's UI ignores the kind tag and opens it on its
    GenAI overview (``runs_page``), so the description says how to reach the runs."""
    runs = f"#/experiments/{exp_id}/runs?workflowType=machine_learning"
    # The UI shows the first line alone until the description is unfolded: what to do first.
    return (
        f"Training runs, not traces: [open the runs]({runs}), or set the sidebar's switch to "
        "**Model training** (once per browser).\n\n"
        "Hyperparameter searches by raysft: one parent run per search, its trials nested under "
        "it, named by their sampled values and trial id."
    )


def short_name(path: str) -> str:
    return SHORT_NAMES.get(path, path.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
    """2 significant digits for floats: ``3.2e-3`` and ``1.2e-2`` below 0.1 (so a learning rate
    range keeps one notation), ``0.25`` and ``16`` up to 100; anything else as written."""
    if not isinstance(value, float) or value == 0 or not math.isfinite(value):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if 0.1 <= abs(value) < 100:  # learning rates (rarely 0.1 or more) stay in one notation
        text = f"{value:.2g}"
        if "e" not in text:  # 99.5 rounds to 1e+02
            return text
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def run_name(sampled: dict[str, Any], order: Sequence[str] = ()) -> str:
    """A trial's sampled values as a run name: ``lr=3.2e-3 r=8 alpha=16 neft=5``.

    ``order`` (the spec's parameter order) comes first: Tune moves products to the end.
    """
    keys = [k for k in order if k in sampled] + [k for k in sampled if k not in order]
    # A searched secret (unlikely, but a name is logged like a param) shows as REDACTED.
    return " ".join(f"{short_name(k)}={redact(k, format_value(sampled[k]))}" for k in keys)[:250]


def trial_run_name(sampled: dict[str, Any], order: Sequence[str], trial_id: str) -> str:
    """A trial's MLflow run name: its sampled values, then its trial id, ``lr=3.2e-3 r=8
    alpha=16 neft=5 (b3d53107)``. Two trials of one search can sample the same values (a space
    of choices, or values equal at 2 significant digits); the id tells their runs apart and names
    the trial as the terminal's table, summary.json and ``trials/<id>/`` do."""
    tail = f" ({trial_id})"
    return run_name(sampled, order)[: 250 - len(tail)] + tail


def describe_parent(mlc: Any, parent_id: str, summary: dict[str, Any]) -> str:
    """The parent run's description (the UI's "Description"): best trial, metric, promotion."""
    text = describe(summary)
    mlc.set_tag(parent_id, NOTE_TAG, text)
    return text


def describe(summary: dict[str, Any]) -> str:
    """summary.json in three markdown lines: best trial, trial counts, promotion outcome."""
    metric, best = summary["metric"], summary.get("best")
    counts = summary.get("counts") or {}
    if best is None:
        rows = summary.get("trials") or []
        head = (
            f"No finished or stopped-early trial has a finite `{metric}` and a checkpoint "
            "(failed and diverged trials are never promoted): nothing to promote."
            if any(r.get("metric") is not None for r in rows)
            else f"No trial reported a finite `{metric}`: nothing to promote."
        )
    else:
        order = list((summary.get("resolved_spec") or {}).get("search", {}).get("params", {}))
        step = f" at step {best['step']} of {best['max_steps']}" if best.get("step") else ""
        better = "lower" if objective_mode(metric, summary.get("mode")) == "min" else "higher"
        head = (
            f"Best trial: **{run_name(best['sampled'], order)}** "
            f"(trial `{best['trial_id']}`, {best['status'].replace('_', ' ')}{step}): "
            f"**{metric} = {best['metric']:.4g}** ({better} is better)."
        )
    tally = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n)
    parts = [head, f"Trials: {tally or 'none'}.", _promotion_line(summary)]
    table = _trials_table(summary)
    return "\n\n".join([*parts, table] if table else parts)


_TABLE_ROWS = 20  # trials listed in the parent's description, best first
_TABLE_CHARS = 5000  # and fewer if their names are long: MLflow caps a tag at 8000 characters


def _trials_table(summary: dict[str, Any]) -> str:
    """The ranked trials as a markdown table, each name a link to its run: the runs table
    folds the trials under the parent and shows no metric until columns are picked."""
    rows = summary.get("trials") or []
    if not rows:
        return ""
    metric = summary["metric"]
    order = list((summary.get("resolved_spec") or {}).get("search", {}).get("params", {}))
    exp_id = (summary.get("mlflow") or {}).get("experiment_id")
    lines = [f"| # | trial | status | step | {metric} |", "|---|---|---|---|---|"]
    listed = 0
    for i, row in enumerate(rows[:_TABLE_ROWS], 1):
        if sum(map(len, lines)) > _TABLE_CHARS:
            break
        listed = i
        name = trial_run_name(row["sampled"], order, row["trial_id"]).replace("|", "/")
        if exp_id and row.get("mlflow_run_id"):
            name = f"[{name}](#/experiments/{exp_id}/runs/{row['mlflow_run_id']})"
        value = row.get("metric")
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
        step = f"{row['step']}/{row['max_steps']}" if row.get("step") is not None else "-"
        lines.append(f"| {i} | {name} | {row['status'].replace('_', ' ')} | {step} | {shown} |")
    if len(rows) > listed:
        lines.append(f"\n{len(rows) - listed} more in summary.json.")
    return "\n".join(lines)


def trial_note(row: dict[str, Any], *, metric: str, scheduler: str, best: bool) -> str:
    """A trial run's description (the UI's "Description"): how it ended, at which step, with
    which value; an ASHA stop said to be one, not a failure."""
    step, of = row.get("step"), row["max_steps"]
    at = f"at step {step} of {of}" if step is not None else f"before its first eval (of {of} steps)"
    value = row.get("metric")
    scored = f"{metric} {value:.4g}" if value is not None else f"no finite {metric}"
    status = row["status"]
    if status == "finished":
        text = f"Finished {at}: {scored}."
    elif status == "stopped_early":
        text = (
            f"Stopped early by the {scheduler} scheduler {at}: {scored} at its last eval. "
            "Not a failure: the scheduler gave its steps to more promising trials."
        )
    elif status == "diverged":
        text = f"Diverged {at}: a non-finite metric; stopped at once, never ranked."
    else:
        cause = (row.get("error") or "no error recorded").strip().splitlines() or [""]
        text = f"Failed {at}: {clipped(cause[-1], 300)} (tag `raysft.error`: the whole error)."
    return f"**The search's best trial.** {text}" if best else text


def _promotion_line(summary: dict[str, Any]) -> str:
    p = summary.get("promotion") or {}
    if p.get("promoted"):
        return (
            f"Promotion: **promoted** as `{p['registered_model']}` v{p['version']} "
            f"(alias `{p['alias']}`): {p.get('reason', '')}."
        )
    return f"Promotion: **not promoted**: {p.get('reason', 'promotion did not run')}."
