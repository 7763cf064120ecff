"""Champion gate and atomic export: the best trial's adapter becomes a Model Registry version
with alias ``champion`` only if it beats the current champion on the same eval rows and metric.

Installing it runs stage (export into a temporary directory beside the target) -> check (loads
with plain transformers/peft, generates) -> register (a version, no alias yet) -> swap (old
export renamed aside, new one in) -> alias (the commit point) -> drop the old export, so a
failure at any step leaves the previous champion's alias and export as they were.

An export describes itself: adapter (or full model) and tokenizer, the trial's resolved
``config.yaml``, ``metrics.json`` and ``champion.json`` (registry version, metric, fingerprint).
Its adapter_config.json names the base as the config did (``embedded:NAME`` or a hub id), not
one install's path: load it with ``load_champion(dir)``, which resolves ``embedded:`` names.
``python -m raysft.promote EXPERIMENT_DIR`` re-runs the gate for a finished search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from raysft.assets import BUNDLED_BASE, absolute_if_local, adapter_base_path, resolve
from raysft.config import Config, PromoteSection, SearchSpec, saved_tree
from raysft.data.digest import Digests, source_digest
from raysft.data.digest import sources as data_sources
from raysft.data.formats import saved_split
from raysft.data.shared import seed_picks_eval_rows
from raysft.errors import ModelError
from raysft.paths import give_plain_modes, writable_dir_problem
from raysft.search.ray_start import base_in_job_copy
from raysft.search.results import finite_or_none, json_safe
from raysft.search.space import trial_config, trial_output_dir
from raysft.search.tracking import not_tried, out_of_reach, redact, redact_tree
from raysft.thirdparty import peft_quietly
from raysft.train.metrics import Mode, is_better, objective_mode
from raysft.train.model import ADAPTER_WEIGHTS

log = logging.getLogger("raysft.promote")

TAG_METRIC = "raysft.metric"
TAG_VALUE = "raysft.metric_value"
TAG_EVAL = "raysft.eval_fingerprint"
TAG_BASE = "raysft.base_model"
TAG_RUN = "raysft.source_run"  # the trial's MLflow run
TAG_MODE = "raysft.mode"  # min or max: which way the metric is better
CHAMPION_FILE = "champion.json"  # the export's registry identity, written once registered


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
        "seed": cfg.train.seed if seed_picks_eval_rows(cfg) else None,
        "render": [d.format, d.template, d.system_prompt, d.max_seq_len, d.max_eval_samples],
        "tokenizer": [cfg.model.name_or_path, cfg.model.revision],
        "generate": [
            cfg.train.max_new_tokens,
            generation.model_dump(mode="json") if generation is not None else None,
        ],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- where the export goes


def export_target(p: PromoteSection, exp_dir: Path) -> Path:
    """Where the champion is exported: ``promote.export_dir``, or EXPERIMENT_DIR/champion."""
    return Path(p.export_dir) if p.export_dir else exp_dir / "champion"


def export_dir_problem(p: PromoteSection, exp_dir: Path) -> str | None:
    """Why the export cannot go where the spec says, or None. Installing a champion swaps the
    export directory whole and deletes the old one: that must only ever be an earlier export."""
    export, exp = export_target(p, exp_dir).resolve(), exp_dir.resolve()
    if export == exp or export in exp.parents:
        return (
            f"{export} is or holds search.experiment_dir {exp}: installing a champion replaces "
            "the export directory whole; choose a directory of its own"
        )
    # The swap renames inside the export's parent directory.
    unusable = writable_dir_problem(export) or writable_dir_problem(export.parent)
    if unusable:
        return unusable
    if export.is_dir() and any(export.iterdir()) and not (export / CHAMPION_FILE).is_file():
        return (
            f"{export} holds files that are no champion export (no {CHAMPION_FILE}); installing "
            "a champion would replace them: choose a new or empty directory"
        )
    return None


# ---------------------------------------------------------------- the gate


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


def champion_value(champ: Any) -> float | None:
    """The champion's metric as a finite number; None (beatable by any finite value) when the
    tag is missing, unreadable, NaN or infinite (an older version promoted a diverged trial)."""
    try:
        return finite_or_none(float(champ.tags.get(TAG_VALUE)))
    except (TypeError, ValueError):
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
    champ: Any, *, metric: str, value: float, fp: str, mode: Mode, judge: bool = True
) -> str | None:
    """Why ``value`` may not replace ``champ``, or None when it may (``judge`` False: only
    whether both were scored alike and judged the same way)."""
    if champ.tags.get(TAG_EVAL) != fp or champ.tags.get(TAG_METRIC) != metric:
        return (
            f"champion v{champ.version} was scored on other eval data or metric "
            f"(fingerprint {champ.tags.get(TAG_EVAL)}, metric {champ.tags.get(TAG_METRIC)}); "
            "not replaced. Use a new promote.registered_model, or the same eval data."
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
        return {"promoted": False, "reason": f"no trial reported a finite {s.metric}"}
    if not best.get("checkpoint"):
        return {"promoted": False, "reason": "the best trial left no checkpoint"}
    fp = eval_fingerprint(cfg, recorded)
    record: dict[str, Any] = {
        "trial_id": best["trial_id"],
        "metric": s.metric,
        "mode": mode,
        "value": value,
        "eval_fingerprint": fp,
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
        with _one_promotion_at_a_time(mlc, p.registered_model):
            return _gate_and_install(mlc, cfg=cfg, best=best, record=record, export=export,
                                     exp_dir=exp_dir, fp=fp)  # fmt: skip
    except LockTimeout as err:
        return _failure(record, "nothing changed", err)


_LOCK_WAIT_S = 600.0  # a promotion loads, checks and uploads one export: minutes at most


class LockTimeout(Exception):
    """Another promotion of the model held its lock for ``_LOCK_WAIT_S``. Its own class: an
    OSError (TimeoutError is one) from the promotion's steps means something else."""


