"""Search spec -> validated Optuna define-by-run space, trial configs and a resource plan.

Pure: no Ray import. Every sampled trial config is validated by the same pydantic models as a
hand-written config, so a spec that passes here cannot produce a trial that fails validation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from raysft.config import (
    Config,
    ConfigError,
    SearchParam,
    SearchSection,
    get_path,
    set_path,
    validate_tree,
)

# What the trainer reports at every eval (usable by ASHA) and only at the end.
PER_EVAL_METRICS = ("eval_loss", "train_loss")
FINAL_METRICS = ("exact_match",)
_UNSEARCHABLE = ("search", "tracking", "promote", "output_dir")
# The Tune trial only hosts Ray Train V2's controller: it reserves no CPU, only a token of
# memory (Ray refuses an empty resource bundle), so N workers x 1 CPU fill N cores exactly.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"CPU": 0, "memory": float(1 << 20)}


@dataclass(frozen=True)
class ResourcePlan:
    cpus_per_trial: float
    gpus_per_trial: float
    concurrent: int
    nodes: str  # where the numbers came from

    def describe(self, search: SearchSection) -> str:
        r = search.resources
        return (
            f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, "
            f"{r.gpus_per_worker:g} GPU  (= {self.cpus_per_trial:g} CPU, "
            f"{self.gpus_per_trial:g} GPU)\n"
            f"concurrent trials: {self.concurrent} of {search.num_samples} ({self.nodes})"
        )


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
    try:
        ann = _field_annotation(name)
    except KeyError as err:
        return f"{where}: {err.args[0]}"
    if p.type in ("loguniform", "uniform") and _is_int_field(ann):
        return f"{where}: {name} is an integer; use type int or choice, not {p.type}"
    if p.type == "int" and not all(float(b).is_integer() for b in (p.low or 0, p.high or 0)):
        # Optuna's suggest_int needs whole bounds; rounding them silently could leave the range
        # that was checked here.
        return f"{where}: type int needs whole-number low and high (got {p.low:g}, {p.high:g})"
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
    return None


# Cap on the value combinations validated together (each is one pydantic validation).
MAX_JOINT_PROBES = 4096


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


def validate_search(tree: dict[str, Any], cfg: Config, *, source: str) -> list[str]:
    """Every problem with the spec's ``search`` section, as ``path: message`` lines."""
    assert cfg.search is not None
    s = cfg.search
    problems: list[str] = []
    for name, p in s.params.items():
        where = f"search.params.{name}"
        shape = _check_param(name, p, s.params, cfg)
        if shape:
            problems.append(shape)
            continue
        for value in _probe_values(p, s.params, cfg):
            probe = copy.deepcopy(tree)
            set_path(probe, name, value)
            probe.pop("search", None)
            try:
                validate_tree(probe, source=source)
            except ConfigError as err:
                problems += [f"{where}: value {value!r}: {e}" for e in err.problems]
                break
    if not problems and len(s.params) > 1:
        problems += _check_combinations(tree, s.params, cfg, source=source)
    problems += _check_metric(cfg)
    return problems


def _check_combinations(
    tree: dict[str, Any], params: dict[str, SearchParam], cfg: Config, *, source: str
) -> list[str]:
    """The first combination of (individually valid) values that fails validation, if any."""
    base = copy.deepcopy(tree)
    base.pop("search", None)
    for combo in _joint_probes(params, cfg) or []:
        probe = copy.deepcopy(base)
        for name, value in combo.items():
            set_path(probe, name, value)
        try:
            validate_tree(probe, source=source)
        except ConfigError as err:
            values = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            return [f"search.params: combination {values}: {e}" for e in err.problems]
    return []


