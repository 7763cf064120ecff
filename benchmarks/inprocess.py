"""An in-process search for the benchmarks: no Ray, trials run one after another in this process.

What ``raysft.tune`` does on Ray, reproduced where the benchmarks need it on 2 CPU cores:

- a trial is ``raysft.train.recipe.run_trial`` on the spec's config with the sampled values set
  (``raysft.search.space.trial_config``); its report callback sees every eval's metrics;
- ``Asha`` is the stopping rule of Ray's ``ASHAScheduler`` (one bracket, as raysft configures it:
  time = the trial's optimizer step, rungs at grace_period * rf^k, a trial is stopped at a rung
  when its metric is below the (1 - 1/rf) percentile of the values that rung recorded before it).
  With one worker, trials run one at a time and each is judged against those before it;
- Optuna proposes configs through raysft's own define-by-run space, and is told each trial as
  raysft's searcher tells it (``raysft.search.searcher``): a finished trial COMPLETE with its
  last metric, one stopped early PRUNED with that metric at its step (until 2026-12-06 raysft,
  and so this, told it COMPLETE, as Ray's ``OptunaSearch`` does);
- a trial with a non-finite metric stops at once (raysft's ``DivergedStopper``).

Every trial's eval history is appended to a JSONL cache keyed by (spec, sampled values, steps):
a rerun replays cached evals instead of training, so an interrupted benchmark resumes where it
stopped and the same config is never trained twice (the CPU recipe is deterministic).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LORA_SPEC = ROOT / "search_spaces" / "lora.yaml"

UNBOUNDED = 10**9  # a budget no search reaches: num_samples decides when it ends

# decide(step, value) -> (continue?, why it stops: "asha" | "budget" | "diverged" | None)
Decide = Callable[[int, float], tuple[bool, str | None]]


# ---------------------------------------------------------------- spec and space


def load(
    spec_path: str | Path, overrides: Iterable[str] = (), *, threads: int | None = 1
) -> tuple[dict[str, Any], Any]:
    """(tree, SearchSpec) of a spec with ``--set``-style overrides, validated as raysft.tune does.

    The benchmarks score eval loss only unless told otherwise: generation is switched off here
    (``train.exact_match=false``) before the overrides, which may switch it back on. ``threads``
    sets ``train.num_threads``: one torch thread per trial is as fast as two on a quiet 2-core
    machine for this model and several times faster when anything else runs (two threads then
    fight over the cores)."""
    from raysft.search.spec import load_spec

    fixed = ["train.exact_match=false", "train.eval_base=false"]
    fixed += [f"train.num_threads={threads}"] if threads else []
    fixed += list(overrides)
    return load_spec(str(spec_path), fixed, preflight=False)


def spec_hash(tree: dict[str, Any]) -> str:
    """Fingerprint of everything but the search, tracking and output settings."""
    t = {k: v for k, v in tree.items() if k not in ("search", "tracking", "promote", "output_dir")}
    return hashlib.sha1(json.dumps(t, sort_keys=True).encode()).hexdigest()[:12]


def grid(search: Any, *, float_points: int) -> list[dict[str, Any]]:
    """Every combination of a discretized space: each (log)uniform range becomes
    ``float_points`` (log-)evenly spaced values, ends included; choices, ints and multiple_of
    factors keep their values. Same keys as the define-by-run space samples."""
    import itertools

    axes: dict[str, list[Any]] = {}
    for name, p in search.params.items():
        if p.type == "loguniform":
            lo, hi = math.log(p.low), math.log(p.high)
            axes[name] = [
                _round(math.exp(lo + (hi - lo) * i / max(1, float_points - 1)))
                for i in range(float_points)
            ]
        elif p.type == "uniform":
            axes[name] = [
                _round(p.low + (p.high - p.low) * i / max(1, float_points - 1))
                for i in range(float_points)
            ]
        elif p.type == "int":
            axes[name] = list(range(int(p.low), int(p.high) + 1))
        elif p.type == "choice":
            axes[name] = list(p.values)
        else:  # multiple_of: the factor axis; the value is computed below
            axes[f"{name}/factor"] = list(p.values)
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    return [_resolve_products(search, c) for c in combos]


def _round(x: float) -> float:
    return float(f"{x:.4g}")  # grid values read well in tables and are exact in JSON


def _resolve_products(search: Any, combo: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in combo.items() if not k.endswith("/factor")}
    for name, p in search.params.items():
        if p.type == "multiple_of":
            out[name] = out[p.of] * combo[f"{name}/factor"]
    return out


# ---------------------------------------------------------------- ASHA, as Ray applies it


class Asha:
    """Ray's ``ASHAScheduler`` stopping rule (``ray.tune.schedulers.async_hyperband``, one
    bracket, ``stop_last_trials=True``) for one objective; ``on_result`` is True to continue."""

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float, mode: str):
        self.max_t, self.rf, self.sign = max_t, reduction_factor, 1.0 if mode == "max" else -1.0
        n_rungs = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
        # Highest milestone first, as Ray keeps them.
        self.rungs: list[tuple[float, dict[str, float]]] = [
            (grace_period * reduction_factor**k, {}) for k in reversed(range(n_rungs))
        ]

    def cutoff(self, recorded: dict[str, float]) -> float | None:
        import numpy as np

        if not recorded:
            return None
        return float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100))

    def on_result(self, trial_id: str, t: int, value: float) -> bool:
        if t >= self.max_t:
            return False  # the trial is done
        reward = self.sign * value
        for milestone, recorded in self.rungs:
            if t < milestone or trial_id in recorded:
                continue
            cutoff = self.cutoff(recorded)
            recorded[trial_id] = reward
            return not (cutoff is not None and reward < cutoff)
        return True


# ---------------------------------------------------------------- trial cache


class TrialCache:
    """JSONL of trial eval histories; the longest history of a key wins."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    self._keep(json.loads(line))

    def _keep(self, row: dict[str, Any]) -> None:
        old = self.rows.get(row["key"])
        if old is None or len(row["history"]) > len(old["history"]) or row["complete"]:
            self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, row: dict[str, Any]) -> None:
        self._keep(row)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def seconds_per_step(self) -> float | None:
        """Median measured training wall time per step of the trials trained so far."""
        rates = sorted(r["wall_s"] / r["steps_run"] for r in self.rows.values() if r["steps_run"])
        return rates[len(rates) // 2] if rates else None


def trial_key(tree: dict[str, Any], sampled: dict[str, Any]) -> str:
    steps = (tree["train"]["max_steps"], tree["train"]["eval_every"])
    blob = json.dumps([spec_hash(tree), sorted(sampled.items()), steps])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one trial


@dataclass
class Outcome:
    """One trial as a search saw it."""

    trial_id: str
    sampled: dict[str, Any]
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) per eval
    stopped: str | None = None  # "asha" | "budget" | "diverged"; None: ran to max_steps
    cached: bool = False  # every eval came from the cache
    final: dict[str, Any] = field(default_factory=dict)  # last eval's metrics (finished trials)

    @property
    def steps(self) -> int:
        return self.history[-1][0] if self.history else 0

    @property
    def value(self) -> float:
        return self.history[-1][1] if self.history else math.nan

    @property
    def finished(self) -> bool:
        return self.stopped is None


