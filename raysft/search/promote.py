"""Champion gate: the best trial's adapter becomes a Model Registry version with alias
``champion`` only if it beats the current champion on the same eval rows and metric.

Installing it runs stage (export into a temporary directory beside the target) -> check (loads
with plain transformers/peft, generates) -> register (a version, no alias yet) -> swap (old
export renamed aside, new one in) -> alias (the commit point) -> drop the old export, so a
failure at any step leaves the previous champion's alias and export as they were. The export's
files are ``raysft.search.export``'s, the registry's calls ``raysft.search.model_registry``'s.
``python -m raysft.promote EXPERIMENT_DIR`` re-runs the gate for a finished search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from raysft.config import Config, PromoteSection, SearchSpec
from raysft.data.digest import TOKENS, TOKENS_CHANGED, Digests, source_digest
from raysft.data.digest import sources as data_sources
from raysft.data.shared import seed_picks_eval_rows
from raysft.data.sources import saved_split
from raysft.search.export import (
    check_export,
    drop_old_export,
    export_dir_problem,
    export_target,
    export_version,
    new_staging,
    rebuild_export,
    recover_export,
    stage_export,
    swap_back,
    swap_in,
    write_identity,
)
from raysft.search.export import load_champion as load_champion
from raysft.search.model_registry import (
    TAG_EVAL,
    TAG_EVAL_TOKENS,
    TAG_METRIC,
    TAG_MODE,
    TAG_RUN,
    champion_value,
    current_champion,
    forget_version,
    move_alias,
    register_version,
)
from raysft.search.promotion_lock import LockTimeout, one_promotion_at_a_time
from raysft.search.redact import redact
from raysft.search.results import finite_or_none
from raysft.search.space import trial_output_dir
from raysft.search.tracking_requests import not_tried, out_of_reach
from raysft.train.metrics import Mode, is_better, objective_mode
from raysft.train.model import ADAPTER_WEIGHTS

# load_champion is imported "as" itself: ``raysft.search.promote.load_champion`` is how the
# README and every registered version's description (``register_version``) say to load an export.

log = logging.getLogger("raysft.promote")


# ---------------------------------------------------------------- what "the same eval" means


def eval_fingerprint(cfg: Config, recorded: Digests | None = None) -> str:
    """Same fingerprint <=> same eval rows, rendered, tokenized and scored the same way.

    Covers the eval files' contents, the split of ``data.train`` when there is no eval file,
    the seed whenever it picks the rows (that split, or ``max_eval_samples`` of more rows),
    the rendering (format, template, system prompt, max_seq_len), the tokenizer (the model)
    and the generation settings of the generated-answer metrics.

    ``recorded``: the data's digests as the search read them when it started
    (raysft_state.json): the trials were scored on those bytes, whatever the files hold now.
    A source it lacks (a search from before raysft recorded them) is read now.
    """

    d = cfg.data
    sources = d.eval if d.eval is not None else d.train
    part = (recorded or {}).get("eval" if d.eval is not None else "train", {})

    def digest(s: str) -> str:
        return part.get(s) or source_digest(s)

    generation = getattr(cfg, "eval", None)  # the eval section, where this version has one
    parts = {
        # A DatasetDict's split is not in its directory's digest (and is left out where there
        # is none, so fingerprints of file sources stay what they were).
        "eval": [
            digest(s) if saved_split(s)[1] is None else [digest(s), saved_split(s)[1]]
            for s in data_sources(sources)
        ],
        "split": None if d.eval is not None else d.eval_fraction,
        "seed": cfg.data_seed() if seed_picks_eval_rows(cfg) else None,
        "render": [d.format, d.template, d.system_prompt, d.max_seq_len, d.max_eval_samples],
        "tokenizer": [cfg.model.name_or_path, cfg.model.revision],
        "generate": [
            cfg.train.max_new_tokens,
            _generation_settings(generation) if generation is not None else None,
        ],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _generation_settings(section: Any) -> dict[str, Any]:
    """The eval section as fingerprinted: ``max_prompts`` only where set, so a champion scored
    before raysft had it keeps its fingerprint."""
    settings: dict[str, Any] = section.model_dump(mode="json")
    if settings.get("max_prompts") is None:
        settings.pop("max_prompts", None)
    return settings


def eval_tokens(recorded: Digests | None) -> str | None:
    """The first 16 hex digits of the eval samples' token digest the search recorded at its
    start (``digest.token_digests``), or None where it has none (a search from before raysft
    recorded them, or whose driver did not read the data)."""
    tokens = (recorded or {}).get(TOKENS) or {}
    digest = tokens.get("eval")
    return digest[:16] if isinstance(digest, str) else None


# ---------------------------------------------------------------- the gate


def _source_run(champ: Any) -> str | None:
    """The MLflow run of the trial a version was promoted from."""
    return champ.tags.get(TAG_RUN) or getattr(champ, "run_id", None)


def _failure(record: dict[str, Any], what: str, err: BaseException) -> dict[str, Any]:
    """The record of a promotion that could not be decided or installed (``failed``: the
    promote command exits non-zero on it); the traceback is logged at debug level."""
    reason = f"{what}: {type(err).__name__}: {redact('error', str(err))}"[:1000]
    log.debug("%s", reason, exc_info=err)
    failure = {**record, "promoted": False, "failed": True, "reason": reason}
    if out_of_reach(err):  # the registry did not answer: the finish asks MLflow no more
        failure["out_of_reach"] = True
    return failure


def _checkpoint_problem(checkpoint: str) -> str | None:
    """Why the best trial's checkpoint cannot be exported, or None: said up front, by file,
    rather than by whatever transformers raises on a half-empty folder."""
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        return f"{ckpt}: the best trial's checkpoint is not there (no such directory)"
    if (ckpt / "adapter_config.json").is_file():
        wanted = list(ADAPTER_WEIGHTS)
    else:
        wanted = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
        if not (ckpt / "config.json").is_file():
            return f"{ckpt}: neither adapter_config.json nor config.json (not a checkpoint)"
    if not any((ckpt / name).is_file() for name in wanted):
        return f"{ckpt}: no weights ({' or '.join(wanted)})"
    return None


def _champion_mode(champ: Any) -> str | None:
    """Which way the champion's metric was judged better: its tag, or for a version promoted
    before raysft kept one, its metric's own mode (the only one raysft allowed then)."""
    if champ.tags.get(TAG_MODE):
        return str(champ.tags[TAG_MODE])
    try:
        return objective_mode(champ.tags.get(TAG_METRIC) or "", None)
    except ValueError:
        return None


