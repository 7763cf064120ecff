"""Plots of a finished search as PNG files: optimization history, parameter importances,
parallel coordinates and every trial's eval curve on one chart.

The Optuna study Tune drove lives inside its searcher; these plots rebuild an in-memory study
from the summary rows instead, so they work for resumed searches and need no Ray. Rendering uses
matplotlib's Agg backend: no display, no browser.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from raysft.config import SearchSection, SearchSpec, get_path
from raysft.errors import one_line
from raysft.search.notes import run_name, short_name
from raysft.search.results import pick_best
from raysft.train.metrics import objective_mode

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"  # under the experiment dir, and the parent run's artifact folder
HISTORY = "optimization_history.png"
IMPORTANCES = "param_importances.png"
PARALLEL = "parallel_coordinate.png"
CURVES = "eval_curves.png"
# Statuses drawn as solid curves: trials that ended as the search meant them to.
_SOLID = ("finished", "stopped_early")
_LEGEND_MAX = 12  # trials named in the curves' legend (the best ones); the rest are drawn only
# Finished trials below which the importances' title calls them a rough guide: with fewer,
# fANOVA's forest has little to split on (a synthetic study: the one parameter that mattered
# scored 0.51 of the importance at 4 trials, 0.75 at 8, 0.98 at 12).
_FEW_FOR_IMPORTANCES = 10
_MAX_PRODUCTS = 1000  # a multiple_of over more products than this is recorded as a float range

History = Mapping[str, Sequence[Mapping[str, Any]]]  # trial_id -> [{step, eval_loss, ...}, ...]


def write_plots(
    exp_dir: str | Path,
    spec: SearchSpec,
    rows: list[dict[str, Any]],
    histories: History,
    *,
    curve_metric: str = "eval_loss",
) -> list[Path]:
    """Draw what can be drawn into EXP_DIR/plots; a plot that cannot be is logged and skipped."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the driver may run where no display exists
    import matplotlib.pyplot as plt

    out = Path(exp_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    study = build_study(spec, rows, histories)
    metric = spec.search.metric
    order = list(spec.search.params)
    derived = [p for p, d in spec.search.params.items() if d.type == "multiple_of"]
    searched = [n for p, n in display_names(order).items() if p not in derived]
    drawers: dict[str, Callable[[], Any]] = {
        HISTORY: lambda: _history(study, metric),
        IMPORTANCES: lambda: _importances(study, metric, searched),
        PARALLEL: lambda: _parallel(study, metric),
        CURVES: lambda: _curves(rows, histories, curve_metric, order),
    }
    written = []
    for name, draw in drawers.items():
        # Optuna's plots call plt.style.use("ggplot"): keep that from leaking into the process.
        with plt.rc_context():
            fig = _quietly(draw)
            if isinstance(fig, str):
                log.info("plot %s skipped: %s", name, fig)
                continue
            written.append(_save(fig, out / name))
    return written


def log_plots(mlc: Any, run_id: str, paths: Sequence[Path]) -> None:
    """The PNGs as artifacts of the search's parent run, under ``plots/``."""
    for path in paths:
        mlc.log_artifact(run_id, str(path), artifact_path=PLOTS_DIR)


def histories_from_mlflow(
    mlc: Any, run_ids: Mapping[str, str], metric: str = "eval_loss"
) -> dict[str, list[dict[str, Any]]]:
    """trial_id -> [{step, metric}] in step order, from each trial run's metric history.

    The trials' callback logs a step once (a trial restarted from an earlier checkpoint
    reports steps it logged before; those are not logged again): MLflow keeps the first
    attempt's values, which a deterministic resume gives again. Should a step hold two, the
    latest is kept.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for trial_id, run_id in run_ids.items():
        latest: dict[int, Any] = {}
        for m in sorted(mlc.get_metric_history(run_id, metric), key=lambda m: m.timestamp):
            latest[int(m.step)] = m
        out[trial_id] = [{"step": s, metric: latest[s].value} for s in sorted(latest)]
    return out


def build_study(spec: SearchSpec, rows: list[dict[str, Any]], histories: History) -> Any:
    """An in-memory Optuna study of the search's trials, in the order they were created.

    A finished trial is COMPLETE; one ASHA stopped is PRUNED with its evals as intermediate
    values (as the searcher told Optuna: its value at step 30 is not a final one, so Optuna's
    history, importances and parallel coordinates leave it out and ``_history`` marks it
    apart); one that failed, diverged or has no finite metric is FAIL. One whose values fall
    outside the spec's space (the spec changed) is left out. ``user_attrs["number"]``: Tune's
    counter, the number summary.json gives it.
    """
    import optuna

    s = spec.search
    names = display_names(list(s.params))
    dists = {names[p]: d for p, d in distributions(spec, s).items()}
    direction: Any = "minimize" if objective_mode(s.metric, s.mode) == "min" else "maximize"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    try:
        study = optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    # Creation order: Tune's counter of the trial (``number``, from its directory name). A trial
    # id is 8 random hex digits under a searcher (uuid4), so sorting by it shuffles the trials.
    for row in sorted(rows, key=creation_order):
        params = {names[p]: _plain(v) for p, v in row["sampled"].items() if p in names}
        history = histories.get(row["trial_id"], ())
        steps = {
            int(h["step"]): float(h[s.metric])
            for h in history
            if h.get("step") is not None and _finite(h.get(s.metric))
        }
        ok = _finite(row["metric"])
        state = {"finished": "COMPLETE", "stopped_early": "PRUNED"}.get(row["status"], "FAIL")
        state = state if ok else "FAIL"
        try:
            study.add_trial(
                optuna.trial.create_trial(
                    state=_state(state),
                    value=float(row["metric"]) if state == "COMPLETE" else None,
                    params=params,
                    distributions={k: dists[k] for k in params},
                    intermediate_values=steps,
                    user_attrs={
                        "trial_id": row["trial_id"],
                        "status": row["status"],
                        "number": row.get("number"),
                        "metric": float(row["metric"]) if ok else None,
                    },
                )
            )
        except ValueError as e:  # a value outside its distribution
            log.warning("trial %s left out of the plots: %s", row["trial_id"], e)
    return study


def creation_order(row: Mapping[str, Any]) -> tuple[bool, int, str]:
    """Sort key of a trial row: Tune's creation counter, rows without one last, by trial id."""
    number = row.get("number")
    return (number is None, number if isinstance(number, int) else 0, str(row["trial_id"]))


def display_names(paths: list[str]) -> dict[str, str]:
    """Dotted path -> the short name the run names use, unless two paths share one."""
    shorts = [short_name(p) for p in paths]
    return {p: s if shorts.count(s) == 1 else p for p, s in zip(paths, shorts, strict=True)}


def distributions(spec: SearchSpec, s: SearchSection) -> dict[str, Any]:
    """Each searched path's Optuna distribution; a multiple_of records its products."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for path, p in s.params.items():
        if p.type in ("loguniform", "uniform"):
            out[path] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")  # type: ignore[arg-type]
        elif p.type == "int":
            out[path] = IntDistribution(int(p.low or 0), int(p.high or 0))
        elif p.type == "choice":
            out[path] = CategoricalDistribution([_plain(v) for v in p.values or []])
    for path, p in s.params.items():
        if p.type == "multiple_of":
            out[path] = _products(spec, s, path, out.get(p.of or ""))
    return out


def _products(spec: SearchSpec, s: SearchSection, path: str, base: Any) -> Any:
    """The values ``base x factor`` can take, computed as the space computes them."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    factors = s.params[path].values or []
    if base is None:  # ``of`` is not searched: the spec's own value
        bases = [get_path(spec, s.params[path].of or "")]
    elif hasattr(base, "choices"):
        bases = list(base.choices)
    elif isinstance(base.low, int) and base.high - base.low < _MAX_PRODUCTS:
        bases = list(range(base.low, base.high + 1, base.step or 1))
    else:  # a float range: its products form a range too
        lo, hi = min(factors), max(factors)
        return FloatDistribution(base.low * lo, base.high * hi, log=base.log and lo > 0)
    return CategoricalDistribution(sorted({_plain(b * f) for b in bases for f in factors}))


def _history(study: Any, metric: str) -> Any:
    """Optuna's history of the finished trials, with the ASHA-stopped ones marked apart at
    their last eval's value; the x axis numbers trials as summary.json does."""
    import optuna.visualization.matplotlib as ovm
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    n = _complete(study)
    if n < 1:
        return f"no trial finished with a finite {metric}"
    ax = ovm.plot_optimization_history(study, target_name=metric)
    stopped = study.get_trials(deepcopy=False, states=(_state("PRUNED"),))
    if stopped:
        ax.scatter(
            [t.number for t in stopped],
            [t.user_attrs["metric"] for t in stopped],
            marker="x",
            color="dimgray",
            zorder=3,
            label=f"stopped early ({len(stopped)}): {metric} at its last eval",
        )
        ax.legend(loc="best")
    # Where a row has no number (a trial dir named otherwise), its place in creation order.
    numbers = {
        t.number: t.user_attrs.get("number") or t.number + 1
        for t in study.get_trials(deepcopy=False)
    }
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _: str(numbers.get(round(x), "")) if x == round(x) else "")
    )
    trials = _counted(n, len(stopped))
    title = f"Optimization history: {metric} of {trials} ({_better(study)} is better)"
    ax.set(title=title, xlabel="trial (creation order, numbered as in summary.json)")
    return _sized(ax, 10, 5)


