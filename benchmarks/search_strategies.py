"""How well the search searches: TPE + ASHA vs random search vs a grid, at equal step budgets.

    python benchmarks/search_strategies.py                  # all of it (the estimate first)
    python benchmarks/search_strategies.py --estimate-only  # the estimate alone

On the embedded default (``search_spaces/lora.yaml``, its space, steps and objective):

- **grid**: every combination of a discretized version of the space (each float range becomes
  ``--float-points`` log-evenly spaced values, choices keep theirs), every trial to max_steps.
  Its result does not depend on a seed; each seed only shuffles the order its trials run in,
  which changes its best-so-far curve, not its final best.
- **tpe-asha**: what ``raysft.tune`` runs: Optuna's ``TPESampler(seed)`` (raysft's settings) and
  ASHA with the spec's grace period and reduction factor (``inprocess.Asha``, Ray's rule).
- **random**: Optuna's ``RandomSampler(seed)`` over the same space, every trial to max_steps.

TPE's first ``startup_trials`` proposals (``search.sampler``; ``auto`` is a third of the spec's
``num_samples``, at least 2) are random, drawn exactly as ``RandomSampler(seed)`` draws them, so
tpe-asha and random share their first configs. With Optuna's default of 10 random trials, which
raysft used until 2026-12-04, a budget that fits fewer than ~10 trials gave tpe-asha and random
the same configs throughout. ``--methods`` can add ``tpe`` (no ASHA) and ``random-asha`` to
separate TPE's share from ASHA's.

tpe-asha and random get the same budget of optimizer steps, ``--budget-fraction`` (1/3) of the
grid's; a search stops launching trials when its budget is spent, and a trial running when it
runs out is stopped at that eval. Reported per method over ``--seeds`` seeds: the best metric of a
finished trial (raysft's champion rule) against steps spent, as ``curves.png`` and a Markdown table
(``results.md``, and between the markers in the README with ``--readme``). Goal of issue 8: TPE +
ASHA within 1% of the grid's best at no more than a third of the grid's steps.

Trials run in this process (``inprocess.py``: ``run_trial`` with a report callback, no Ray) and
each one's eval history is appended to ``OUT/trials.jsonl``; a rerun replays those instead of
training, so an interrupted run resumes and the grid's trials are trained once for all seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import inprocess as ip  # noqa: E402
import search_report as report  # noqa: E402

from raysft.bench.measure import machine  # noqa: E402

METHODS = ("tpe-asha", "random", "grid")
OPTIONAL = ("tpe", "random-asha")  # to tell TPE's share from ASHA's, when asked for
DEFAULT_OUT = Path(__file__).resolve().parent / "search_strategies"
DEFAULT_SEC_PER_STEP = 0.25  # lora.yaml on 2 quiet CPU cores, setup and evals included


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(ip.LORA_SPEC))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override the spec, as raysft.tune --set (e.g. train.max_steps=60)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (0: torch's)")
    p.add_argument("--float-points", type=int, default=4, help="grid values per float range")
    p.add_argument("--budget-fraction", type=float, default=1 / 3)
    p.add_argument("--methods", default=",".join(METHODS), help=f"of {METHODS + OPTIONAL}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--readme", type=Path, default=None, help="splice the table into this file")
    p.add_argument(
        "--reseeds",
        type=int,
        default=3,
        help="train every method's champion again on this many other train.seed values (0: no)",
    )
    p.add_argument("--estimate-only", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------- pure: budgets, curves, table


def budget_steps(grid_steps: int, fraction: float, eval_every: int) -> int:
    """The other methods' budget: ``fraction`` of the grid's steps, down to whole evals."""
    return max(eval_every, int(grid_steps * fraction) // eval_every * eval_every)


def grid_orders(n: int, seeds: int) -> list[list[int]]:
    """One shuffled order of the grid's trials per seed."""
    orders = []
    for seed in range(seeds):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        orders.append(order)
    return orders