class _Stop(Exception):
    pass


def run(
    tree: dict[str, Any],
    sampled: dict[str, Any],
    *,
    metric: str,
    decide: Decide,
    cache: TrialCache,
    trial_id: str,
) -> Outcome:
    """One trial: cached evals replayed through ``decide``, the rest trained from scratch."""
    out = Outcome(trial_id, dict(sampled))
    key = trial_key(tree, sampled)
    row = cache.get(key)
    cached = [(int(h["step"]), float(h[metric])) for h in (row["history"] if row else [])]
    for step, value in cached:
        out.history.append((step, value))
        go, why = decide(step, value)
        if not go:
            out.stopped, out.cached = why, True
            return out
    if row and row["complete"]:
        out.cached, out.final = True, row.get("final", {})
        return out
    _train(tree, out, (metric, decide, cache, key), done=cached)
    return out


def _train(
    tree: dict[str, Any], out: Outcome, how: tuple[str, Decide, TrialCache, str], *, done: list
) -> None:
    """Train ``out.sampled`` from step 0; evals up to ``done``'s last were decided already.
    ``how``: the metric, the decision rule, the cache and the trial's key in it."""
    from raysft.search.space import trial_config
    from raysft.train.recipe import run_trial

    metric, decide, cache, key = how
    sampled = out.sampled
    history: list[dict[str, Any]] = []

    def report(record: dict[str, Any], _checkpoint: str | None) -> None:
        step, value = int(record["step"]), float(record[metric])
        history.append({k: v for k, v in record.items() if isinstance(v, int | float)})
        if step <= (done[-1][0] if done else 0):
            return  # decided when the cached evals were replayed
        out.history.append((step, value))
        go, why = decide(step, value)
        if not go:
            out.stopped = why
            raise _Stop

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysft-bench-") as tmp:
        cfg = trial_config(tree, sampled, output_dir=tmp)
        with contextlib.suppress(_Stop):  # raised by report: ASHA, the budget or divergence
            run_trial(cfg, report=report)
    max_steps = tree["train"]["max_steps"]
    complete = bool(history) and (
        history[-1]["step"] >= max_steps or not math.isfinite(history[-1][metric])
    )
    if complete and out.stopped is None:
        out.final = history[-1]
    cache.put(
        {
            "key": key,
            "sampled": sampled,
            "max_steps": max_steps,
            "history": history,
            "complete": complete,
            "final": out.final,
            "steps_run": history[-1]["step"] if history else 0,
            "wall_s": round(time.perf_counter() - t0, 2),
        }
    )