@contextlib.contextmanager
def _one_promotion_at_a_time(mlc: Any, name: str) -> Iterator[None]:
    """Promotions of one registered model, from this machine, one at a time. The gate reads the
    champion and the alias move commits: another promotion between the two could put a worse
    adapter over a better one, and tidy away the other's staged export. Searches started with
    ``ray job submit`` run their drivers on the head node, so theirs queue here too. Across
    machines MLflow's registry offers nothing to lock (no compare-and-set on an alias).
    Raises LockTimeout after ``_LOCK_WAIT_S``."""
    import fcntl

    path = _lock_path(mlc, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as err:  # no writable cache dir: promotions are not queued then
        log.warning("promotion of %s not queued behind others (%s): %s", name, path, err)
        yield
        return
    with handle:
        deadline, said = time.monotonic() + _LOCK_WAIT_S, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"another promotion of {name} held {path} for {_LOCK_WAIT_S:.0f} s"
                    ) from None
                if not said:
                    log.info("waiting for another promotion of %s to end (%s)", name, path)
                    said = True
                time.sleep(0.5)
            except OSError as err:  # a file system without flock (some NFS, FUSE): unqueued
                log.warning("promotion of %s not queued behind others (%s): %s", name, path, err)
                break
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_path(mlc: Any, name: str) -> Path:
    """The lock file of one registered model in one registry (``_one_promotion_at_a_time``)."""
    # The registry's URI (MLflow's own attribute; the tracking URI where it has none).
    uri = getattr(mlc, "_registry_uri", None) or getattr(mlc, "tracking_uri", "")
    key = hashlib.sha256(f"{str(uri).rstrip('/')}\0{name}".encode()).hexdigest()[:16]
    # A lasting place, not the temp dir: a lock file is never deleted (a process waiting on it
    # would hold a lock on a file no other one opens), and a search leaves no file in /tmp.
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "raysft" / "locks" / f"promote-{key}.lock"


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
    _recover(mlc, p, export, None if champ is None else str(champ.version))
    if champ is not None:
        if (
            _source_run(champ) == best.get("mlflow_run_id")
            and champion_value(champ) == value
            and not _refusal(champ, metric=s.metric, value=value, fp=fp, mode=mode, judge=False)
        ):  # promote run again on the same search: its best already holds the alias
            return _already_champion(mlc, p, export, record, version=str(champ.version))
        record["previous"] = {"version": str(champ.version), "value": champion_value(champ)}
        refusal = _refusal(champ, metric=s.metric, value=value, fp=fp, mode=mode)
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
    staging = _new_staging(export)
    trial_dir = trial_output_dir(exp_dir.resolve(), best["trial_id"])
    try:
        _stage_export(staging, cfg=cfg, best=best, record=record, trial_dir=trial_dir)
        _check_export(staging)
        run_id = best["mlflow_run_id"]
        mv = _register(mlc, export_dir=staging, run_id=run_id, cfg=cfg, record=record)
        try:
            _write_identity(staging, {**record, "version": str(mv.version)})
            aside = _swap_in(staging, export)
            try:
                _move_alias(mlc, cfg.promote, str(mv.version))
            except BaseException:
                _swap_back(export, aside, staging)
                raise
        except BaseException:
            _forget(mlc, cfg.promote, str(mv.version), previous)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the half-built or swapped-out export
    try:  # after the commit point: a failure here must not undo the promotion
        _drop_old(aside)
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
    if _version_of(export) != version:
        try:
            _rebuild_export(mlc, p, export, kept)
        except Exception as err:
            why = f"{kept['reason']}, but its export at {export} could not be rebuilt"
            return {**_failure(record, why, err), "promoted": True, "version": version}
        kept["export_rebuilt"] = True
    return {**kept, "export_dir": str(export.resolve())}


