"""Read, override and validate a search spec: every problem at once, before Ray starts.

Pure but for the node probe of laptop mode (``resources.local_nodes``). Every searched value is
probed through the same pydantic models a trial config goes through, alone and in combination.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Collection, Iterator
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from raysft.config import (
    Config,
    SearchParam,
    SearchSpec,
    blame_overrides,
    drop_sections_of_replaced_method,
    get_path,
    read_yaml,
    set_path,
    split_overrides,
    unread_sections,
    validate_rest,
    validate_spec,
    validate_tree,
)
from raysft.config.rules import RULE_INPUTS, overlaps
from raysft.data.shared import SharedData
from raysft.errors import ConfigError, ModelError
from raysft.search.memory import MEMORY_PATHS, Estimate, estimate, model_shape
from raysft.search.preflight import preflight as read_as_a_trial
from raysft.search.ray_start import attaching_to_cluster
from raysft.search.resources import check_resources, local_nodes
from raysft.train.metrics import METRICS, objective_mode, reported

log = logging.getLogger(__name__)

_UNSEARCHABLE = ("search", "tracking", "promote", "output_dir")
# Single paths that cannot be searched, and why.
_UNSEARCHABLE_PATHS = {
    "train.eval_base": "a trial never scores the base model (the search does, once, after "
    "the trials): every trial would run the same",
}
# Paths whose value changes how long a trial runs or what its metric measures. ASHA's horizon, a
# trial's status and the eval fingerprint that gates promotion all come from the spec, so trials
# that differ in one of these would be ranked against each other on unequal terms: refused.
# A prefix ending in "." covers a whole section.
_NOT_COMPARABLE = {
    "train.max_steps": "sets how long a trial runs (ASHA's horizon and the finished status "
    "are the spec's)",
    "train.eval_every": "sets when a trial is scored (ASHA counts its rungs in evals)",
    "data.": "selects or renders the rows the metric is computed on",
    "model.name_or_path": "sets the tokenizer that renders the eval rows",
    "model.revision": "sets the tokenizer that renders the eval rows",
    "train.max_new_tokens": "changes what the generated-answer metrics measure",
    "eval.": "changes what the generated-answer metrics measure",
    "train.exact_match": "decides whether the generated-answer metrics are measured",
}
# How rows are batched, not which rows are scored or how they render.
_COMPARABLE = {"data.packing", "data.group_by_length"}
# Cap on the value combinations validated together (each is one pydantic validation), whole
# combinations or, in a bigger space, pairs of values (~0.3 ms each: about a second).
MAX_JOINT_PROBES = 4096


def load_spec(
    path: str, overrides: list[str], *, dry_run: bool = False, preflight: bool = True
) -> tuple[dict[str, Any], SearchSpec]:
    """``read_spec`` without the data it read."""
    tree, spec, _ = read_spec(path, overrides, dry_run=dry_run, preflight=preflight)
    return tree, spec


def read_spec(
    path: str, overrides: list[str], *, dry_run: bool = False, preflight: bool = True
) -> tuple[dict[str, Any], SearchSpec, SharedData | None]:
    """Read, override and validate a spec; every problem at once, before Ray starts.

    Resources are checked against this machine (laptop mode) unless the driver joins a cluster,
    which is checked once joined; a dry run of a GPU spec on a GPU-less machine is a cluster
    spec being checked before submission, so its plan is printed, not refused.

    Once the spec is valid, ``preflight`` reads its data and model as a trial will
    (``raysft.search.preflight``), except in that cluster-spec dry run: its data and model may
    exist only on the cluster, where the search's own run checks them. The data it read and
    tokenized is returned for the trials to take (None when it read none).
    """
    sets, bad = split_overrides(overrides)
    # Reported with the spec's other problems, not alone.
    bad_sets: list[str] = [f"--set {p}" for p in bad]
    try:
        tree = read_yaml(path)
    except ConfigError as err:
        raise ConfigError(path, err.problems + bad_sets) from None
    in_file = copy.deepcopy(tree)
    file_method = tree.get("method")
    changes: dict[str, Any] = {}
    for key, value in sets.items():
        try:
            set_path(tree, key, value)
        except KeyError as err:
            bad_sets.append(f"--set {err.args[0]}")
        else:
            changes[key] = value
    drop_sections_of_replaced_method(tree, changes, file_method, source=path)
    problems: list[str] = []
    dropped: set[str] = set()
    rules_broken = False
    rules_read: set[str] = set()
    try:
        spec = validate_spec(tree, source=path)
    except ConfigError as err:
        # A problem of the schema or of a cross-field rule must not hide the search's own:
        # those are checked on what validated (``validate_rest``), each check that reads a
        # value that failed left out.
        problems = list(err.problems)
        rest = validate_rest(tree, model=SearchSpec) if "search" in tree else None
        if rest is None or not isinstance(rest.cfg, SearchSpec):
            blamed = blame_overrides(problems, changes, in_file)
            raise ConfigError(path, bad_sets + blamed) from None
        tree, spec, dropped, rules_broken = rest.tree, rest.cfg, rest.dropped, bool(rest.rules)
        rules_read = rest.read
    problems += validate_search(
        tree, spec, source=path, dropped=dropped, known=problems, read=rules_read
    )
    # The resource plan reads nearly every setting (the memory estimate): made once the rest
    # of the spec holds, or where only malformed search parameters were left out.
    if all(d.startswith("search.params.") for d in dropped) and not rules_broken:
        memory = trial_memory(spec) if spec.search.resources.gpus else None
        nodes = None if attaching_to_cluster() else local_nodes()
        more, checked_here = check_resources(tree, spec, memory, nodes, dry_run=dry_run)
        problems += more
    else:
        checked_here = False
    if problems or bad_sets:
        raise ConfigError(path, bad_sets + blame_overrides(problems, changes, in_file))
    spec.search.mode = objective_mode(spec.search.metric, spec.search.mode)
    shared = read_as_a_trial(spec, source=path) if preflight and checked_here else None
    return tree, spec, shared


def trial_memory(spec: SearchSpec) -> Estimate | str:
    """The memory estimate of the largest trial the space can produce (every combination of
    the searched values that change it), or why there is none."""
    params = spec.search.params
    keep = {k: p for k, p in params.items() if k in MEMORY_PATHS}
    keep.update({p.of: params[p.of] for p in list(keep.values()) if p.of and p.of in params})
    combos = _joint_probes(keep, spec) or [_largest(keep, spec)]
    base = spec.model_dump(mode="json", exclude={"search"})
    gpu = spec.search.resources.gpus > 0 and spec.train.device != "cpu"
    worst: tuple[Estimate, dict[str, Any]] | None = None
    for combo in combos:
        probe = copy.deepcopy(base)
        for name, value in combo.items():
            set_path(probe, name, value)
        try:
            cfg = validate_tree(probe)
            shape = model_shape(cfg.model)
        except ConfigError:
            continue  # reported by validate_search
        except ModelError as err:
            return str(err)
        est = estimate(
            cfg,
            shape,
            device="gpu" if gpu else "cpu",
            workers=spec.search.resources.workers,
            sharded=spec.search.resources.shards(cfg.method),
        )
        if worst is None or est.peak > worst[0].peak:
            worst = est, combo
    if worst is None:
        return "no valid trial config"
    est, combo = worst
    searched = ", ".join(f"{k} {v}" for k, v in combo.items() if k in MEMORY_PATHS)
    return est.with_note(f"the space's largest trial ({searched})" if searched else "")


def _largest(params: dict[str, SearchParam], cfg: Config) -> dict[str, Any]:
    """Too many combinations: each parameter at its largest value (its first if not a number)."""
    out = {}
    for name, p in params.items():
        values = _probe_values(p, params, cfg)
        numbers = [v for v in values if _is_number(v)]
        out[name] = max(numbers) if len(numbers) == len(values) else values[0]
    return out


def _field_annotation(path: str) -> Any:
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


def _is_int_field(ann: Any) -> bool:
    args = get_args(ann) if get_origin(ann) is not None else (ann,)
    return int in args and float not in args


def _takes_a_float(ann: Any) -> bool:
    """Whether any float of a range is a valid value (not for bool, int, str or Literal)."""
    args = get_args(ann) if get_origin(ann) is not None else (ann,)
    return float in args


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _probe_values(p: SearchParam, params: dict[str, SearchParam], cfg: Config) -> list[Any]:
    """Values that must all validate: the bounds, every choice, every product."""
    if p.type in ("loguniform", "uniform"):
        return [p.low, p.high]
    if p.type == "int":
        return [int(p.low or 0), int(p.high or 0)]
    if p.type == "choice":
        return list(p.values or [])
    return [b * f for b in _bases(p, params, cfg) for f in (p.values or [])]


def _bases(p: SearchParam, params: dict[str, SearchParam], cfg: Config) -> list[Any]:
    """The values a multiple_of multiplies: its searched ``of``'s probes, or the fixed value."""
    of = params.get(p.of or "")
    return _probe_values(of, params, cfg) if of else [get_path(cfg, p.of or "")]