# ---------------------------------------------------------------- a search under a step budget


@dataclass
class Search:
    """A finished search: its trials in order and the steps each had spent when it ended."""

    method: str
    seed: int
    budget: int
    trials: list[Outcome] = field(default_factory=list)
    spent_after: list[int] = field(default_factory=list)  # cumulative steps after each trial

    @property
    def spent(self) -> int:
        return self.spent_after[-1] if self.spent_after else 0


def budgeted(
    method: str,
    seed: int,
    proposals: Iterator[tuple[dict[str, Any], Callable[[Outcome], None]]],
    *,
    tree: dict[str, Any],
    metric: str,
    asha: Asha | None,
    budget: int,
    cache: TrialCache,
    log: Callable[[str], None] = print,
) -> Search:
    """Run proposed configs one at a time until ``budget`` steps are spent (a running trial is
    stopped at the eval where the budget runs out); each proposal comes with its ``tell``."""
    search = Search(method, seed, budget)
    max_steps = tree["train"]["max_steps"]
    for sampled, tell in proposals:
        spent = search.spent
        if spent >= budget:
            break
        trial_id = f"{method}-s{seed}-{len(search.trials):03d}"

        def decide(step: int, value: float, _id: str = trial_id, _spent: int = spent) -> Any:
            if not math.isfinite(value):
                return False, "diverged"
            if step >= max_steps:
                return True, None  # its last eval: done (Ray stops it at max_t, unrecorded)
            if _spent + step >= budget:
                return False, "budget"
            if asha is not None and not asha.on_result(_id, step, value):
                return False, "asha"
            return True, None

        out = run(tree, sampled, metric=metric, decide=decide, cache=cache, trial_id=trial_id)
        tell(out)
        search.trials.append(out)
        search.spent_after.append(spent + out.steps)
        log(_describe(out, search.spent, budget))
    return search


def _describe(out: Outcome, spent: int, budget: int) -> str:
    values = " ".join(f"{k}={_fmt(v)}" for k, v in out.sampled.items())
    how = "cached" if out.cached else "trained"
    state = "finished" if out.finished else f"stopped ({out.stopped})"
    return (
        f"  {out.trial_id} {values}: {state} at step {out.steps}, {out.value:.4f} "
        f"[{how}; {spent}{f'/{budget}' if budget < UNBOUNDED else ''} steps]"
    )


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def optuna_proposals(
    tree: dict[str, Any], spec: Any, sampler: Any, *, direction: str
) -> Iterator[tuple[dict[str, Any], Callable[[Outcome], None]]]:
    """Configs from an Optuna sampler through raysft's define-by-run space; each ``tell``
    reports a finished trial's last metric as COMPLETE, a stopped one's as PRUNED at its step,
    a NaN one as FAIL, as raysft's searcher does."""
    import optuna

    from raysft.search.space import build_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler, direction=direction)
    space = build_space(spec, spec.search)
    while True:
        trial = study.ask()
        sampled = space(trial)

        def tell(out: Outcome, _trial: Any = trial) -> None:
            if not math.isfinite(out.value):
                study.tell(_trial, state=optuna.trial.TrialState.FAIL)
            elif out.finished:
                study.tell(_trial, out.value)
            else:
                _trial.report(out.value, out.steps)
                study.tell(_trial, state=optuna.trial.TrialState.PRUNED)

        yield sampled, tell


def fixed_proposals(
    configs: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], Callable[[Outcome], None]]]:
    for sampled in configs:
        yield copy.deepcopy(sampled), lambda out: None


def best_finished(trials: Iterable[Outcome], mode: str) -> Outcome | None:
    """The champion rule of raysft: the best metric among trials that ran to max_steps."""
    finished = [t for t in trials if t.finished and math.isfinite(t.value)]
    if not finished:
        return None
    return (max if mode == "max" else min)(finished, key=lambda t: t.value)


def quiet_logs() -> None:
    """The recipe logs every eval at INFO; a benchmark prints one line per trial instead."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("raysft", "transformers", "peft", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