def _rebuild_export(mlc: Any, p: PromoteSection, export: Path, record: dict[str, Any]) -> None:
    """The champion's export put back from its registry version, staged, checked and swapped in
    as ``_install`` does: the version holds what was exported, less champion.json (written
    once registered). The registry itself is left as it is."""
    import mlflow

    staging = _new_staging(export)
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{p.registered_model}/{record['version']}",
            dst_path=str(staging),
            tracking_uri=mlc.tracking_uri,
        )
        _check_export(staging)
        _write_identity(staging, record)
        aside = _swap_in(staging, export)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("rebuilt the export of %s v%s at %s", p.registered_model, record["version"], export)
    _drop_old(aside)


def _new_staging(export: Path) -> Path:
    """An empty folder beside ``export`` (the swap renames within one filesystem) that the
    export is built in; ``_recover`` tidies one a killed promotion left."""
    export.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export.name}.new-", dir=export.parent))
    give_plain_modes(staging, [])  # mkdtemp's 0700 would keep a serving user out
    return staging


def _write_identity(staging: Path, record: dict[str, Any]) -> None:
    """The export's champion.json: its registry version and what it scored (``_version_of``)."""
    (staging / CHAMPION_FILE).write_text(json.dumps(record, indent=2, allow_nan=False))


def _stage_export(
    staging: Path, *, cfg: SearchSpec, best: dict[str, Any], record: dict[str, Any], trial_dir: str
) -> None:
    """The checkpoint's adapter (or model) and tokenizer, without its training state, plus the
    trial's resolved config and metrics; the base named portably."""
    from raysft.train.state import serving_files

    for item in serving_files(best["checkpoint"]):
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)
    own = trial_config(cfg.model_dump(mode="json"), best.get("sampled") or {}, output_dir=trial_dir)
    # The export is logged to the registry: no secret may ride along (tracking.redact_tree).
    text = yaml.safe_dump(redact_tree(saved_tree(own)), sort_keys=False)
    (staging / "config.yaml").write_text(text, encoding="utf-8")
    metrics = {
        "trial_id": best["trial_id"],
        "step": best.get("step"),
        "objective": {"metric": record["metric"], "value": record["value"]},
        "eval_fingerprint": record["eval_fingerprint"],
        "metrics": best.get("metrics", {}),
        "sampled": best.get("sampled", {}),
        "working_dir": os.getcwd(),  # the search's: config.yaml's relative paths are read there
    }
    text = json.dumps(json_safe(redact_tree(metrics)), indent=2, allow_nan=False)
    (staging / "metrics.json").write_text(text, encoding="utf-8")
    adapter_config = staging / "adapter_config.json"
    if adapter_config.is_file():
        # The trial's checkpoint names the path it loaded its base from; embedded:NAME and a hub
        # id are kept as the config gives them, to resolve where the package is installed.
        conf = json.loads(adapter_config.read_text(encoding="utf-8"))
        conf["base_model_name_or_path"] = absolute_if_local(cfg.model.name_or_path)
        gone = base_in_job_copy(cfg.model.name_or_path, os.environ, Path.cwd())
        if gone is not None:  # Ray removes the job's copy after the job: the export keeps one
            shutil.copytree(gone, staging / BUNDLED_BASE)
            conf["base_model_name_or_path"] = BUNDLED_BASE
            record["base_bundled_from"] = str(gone)
            log.info("the export carries its base (%s), which Ray removes after the job", gone)
        adapter_config.write_text(json.dumps(conf, indent=2, sort_keys=True), encoding="utf-8")