def _check_param(
    name: str, p: SearchParam, params: dict[str, SearchParam], cfg: Config
) -> str | None:
    """The first shape problem of one parameter (before its values are probed), or None."""
    where = f"search.params.{name}"
    if name.split(".")[0] in _UNSEARCHABLE:
        return f"{where}: {name.split('.')[0]} cannot be searched"
    if name in _UNSEARCHABLE_PATHS:
        return f"{where}: {name} cannot be searched: {_UNSEARCHABLE_PATHS[name]}"
    try:
        ann = _field_annotation(name)
    except KeyError as err:
        return f"{where}: {err.args[0]}"
    twice = _listed_twice(p.values or [])
    if twice is not None:
        # Here, on the spec file a search starts from, not in SearchParam's validator: a
        # saved spec (summary.json's resolved_spec, a trial's, --resume's) of a search that
        # ran with one must still load.
        return (
            f"{where}: values: {twice!r} is listed more than once; each value is drawn as "
            "often as it is listed: list it once"
        )
    if p.type in ("loguniform", "uniform") and _is_int_field(ann):
        return f"{where}: {name} is an integer; use type int or choice, not {p.type}"
    if p.type in ("loguniform", "uniform") and not _takes_a_float(ann):
        # Only the bounds are probed: 0 and 1 pass a bool field, 0.37 would fail every trial.
        return f"{where}: {name} is not a real number; use type choice, not {p.type}"
    if p.type == "int" and not all(float(b).is_integer() for b in (p.low or 0, p.high or 0)):
        # Optuna's suggest_int needs whole bounds; rounding them silently could leave the range
        # that was checked here.
        return f"{where}: type int needs whole-number low and high (got {p.low:g}, {p.high:g})"
    why = _not_comparable(name, cfg)
    if why:
        return (
            f"{where}: {name} cannot be searched: it {why}, so trials would not be compared "
            "on equal terms; set one value in the spec (one search per value)"
        )
    if p.type != "multiple_of":
        return None
    bad = [f for f in p.values or [] if not _is_number(f)]
    if bad:
        return f"{where}.values: multiple_of factors must be numbers, got {bad[0]!r}"
    of = params.get(p.of or "")
    if of is not None and of.type == "multiple_of":
        # The products are computed after every other value is sampled, in one pass.
        return (
            f"{where}.of: {p.of} is itself a multiple_of; "
            "multiple_of must refer to a sampled parameter or a fixed config value"
        )
    if of is None:
        try:
            _field_annotation(p.of or "")
        except KeyError as err:
            return f"{where}.of: {err.args[0]}"
    bases = _bases(p, params, cfg)
    if not all(_is_number(b) for b in bases):
        got = next(b for b in bases if not _is_number(b))
        return f"{where}.of: {p.of} is not a number ({got!r}); multiple_of needs a number"
    if of is not None and _is_int_field(ann):
        # Only the bounds of a range are probed: products between them must be whole too.
        if of.type in ("loguniform", "uniform"):
            return (
                f"{where}.of: {name} is an integer, but {p.of} is searched as a real-valued "
                f"range ({of.type}): its multiples are not whole numbers; search {p.of} with "
                "type int or choice"
            )
        halves = [f for f in p.values or [] if not float(f).is_integer()]
        if of.type == "int" and halves:
            return (
                f"{where}.values: {name} is an integer, and {p.of} an int range: a factor of "
                f"{halves[0]:g} gives a fraction for some of its values; use whole factors, or "
                f"search {p.of} as a choice of values whose products are whole"
            )
    return None


