"""The champion in MLflow's Model Registry: the tags a promoted version carries, the version
holding the alias, registering an export as a new version, moving the alias, undoing a version
that never became champion."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from raysft.assets import BUNDLED_BASE, absolute_if_local
from raysft.config import Config, PromoteSection
from raysft.search.redact import scrubbed
from raysft.search.results import finite_or_none

log = logging.getLogger("raysft.promote")

TAG_METRIC = "raysft.metric"
TAG_VALUE = "raysft.metric_value"
TAG_EVAL = "raysft.eval_fingerprint"
# sha256 (first 16) of the eval samples' token ids the search scored on, where it read them:
# the fingerprint names the data and settings, this what they tokenized to (promote._refusal).
TAG_EVAL_TOKENS = "raysft.eval_tokens"
TAG_BASE = "raysft.base_model"
TAG_RUN = "raysft.source_run"  # the trial's MLflow run
TAG_MODE = "raysft.mode"  # min or max: which way the metric is better


def current_champion(mlc: Any, name: str, alias: str) -> Any | None:
    """The version holding ``alias``; None only when the registry says there is none (no such
    model, or no version holds the alias). Any other error is raised: an outage read as "no
    champion" would let a worse adapter take the alias."""
    from mlflow.exceptions import MlflowException

    try:
        model = mlc.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if alias not in (model.aliases or {}):
        return None
    return mlc.get_model_version_by_alias(name, alias)


def champion_value(champ: Any) -> float | None:
    """The champion's metric as a finite number; None (beatable by any finite value) when the
    tag is missing, unreadable, NaN or infinite (an older version promoted a diverged trial)."""
    try:
        return finite_or_none(float(champ.tags.get(TAG_VALUE)))
    except (TypeError, ValueError):
        return None


def register_version(
    mlc: Any, *, export_dir: Path, run_id: str, cfg: Config, record: dict[str, Any]
) -> Any:
    """A new registry version holding the export (no alias yet), tagged with what it scored."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    exp_id = mlc.get_run(run_id).info.experiment_id
    # The trial's own method (it may be searched), from the export's config.yaml.
    own = yaml.safe_load((export_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    method = own.get("method", cfg.method)
    # MLflow 3 registers logged models, not artifact folders.
    lm = mlflow.initialize_logged_model(
        name="adapter" if method != "full" else "model",
        source_run_id=run_id,
        experiment_id=exp_id,
        model_type=f"peft-{method}" if method != "full" else "full-model",
    )
    mlc.log_model_artifacts(lm.model_id, str(export_dir))
    mlflow.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    tags = {
        TAG_METRIC: record["metric"],
        TAG_VALUE: repr(record["value"]),
        TAG_EVAL: record["eval_fingerprint"],
        TAG_BASE: (
            f"{BUNDLED_BASE}/ of this model (copied from {record['base_bundled_from']})"
            if "base_bundled_from" in record
            else absolute_if_local(cfg.model.name_or_path)
        ),
        TAG_RUN: run_id,
        TAG_MODE: record["mode"],
    }
    if record.get("eval_tokens"):
        tags[TAG_EVAL_TOKENS] = record["eval_tokens"]
    version = mlflow.register_model(
        f"models:/{lm.model_id}", cfg.promote.registered_model, tags=tags
    )
    better = "lower" if record["mode"] == "min" else "higher"
    what = f"{method} adapter" if method != "full" else "fully fine-tuned model"
    try:
        mlc.update_model_version(
            cfg.promote.registered_model,
            version.version,
            description=f"A {what} of {tags[TAG_BASE]}, from the trial run {run_id}: "
            f"**{record['metric']} = {record['value']:.4g}** ({better} is better) on the "
            "search's eval rows (tag raysft.eval_fingerprint). Load it with "
            "raysft.search.promote.load_champion"
            + (
                ", which puts it on the unquantized base: it scored that value on the 4-bit base "
                "it trained on, and scores slightly differently there."
                if method == "qlora"
                else "."
            ),
        )
    except BaseException:
        # Registered, never champion: the caller never learns its number, so it goes here.
        _delete_unreturned(mlc, cfg.promote.registered_model, str(version.version))
        raise
    return version


def _delete_unreturned(mlc: Any, name: str, version: str) -> None:
    try:
        mlc.delete_model_version(name, version)
    except Exception as err:
        log.warning("could not undo %s v%s (registered, never champion): %s", name, version,
                    scrubbed(err))  # fmt: skip


def forget_version(mlc: Any, p: PromoteSection, version: str, previous: str | None) -> None:
    """Undo the registration of a promotion that failed at or before its alias move: a version
    tagged with a metric but never champion would only mislead. The alias move may have taken
    effect though the call failed (a lost reply): the alias goes back to ``previous`` (or is
    removed) first, so no version is deleted while it holds the alias. When the registry
    cannot say, the version is left as it is."""
    try:
        holder = current_champion(mlc, p.registered_model, p.alias)
        if holder is not None and str(holder.version) == version:
            if previous is not None:
                mlc.set_registered_model_alias(p.registered_model, p.alias, previous)
            else:
                mlc.delete_registered_model_alias(p.registered_model, p.alias)
        mlc.delete_model_version(p.registered_model, version)
    except Exception as err:
        log.warning(
            "could not undo %s v%s (registered, never champion): %s", p.registered_model,
            version, scrubbed(err),
        )  # fmt: skip


def move_alias(mlc: Any, p: PromoteSection, version: str) -> None:
    mlc.set_registered_model_alias(p.registered_model, p.alias, version)