def _check_export(directory: Path) -> None:
    """The export loads as a user would load it and generates from finite logits."""
    import torch

    model, tokenizer = load_champion(directory)
    ids = tokenizer("Hello", add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id or 0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            raise ModelError(f"{directory}: the exported model's logits are not finite")
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    if out.shape[1] <= ids.shape[1]:
        raise ModelError(f"{directory}: the exported model generated no token")


def _register(
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
    version = mlflow.register_model(
        f"models:/{lm.model_id}", cfg.promote.registered_model, tags=tags
    )
    better = "lower" if record["mode"] == "min" else "higher"
    what = f"{method} adapter" if method != "full" else "fully fine-tuned model"
    mlc.update_model_version(
        cfg.promote.registered_model,
        version.version,
        description=f"A {what} of {tags[TAG_BASE]}, from the trial run {run_id}: "
        f"**{record['metric']} = {record['value']:.4g}** ({better} is better) on the search's "
        "eval rows (tag raysft.eval_fingerprint). Load it with "
        "raysft.search.promote.load_champion"
        + (
            ", which puts it on the unquantized base: it scored that value on the 4-bit base it "
            "trained on, and scores slightly differently there."
            if method == "qlora"
            else "."
        ),
    )
    return version


def _rename(src: Path, dst: Path) -> None:
    src.rename(dst)  # atomic on one filesystem: the staging dir sits beside its target


def _swap_in(staging: Path, export: Path) -> Path | None:
    """Rename the current export aside and the staged one in; returns where the old one went."""
    aside = None
    if export.exists():
        aside = export.with_name(f".{export.name}.old-{uuid.uuid4().hex[:8]}")
        _rename(export, aside)
    try:
        _rename(staging, export)
    except BaseException:
        if aside is not None:
            _rename(aside, export)
        raise
    return aside


def _swap_back(export: Path, aside: Path | None, staging: Path) -> None:
    """Undo ``_swap_in``: the new export goes back to ``staging`` (deleted), the old one in."""
    _rename(export, staging)
    if aside is not None:
        _rename(aside, export)


def _forget(mlc: Any, p: PromoteSection, version: str, previous: str | None) -> None:
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
    except Exception:
        log.warning(
            "could not undo %s v%s (registered, never champion)", p.registered_model, version,
            exc_info=True,
        )  # fmt: skip


def _move_alias(mlc: Any, p: PromoteSection, version: str) -> None:
    mlc.set_registered_model_alias(p.registered_model, p.alias, version)


def _drop_old(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _recover(mlc: Any, p: PromoteSection, export: Path, champion_version: str | None) -> None:
    """Tidy what an interrupted promotion left beside ``export``.

    A staged export is deleted. An export set aside is put back if the export now in place was
    never aliased (the process died between the swap and the alias), else deleted; the version
    that unaliased export registered is deleted from the registry too (``_forget``).
    """
    for stale in export.parent.glob(f".{export.name}.new-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in export.parent.glob(f".{export.name}.old-*"):
        restore = (
            champion_version is not None
            and _version_of(aside) == champion_version
            and _version_of(export) != champion_version
        )
        if not restore:
            shutil.rmtree(aside, ignore_errors=True)
            continue
        log.warning("restoring %s: the export in place was never aliased", export)
        never_champion = _version_of(export)
        unaliased = export.with_name(f".{export.name}.new-{uuid.uuid4().hex[:8]}")
        try:
            if export.exists():
                _rename(export, unaliased)
            _rename(aside, export)
        except OSError:  # the next promotion tries again
            log.warning("could not restore %s from %s", export, aside, exc_info=True)
            continue
        shutil.rmtree(unaliased, ignore_errors=True)
        if never_champion is not None:
            _forget(mlc, p, never_champion, champion_version)


def _version_of(export: Path) -> str | None:
    try:
        return str(json.loads((export / CHAMPION_FILE).read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------- using an export


def load_champion(directory: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an export: a PEFT adapter on its base, or a full model.

    The adapter names its base portably (``embedded:NAME`` or a hub id); ``embedded:`` names
    resolve to this install's copy. The base is loaded unquantized (a QLoRA adapter applies to
    it as is). Revision and trust_remote_code come from the export's config.yaml; an adapter's
    generation_config.json (the template's end of answer among its EOS ids) replaces the
    base's, as a full model's does by itself.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(directory)
    own = d / "config.yaml"
    model_cfg = (yaml.safe_load(own.read_text()) or {}).get("model", {}) if own.is_file() else {}
    trust = bool(model_cfg.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(str(d), trust_remote_code=trust)
    adapter_config = d / "adapter_config.json"
    if not adapter_config.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=trust)
        return model.eval(), tokenizer
    from peft import PeftModel

    base_name = json.loads(adapter_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(
        resolve(adapter_base_path(d, base_name)),
        revision=model_cfg.get("revision"),
        trust_remote_code=trust,
    )
    if (d / "generation_config.json").is_file():  # the template's end of answer (save_model)
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(str(d))
    with peft_quietly():
        return PeftModel.from_pretrained(base, str(d)).eval(), tokenizer
