"""Base vs tuned, once per search: the base model and the best trial scored on the same
held-out rows, with the same metrics and decoding, side by side.

Runs as one Ray task with one worker's resources (on a cluster it lands where the trials ran,
with a GPU if they had one), while the search's Ray is still up. The driver reads the held-out
rows and hands them to the task, as it hands the trials their data: the task reads no data file.
Trials themselves no longer score the base (``TrialConfigs`` turns ``train.eval_base`` off): once
per search, not per trial.

The comparison is a report on the search, not part of it: when it fails (the base does not load
on the task's node, the task runs out of memory, ...) the search still ranks, promotes and writes
its summary, which records the failure and its reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysft.config import Config, SearchSpec, validate_tree
from raysft.data.formats import Conversation
from raysft.search.redact import scrubbed
from raysft.train.score_report import as_json, metrics_table, side_by_side
from raysft.train.score_saved import eval_rows, score_model

log = logging.getLogger(__name__)

COMPARISON_MD = "base_vs_tuned.md"
COMPARISON_JSON = "base_vs_tuned.json"
SHOWN = 5  # prompts shown side by side


def _score_pair(
    cfg_tree: dict[str, Any], tuned_dir: str, rows: list[Conversation]
) -> dict[str, Any]:
    """In a Ray worker: score the base and the tuned model on the held-out ``rows``."""
    cfg = validate_tree(cfg_tree, source="<best trial>")
    scores = {
        "base": score_model(cfg.model.name_or_path, cfg, conversations=rows),
        "tuned": score_model(tuned_dir, cfg, conversations=rows),
    }
    return {
        "table": metrics_table(scores),
        "side_by_side": side_by_side(scores, n=SHOWN),
        "scores": as_json(scores, n=SHOWN),
    }


def _score_pair_task(
    cfg_tree: dict[str, Any], tuned_dir: str, rows: list[Conversation]
) -> dict[str, Any]:
    """``_score_pair`` as the Ray task runs it: in a task process of its own, for this one
    scoring, a model that is not quantized loads without bitsandbytes' import, as in a trial's
    worker (``keep_bitsandbytes_out``: ~1 CPU-s on the finish's critical path)."""
    from raysft.search.trial import keep_bitsandbytes_out, no_progress_bars

    keep_bitsandbytes_out(str(cfg_tree.get("method")))
    no_progress_bars()
    return _score_pair(cfg_tree, tuned_dir, rows)


Scores = Callable[[], dict[str, Any]]  # waits for the task's scores; raises what it raised


def start(spec: SearchSpec, best_cfg: Config, tuned_dir: str) -> Scores:
    """Read the held-out rows and launch the scoring as a Ray task; returns what waits for its
    scores (``collect``). The driver promotes and draws meanwhile."""
    import ray

    try:
        rows = eval_rows(best_cfg)
    except Exception as err:  # a data file changed or went away since the search read it
        failure = err

        def raise_it() -> dict[str, Any]:
            raise failure

        return raise_it
    res = spec.search.resources
    task = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus or 0)(_score_pair_task)
    handle = task.remote(best_cfg.model_dump(mode="json"), tuned_dir, rows)
    return lambda: ray.get(handle)


def collect(scores: Scores, best_cfg: Config, tuned_dir: str, exp_dir: Path) -> dict[str, Any]:
    """Wait for ``start``'s scores and write EXP_DIR/base_vs_tuned.{md,json} (``log_comparison``
    logs them). Returns the JSON record; a failed scoring returns ``{"failed": True, "reason":
    ...}`` (the finish tags it on the parent run) and writes no file."""
    try:
        out = scores()
    except Exception as err:  # the task raised, its worker or node died, ...
        reason = scrubbed(err)
        log.warning("base vs tuned: the scoring failed (%s); the search goes on without it", reason)
        log.debug("base vs tuned failure", exc_info=True)
        return {"failed": True, "reason": reason}
    title = f"# Base vs tuned ({best_cfg.model.name_or_path} vs {tuned_dir})"
    md = f"{title}\n\n```\n{out['table']}\n```\n"
    if out["side_by_side"]:  # none where no metric generates (plain-text held-out rows)
        md += f"\n## Answers side by side\n\n```\n{out['side_by_side']}\n```\n"
    (exp_dir / COMPARISON_MD).write_text(md, encoding="utf-8")
    path = exp_dir / COMPARISON_JSON
    path.write_text(json.dumps(out["scores"], indent=2, ensure_ascii=False), encoding="utf-8")
    # The table itself is printed once, by the CLI's summary (``raysft.tune``).
    log.info("base vs tuned: scored, written to %s", exp_dir / COMPARISON_MD)
    return {"table": out["table"], "side_by_side": out["side_by_side"], **out["scores"]}


def log_comparison(mlc: Any, parent_id: str, exp_dir: Path, record: dict[str, Any]) -> None:
    """``collect``'s scores on the parent run: ``base_*``/``tuned_*`` metrics and both files. Apart
    from ``collect``, so that MLflow refusing them loses neither the scores nor the gate on them."""
    for name in ("base", "tuned"):
        for metric, value in record[name]["metrics"].items():
            if value is not None:
                mlc.log_metric(parent_id, f"{name}_{metric}", float(value))
    mlc.log_artifact(parent_id, str(exp_dir / COMPARISON_MD))
    mlc.log_artifact(parent_id, str(exp_dir / COMPARISON_JSON))


def base_value(comparison: dict[str, Any] | None, metric: str) -> float | None:
    """The base model's ``metric`` in a comparison (``collect``'s record, or summary.json's
    ``base_vs_tuned``); None where it was not scored."""
    if not isinstance(comparison, dict) or comparison.get("failed"):
        return None
    value = ((comparison.get("base") or {}).get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None
