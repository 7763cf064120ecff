"""The champion's export on disk, installed atomically: staged in a folder beside the target,
checked, swapped in (the old export renamed aside, dropped once the alias moved), put back by
``recover_export`` after a promotion killed half way.

An export describes itself: adapter (or full model) and tokenizer, the trial's resolved
``config.yaml``, ``metrics.json`` and ``champion.json`` (registry version, metric, fingerprint).
Its adapter_config.json names the base as the config did (``embedded:NAME`` or a hub id), not
one install's path: load it with ``load_champion(dir)``, which resolves ``embedded:`` names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from raysft.assets import BUNDLED_BASE, absolute_if_local, adapter_base_path, resolve
from raysft.config import PromoteSection, SearchSpec, saved_tree
from raysft.errors import ModelError
from raysft.paths import give_plain_modes, writable_dir_problem
from raysft.search.model_registry import forget_version
from raysft.search.ray_start import base_in_job_copy
from raysft.search.redact import redact_tree
from raysft.search.results import json_safe
from raysft.search.space import trial_config
from raysft.thirdparty import peft_quietly

log = logging.getLogger("raysft.promote")

CHAMPION_FILE = "champion.json"  # the export's registry identity, written once registered


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


# ---------------------------------------------------------------- the steps


def rebuild_export(mlc: Any, p: PromoteSection, export: Path, record: dict[str, Any]) -> None:
    """The champion's export put back from its registry version, staged, checked and swapped in
    as ``_install`` does: the version holds what was exported, less champion.json (written
    once registered). The registry itself is left as it is."""
    import mlflow

    staging = new_staging(export)
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{p.registered_model}/{record['version']}",
            dst_path=str(staging),
            tracking_uri=mlc.tracking_uri,
        )
        check_export(staging)
        write_identity(staging, record)
        aside = swap_in(staging, export)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("rebuilt the export of %s v%s at %s", p.registered_model, record["version"], export)
    drop_old_export(aside)


def new_staging(export: Path) -> Path:
    """An empty folder beside ``export`` (the swap renames within one filesystem) that the
    export is built in; ``recover_export`` tidies one a killed promotion left."""
    export.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export.name}.new-", dir=export.parent))
    give_plain_modes(staging, [])  # mkdtemp's 0700 would keep a serving user out
    return staging


def write_identity(staging: Path, record: dict[str, Any]) -> None:
    """The export's champion.json: its registry version and what it scored (``export_version``)."""
    (staging / CHAMPION_FILE).write_text(json.dumps(record, indent=2, allow_nan=False))


def recorded_numerics(checkpoint: str | Path) -> dict[str, str] | None:
    """The dtypes a checkpoint's run resolved (``precision.numerics``), or None for one written
    before they were recorded (or unreadable)."""
    from raysft.errors import RaysftError
    from raysft.train.precision import NUMERICS
    from raysft.train.state import read_progress_final

    try:
        found = read_progress_final(checkpoint).get(NUMERICS)
    except (OSError, KeyError, RaysftError):
        return None
    return dict(found) if isinstance(found, dict) else None


def stage_export(
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
    # The export is logged to the registry: no secret may ride along (redact.redact_tree).
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
        # The dtypes the trial loaded and computed in (raysft.merge's --dtype auto reads them).
        "numerics": recorded_numerics(best["checkpoint"]),
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


def check_export(directory: Path) -> None:
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


def _rename(src: Path, dst: Path) -> None:
    src.rename(dst)  # atomic on one filesystem: the staging dir sits beside its target


def swap_in(staging: Path, export: Path) -> Path | None:
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


def swap_back(export: Path, aside: Path | None, staging: Path) -> None:
    """Undo ``swap_in``: the new export goes back to ``staging`` (deleted), the old one in."""
    _rename(export, staging)
    if aside is not None:
        _rename(aside, export)


def drop_old_export(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def recover_export(mlc: Any, p: PromoteSection, export: Path, champion_version: str | None) -> None:
    """Tidy what an interrupted promotion left beside ``export``.

    A staged export is deleted. An export set aside is put back if the export now in place was
    never aliased (the process died between the swap and the alias), else deleted; the version
    that unaliased export registered is deleted from the registry too (``forget_version``).
    """
    for stale in export.parent.glob(f".{export.name}.new-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in export.parent.glob(f".{export.name}.old-*"):
        restore = (
            champion_version is not None
            and export_version(aside) == champion_version
            and export_version(export) != champion_version
        )
        if not restore:
            shutil.rmtree(aside, ignore_errors=True)
            continue
        log.warning("restoring %s: the export in place was never aliased", export)
        never_champion = export_version(export)
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
            forget_version(mlc, p, never_champion, champion_version)


def export_version(export: Path) -> str | None:
    try:
        return str(json.loads((export / CHAMPION_FILE).read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------- using an export


def use_saved_generation_config(model: Any, directory: Path) -> None:
    """An adapter directory's generation_config.json (the template's end of answer among its EOS
    ids, written by ``save_model``) on ``model``, its base, in place of the base's own."""
    path = directory / "generation_config.json"
    if path.is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(directory))
        except (OSError, ValueError, TypeError) as err:  # transformers: OSError for bad JSON
            raise ModelError(
                f"{path}: not a generation config transformers can read ({err})"
            ) from None


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
    use_saved_generation_config(base, d)
    with peft_quietly():
        return PeftModel.from_pretrained(base, str(d)).eval(), tokenizer