def _importances(study: Any, metric: str, params: list[str]) -> Any:
    """fANOVA importances over the finished trials of the parameters searched on their own
    (a ``multiple_of`` follows its base: it would split that one's importance in two) that
    took two values or more among them."""
    import optuna
    import optuna.visualization.matplotlib as ovm

    n = _complete(study)
    if n < 2:
        return f"needs >= 2 finished trials with a finite {metric}, got {n}"
    done = study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))
    varied = [k for k in params if len({repr(t.params.get(k)) for t in done}) > 1]
    if not varied:
        return "no parameter took two values among the finished trials"
    # fANOVA (a random forest of the objective; seeded: the same trials draw the same bars),
    # not Optuna 5's default PED-ANOVA: with the few finished trials of a small search (below
    # ~20), PED-ANOVA put the weight on a continuous parameter the metric did not depend on
    # (tests/unit/test_plots.py). Few trials remain a rough guide, as the title says.
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    ax = ovm.plot_param_importances(study, evaluator=evaluator, params=varied, target_name=metric)
    ax.set_title("", loc="left")  # Optuna's own title, which ours would overlap
    few = "; few trials: a rough guide" if n < _FEW_FOR_IMPORTANCES else ""
    ax.set_title(f"Parameter importances for {metric} ({_trials(n)} finished, fANOVA{few})")
    legend = ax.get_legend()
    if legend is not None:  # one objective: the legend only repeats the title
        legend.remove()
    ax.margins(x=0.15)  # room for the value labels Optuna writes beside the bars
    return _sized(ax, 9, 0.6 * len(varied) + 2.5)


