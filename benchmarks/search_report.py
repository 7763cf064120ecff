"""The report of ``search_strategies.py``: best-so-far curves, the table, the plot.

Pure functions of the searches' results (a rerun redraws them from ``summary.json``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import inprocess as ip

README_START, README_END = "<!-- search-strategies:start -->", "<!-- search-strategies:end -->"


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


def gap_pct(value: float, reference: float, mode: str) -> float:
    """How much worse ``value`` is than ``reference``, in % of it: negative where it is better."""
    worse = value - reference if mode == "min" else reference - value
    return 100 * worse / abs(reference)


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
                "gap_pct": gap_pct(mean, grid_best, mode) if found else math.nan,
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
        "| per seed | gap to grid best (+: worse) | within 1% by then | steps to within 1% |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        per_seed = ", ".join(_f(v) for v in r["best_per_seed"])
        reach = "-" if r["steps_to_1pct"] is None else f"{r['steps_to_1pct']:.0f}"
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['trials']:.1f} | {r['finished']:.1f} "
            f"| {_f(r['best_mean'])} ± {_f(r['best_std'])} | {per_seed} | {r['gap_pct']:+.2f}% "
            f"| {r['within_1pct']}/{r['seeds']} | {reach} |"
        )
    tpe = next((r for r in rows if r["method"] == "tpe-asha"), None)
    verdict = ""
    if tpe is not None:
        met = tpe["within_1pct"] == tpe["seeds"]
        found = [v for v in tpe["best_per_seed"] if math.isfinite(v)]
        verdict = (
            f"\n\nGoal (TPE + ASHA within 1% of the grid's best at <= 1/3 of its steps): "
            f"**{'met' if met else 'not met'}**: {tpe['within_1pct']} of {tpe['seeds']} seeds "
            f"within 1% of {_f(grid_best)} by {budget} of the grid's {grid_steps} steps."
        )
        if len(found) > 1:  # a mean and its spread
            sem = statistics.stdev(found) / math.sqrt(len(found))
            verdict += (
                f" Their mean, {_f(tpe['best_mean'])}, is {tpe['gap_pct']:+.2f}% from it "
                f"(standard error of the mean {100 * sem / abs(grid_best):.2f}%)."
            )
    return f"{context}\n\n{head}" + "\n".join(lines) + verdict + "\n"


def champion(search: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """A search's champion config: its best finished trial's sampled values (None: none)."""
    done = [t for t in search["trials"] if t["stopped"] is None and math.isfinite(t["value"])]
    if not done:
        return None
    pick = min if mode == "min" else max
    return pick(done, key=lambda t: t["value"])["sampled"]


def reseed_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: its seeds' champions, each trained on every reseed seed; the mean
    over champions and training seeds, and its gap to the grid champion's mean."""
    rs, mode = result["reseeded"], result["mode"]
    grid_key = json.dumps(result["grid_best_config"], sort_keys=True)
    grid_mean = statistics.fmean(rs["values"][grid_key])
    rows = []
    for method in dict.fromkeys(s["method"] for s in result["searches"]):
        picked = [champion(s, mode) for s in result["searches"] if s["method"] == method]
        keys = [json.dumps(c, sort_keys=True) for c in picked if c is not None]
        means = [statistics.fmean(rs["values"][k]) for k in keys]
        mean = statistics.fmean(means) if means else math.nan
        rows.append(
            {
                "method": method,
                "champions": [json.loads(k) for k in keys],
                "champion_means": means,
                "mean": mean,
                "gap_pct": gap_pct(mean, grid_mean, mode),
            }
        )
    return rows


def reseed_markdown(result: dict[str, Any]) -> str:
    """The champions trained again on other seeds: how much of each lead is the config."""
    rs = result["reseeded"]
    seeds = rs["seeds"]
    grid_key = json.dumps(result["grid_best_config"], sort_keys=True)
    grid = rs["values"][grid_key]
    spread = statistics.stdev(grid) if len(grid) > 1 else 0.0
    lines = [
        f"Every champion trained again with `train.seed` = {', '.join(map(str, seeds[1:]))} "
        f"(data order and adapter init; the search's own runs used {seeds[0]}): the grid's "
        f"champion then scores {', '.join(_f(v) for v in grid)}, a seed-to-seed std of "
        f"{_f(spread)} ({100 * spread / abs(statistics.fmean(grid)):.1f}% of its mean), against "
        "the 1% the goal asks for.",
        "",
        "| champion | eval per seed (" + ", ".join(map(str, seeds)) + ") | mean ± std |",
        "|---|---|---|",
    ]
    for key, values in rs["values"].items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {_config(json.loads(key))} | {', '.join(_f(v) for v in values)} "
            f"| {_f(statistics.fmean(values))} ± {_f(std)} |"
        )
    lines += [
        "",
        "| method | champions' mean over all seeds | gap to the grid champion's (+: worse) |",
    ]
    lines.append("|---|---|---|")
    for r in reseed_rows(result):
        lines.append(f"| {r['method']} | {_f(r['mean'])} | {r['gap_pct']:+.2f}% |")
    return "\n".join(lines) + "\n"


def _config(sampled: dict[str, Any]) -> str:
    return " ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in sampled.items()
    )


def _f(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4f}"


def splice_readme(text: str, block: str) -> str:
    """``text`` with the part between the README markers replaced by ``block``."""
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    return text[:start] + "\n" + block.strip() + "\n" + text[end:]


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
    values = [v for s in result["searches"] for _, v in s["curve"] if math.isfinite(v)]
    ends = [s["curve"][-1][1] for s in result["searches"] if s["curve"]]
    ends = [v for v in ends if math.isfinite(v)]
    if math.isfinite(best) and values:
        # Where the searches end up, not their first trials: up to 1.5x the grid's best (down
        # to 2/3 of it for a metric to maximize) or the worst search's end, if further; the
        # first trials of a search run off the chart.
        pick = max if mode == "min" else min
        far = pick([within(best, 0.5, mode) if mode == "min" else best / 1.5, *ends])
        near = min(values) if mode == "min" else max(values)
        low, high = sorted((near, far))
        pad = 0.03 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("optimizer steps spent by the search (all trials)")
    ax.set_ylabel(f"best {result['metric']} of a finished trial so far")
    ax.set_title("Search strategies on the embedded default (a line per seed; their ends)")
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
        f"Measured by `{result.get('command', 'python benchmarks/search_strategies.py')}` on "
        f"{result['machine']} "
        f"({result['trial_seconds'] / 60:.1f} min of trials): `{Path(result['spec']).name}`"
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
    if result.get("reseeded"):
        table += "\n" + reseed_markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n![search strategies](curves.png)\n", "utf-8")
    (out / "summary.json").write_text(json.dumps({**result, "table": rows}, indent=1) + "\n")
    plot(result, out / "curves.png")
    if readme is not None:
        rel = os.path.relpath((out / "curves.png").resolve(), readme.resolve().parent)
        block = table + f"\n![search strategies: best metric against steps spent]({rel})\n"
        readme.write_text(splice_readme(readme.read_text("utf-8"), block), "utf-8")
    return table