def _listed_twice(values: list[Any]) -> Any:
    """The first value listed a second time (4 and 4.0 are one value), or None: it would be
    drawn twice as often, the search leaning on it unasked."""
    seen: set[Any] = set()
    for v in values:
        if _same_value(v) in seen:
            return v
        seen.add(_same_value(v))
    return None


def _same_value(v: Any) -> Any:
    """What tells two listed values apart: 4 and 4.0 are one value."""
    return float(v) if _is_number(v) else repr(v)


def _not_comparable(name: str, cfg: Config) -> str | None:
    """Why trials differing in ``name`` could not be ranked against each other, or None.

    ``train.seed`` picks the eval rows when they are split off ``data.train``; when it samples
    ``max_eval_samples`` of a larger eval file is known only by reading it (preflight).
    """
    if name in _COMPARABLE:
        return None
    if name == "train.seed" and cfg.data.eval is None:
        return "picks the eval rows (data.eval is null: the seed splits them off data.train)"
    for prefix, why in _NOT_COMPARABLE.items():
        if name == prefix or (prefix.endswith(".") and name.startswith(prefix)):
            return why
    return None


def _joint_probes(params: dict[str, SearchParam], cfg: Config) -> list[dict[str, Any]] | None:
    """Every combination of the parameters' probe values (products follow their ``of``).

    A cross-field rule (``method: full`` with ``lora.use_dora``) can reject a combination whose
    values each pass alone. None when there are too many to check.
    """
    free = {k: _probe_values(p, params, cfg) for k, p in params.items() if p.type != "multiple_of"}
    products = {k: p for k, p in params.items() if p.type == "multiple_of"}
    count = math.prod(len(set(map(repr, v))) for v in free.values())
    count *= math.prod(len(p.values or []) for p in products.values())
    if count > MAX_JOINT_PROBES:
        return None
    combos: list[dict[str, Any]] = [{}]
    for k, values in free.items():
        unique = list({repr(v): v for v in values}.values())
        combos = [{**c, k: v} for c in combos for v in unique]
    for k, p in products.items():
        combos = [
            {**c, k: c.get(p.of or "", get_path(cfg, p.of or "")) * f}
            for c in combos
            for f in p.values or []
        ]
    return combos