def _parallel(study: Any, metric: str) -> Any:
    import optuna.visualization.matplotlib as ovm

    n = _complete(study)
    if n < 2:  # one line relates nothing to anything
        return f"needs >= 2 finished trials with a finite {metric}, got {n}"
    ax = ovm.plot_parallel_coordinate(study, target_name=metric)
    what = f"{_trials(n)} finished, coloured by {metric} (darker is better)"
    ax.set_title(f"Parallel coordinates: {what}", pad=16)
    _visible_cmap(ax)
    return _sized(ax, 12, 6)


def _visible_cmap(ax: Any) -> None:
    """Optuna colours the worst trial white, invisible on white: cut off the palest quarter."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    for lines in ax.collections:
        cmap = lines.get_cmap()
        lo, hi = (0.0, 0.75) if cmap.name.endswith("_r") else (0.25, 1.0)
        lines.set_cmap(ListedColormap(plt.get_cmap(cmap.name)(np.linspace(lo, hi, 256))))


def _curves(rows: list[dict[str, Any]], histories: History, metric: str, order: list[str]) -> Any:
    """One line per trial: ``metric`` against step, the best trial (the one promotion takes,
    ``pick_best``: a finished trial before one stopped early) first and drawn thickest."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best_id = (pick_best(rows) or {}).get("trial_id")
    lines = []
    # Ranked, the best trial first (rank() puts it first where a trial finished, else first of
    # those ASHA stopped).
    for row in sorted(rows, key=lambda r: r["trial_id"] != best_id):
        points = [
            (h["step"], h[metric])
            for h in histories.get(row["trial_id"], ())
            if _finite(h.get(metric)) and h.get("step") is not None
        ]
        if points:
            lines.append((row, sorted(points)))
    if not lines:
        return f"no trial history holds {metric}"
    with plt.style.context("ggplot"):
        fig, ax = plt.subplots(figsize=(10, 5.5))
        colors = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20").colors  # type: ignore[attr-defined]
        for i, (row, points) in enumerate(lines):
            best = row["trial_id"] == best_id
            # The trial id tells apart trials that sampled the same values (as their runs' names).
            said = [row["trial_id"]]
            if row["status"] != "finished":
                said.append(row["status"].replace("_", " "))
            label = ("best: " if best else "") + f"{run_name(row['sampled'], order)} "
            label += f"({', '.join(said)})"
            color = colors[i % len(colors)]
            if i >= _LEGEND_MAX:
                label = "_nolegend_"  # matplotlib's marker for a line left out of the legend
                color = "silver"  # not a colour of a line the legend names
            steps, values = zip(*points, strict=True)
            ax.plot(
                steps,
                values,
                marker="o",
                markersize=3,
                linewidth=2.8 if best else 1.4,
                linestyle="-" if row["status"] in _SOLID else "--",
                color=color,
                label=label,
                zorder=3 if best else 2,
            )
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 28.5
        ax.set_ylabel(metric)
        every = [v for _, points in lines for _, v in points]
        if min(every) > 0 and max(every) / min(every) > 4:  # early evals would flatten the rest
            ax.set_yscale("log")
            ax.set_ylabel(f"{metric} (log scale)")
        ax.set_title(f"{metric} on the eval split, {_trials(len(lines))}")
        more = len(lines) - _LEGEND_MAX
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            frameon=False,
            title=f"best {_LEGEND_MAX} of {len(lines)}" if more > 0 else None,
        )
    return fig


def _sized(ax: Any, width: float, height: float) -> Any:
    """The figure of ``ax``, resized (inches): Optuna draws at matplotlib's 6.4 x 4.8."""
    fig: Any = ax.figure
    fig.set_size_inches(width, height)
    return fig


def _quietly(draw: Callable[[], Any]) -> Any:
    """Run a drawer without Optuna's experimental warnings; its own errors become a skip."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # One trial, or one value of a parameter: matplotlib widens the flat axis itself.
        warnings.filterwarnings("ignore", "Attempting to set identical low and high ylims")
        try:
            return draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few or too alike trials
            return one_line(e)
        except ImportError as e:  # fANOVA's scikit-learn missing: the other plots still drawn
            return one_line(e)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _complete(study: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=(_state("COMPLETE"),)))


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _counted(finished: int, stopped: int) -> str:
    more = f" (+{stopped} stopped early)" if stopped else ""
    return f"{_trials(finished)} finished{more}"


def _better(study: Any) -> str:
    return "lower" if study.direction.name == "MINIMIZE" else "higher"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v: Any) -> Any:
    """A value Optuna's categorical distribution accepts (lists and dicts by their text)."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
