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
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import inprocess as ip  # noqa: E402

METHODS = ("tpe-asha", "random", "grid")
OPTIONAL = ("tpe", "random-asha")  # to tell TPE's share from ASHA's, when asked for
DEFAULT_OUT = Path(__file__).resolve().parent / "search_strategies"
DEFAULT_SEC_PER_STEP = 0.25  # lora.yaml on 2 quiet CPU cores, setup and evals included
README_START, README_END = "<!-- search-strategies:start -->", "<!-- search-strategies:end -->"


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
    p.add_argument("--estimate-only", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------- pure: budgets, curves, table


def budget_steps(grid_steps: int, fraction: float, eval_every: int) -> int:
    """The other methods' budget: ``fraction`` of the grid's steps, down to whole evals."""
    return max(eval_every, int(grid_steps * fraction) // eval_every * eval_every)


def curve(trials: list[ip.Outcome], mode: str) -> list[tuple[int, float]]:
    """(steps spent, best finished metric so far) after each trial that improved it."""
    points: list[tuple[int, float]] = []
    spent, best = 0, math.nan
    for t in trials:
        spent += t.steps
        if (
            t.finished
            and math.isfinite(t.value)
            and (math.isnan(best) or _better(t.value, best, mode))
        ):
            best = t.value
            points.append((spent, best))
    return points


def best_at(points: list[tuple[int, float]], steps: int) -> float:
    """Best value of a curve once ``steps`` were spent (NaN before its first finished trial)."""
    best = math.nan
    for spent, value in points:
        if spent > steps:
            break
        best = value
    return best


def steps_to_reach(points: list[tuple[int, float]], target: float, mode: str) -> int | None:
    """Steps spent when the curve first got within ``target`` (inclusive), None if never."""
    for spent, value in points:
        if value == target or _better(value, target, mode):
            return spent
    return None


def within(reference: float, fraction: float, mode: str) -> float:
    """The value ``fraction`` (0.01: 1%) worse than ``reference``."""
    return reference * (1 + fraction) if mode == "min" else reference * (1 - fraction)


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def grid_orders(n: int, seeds: int) -> list[list[int]]:
    """One shuffled order of the grid's trials per seed."""
    orders = []
    for seed in range(seeds):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        orders.append(order)
    return orders


def summarize(
    searches: list[dict[str, Any]], *, grid_best: float, budget: int, mode: str
) -> list[dict[str, Any]]:
    """One row per method: trials, best at the budget (mean, std, per seed), gap to the grid's
    best, seeds within 1% of it by the budget and the steps they needed."""
    target = within(grid_best, 0.01, mode)
    rows = []
    for method in dict.fromkeys(s["method"] for s in searches):
        mine = [s for s in searches if s["method"] == method]
        at = [best_at(s["curve"], budget) for s in mine]
        found = [v for v in at if math.isfinite(v)]
        reach = [steps_to_reach(s["curve"], target, mode) for s in mine]
        reach_in = [r for r in reach if r is not None and r <= budget]
        mean = statistics.fmean(found) if found else math.nan
        rows.append(
            {
                "method": method,
                "seeds": len(mine),
                "trials": statistics.fmean(len(s["trials"]) for s in mine),
                "finished": statistics.fmean(
                    sum(t["stopped"] is None for t in s["trials"]) for s in mine
                ),
                "spent": statistics.fmean(min(s["spent"], budget) for s in mine),
                "best_mean": mean,
                "best_std": statistics.stdev(found) if len(found) > 1 else 0.0,
                "best_per_seed": at,
                "gap_pct": 100 * abs(mean - grid_best) / abs(grid_best) if found else math.nan,
                "within_1pct": len(reach_in),
                "steps_to_1pct": statistics.fmean(reach_in) if reach_in else None,
            }
        )
    return rows


def markdown(
    rows: list[dict[str, Any]],
    *,
    metric: str,
    grid_best: float,
    grid_steps: int,
    budget: int,
    context: str,
) -> str:
    """The results table and the goal's verdict, in Markdown."""
    head = (
        f"| method | seeds | trials | finished | best {metric} at {budget} steps (mean ± std) "
        "| per seed | gap to grid best | within 1% by then | steps to within 1% |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        per_seed = ", ".join(_f(v) for v in r["best_per_seed"])
        reach = "-" if r["steps_to_1pct"] is None else f"{r['steps_to_1pct']:.0f}"
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['trials']:.1f} | {r['finished']:.1f} "
            f"| {_f(r['best_mean'])} ± {_f(r['best_std'])} | {per_seed} | {r['gap_pct']:.2f}% "
            f"| {r['within_1pct']}/{r['seeds']} | {reach} |"
        )
    tpe = next((r for r in rows if r["method"] == "tpe-asha"), None)
    verdict = ""
    if tpe is not None:
        met = tpe["within_1pct"] == tpe["seeds"]
        verdict = (
            f"\n\nGoal (TPE + ASHA within 1% of the grid's best at <= 1/3 of its steps): "
            f"**{'met' if met else 'not met'}**: {tpe['within_1pct']} of {tpe['seeds']} seeds "
            f"within 1% of {_f(grid_best)} by {budget} of the grid's {grid_steps} steps."
        )
    return f"{context}\n\n{head}" + "\n".join(lines) + verdict + "\n"


def _f(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4f}"


def splice_readme(text: str, block: str) -> str:
    """``text`` with the part between the README markers replaced by ``block``."""
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    return text[:start] + "\n" + block.strip() + "\n" + text[end:]


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
        "curve": curve(search.trials, mode),
        "trials": [
            {"sampled": t.sampled, "steps": t.steps, "value": t.value, "stopped": t.stopped}
            for t in search.trials
        ],
    }