def _check_metric(cfg: Config) -> list[str]:
    assert cfg.search is not None
    s = cfg.search
    problems = []
    known = PER_EVAL_METRICS + (FINAL_METRICS if cfg.train.exact_match else ())
    if s.metric not in known:
        problems.append(
            f"search.metric: the trainer never reports {s.metric!r} (it reports {', '.join(known)})"
        )
    elif s.scheduler.type == "asha" and s.metric not in PER_EVAL_METRICS:
        problems.append(
            f"search.metric: {s.metric} is reported only at the end of a trial; "
            f"search.scheduler asha needs a per-eval metric ({', '.join(PER_EVAL_METRICS)})"
        )
    # The recipe evaluates every eval_every steps and at the last step.
    n_evals = -(-cfg.train.max_steps // cfg.train.eval_every)
    if s.scheduler.type == "asha" and n_evals < 2:
        problems.append(
            f"search.scheduler: asha needs at least 2 evals per trial, this one has {n_evals} "
            f"(train.max_steps {cfg.train.max_steps}, train.eval_every {cfg.train.eval_every})"
        )
    return problems


class DefineByRun:
    """Optuna define-by-run space; a class (not a closure) so Tune can pickle the searcher."""

    def __init__(self, cfg: Config):
        assert cfg.search is not None
        self.params = {k: v.model_dump() for k, v in cfg.search.params.items()}
        # multiple_of an unsearched path multiplies the base config's value.
        self.fixed = {
            p.of: get_path(cfg, p.of)
            for p in cfg.search.params.values()
            if p.type == "multiple_of" and p.of and p.of not in cfg.search.params
        }

    def __call__(self, trial: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            if p["type"] == "loguniform":
                out[name] = trial.suggest_float(name, p["low"], p["high"], log=True)
            elif p["type"] == "uniform":
                out[name] = trial.suggest_float(name, p["low"], p["high"])
            elif p["type"] == "int":
                out[name] = trial.suggest_int(name, int(p["low"]), int(p["high"]))
            elif p["type"] == "choice":
                out[name] = trial.suggest_categorical(name, p["values"])
        for name, p in self.params.items():  # products once their factors are sampled
            if p["type"] == "multiple_of":
                factor = trial.suggest_categorical(f"{name}/factor", p["values"])
                out[name] = {**self.fixed, **out}[p["of"]] * factor
        return out


def build_space(cfg: Config) -> DefineByRun:
    return DefineByRun(cfg)


def trial_config(tree: dict[str, Any], sampled: dict[str, Any], *, output_dir: str) -> Config:
    """The base config with the sampled values set; validated like any config."""
    t = copy.deepcopy(tree)
    t.pop("search", None)
    for name, value in sampled.items():
        set_path(t, name, value)
    t["output_dir"] = output_dir
    return validate_tree(t, source="<trial>")


def describe_space(search: SearchSection) -> list[str]:
    lines = []
    for name, p in search.params.items():
        if p.type in ("loguniform", "uniform"):
            lines.append(f"{name}: {p.type}({p.low:g}, {p.high:g})")
        elif p.type == "int":
            lines.append(f"{name}: int({int(p.low or 0)}, {int(p.high or 0)})")
        elif p.type == "choice":
            lines.append(f"{name}: choice{p.values}")
        else:
            lines.append(f"{name}: {p.of} x choice{p.values}")
    return lines


def plan_resources(
    search: SearchSection, nodes: list[dict[str, float]], *, where: str
) -> tuple[ResourcePlan | None, list[str]]:
    """Check every worker fits on some node and work out how many trials run at once."""
    r = search.resources
    problems = []
    if not any(_workers_on(n, r.cpus_per_worker, r.gpus_per_worker) for n in nodes):
        have = (
            "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes) or "none"
        )
        problems.append(
            f"search.resources: no node has {r.cpus_per_worker:g} CPU and "
            f"{r.gpus_per_worker:g} GPU for one worker ({where}: {have})"
        )
        return None, problems
    cpus = r.workers * r.cpus_per_worker
    gpus = r.workers * r.gpus_per_worker
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    # A worker runs on one node: count the workers each node holds, then whole trials.
    slots = sum(_workers_on(n, r.cpus_per_worker, r.gpus_per_worker) for n in nodes)
    fits = slots // r.workers
    if fits < 1:
        problems.append(
            f"search.resources: one trial needs {r.workers} worker(s) of "
            f"{r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU (= {cpus:g} CPU, {gpus:g} GPU); "
            f"the cluster holds {slots} such worker(s) ({where}: {total_cpu:g} CPU, "
            f"{total_gpu:g} GPU)"
        )
        return None, problems
    concurrent = min(fits, search.max_concurrent or fits, search.num_samples)
    return ResourcePlan(cpus, gpus, concurrent, where), problems


def _workers_on(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPU and ``gpus`` GPU fit on one node.

    Floor division of floats undercounts fractions (``1.0 // 0.2 == 4.0``); Ray itself adds
    fractional resources up in units of 1e-4, so five 0.2-GPU workers share one GPU.
    """

    def times(have: float, need: float) -> int:
        return math.floor(have / need + 1e-6)

    n = times(node.get("CPU", 0), cpus)
    return min(n, times(node.get("GPU", 0), gpus)) if gpus else n
