"""Champion gate: the best trial's adapter becomes a Model Registry version with alias
``champion`` only if it beats the current champion on the same eval data and metric.

``python -m raysft.promote EXPERIMENT_DIR`` re-runs it for a finished search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from raysft.config import Config, SearchSpec
from raysft.train.metrics import is_better, objective_mode

log = logging.getLogger("raysft.promote")

TAG_METRIC = "raysft.metric"
TAG_VALUE = "raysft.metric_value"
TAG_EVAL = "raysft.eval_fingerprint"
TAG_BASE = "raysft.base_model"


def _file_digest(spec: str) -> str:
    from raysft.assets import resolve

    path = Path(resolve(spec))
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
        return h.hexdigest()
    return spec  # a hub dataset name: its name is all we know


def eval_fingerprint(cfg: Config) -> str:
    """Same fingerprint <=> same eval examples, rendered and scored the same way."""
    d = cfg.data
    sources = d.eval if d.eval is not None else d.train
    parts = {
        "eval": [_file_digest(s) for s in ([sources] if isinstance(sources, str) else sources)],
        "split": None if d.eval is not None else [d.eval_fraction, cfg.train.seed],
        "render": [d.format, d.template, d.system_prompt, d.max_seq_len, d.max_eval_samples],
        "base": cfg.model.name_or_path,
        "score": [cfg.train.max_new_tokens],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def current_champion(mlc: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return mlc.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None  # no such registered model, or no version holds the alias yet


def _register(
    mlc: Any, *, adapter_dir: str, run_id: str, cfg: Config, metric: str, value: float, fp: str
) -> Any:
    import mlflow
    from mlflow.entities import LoggedModelStatus

    exp_id = mlc.get_run(run_id).info.experiment_id
    # MLflow 3 registers logged models, not artifact folders.
    lm = mlflow.initialize_logged_model(
        name="adapter",
        source_run_id=run_id,
        experiment_id=exp_id,
        model_type=f"peft-{cfg.method}" if cfg.method != "full" else "full-model",
    )
    mlc.log_model_artifacts(lm.model_id, adapter_dir)
    mlflow.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    tags = {
        TAG_METRIC: metric,
        TAG_VALUE: repr(value),
        TAG_EVAL: fp,
        TAG_BASE: cfg.model.name_or_path,
    }
    return mlflow.register_model(f"models:/{lm.model_id}", cfg.promote.registered_model, tags=tags)


def promote(
    *, mlc: Any, cfg: SearchSpec, best: dict[str, Any] | None, exp_dir: Path
) -> dict[str, Any]:
    """Gate, register, alias and export; returns the record that goes into summary.json."""
    p = cfg.promote
    s = cfg.search
    mode = objective_mode(s.metric, s.mode)
    if not p.enabled:
        return {"promoted": False, "reason": "promote.enabled is false"}
    if best is None or best.get("metric") is None:
        return {"promoted": False, "reason": "no trial reported the metric"}
    if not best.get("checkpoint"):
        return {"promoted": False, "reason": "the best trial left no checkpoint"}
    value, fp = float(best["metric"]), eval_fingerprint(cfg)
    record: dict[str, Any] = {
        "metric": s.metric,
        "value": value,
        "eval_fingerprint": fp,
        "registered_model": p.registered_model,
        "alias": p.alias,
    }
    champ = current_champion(mlc, p.registered_model, p.alias)
    if champ is not None:
        record["previous"] = {"version": champ.version, "value": champ.tags.get(TAG_VALUE)}
        comparable = champ.tags.get(TAG_EVAL) == fp and champ.tags.get(TAG_METRIC) == s.metric
        if not comparable:
            record.update(
                promoted=False,
                reason=(
                    f"champion v{champ.version} was scored on other eval data or metric "
                    f"(fingerprint {champ.tags.get(TAG_EVAL)}, "
                    f"metric {champ.tags.get(TAG_METRIC)}); "
                    "not replaced. Use a new promote.registered_model, or the same eval data."
                ),
            )
            return record
        old = float(champ.tags[TAG_VALUE])
        if not is_better(value, old, mode):
            record.update(
                promoted=False,
                reason=(
                    f"{s.metric} {value:.6g} does not beat champion v{champ.version} ({old:.6g})"
                ),
            )
            return record
    mv = _register(
        mlc,
        adapter_dir=best["checkpoint"],
        run_id=best["mlflow_run_id"],
        cfg=cfg,
        metric=s.metric,
        value=value,
        fp=fp,
    )
    mlc.set_registered_model_alias(p.registered_model, p.alias, mv.version)
    export = Path(p.export_dir) if p.export_dir else exp_dir / "champion"
    if export.exists():
        shutil.rmtree(export)
    shutil.copytree(best["checkpoint"], export)
    record.update(
        promoted=True,
        version=mv.version,
        export_dir=str(export.resolve()),
        reason="first champion" if champ is None else f"beats v{champ.version}",
    )
    log.info(
        "promoted %s v%s (%s=%.6g) -> alias %s; exported to %s",
        p.registered_model,
        mv.version,
        s.metric,
        value,
        p.alias,
        export,
    )
    return record