def _sampler(method: str, seed: int) -> Any:
    import optuna

    if method.startswith("tpe"):
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    tree, spec = ip.load(args.spec, args.set, threads=args.threads)
    s, t = spec.search, spec.train
    from raysft.train.metrics import objective_mode

    mode = objective_mode(s.metric, s.mode)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS + OPTIONAL)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)} (have {METHODS + OPTIONAL})")
    configs = ip.grid(s, float_points=args.float_points)
    grid_steps = len(configs) * t.max_steps
    budget = budget_steps(grid_steps, args.budget_fraction, t.eval_every)
    cache = ip.TrialCache(args.out / "trials.jsonl")
    cached = sum(
        t.max_steps
        for c in configs
        if (row := cache.get(ip.trial_key(tree, c))) is not None and row["complete"]
    )
    rate = cache.seconds_per_step() or DEFAULT_SEC_PER_STEP
    others = [m for m in methods if m != "grid"]
    est = estimate_seconds(
        grid_steps=grid_steps,
        cached_grid_steps=cached,
        budget=budget,
        seeds=args.seeds,
        n_methods=len(others),
        sec_per_step=rate,
    )
    print(
        f"space: {len(configs)} grid points ({args.float_points} per float range) x "
        f"{t.max_steps} steps = {grid_steps} steps; budget of {', '.join(others)}: {budget} "
        f"steps x {args.seeds} seeds; metric {s.metric} ({mode})\n"
        f"estimate: ~{est / 60:.0f} min at {rate:.3f} s/step "
        f"({'measured here' if cache.seconds_per_step() else 'assumed, quiet 2-core machine'}; "
        f"{cached} grid steps cached, cached trials of other methods cost nothing)",
        flush=True,
    )
    if args.estimate_only:
        return {}
    ip.quiet_logs()
    t0 = time.perf_counter()
    asha_cfg = {
        "max_t": t.max_steps,
        "grace_period": min(s.scheduler.grace_period * t.eval_every, t.max_steps),
        "reduction_factor": s.scheduler.reduction_factor,
        "mode": mode,
    }
    common = {"tree": tree, "metric": s.metric, "cache": cache}
    print("grid:", flush=True)
    grid = ip.budgeted(
        "grid", 0, ip.fixed_proposals(configs), asha=None, budget=grid_steps, **common
    )
    grid_best = ip.best_finished(grid.trials, mode)
    searches = []
    for seed in range(args.seeds):
        if "grid" in methods:
            order = grid_orders(len(grid.trials), args.seeds)[seed]
            shuffled = ip.Search("grid", seed, grid_steps, [grid.trials[i] for i in order])
            searches.append(_search_dict(shuffled, mode))
        for method in others:
            print(f"{method} seed {seed}:", flush=True)
            proposals = ip.optuna_proposals(
                tree,
                spec,
                _sampler(method, seed),
                direction="minimize" if mode == "min" else "maximize",
            )
            asha = ip.Asha(**asha_cfg) if method.endswith("asha") else None
            found = ip.budgeted(method, seed, proposals, asha=asha, budget=budget, **common)
            searches.append(_search_dict(found, mode))
    return {
        "spec": args.spec,
        "overrides": args.set,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "metric": s.metric,
        "mode": mode,
        "max_steps": t.max_steps,
        "eval_every": t.eval_every,
        "asha": asha_cfg,
        "float_points": args.float_points,
        "grid_points": len(configs),
        "grid_steps": grid_steps,
        "budget": budget,
        "grid_best": grid_best.value if grid_best else math.nan,
        "grid_best_config": grid_best.sampled if grid_best else None,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "searches": searches,
    }