def _refusal(
    champ: Any, *, metric: str, value: float, fp: str, mode: Mode, judge: bool = True,
    tokens: str | None = None,
) -> str | None:  # fmt: skip
    """Why ``value`` may not replace ``champ``, or None when it may (``judge`` False: only
    whether both were scored alike and judged the same way). ``tokens``: the eval samples'
    token digest (``eval_tokens``), where known."""
    if champ.tags.get(TAG_EVAL) != fp or champ.tags.get(TAG_METRIC) != metric:
        return (
            f"champion v{champ.version} was scored on other eval data or metric "
            f"(fingerprint {champ.tags.get(TAG_EVAL)}, metric {champ.tags.get(TAG_METRIC)}); "
            "not replaced. Use a new promote.registered_model, or the same eval data."
        )
    then = champ.tags.get(TAG_EVAL_TOKENS)
    if tokens and then and then != tokens:  # where both searches recorded them
        return (
            f"champion v{champ.version} was scored on eval samples of other token ids (tokens "
            f"{then}, now {tokens}: {TOKENS_CHANGED}); not replaced. Use a new "
            "promote.registered_model."
        )
    champion_mode = _champion_mode(champ)
    if champion_mode != mode:  # "better" the other way round would let worse win
        return (
            f"champion v{champ.version} was chosen with {metric} judged by mode "
            f"{champion_mode}, this search by mode {mode}; not replaced. Use a new "
            "promote.registered_model, or the same search.mode."
        )
    old = champion_value(champ)
    if judge and old is not None and not is_better(value, old, mode):
        return f"{metric} {value:.6g} does not beat champion v{champ.version} ({old:.6g})"
    return None


def promote(
    *,
    mlc: Any,
    cfg: SearchSpec,
    best: dict[str, Any] | None,
    exp_dir: Path,
    base_value: float | None = None,
    unreachable: str | None = None,
    recorded: Digests | None = None,
) -> dict[str, Any]:
    """Gate, export, register and alias; returns the record that goes into summary.json.

    ``base_value``: the base model's ``search.metric`` on the same held-out rows (base vs
    tuned), where it was scored: a best trial that does not beat it is not promoted (a search
    whose every trial diverged or was stopped early can leave a "best" worse than no training).
    ``unreachable``: the earlier step that found the tracking server out of reach, if one did:
    the gates still decide, but the registry is not asked (a failure, ``not tried``).
    ``recorded``: the data's digests from the search's start (``eval_fingerprint``).

    A failure while installing the new champion is recorded as its reason (the traceback is
    logged) rather than raised: the search's summary is still written, the previous champion
    stays, and ``python -m raysft.promote`` can retry.
    """
    p, s = cfg.promote, cfg.search
    mode = objective_mode(s.metric, s.mode)
    if not p.enabled:
        return {"promoted": False, "reason": "promote.enabled is false"}
    value = finite_or_none(best.get("metric")) if best else None
    if best is None or value is None:
        return {
            "promoted": False,
            "reason": (
                f"no finished or stopped-early trial has a finite {s.metric} and a checkpoint"
            ),
        }
    if not best.get("checkpoint"):
        return {"promoted": False, "reason": "the best trial left no checkpoint"}
    fp = eval_fingerprint(cfg, recorded)
    record: dict[str, Any] = {
        "trial_id": best["trial_id"],
        "metric": s.metric,
        "mode": mode,
        "value": value,
        "eval_fingerprint": fp,
        "eval_tokens": eval_tokens(recorded),
        "registered_model": p.registered_model,
        "alias": p.alias,
    }
    base = finite_or_none(base_value)
    if base is not None:
        record["base_value"] = base
        if not is_better(value, base, mode):
            return {
                **record,
                "promoted": False,
                "reason": f"{s.metric} {value:.6g} does not beat the base model's {base:.6g} "
                "on the same held-out rows",
            }
    if unreachable is not None:
        reason = not_tried(unreachable)
        return {**record, "promoted": False, "failed": True, "reason": reason}
    export = export_target(p, exp_dir)
    unsafe = export_dir_problem(p, exp_dir)
    if unsafe:
        return {
            **record,
            "promoted": False,
            "failed": True,
            "reason": f"promote.export_dir: {unsafe}",
        }
    try:
        with one_promotion_at_a_time(mlc, p.registered_model):
            return _gate_and_install(mlc, cfg=cfg, best=best, record=record, export=export,
                                     exp_dir=exp_dir, fp=fp)  # fmt: skip
    except LockTimeout as err:
        return _failure(record, "nothing changed", err)


