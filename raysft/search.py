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
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1 << 20}


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


def _probe_values(p: SearchParam, params: dict[str, SearchParam], cfg: Config) -> list[Any]:
    """Values that must all validate: the bounds, every choice, every product."""
    if p.type in ("loguniform", "uniform"):
        return [p.low, p.high]
    if p.type == "int":
        return [int(math.ceil(p.low or 0)), int(math.floor(p.high or 0))]
    if p.type == "choice":
        return list(p.values or [])
    of = params.get(p.of or "")
    bases = _probe_values(of, params, cfg) if of else [get_path(cfg, p.of or "")]
    return [b * f for b in bases for f in (p.values or [])]


def validate_search(tree: dict[str, Any], cfg: Config, *, source: str) -> list[str]:
    """Every problem with the spec's ``search`` section, as ``path: message`` lines."""
    assert cfg.search is not None
    s = cfg.search
    problems: list[str] = []
    for name, p in s.params.items():
        where = f"search.params.{name}"
        if name.split(".")[0] in _UNSEARCHABLE:
            problems.append(f"{where}: {name.split('.')[0]} cannot be searched")
            continue
        try:
            ann = _field_annotation(name)
        except KeyError as err:
            problems.append(f"{where}: {err.args[0]}")
            continue
        if p.type in ("loguniform", "uniform") and _is_int_field(ann):
            problems.append(f"{where}: {name} is an integer; use type int or choice, not {p.type}")
            continue
        if p.type == "multiple_of" and p.of not in s.params:
            try:
                _field_annotation(p.of or "")
            except KeyError as err:
                problems.append(f"{where}.of: {err.args[0]}")
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
    problems += _check_metric(cfg)
    return problems


def _check_metric(cfg: Config) -> list[str]:
    assert cfg.search is not None
    s = cfg.search
    known = PER_EVAL_METRICS + (FINAL_METRICS if cfg.train.exact_match else ())
    if s.metric not in known:
        return [
            f"search.metric: the trainer never reports {s.metric!r} (it reports {', '.join(known)})"
        ]
    if s.scheduler.type == "asha" and s.metric not in PER_EVAL_METRICS:
        return [
            f"search.metric: {s.metric} is reported only at the end of a trial; "
            f"search.scheduler asha needs a per-eval metric ({', '.join(PER_EVAL_METRICS)})"
        ]
    if s.scheduler.type == "asha" and cfg.train.max_steps < 2 * cfg.train.eval_every:
        return [
            "search.scheduler: asha needs at least 2 evals per trial "
            f"(train.max_steps {cfg.train.max_steps} < 2 x train.eval_every {cfg.train.eval_every})"
        ]
    return []


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
    if not any(
        n.get("CPU", 0) >= r.cpus_per_worker and n.get("GPU", 0) >= r.gpus_per_worker for n in nodes
    ):
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
    fits = int(total_cpu // cpus)
    if gpus:
        fits = min(fits, int(total_gpu // gpus + 1e-9))
    if fits < 1:
        problems.append(
            f"search.resources: one trial needs {cpus:g} CPU, {gpus:g} GPU; "
            f"the cluster has {total_cpu:g} CPU, {total_gpu:g} GPU ({where})"
        )
        return None, problems
    concurrent = min(fits, search.max_concurrent or fits, search.num_samples)
    return ResourcePlan(cpus, gpus, concurrent, where), problems