def estimate_seconds(
    *,
    grid_steps: int,
    cached_grid_steps: int,
    budget: int,
    seeds: int,
    n_methods: int,
    sec_per_step: float,
) -> float:
    """Wall time if nothing else is cached: the grid once, each other method's budget per seed."""
    return (grid_steps - cached_grid_steps + budget * seeds * n_methods) * sec_per_step


# ---------------------------------------------------------------- running


def _search_dict(search: ip.Search, mode: str) -> dict[str, Any]:
    return {
        "method": search.method,
        "seed": search.seed,
        "budget": search.budget,
        "spent": search.spent,
        "curve": report.curve(search.trials, mode),
        "trials": [
            {"sampled": t.sampled, "steps": t.steps, "value": t.value, "stopped": t.stopped}
            for t in search.trials
        ],
    }


def _sampler(method: str, search: Any, seed: int) -> Any:
    """raysft's own sampler for the spec's search section (``tpe*``, one trial at a time, as
    here), or Optuna's ``RandomSampler``, both seeded with ``seed``."""
    import optuna

    from raysft.search.space import build_sampler

    if method.startswith("tpe"):
        return build_sampler(search.model_copy(update={"seed": seed}), concurrent=1)
    return optuna.samplers.RandomSampler(seed=seed)


@dataclass
class Plan:
    """What a benchmark run trains: the spec, its grid, the budgets, the trial cache."""

    tree: dict[str, Any]
    spec: Any
    mode: str
    methods: list[str]
    configs: list[dict[str, Any]]
    grid_steps: int
    budget: int
    cache: ip.TrialCache

    @property
    def others(self) -> list[str]:
        return [m for m in self.methods if m != "grid"]

    def asha(self) -> dict[str, Any]:
        s, t = self.spec.search, self.spec.train
        return {
            "max_t": t.max_steps,
            "grace_period": min(s.scheduler.grace_period * t.eval_every, t.max_steps),
            "reduction_factor": s.scheduler.reduction_factor,
            "mode": self.mode,
        }


def make_plan(args: argparse.Namespace) -> Plan:
    from raysft.train.metrics import objective_mode

    tree, spec = ip.load(args.spec, args.set, threads=args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS + OPTIONAL)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)} (have {METHODS + OPTIONAL})")
    configs = ip.grid(spec.search, float_points=args.float_points)
    grid_steps = len(configs) * spec.train.max_steps
    budget = budget_steps(grid_steps, args.budget_fraction, spec.train.eval_every)
    mode = objective_mode(spec.search.metric, spec.search.mode)
    cache = ip.TrialCache(args.out / "trials.jsonl")
    return Plan(tree, spec, mode, methods, configs, grid_steps, budget, cache)


def print_estimate(plan: Plan, args: argparse.Namespace) -> None:
    t = plan.spec.train
    cached = sum(
        t.max_steps
        for c in plan.configs
        if (row := plan.cache.get(ip.trial_key(plan.tree, c))) is not None and row["complete"]
    )
    measured = plan.cache.seconds_per_step()
    rate = measured or DEFAULT_SEC_PER_STEP
    est = estimate_seconds(
        grid_steps=plan.grid_steps,
        cached_grid_steps=cached,
        budget=plan.budget,
        seeds=args.seeds,
        n_methods=len(plan.others),
        sec_per_step=rate,
    )
    print(
        f"space: {len(plan.configs)} grid points ({args.float_points} per float range) x "
        f"{t.max_steps} steps = {plan.grid_steps} steps; budget of {', '.join(plan.others)}: "
        f"{plan.budget} steps x {args.seeds} seeds; metric {plan.spec.search.metric} "
        f"({plan.mode})\nestimate: ~{est / 60:.0f} min at {rate:.3f} s/step "
        f"({'measured here' if measured else 'assumed, quiet 2-core machine'}; "
        f"{cached} grid steps cached, cached trials of other methods cost nothing)",
        flush=True,
    )