def _gate_and_install(
    mlc: Any, *, cfg: SearchSpec, best: dict[str, Any], record: dict[str, Any], export: Path,
    exp_dir: Path, fp: str,
) -> dict[str, Any]:  # fmt: skip
    """``promote``'s gate against the current champion and the install, under its lock."""
    p, s = cfg.promote, cfg.search
    mode, value = record["mode"], record["value"]
    try:
        champ = current_champion(mlc, p.registered_model, p.alias)
    except Exception as err:
        return _failure(record, "could not read the current champion, nothing changed", err)
    recover_export(mlc, p, export, None if champ is None else str(champ.version))
    if champ is not None:
        if (
            _source_run(champ) == best.get("mlflow_run_id")
            and champion_value(champ) == value
            and not _refusal(
                champ,
                metric=s.metric,
                value=value,
                fp=fp,
                mode=mode,
                judge=False,
                tokens=record["eval_tokens"],
            )  # fmt: skip
        ):  # promote run again on the same search: its best already holds the alias
            return _already_champion(mlc, p, export, record, version=str(champ.version))
        record["previous"] = {"version": str(champ.version), "value": champion_value(champ)}
        refusal = _refusal(
            champ, metric=s.metric, value=value, fp=fp, mode=mode, tokens=record["eval_tokens"]
        )
        if refusal:
            return {**record, "promoted": False, "reason": refusal}
    problem = _checkpoint_problem(best["checkpoint"])
    if problem:
        return {**record, "promoted": False, "failed": True, "reason": problem}
    try:
        version = _install(
            mlc, cfg=cfg, best=best, record=record, export=export, exp_dir=exp_dir,
            previous=None if champ is None else str(champ.version),
        )  # fmt: skip
    except Exception as err:
        return _failure(record, "promotion failed, previous champion kept", err)
    record.update(
        promoted=True,
        version=version,
        export_dir=str(export.resolve()),
        reason="first champion" if champ is None else f"beats v{champ.version}",
    )
    log.info(
        "promoted %s v%s (%s=%.6g) -> alias %s; exported to %s",
        p.registered_model, version, s.metric, value, p.alias, export,
    )  # fmt: skip
    return record


# ---------------------------------------------------------------- the steps


def _install(
    mlc: Any, *, cfg: SearchSpec, best: dict[str, Any], record: dict[str, Any], export: Path,
    exp_dir: Path, previous: str | None,
) -> str:  # fmt: skip
    """Stage, check, register, swap in, move the alias; returns the new version.
    ``previous``: the version that held the alias before."""
    staging = new_staging(export)
    trial_dir = trial_output_dir(exp_dir.resolve(), best["trial_id"])
    try:
        stage_export(staging, cfg=cfg, best=best, record=record, trial_dir=trial_dir)
        check_export(staging)
        run_id = best["mlflow_run_id"]
        mv = register_version(mlc, export_dir=staging, run_id=run_id, cfg=cfg, record=record)
        try:
            write_identity(staging, {**record, "version": str(mv.version)})
            aside = swap_in(staging, export)
            try:
                move_alias(mlc, cfg.promote, str(mv.version))
            except BaseException:
                swap_back(export, aside, staging)
                raise
        except BaseException:
            forget_version(mlc, cfg.promote, str(mv.version), previous)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the half-built or swapped-out export
    try:  # after the commit point: a failure here must not undo the promotion
        drop_old_export(aside)
    except Exception:
        log.warning("could not delete the previous export at %s", aside, exc_info=True)
    return str(mv.version)


def _already_champion(
    mlc: Any, p: PromoteSection, export: Path, record: dict[str, Any], *, version: str
) -> dict[str, Any]:
    """The record of a best trial that already holds the alias; its export is rebuilt from the
    registry where it is gone (or holds another version)."""
    reason = f"already champion v{version}"
    kept = {**record, "promoted": True, "version": version, "reason": reason}
    if export_version(export) != version:
        try:
            rebuild_export(mlc, p, export, kept)
        except Exception as err:
            why = f"{kept['reason']}, but its export at {export} could not be rebuilt"
            return {**_failure(record, why, err), "promoted": True, "version": version}
        kept["export_rebuilt"] = True
    return {**kept, "export_dir": str(export.resolve())}
