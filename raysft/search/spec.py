"""Read, override and validate a search spec: every problem at once, before Ray starts.

Pure but for the node probe of laptop mode (``resources.local_nodes``). Every searched value is
probed through the same pydantic models a trial config goes through, alone (each parameter's
shape and probe values: ``searchable``) and in combination (``combinations``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection
from typing import Any

from raysft.config import (
    Config,
    SearchParam,
    SearchSpec,
    apply_set,
    blame_overrides,
    drop_sections_of_replaced_method,
    read_yaml,
    set_path,
    split_overrides,
    unread_sections,
    unused_settings,
    validate_rest,
    validate_spec,
    validate_tree,
)
from raysft.data.shared import SharedData
from raysft.errors import ConfigError, ModelError
from raysft.search.combinations import (
    check_combinations,
    joint_probes,
    probe_problems,
    reads_any,
)
from raysft.search.memory import MEMORY_PATHS, Estimate, estimate, model_shape
from raysft.search.preflight import preflight as read_as_a_trial
from raysft.search.ray_start import attaching_to_cluster
from raysft.search.resources import check_resources, local_nodes
from raysft.search.searchable import (
    check_param,
    is_number,
    probe_values,
    repeats_configs,
    varies_nothing,
)
from raysft.train.metrics import METRICS, objective_mode, reported

log = logging.getLogger(__name__)


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
            apply_set(tree, key, value)
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
        tree,
        spec,
        source=path,
        dropped=dropped,
        known=problems,
        read=rules_read,
        explicit=changes,
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
    for problem in unused_settings(spec, spec.search.params):
        log.warning("%s: %s", path, problem)
    alike = varies_nothing(spec.search.params)
    if alike:  # said, not refused: a spec may pin its values on purpose (a rerun, a check)
        log.warning("%s: search.params: %s", path, alike)
    shared = read_as_a_trial(spec, source=path) if preflight and checked_here else None
    if spec.train.epochs is not None and shared is not None:
        tree, spec = _epochs_as_steps(tree, spec, shared, source=path)
    elif spec.train.epochs is not None:
        log.info(
            "%s: train.epochs %g is counted in optimizer steps once the search reads its data",
            path, spec.train.epochs,
        )  # fmt: skip
    again = repeats_configs(spec.search.params, spec.search.num_samples)
    if again:  # said once the spec and its data hold, not refused: repeats may be meant
        log.warning("%s: search.num_samples: %s", path, again)
    return tree, spec, shared


def _epochs_as_steps(
    tree: dict[str, Any], spec: SearchSpec, shared: SharedData, *, source: str
) -> tuple[dict[str, Any], SearchSpec]:
    """``tree`` and ``spec`` with ``train.epochs`` resolved into ``train.max_steps`` from the
    data the driver read (``raysft.train.epochs``): every trial, ASHA and the trials'
    statuses then count the same steps. Raises ``ConfigError`` where the steps break a check."""
    from raysft.train.epochs import resolve_epochs

    epochs = spec.train.epochs
    resolved = resolve_epochs(
        spec, shared.prepared().train, world_size=spec.search.resources.workers, source=source
    )
    steps = resolved.train.max_steps
    tree = copy.deepcopy(tree)
    train = tree.setdefault("train", {})
    train.pop("epochs", None)
    train["max_steps"] = steps
    # The searched values were probed against the default max_steps, the steps unknown then:
    # probed again against these (a train.warmup_steps of 36 in 28 steps; a multiple_of of
    # train.max_steps), so no trial is refused once Ray is up.
    problems = validate_search(tree, resolved, source=source)  # the metric among its checks
    if problems:
        raise ConfigError(
            source,
            [
                f"train.epochs {epochs:g} is {steps:,} optimizer step(s) of this data: {p}"
                for p in problems
            ],  # fmt: skip
        )
    return tree, resolved


def trial_memory(spec: SearchSpec) -> Estimate | str:
    """The memory estimate of the largest trial the space can produce (every combination of
    the searched values that change it), or why there is none."""
    params = spec.search.params
    keep = {k: p for k, p in params.items() if k in MEMORY_PATHS}
    keep.update({p.of: params[p.of] for p in list(keep.values()) if p.of and p.of in params})
    combos = joint_probes(keep, spec) or [_largest(keep, spec)]
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
        values = probe_values(p, params, cfg)
        numbers = [v for v in values if is_number(v)]
        out[name] = max(numbers) if len(numbers) == len(values) else values[0]
    return out


def validate_search(
    tree: dict[str, Any],
    spec: SearchSpec,
    *,
    source: str,
    dropped: Collection[str] = (),
    known: Collection[str] = (),
    read: Collection[str] = (),
    explicit: Collection[str] = (),
) -> list[str]:
    """Every problem with the spec's ``search`` section, as ``path: message`` lines.

    ``dropped``: dotted paths whose values failed validation and were left out of ``tree`` and
    ``spec`` (``validate_rest``): a check reading one is skipped. ``known``: the spec's own
    problems, already reported: a searched value's probe that fails on one of them alone says
    nothing of the value. ``read``: the paths the broken cross-field rules among them read
    (``Rest.read``): a section one of them judged is not reported again as unread.
    ``explicit``: the keys set on the command line (``unread_sections``).
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
        shape = check_param(name, p, s.params, spec)
        if shape:
            problems.append(shape)
            rejected.add(name)
            continue
        for value in probe_values(p, s.params, spec):
            own = probe_problems(tree, {name: value}, source=source, dropped=dropped, known=known)
            if own:
                problems += [f"{where}: value {value!r}: {e}" for e in own]
                rejected.add(name)
                if p.type != "choice":  # a choice names every bad value: each is one of its own
                    break  # a range's bounds or a multiple's products share one cause
    if "method" not in rejected and not reads_any(dropped, "method", "lora", "qlora"):
        # A rejected method search (a typo among its values) says nothing of the methods the
        # trials will run: which sections they read is judged once it is fixed.
        searched = [n for n in s.params if n not in rejected]
        unread = unread_sections(spec, tree, searched, explicit)
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
        problems += check_combinations(
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
    return "." not in path and reads_any(read, path)


def _check_metric(spec: SearchSpec, dropped: Collection[str] = ()) -> list[str]:
    """``search.metric`` is a searchable metric this config reports, usable by the scheduler;
    each check left out where a setting it reads failed validation (``dropped``)."""
    s = spec.search
    reads = ("train.exact_match", "train.eval_base", "data.train", "data.eval")
    if reads_any(dropped, "search.metric", *reads):
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
    if s.mode is not None and s.mode != metric.mode and not reads_any(dropped, "search.mode"):
        problems.append(
            f"search.mode: {s.mode}, but {s.metric} is better when "
            f"{'lower' if metric.mode == 'min' else 'higher'} (mode {metric.mode}); "
            "leave search.mode out to use the metric's own"
        )
    if reads_any(dropped, "search.scheduler", "train.max_steps", "train.eval_every"):
        return problems
    per_eval = [m for m in known if METRICS[m].per_eval]
    if s.scheduler.type == "asha" and not metric.per_eval:
        problems.append(
            f"search.metric: {s.metric} is reported only at the end of a trial; "
            f"search.scheduler asha needs a per-eval metric ({', '.join(per_eval)})"
        )
    if spec.train.epochs is not None:  # steps not known yet: checked once they are
        return problems
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
        # ASHA's first rung would be the trial's end (tuner.build_tuner caps it at max_steps).
        problems.append(
            f"search.scheduler.grace_period: {s.scheduler.grace_period} evals x train.eval_every "
            f"{spec.train.eval_every} reaches train.max_steps {spec.train.max_steps}: ASHA would "
            "stop no trial; lower it, or set search.scheduler.type: none"
        )
    return problems
