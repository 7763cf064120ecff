"""Base vs tuned, once per search: the base model and the best trial scored on the same
held-out rows, with the same metrics and decoding, side by side.

Runs as one Ray task with one worker's resources (on a cluster it lands where the trials ran,
with a GPU if they had one), while the search's Ray is still up. Trials themselves no longer
score the base (``TrialConfigs`` turns ``train.eval_base`` off): once per search, not per trial.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raysft.config import Config, SearchSpec, validate_tree
from raysft.evaluate import as_json, eval_rows, metrics_table, score_model, side_by_side

log = logging.getLogger(__name__)

COMPARISON_MD = "base_vs_tuned.md"
COMPARISON_JSON = "base_vs_tuned.json"
SHOWN = 5  # prompts shown side by side


def _score_pair(cfg_tree: dict[str, Any], tuned_dir: str) -> dict[str, Any]:
    """In a Ray worker: score the base and the tuned model on the trial config's eval rows."""

    cfg = validate_tree(cfg_tree, source="<best trial>")
    rows = eval_rows(cfg)
    scores = {
        "base": score_model(cfg.model.name_or_path, cfg, conversations=rows),
        "tuned": score_model(tuned_dir, cfg, conversations=rows),
    }
    return {
        "table": metrics_table(scores, conversations=rows),
        "side_by_side": side_by_side(scores, n=SHOWN),
        "scores": as_json(scores, n=SHOWN),
    }


def start(spec: SearchSpec, best_cfg: Config, tuned_dir: str) -> Any:
    """Launch the scoring as a Ray task; returns its handle for ``collect``. The driver promotes
    and draws meanwhile."""
    import ray

    res = spec.search.resources
    task = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus or 0)(_score_pair)
    return task.remote(best_cfg.model_dump(mode="json"), tuned_dir)


def collect(
    handle: Any, best_cfg: Config, tuned_dir: str, exp_dir: Path, *, mlc: Any, parent_id: str
) -> dict[str, Any]:
    """Wait for ``start``'s scores, write EXP_DIR/base_vs_tuned.{md,json}, log both to the
    parent run (files, and ``base_*``/``tuned_*`` metrics). Returns the JSON record."""
    import ray

    out = ray.get(handle)
    md = (
        f"# Base vs tuned ({best_cfg.model.name_or_path} vs {tuned_dir})\n\n"
        f"```\n{out['table']}\n```\n\n## Answers side by side\n\n```\n{out['side_by_side']}\n```\n"
    )
    (exp_dir / COMPARISON_MD).write_text(md, encoding="utf-8")
    path = exp_dir / COMPARISON_JSON
    path.write_text(json.dumps(out["scores"], indent=2, ensure_ascii=False), encoding="utf-8")
    for name, scored in out["scores"].items():
        for metric, value in scored["metrics"].items():
            if value is not None:
                mlc.log_metric(parent_id, f"{name}_{metric}", float(value))
    mlc.log_artifact(parent_id, str(exp_dir / COMPARISON_MD))
    mlc.log_artifact(parent_id, str(path))
    log.info("base vs tuned:\n%s", out["table"])
    return {"table": out["table"], "side_by_side": out["side_by_side"], **out["scores"]}