def champions(searches: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Each search's champion config (its best finished trial), in order, without repeats."""
    seen: dict[str, dict[str, Any]] = {}
    for s in searches:
        best = report.champion(s, mode)
        if best is not None:
            seen.setdefault(json.dumps(best, sort_keys=True), best)
    return list(seen.values())


def reseed(plan: Plan, args: argparse.Namespace, configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every config again on ``args.reseeds`` other training seeds (data order, adapter init):
    {config json: [its value at the spec's seed, then at each other seed]}. How much of a
    champion's lead is the config, and how much the seed it happened to be trained with."""
    base = int(plan.spec.train.seed)
    seeds = [base + i for i in range(1, args.reseeds + 1)]
    trees = {
        s: ip.load(args.spec, [*args.set, f"train.seed={s}"], threads=args.threads)[0]
        for s in seeds
    }
    out: dict[str, Any] = {"seeds": [base, *seeds], "values": {}}
    metric = plan.spec.search.metric
    for sampled in configs:
        values = []
        for seed, tree in [(base, plan.tree), *trees.items()]:
            print(f"reseed {seed}:", flush=True)
            found = ip.run(
                tree,
                sampled,
                metric=metric,
                decide=lambda step, value: (
                    math.isfinite(value),
                    None if math.isfinite(value) else "diverged",
                ),
                cache=plan.cache,
                trial_id=f"reseed-{seed}",
            )
            values.append(found.value)
        out["values"][json.dumps(sampled, sort_keys=True)] = values
    return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    plan = make_plan(args)
    print_estimate(plan, args)
    if args.estimate_only:
        return {}
    ip.quiet_logs()
    t0 = time.perf_counter()
    common = {"tree": plan.tree, "metric": plan.spec.search.metric, "cache": plan.cache}
    print("grid:", flush=True)
    grid = ip.budgeted(
        "grid", 0, ip.fixed_proposals(plan.configs), asha=None, budget=plan.grid_steps, **common
    )
    grid_best = ip.best_finished(grid.trials, plan.mode)
    searches = []
    for seed in range(args.seeds):
        if "grid" in plan.methods:
            trials = [grid.trials[i] for i in grid_orders(len(grid.trials), args.seeds)[seed]]
            spent = list(itertools.accumulate(t.steps for t in trials))
            shuffled = ip.Search("grid", seed, plan.grid_steps, trials, spent)
            searches.append(_search_dict(shuffled, plan.mode))
        for method in plan.others:
            print(f"{method} seed {seed}:", flush=True)
            direction = "minimize" if plan.mode == "min" else "maximize"
            proposals = ip.optuna_proposals(
                plan.tree, plan.spec, _sampler(method, plan.spec.search, seed), direction=direction
            )
            asha = ip.Asha(**plan.asha()) if method.endswith("asha") else None
            found = ip.budgeted(method, seed, proposals, asha=asha, budget=plan.budget, **common)
            searches.append(_search_dict(found, plan.mode))
    reseeded = None
    if args.reseeds > 0:
        reseeded = reseed(plan, args, champions(searches, plan.mode))
    t = plan.spec.train
    return {
        "command": " ".join(["python benchmarks/search_strategies.py", *sys.argv[1:]]),
        "spec": args.spec,
        "overrides": args.set,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": machine(),  # this start's host (a resumed run's cached trials may be another's)
        "metric": plan.spec.search.metric,
        "mode": plan.mode,
        "max_steps": t.max_steps,
        "eval_every": t.eval_every,
        "asha": plan.asha(),
        "float_points": args.float_points,
        "grid_points": len(plan.configs),
        "grid_steps": plan.grid_steps,
        "budget": plan.budget,
        "grid_best": grid_best.value if grid_best else math.nan,
        "grid_best_config": grid_best.sampled if grid_best else None,
        "wall_seconds": round(time.perf_counter() - t0, 1),  # this invocation's
        # every cached trial's own training wall time: the whole benchmark's, however resumed
        "trial_seconds": round(sum(r["wall_s"] for r in plan.cache.rows.values()), 1),
        "searches": searches,
        "reseeded": reseeded,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_benchmark(args)
    if result:
        print(report.write_report(result, args.out, args.readme))
        print(f"wrote {args.out}/results.md, curves.png, summary.json, trials.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
