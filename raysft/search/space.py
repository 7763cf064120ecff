"""A validated spec -> Optuna define-by-run space; sampled values -> a trial's own config.

Pure: no Ray import. Every sampled trial config is validated by the same pydantic models as a
hand-written config, so a spec that passes validation cannot produce a trial that fails it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft.config import Config, SearchSection, get_path, set_path, validate_tree


class DefineByRun:
    """Optuna define-by-run space; a class (not a closure) so Tune can pickle the searcher."""

    def __init__(self, cfg: Config, search: SearchSection):
        self.params = {k: v.model_dump() for k, v in search.params.items()}
        # multiple_of an unsearched path multiplies the base config's value.
        self.fixed = {
            p.of: get_path(cfg, p.of)
            for p in search.params.values()
            if p.type == "multiple_of" and p.of and p.of not in search.params
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


def build_space(cfg: Config, search: SearchSection) -> DefineByRun:
    return DefineByRun(cfg, search)


def trial_output_dir(exp_dir: str | Path, trial_id: str) -> str:
    return str(Path(exp_dir) / "trials" / trial_id)


def trial_config(tree: dict[str, Any], sampled: dict[str, Any], *, output_dir: str) -> Config:
    """The base config with the sampled values set; validated like any config.

    A trial never scores the base model: the search does that once (``train.eval_base``).
    """
    t = copy.deepcopy(tree)
    t.pop("search", None)
    for name, value in sampled.items():
        set_path(t, name, value)
    t["output_dir"] = output_dir
    set_path(t, "train.eval_base", False)
    return validate_tree(t, source="<trial>")


@dataclass(frozen=True)
class TrialConfigs:
    """(trial_id, sampled values) -> that trial's resolved config. Picklable, for Tune callbacks."""

    tree: dict[str, Any]
    exp_dir: str

    def __call__(self, trial_id: str, sampled: dict[str, Any]) -> Config:
        return trial_config(self.tree, sampled, output_dir=trial_output_dir(self.exp_dir, trial_id))


def startup_trials(search: SearchSection) -> int:
    """TPE's random trials before it models the results (``search.sampler.startup_trials``).

    ``auto``: a third of the trials, 2 to 10. With Optuna's default of 10, a search of up to 10
    trials (the laptop default runs 4) never leaves random sampling, and its first 10 draws are
    exactly ``RandomSampler(seed)``'s.
    """
    n = search.sampler.startup_trials
    if n == "auto":
        return min(10, max(2, round(search.num_samples / 3)))
    return int(n)


def build_sampler(search: SearchSection, *, concurrent: int) -> Any:
    """The Optuna sampler of a search, seeded with ``search.seed``.

    With more than one trial at a time, TPE runs with ``constant_liar``: a trial still running
    counts as a bad result, so two trials started together are not proposed the same point.
    """
    import optuna

    s = search.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    return optuna.samplers.TPESampler(
        seed=search.seed,
        n_startup_trials=startup_trials(search),
        multivariate=s.multivariate,
        constant_liar=concurrent > 1,
    )


def describe_sampler(search: SearchSection, *, concurrent: int | None) -> str:
    """One line for the search plan: which sampler, how many trials it draws at random.
    ``concurrent``: trials at once, None where the cluster decides it later."""
    s, n = search.sampler, search.num_samples
    if s.type == "random":
        return f"sampler: random, seed {search.seed}"
    k = startup_trials(search)
    if k >= n:
        random_part = f"all {n} trials random" if n > 1 else "its one trial random"
    elif concurrent == 1:
        random_part = f"first {k} of {n} trials random"
    else:  # TPE models only ended trials: those started while the first k run are random too
        random_part = f"random until {k} of {n} trials have ended"
    extras = ["multivariate"] if s.multivariate else []
    if concurrent is None:
        extras.append("constant liar if trials run together")
    elif concurrent > 1:
        extras.append("constant liar")
    how = f" ({', '.join(extras)})" if extras else ""
    return f"sampler: TPE{how}, {random_part}, seed {search.seed}"


def describe_space(search: SearchSection) -> list[str]:
    return [f"{name}: {describe_param(p)}" for name, p in search.params.items()]


def describe_param(p: Any) -> str:
    """A searched parameter's distribution, as the plan and the parent run's params show it."""
    if p.type in ("loguniform", "uniform"):
        return f"{p.type}({p.low:g}, {p.high:g})"
    if p.type == "int":
        return f"int({int(p.low or 0)}, {int(p.high or 0)})"
    if p.type == "choice":
        return f"choice{p.values}"
    return f"{p.of} x choice{p.values}"