def validate_search(
    tree: dict[str, Any],
    spec: SearchSpec,
    *,
    source: str,
    dropped: Collection[str] = (),
    known: Collection[str] = (),
    read: Collection[str] = (),
) -> list[str]:
    """Every problem with the spec's ``search`` section, as ``path: message`` lines.

    ``dropped``: dotted paths whose values failed validation and were left out of ``tree`` and
    ``spec`` (``validate_rest``): a check reading one is skipped. ``known``: the spec's own
    problems, already reported: a searched value's probe that fails on one of them alone says
    nothing of the value. ``read``: the paths the broken cross-field rules among them read
    (``Rest.read``): a section one of them judged is not reported again as unread.
    """
    s = spec.search
    problems: list[str] = []
    # The parameters reported here, and those the schema refused (left out of ``spec``): a
    # check that depends on their values (which methods the trials run) waits for them.
    rejected: set[str] = {_param_of(d) for d in dropped if d.startswith("search.params.")}
    # A multiple_of after the parameter it multiplies: one whose base is already reported is
    # left until that is fixed (its products of a bad value would only repeat the problem).
    for name, p in sorted(s.params.items(), key=lambda item: item[1].type == "multiple_of"):
        if p.type == "multiple_of" and p.of in rejected:
            continue
        where = f"search.params.{name}"
        shape = _check_param(name, p, s.params, spec)
        if shape:
            problems.append(shape)
            rejected.add(name)
            continue
        for value in _probe_values(p, s.params, spec):
            probe = _probe_tree(tree, {name: value})
            try:
                # As a SearchSpec: its rules that join a trial's values to search.resources
                # (fsdp and train.compile, train.device cpu and GPUs) hold for searched values.
                validate_tree(probe, source=source, model=SearchSpec, dropped=dropped, rest=False)
            except ConfigError as err:
                own = [e for e in err.problems if e not in known]
                if not own:
                    continue
                problems += [f"{where}: value {value!r}: {e}" for e in own]
                rejected.add(name)
                if p.type != "choice":  # a choice names every bad value: each is one of its own
                    break  # a range's bounds or a multiple's products share one cause
    if "method" not in rejected and not _reads(dropped, "method", "lora", "qlora"):
        # A rejected method search (a typo among its values) says nothing of the methods the
        # trials will run: which sections they read is judged once it is fixed.
        unread = unread_sections(spec, tree, [n for n in s.params if n not in rejected])
        # One cause, one line: ``method: full`` with a ``lora:`` that sets use_dora breaks
        # a rule reading lora; that section is not said to be unread as well.
        problems += [u for u in unread if not _section_read(u.split(": ", 1)[0], read)]
    # The parameters not rejected, together: a problem elsewhere hides none of their
    # contradictions (a multiple_of of a rejected one waits for it, as above).
    valid = {
        n: p
        for n, p in s.params.items()
        if n not in rejected and not (p.type == "multiple_of" and p.of in rejected)
    }
    if len(valid) > 1:
        problems += _check_combinations(
            tree, valid, spec, source=source, dropped=dropped, known=known
        )
    problems += _check_metric(spec, dropped)
    return problems