# ---------------------------------------------------------------- report


# Colour and line style per method: with the same seed, TPE's first (random) proposals are
# random search's, so their lines can coincide; dashes keep both visible.
STYLES = {
    "tpe-asha": ("tab:blue", "-"),
    "random": ("tab:orange", "--"),
    "grid": ("tab:gray", ":"),
    "tpe": ("tab:green", "-."),
    "random-asha": ("tab:red", "-."),
}


def plot(result: dict[str, Any], path: Path) -> None:
    """Best finished metric against steps spent, one line per (method, seed); the grid's best
    with its 1% band and the budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode, best, budget = result["mode"], result["grid_best"], result["budget"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    seen: set[str] = set()
    for s in result["searches"]:
        if not s["curve"]:
            continue
        xs, ys = zip(*s["curve"], strict=True)
        end = s["budget"] if s["method"] != "grid" else result["grid_steps"]
        label = None if s["method"] in seen else s["method"]
        seen.add(s["method"])
        color, style = STYLES.get(s["method"], ("black", "-"))
        ax.step(
            [*xs, end],
            [*ys, ys[-1]],
            where="post",
            color=color,
            ls=style,
            alpha=0.8,
            lw=1.5,
            label=label,
        )
    if math.isfinite(best):
        ax.axhline(best, color="black", ls="--", lw=1, label=f"grid best {best:.4f}")
        ax.axhspan(
            *sorted((best, within(best, 0.01, mode))),
            color="green",
            alpha=0.12,
            label="within 1% of it",
        )
    share = budget / result["grid_steps"]
    ax.axvline(
        budget, color="black", ls=":", lw=1, label=f"budget {budget} steps ({share:.0%} of grid)"
    )
    ax.set_xlim(0, result["grid_steps"])
    ax.set_xlabel("optimizer steps spent by the search (all trials)")
    ax.set_ylabel(f"best {result['metric']} of a finished trial so far")
    ax.set_title("Search strategies on the embedded default (one line per seed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: dict[str, Any], out: Path, readme: Path | None) -> str:
    rows = summarize(
        result["searches"],
        grid_best=result["grid_best"],
        budget=result["budget"],
        mode=result["mode"],
    )
    context = (
        f"Measured by `python benchmarks/search_strategies.py` on {result['machine']} "
        f"({result['wall_seconds'] / 60:.1f} min): `{Path(result['spec']).name}`"
        f"{' with ' + ', '.join(result['overrides']) if result['overrides'] else ''}, "
        f"{result['max_steps']} steps per trial, metric `{result['metric']}` ({result['mode']}). "
        f"Grid: {result['grid_points']} points ({result['float_points']} per float range), "
        f"{result['grid_steps']} steps, best {_f(result['grid_best'])} at "
        f"{result['grid_best_config']}; the grid's seeds only reorder its trials. "
        f"tpe-asha and random: a budget of {result['budget']} steps each. "
        "Best = best metric of a trial that ran to max_steps."
    )
    table = markdown(
        rows,
        metric=result["metric"],
        grid_best=result["grid_best"],
        grid_steps=result["grid_steps"],
        budget=result["budget"],
        context=context,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n![search strategies](curves.png)\n", "utf-8")
    (out / "summary.json").write_text(json.dumps({**result, "table": rows}, indent=1) + "\n")
    plot(result, out / "curves.png")
    if readme is not None:
        rel = (out / "curves.png").resolve().relative_to(readme.resolve().parent)
        block = table + f"\n![search strategies: best metric against steps spent]({rel})\n"
        readme.write_text(splice_readme(readme.read_text("utf-8"), block), "utf-8")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_benchmark(args)
    if result:
        print(write_report(result, args.out, args.readme))
        print(f"wrote {args.out}/results.md, curves.png, summary.json, trials.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
