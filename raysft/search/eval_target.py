"""What ``raysft.evaluate DIR`` names: a full model, an adapter (a training checkpoint included)
or an experiment's champion, and the settings to score it with (``--config``, else DIR's
``config.yaml``, else the experiment's ``summary.json``, else the defaults), its relative paths
read where the run read them."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft.config import (
    Config,
    blame_overrides,
    load_config,
    read_yaml,
    set_path,
    validate_tree,
)
from raysft.errors import ConfigError, ModelError, SearchStateError, one_line
from raysft.paths import origin_working_dir
from raysft.search.results import SUMMARY_FILE, read_summary
from raysft.train.score_saved import adapter_base

log = logging.getLogger(__name__)


@dataclass
class Target:
    """What DIR names: the model or adapter to load, its base, and the settings to score with."""

    kind: str  # "model", "adapter" or "experiment"
    path: Path  # the model or adapter directory
    cfg: Config
    base: str | None  # the base model (an adapter's, or the config's); None if unknown


_SCORED_WITH_DEFAULTS = (
    "scored with the defaults (pass --config FILE, or --data and --set, for its data and template)"
)


def resolve_target(
    directory: str,
    *,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    without_settings: str = _SCORED_WITH_DEFAULTS,
    adapters_only: str | None = None,
) -> Target:
    """Classify DIR and find the settings to score it with. ``without_settings``: what the
    warning says is done where DIR has none (the caller's use of the defaults).
    ``adapters_only``: a full model (DIR's or its champion) is refused, with this reason."""
    root = Path(directory)
    if not root.is_dir():
        if root.exists():
            raise ModelError(f"{directory}: a file; give a model, adapter or experiment directory")
        raise ModelError(f"{directory}: no such directory")
    kind, path, summary = "model", root, None
    if any((root / name).exists() for name in ("summary.json", "tune", "champion")):
        kind = "experiment"
        summary = read_summary(root, objects=_SECTIONS_READ)
        path = _champion_dir(root, summary)
    elif (root / "adapter_config.json").is_file():
        kind = "adapter"
    elif not (root / "config.json").is_file():
        trial = re.match(r"run_trial_on_ray_([0-9a-f]+)_", root.name)
        hint = (
            f"; this is Ray Tune's record of trial {trial[1]}: score its output "
            f"({root.parent.parent / 'trials' / trial[1]}) or a checkpoint of it "
            f"({root.parent.parent / 'train' / ('train-' + trial[1])}/checkpoint_*)"
            if trial and root.parent.name == "tune"
            else ""
        )
        raise ModelError(
            f"{directory}: neither a model (config.json), an adapter (adapter_config.json) nor "
            f"an experiment directory (summary.json){hint}"
        )
    if adapters_only is not None and not (path / "adapter_config.json").is_file():
        raise ModelError(f"{path}: a full model, not an adapter: {adapters_only}")
    # An experiment without its summary (copied without it, say): its champion export's own.
    own = path if kind == "experiment" and summary is None else root
    sampled = _champion_sampled(path, summary) if summary is not None else {}
    cfg, known = _settings(own, summary, config=config, overrides=overrides or {}, sampled=sampled)
    if not known and not overrides:  # nothing of the run's, nothing of yours
        log.warning(
            "%s: no config.yaml or summary.json to read the run's settings from: %s",
            directory,
            without_settings,
        )
    if (path / "adapter_config.json").is_file():
        base: str | None = adapter_base(path)
    else:
        base = cfg.model.name_or_path if known else None
    return Target(kind, path, cfg, base)


# The sections of summary.json read here, each an object where it is there.
_SECTIONS_READ = ("promotion", "best", "resolved_spec")


def _champion_dir(exp_dir: Path, summary: dict[str, Any] | None) -> Path:
    promotion = (summary or {}).get("promotion") or {}
    export = promotion.get("export_dir")
    recorded_exp = (summary or {}).get("experiment_dir")
    moved = _mover(recorded_exp, exp_dir)
    own = _inside(export, recorded_exp)
    if own is not None:
        # Exported into the experiment dir (the default): this directory's own, never the one
        # it was copied from, which the recorded path still names.
        export, candidates = str(exp_dir / own), [exp_dir / own]
    else:  # elsewhere: as recorded; where it is if the project moved with it since
        candidates = [Path(p) for p in (export, moved(export)) if p]
    for path in [*candidates, exp_dir / "champion"]:
        if path.is_dir():
            return path
    if promotion.get("promoted") and export:
        raise SearchStateError(
            f"{exp_dir}: its champion (v{promotion.get('version')}) was exported to {export}, "
            "which is not there (moved or deleted?); give the export's own directory instead"
        )
    recorded = ((summary or {}).get("best") or {}).get("checkpoint")
    best = next((p for p in (recorded, moved(recorded)) if p and Path(p).is_dir()), None)
    hint = f"; score the best trial's checkpoint directly: {best}" if best else ""
    if recorded and not best:
        hint = f"; the best trial's checkpoint was {recorded}, which is not there now"
    why = promotion.get("reason") or "the search has not finished"
    raise SearchStateError(f"{exp_dir}: no champion to score ({why}){hint}")


def _inside(path: Any, directory: Any) -> Path | None:
    """``path`` relative to ``directory`` where it lies inside it (both recorded strings)."""
    if not isinstance(path, str) or not isinstance(directory, str):
        return None
    try:
        return Path(path).relative_to(directory)
    except ValueError:
        return None


def _mover(old_exp: Any, new_exp: Path) -> Callable[[Any], str | None]:
    """Where a path the summary recorded is now, if the experiment dir moved from ``old_exp``
    to ``new_exp`` together with that path: the directories above their common tail (e.g.
    ``/old/proj`` for ``/old/proj/exp`` -> ``/new/proj/exp``) map onto each other."""
    if not isinstance(old_exp, str):
        return lambda _: None
    old, new = Path(old_exp).parts, new_exp.resolve().parts
    tail = 0
    while tail < min(len(old), len(new)) - 1 and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    old_root, new_root = Path(*old[: len(old) - tail]), Path(*new[: len(new) - tail])

    def moved(path: Any) -> str | None:
        if not isinstance(path, str) or old_root == new_root:
            return None
        try:
            return str(new_root / Path(path).relative_to(old_root))
        except ValueError:
            return None  # not under the directory that moved

    return moved


def _champion_sampled(champion: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The values the champion's trial sampled: its export's record (metrics.json), else the
    search's best trial's where the search promoted it."""
    own = _json_field(champion / "metrics.json", "sampled", dict)
    if own is not None:
        return own
    best = summary.get("best") or {}
    promoted = (summary.get("promotion") or {}).get("promoted")
    return dict(best.get("sampled") or {}) if promoted else {}


def _settings(
    root: Path,
    summary: dict[str, Any] | None,
    *,
    config: str | None,
    overrides: dict[str, Any],
    sampled: dict[str, Any],
) -> tuple[Config, bool]:
    """The config to score with, and whether it is known (not just the defaults).

    A run's own settings (its ``config.yaml``, or the spec in the experiment's summary.json)
    name data and model by the paths the run was given: relative ones are read from the
    directory it ran in (``_working_dir``), not from yours. ``--config`` is yours."""
    if config is not None:
        return load_config(config, overrides), True
    if (root / "config.yaml").is_file():
        source, tree, prefix = str(root / "config.yaml"), read_yaml(root / "config.yaml"), ""
    else:
        if summary is None and (root.parent / "summary.json").is_file():  # EXP_DIR/champion
            root = root.parent
            summary = read_summary(root)
        spec = (summary or {}).get("resolved_spec")
        if not isinstance(spec, dict):
            return load_config(None, overrides), False
        tree = {k: v for k, v in spec.items() if k != "search"}
        for name, value in sampled.items():  # as the champion's trial trained (space.trial_config)
            set_path(tree, name, value)
        source, prefix = str(root / "summary.json"), "resolved_spec: "
    _rebase(tree, _working_dir(root))  # before --set: those are yours
    problems = []
    for key, value in overrides.items():
        try:
            set_path(tree, key, value, merge=True)
        except KeyError as err:
            problems.append(f"--set {err.args[0]}")
    if problems:
        raise ConfigError(source, problems)
    try:
        return validate_tree(tree, source=source), True
    except ConfigError as err:
        blamed = blame_overrides(err.problems, overrides)
        raise ConfigError(
            source, [b if b.startswith("--set ") else f"{prefix}{b}" for b in blamed]
        ) from None


def _working_dir(root: Path) -> str | None:
    """The directory the run under ``root`` read its relative paths from: its own record
    (metrics.json: a raysft.train output, a trial, an export), else its experiment's
    (summary.json, there or up to 4 levels above: EXP/train/train-ID/checkpoint_*), else its run's
    (metrics.json, up to 2 levels above: OUT/checkpoints/step-N), else the checkpoint's own
    (origin.json: a stopped run's); None when no record says."""
    here = root.resolve()
    own = _json_field(here / "metrics.json", "working_dir")
    if own is not None:
        return own
    for d in [here, *list(here.parents)[:4]]:
        if (d / SUMMARY_FILE).is_file():  # the nearest experiment: older ones record none
            wd = _json_field(d / SUMMARY_FILE, "working_dir")
            if wd is not None:
                return wd
            break
    for d in list(here.parents)[:2]:
        wd = _json_field(d / "metrics.json", "working_dir")
        if wd is not None:
            return wd
    # Last: a trial's worker may run elsewhere than its search's driver (summary.json's).
    return origin_working_dir(here)


def _json_field(path: Path, key: str, kind: type = str) -> Any:
    """``key`` of the JSON object at ``path`` when it is a ``kind``, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # a directory, unreadable, not JSON, not text
        log.warning("%s: not read (%s); its record is left out", path, one_line(err))
        return None
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, kind) else None


def _rebase(tree: dict[str, Any], working_dir: Any) -> None:
    """The search's relative local paths (``data.train``, ``data.eval``,
    ``model.name_or_path``) made absolute in the directory it ran in (summary.json's
    ``working_dir``), where they are there; a Hub id such as ``org/name`` is not, and stays."""
    if not isinstance(working_dir, str) or not Path(working_dir).is_dir():
        return

    def moved(value: Any) -> Any:
        if isinstance(value, list):
            return [moved(v) for v in value]
        if not isinstance(value, str) or value.startswith(("embedded:", "hf:")):
            return value
        if Path(value).is_absolute():
            return value
        here = Path(working_dir, value)
        dir_part = Path(working_dir, value.rsplit(":", 1)[0])  # DIR:SPLIT
        if not (here.exists() or dir_part.exists()):
            return value
        return str(here)

    for section, key in (("data", "train"), ("data", "eval"), ("model", "name_or_path")):
        part = tree.get(section)
        if isinstance(part, dict) and key in part:
            part[key] = moved(part[key])