def _param_of(dropped: str) -> str:
    """The search parameter a dropped path ``search.params.NAME[.field]`` is of."""
    name = dropped.removeprefix("search.params.")
    head, _, last = name.rpartition(".")
    return head if head and last in SearchParam.model_fields else name


def _section_read(path: str, read: Collection[str]) -> bool:
    """Whether ``path`` is a section (no dot) that a path of ``read`` lies in."""
    return "." not in path and _reads(read, path)


def _reads(dropped: Collection[str], *paths: str) -> bool:
    """Whether any of ``paths`` is, holds or lies under a dropped path."""
    return any(overlaps(p, d) for p in paths for d in dropped)


def _check_combinations(
    tree: dict[str, Any],
    params: dict[str, SearchParam],
    cfg: Config,
    *,
    source: str,
    dropped: Collection[str] = (),
    known: Collection[str] = (),
) -> list[str]:
    """The first combination of (individually valid) values that fails validation, if any;
    a failure on the spec's ``known`` problems alone says nothing of the combination.

    Beyond ``MAX_JOINT_PROBES`` combinations, pairs of values of two parameters
    (``_pair_probes``), at most ``MAX_JOINT_PROBES`` of them: a rule joining two parameters
    (method and lora.use_dora) is caught, one joining three or more searched values (fsdp:
    method, workers and train.compile all searched) may not be.
    """
    combos = _joint_probes(params, cfg)
    unchecked = 0
    if combos is None:
        pairs = _pair_probes(params, cfg)
        combos = list(itertools.islice(pairs, MAX_JOINT_PROBES))
        unchecked = _pair_total(params, cfg) - len(combos)
    for combo in combos:
        probe = _probe_tree(tree, combo)
        try:
            validate_tree(probe, source=source, model=SearchSpec, dropped=dropped, rest=False)
        except ConfigError as err:
            own = [e for e in err.problems if e not in known]
            if not own:
                continue
            values = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            return [f"search.params: combination {values}: {e}" for e in own]
    if unchecked:
        # Printed before the CLIs set up logging (Python's last-resort handler): a dry run
        # and a run both say it.
        log.warning(
            "%s: search.params: %d pairs of searched values checked together, %d not (too "
            "many; those of parameters a rule or a section reads together were checked first)",
            source,
            len(combos),
            unchecked,
        )
    return []


def _pair_probes(params: dict[str, SearchParam], cfg: Config) -> Iterator[dict[str, Any]]:
    """Each pair of probe values of each two parameters, the others at the spec's own values
    (a multiple_of follows its ``of`` when that is one of the two, else at its first factor).
    Values that each pass alone and not together are the common failure of a big space.
    Pairs of parameters read together come first (``_related``): a cap keeps those."""
    free = {k: _unique(_probe_values(p, params, cfg)) for k, p in params.items()}
    names = list(params)
    couples = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    couples.sort(key=lambda ab: not _related(ab[0], ab[1], params))  # stable: else spec order
    for a, b in couples:
        x, y = (b, a) if params[a].type == "multiple_of" and params[a].of == b else (a, b)
        pairs = (  # a multiple_of and its base: the products the space draws
            [(vx, vx * f) for vx in free[x] for f in params[y].values or []]
            if params[y].type == "multiple_of" and params[y].of == x
            else [(vx, vy) for vx in free[x] for vy in free[y]]
        )
        for vx, vy in pairs:
            combo = {x: vx, y: vy}
            for k, p in params.items():  # the products of the pair's values
                if p.type == "multiple_of" and p.of in combo and k not in combo:
                    combo[k] = combo[p.of] * (p.values or [1])[0]
            yield combo


