"""Loading a config: its YAML file read, ``--set`` overrides applied, validated all at once;
which method sections each training method reads (the ones a ``--set method`` replaces are
dropped, the ones no run reads refused); and the config as a run saves it. Imports neither
torch nor ray.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel

from raysft.config.fields import Method
from raysft.config.overrides import blame_overrides, set_path, split_overrides, unset_path
from raysft.config.sections import Config
from raysft.config.validation import validate_tree
from raysft.config.yaml_reader import read_yaml
from raysft.errors import ConfigError

log = logging.getLogger(__name__)


# The method sections and the training methods that read them: LoRA settings apply to LoRA and
# QLoRA, the 4-bit settings to QLoRA alone.
_READ_BY = {"lora": ("lora", "qlora"), "qlora": ("qlora",)}
_DEFAULT_METHOD = Config.model_fields["method"].default


def field_annotation(path: str) -> Any:
    """The type annotation of a leaf config field at ``path``, or raise KeyError."""
    model: type[BaseModel] = Config
    keys = path.split(".")
    for i, key in enumerate(keys):
        if key not in model.model_fields:
            raise KeyError(f"config has no field {key!r} at {'.'.join(keys[: i + 1])}")
        ann = model.model_fields[key].annotation
        sub = [
            a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if i == len(keys) - 1:
            if sub:
                raise KeyError(f"{path} is a section, not a value")
            return ann
        if not sub:
            raise KeyError(f"{'.'.join(keys[: i + 1])} is a value, it has no field {keys[i + 1]!r}")
        model = sub[0]
    raise KeyError(path)


def apply_set(tree: dict[str, Any], key: str, value: Any) -> None:
    """A ``--set KEY=VALUE`` applied to a config's ``tree`` (``set_path``, a mapping merged).
    ``null`` for a setting that takes no null unsets it: the default applies, as if the file
    never set it (``--set train.max_steps=null --set train.epochs=2`` on a spec giving steps).
    Raises KeyError as ``set_path`` does."""
    if value is None:
        try:
            nullable = type(None) in get_args(field_annotation(key))
        except KeyError:  # no leaf setting of the config: validation says what is wrong
            nullable = True
        if not nullable:
            unset_path(tree, key)
            return
    set_path(tree, key, value, merge=True)


def methods_of(cfg: Config, *, trials: bool = False) -> list[str]:
    """The training methods a config runs: its own, and those its search (if any) samples;
    ``trials``: the search's trials alone (a searched method replaces the config's in each)."""
    searched = cfg.search.params.get("method") if cfg.search else None
    # Values that are no method are reported where they are searched, not here.
    sampled = [m for m in (searched.values or [] if searched else []) if m in get_args(Method)]
    return sampled if trials and sampled else [cfg.method, *sampled]


def drop_sections_of_replaced_method(
    tree: dict[str, Any], overrides: dict[str, Any], file_method: Any, *, source: str
) -> None:
    """``--set method=X`` on a file written for another method (``file_method``, as the file
    wrote it, or None): remove (and log) the method sections of ``tree``, the config with the
    overrides applied, that X never reads, so the run goes ahead without them.

    The file's ``lora:`` was written for its own method; the command line asks for another one,
    so those settings are knowingly left out, not forgotten (``unread_sections`` refuses the
    forgotten kind). A section the command line sets too (``--set lora.r=8``) stays, and is
    refused if X does not read it. A spec that searches ``method`` keeps every section: its
    trials choose their methods.
    """
    method = overrides.get("method")
    if method not in get_args(Method) or method == (file_method or _DEFAULT_METHOD):
        return  # no change of method (an invalid one is reported by validation)
    search = tree.get("search")
    params = search.get("params") if isinstance(search, dict) else None
    if isinstance(params, dict) and "method" in params:
        return
    set_here = {key.split(".", 1)[0] for key in overrides}
    dropped = [
        section
        for section, readers in _READ_BY.items()
        if section in tree and section not in set_here and method not in readers
    ]
    for section in dropped:
        tree.pop(section)
        # A warning: it is printed before the CLIs set up logging (Python's last-resort
        # handler), which they do only once the config is valid, so that a refused config
        # prints its error lines and nothing else.
        log.warning(
            "--set method=%s: the %s: section of %s is for method %s only; running without it",
            method,
            section,
            source,
            " and ".join(_READ_BY[section]),
        )


def unread_sections(
    cfg: Config,
    tree: dict[str, Any],
    searched: list[str] | None = None,
    explicit: Iterable[str] = (),
) -> list[str]:
    """Method sections (and searched parameters in them) that no run of the config reads.

    ``tree``: the config as written (a section counts when it is there and sets anything but
    the defaults: a saved config holds every section); ``searched``: a spec's searched parameter
    names (None for a training config); ``explicit``: the keys set on the command line, whose
    section counts whatever they set it to (``--set lora.r=16`` on a full run, 16 being the
    default, was asked for all the same). Such settings would be dropped without a word
    (``method: full`` with a ``lora:`` section), and searching them would run trials that
    differ in nothing.
    """
    set_here = {k.split(".", 1)[0] for k in explicit}
    used = list(dict.fromkeys(methods_of(cfg, trials=searched is not None)))
    if searched is not None and "method" in searched:
        why = f"the searched methods are {', '.join(used)}"
    elif len(used) > 1:
        why = f"the methods are {', '.join(used)}"
    else:
        why = f"method is {used[0]}" + (" (not searched)" if searched is not None else "")
    problems = []
    for section, readers in _READ_BY.items():
        if set(used) & set(readers):
            continue
        for_whom = " and ".join(readers)
        values = getattr(cfg, section)
        if section in tree and (values != type(values)() or section in set_here):
            problems.append(
                f"{section}: settings for method {for_whom} only, but {why}: they would be "
                f"ignored; remove the section or set method: {' or '.join(readers)}"
            )
        for name in searched or []:
            if name.split(".", 1)[0] == section:
                problems.append(
                    f"search.params.{name}: a setting for method {for_whom} only, but {why}: "
                    "every trial would ignore it; search another parameter"
                )
    return problems


def unused_settings(cfg: Config, searched: Iterable[str] = ()) -> list[str]:
    """Settings of ``cfg`` that nothing reads, as messages: a ``data.eval_fraction`` off its
    default beside a ``data.eval`` file (held-out data of its own: no split of ``data.train``),
    a ``train.warmup_ratio`` off its default beside a ``train.warmup_steps``.
    Said, not refused: a config written before this check, or a search's saved spec, must still
    run; a default counts as unset, so a run's saved config.yaml (every setting written out) is
    not blamed. ``searched``: a spec's parameter names (its trials may set either).

    Generation settings (``eval.*``, ``train.max_new_tokens``) are read even with
    ``train.exact_match`` false: a search's base-vs-tuned scoring and ``raysft.evaluate`` score
    the generated answers with them."""
    searched = set(searched)
    unused = []
    default = type(cfg.data).model_fields["eval_fraction"].default
    if (
        cfg.data.eval is not None
        and "data.eval" not in searched
        and (cfg.data.eval_fraction != default or "data.eval_fraction" in searched)
    ):
        unused.append(
            "data.eval_fraction: has no effect, since data.eval names the held-out data "
            "(data.eval: null holds out that share of data.train instead)"
        )
    ratio = type(cfg.train).model_fields["warmup_ratio"].default
    steps_given = cfg.train.warmup_steps is not None or "train.warmup_steps" in searched
    if steps_given and (cfg.train.warmup_ratio != ratio or "train.warmup_ratio" in searched):
        unused.append("train.warmup_ratio: has no effect, since train.warmup_steps sets the warmup")
    return unused


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    authored: bool = False,
) -> Config:
    """Read YAML (or start from defaults), apply ``--set`` overrides, validate all at once.

    ``overrides``: parsed (``parse_overrides``), or the ``KEY=VALUE`` pairs as given, whose
    malformed ones are then reported with the file's problems, not alone before them.
    ``authored``: a config a person wrote (``raysft.train``'s): a method section that its
    methods never read is refused too. A run's saved ``config.yaml`` (``saved_tree``) holds
    none such.
    """
    source = str(path) if path is not None else "<defaults>"
    problems: list[str] = []
    if isinstance(overrides, list):
        overrides, bad = split_overrides(overrides)
        problems += [f"--set {p}" for p in bad]
    overrides = overrides or {}
    try:
        tree = read_yaml(path) if path is not None else {}
    except ConfigError as err:
        raise ConfigError(source, err.problems + problems) from None
    in_file = copy.deepcopy(tree)
    tree = copy.deepcopy(tree)
    file_method = tree.get("method")
    for key, value in overrides.items():
        try:
            apply_set(tree, key, value)
        except KeyError as err:
            problems.append(f"--set {err.args[0]}")
    drop_sections_of_replaced_method(tree, overrides, file_method, source=source)
    try:
        cfg = validate_tree(tree, source=source)
    except ConfigError as err:
        blamed = blame_overrides(err.problems, overrides, in_file)
        raise ConfigError(source, problems + blamed) from None
    if authored:
        unread = unread_sections(cfg, tree, explicit=overrides)
        problems += blame_overrides(unread, overrides, in_file)
    if problems:
        raise ConfigError(source, problems)
    if authored:
        for problem in unused_settings(cfg):
            # Before the CLI sets up logging: Python's last-resort handler prints it.
            log.warning("%s: %s", source, problem)
    return cfg


def saved_tree(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a run saves it: without the method sections its method never reads (a full
    trial of a search over methods would otherwise save the spec's ``lora:``, which
    ``raysft.train`` refuses)."""
    tree = cfg.model_dump(mode="json")
    for section, readers in _READ_BY.items():
        if cfg.method not in readers:
            tree.pop(section, None)
    return tree


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(saved_tree(cfg), sort_keys=False, allow_unicode=True)