def _pair_total(params: dict[str, SearchParam], cfg: Config) -> int:
    """How many combinations ``_pair_probes`` yields, counted, not made."""
    n = {k: len(_unique(_probe_values(p, params, cfg))) for k, p in params.items()}
    names = list(params)
    total = 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = (b, a) if params[a].type == "multiple_of" and params[a].of == b else (a, b)
            of_x = params[y].type == "multiple_of" and params[y].of == x
            total += n[x] * (len(params[y].values or []) if of_x else n[y])
    return total


def _related(a: str, b: str, params: dict[str, SearchParam]) -> bool:
    """Whether parameters ``a`` and ``b`` are read together: by one section's validator (the
    same section), by one cross-field rule, or one is the other's multiple."""
    if params[a].of == b or params[b].of == a:
        return True
    if "." in a and a.split(".")[0] == b.split(".")[0]:
        return True
    return any(_reads(inputs, a) and _reads(inputs, b) for inputs in RULE_INPUTS)


def _probe_tree(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``values`` set at their (config field) paths, copying only the sections on
    those paths: a deep copy per probe would copy the search's value lists each time (most
    of a big space's validation time). Validation never changes its input."""
    probe = dict(tree)
    for name, value in values.items():
        *sections, leaf = name.split(".")
        node = probe
        for key in sections:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return probe


def _unique(values: list[Any]) -> list[Any]:
    return list({_same_value(v): v for v in values}.values())


def _check_metric(spec: SearchSpec, dropped: Collection[str] = ()) -> list[str]:
    """``search.metric`` is a searchable metric this config reports, usable by the scheduler;
    each check left out where a setting it reads failed validation (``dropped``)."""
    s = spec.search
    reads = ("train.exact_match", "train.eval_base", "data.train", "data.eval")
    if _reads(dropped, "search.metric", *reads):
        return []
    known = [m.name for m in reported(spec) if m.searchable]
    metric = METRICS.get(s.metric) if s.metric in known else None
    if metric is None:
        if s.metric in [m.name for m in reported(spec)] and METRICS[s.metric].mode is None:
            # Reported, but neither lower nor higher is better: nothing to optimise.
            return [
                f"search.metric: {s.metric!r} is reported but has no direction (neither lower "
                f"nor higher is better), so it cannot be optimised; choose one of "
                f"{', '.join(known)}"
            ]
        return [
            f"search.metric: the trainer never reports {s.metric!r} (it reports {', '.join(known)})"
        ]
    problems = []
    if s.mode is not None and s.mode != metric.mode and not _reads(dropped, "search.mode"):
        problems.append(
            f"search.mode: {s.mode}, but {s.metric} is better when "
            f"{'lower' if metric.mode == 'min' else 'higher'} (mode {metric.mode}); "
            "leave search.mode out to use the metric's own"
        )
    if _reads(dropped, "search.scheduler", "train.max_steps", "train.eval_every"):
        return problems
    per_eval = [m for m in known if METRICS[m].per_eval]
    if s.scheduler.type == "asha" and not metric.per_eval:
        problems.append(
            f"search.metric: {s.metric} is reported only at the end of a trial; "
            f"search.scheduler asha needs a per-eval metric ({', '.join(per_eval)})"
        )
    # The recipe evaluates every eval_every steps and at the last step.
    n_evals = -(-spec.train.max_steps // spec.train.eval_every)
    if s.scheduler.type == "asha" and n_evals < 2:
        problems.append(
            f"search.scheduler: asha needs at least 2 evals per trial, this one has {n_evals} "
            f"(train.max_steps {spec.train.max_steps}, train.eval_every {spec.train.eval_every})"
        )
    elif s.scheduler.type == "asha" and s.scheduler.grace_period * spec.train.eval_every >= (
        spec.train.max_steps
    ):
        # ASHA's first rung would be the trial's end (driver.build_tuner caps it at max_steps).
        problems.append(
            f"search.scheduler.grace_period: {s.scheduler.grace_period} evals x train.eval_every "
            f"{spec.train.eval_every} reaches train.max_steps {spec.train.max_steps}: ASHA would "
            "stop no trial; lower it, or set search.scheduler.type: none"
        )
    return problems
