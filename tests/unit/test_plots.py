"""Plots of a finished search: the in-memory Optuna study rebuilt from summary rows, and real
matplotlib PNGs (Agg) for a synthetic search. MLflow runs on a SQLite store in tmp_path."""

from __future__ import annotations

import logging
import math
import random
import struct
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import yaml

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from raysft.config import validate_spec  # noqa: E402
from raysft.search import plots  # noqa: E402
from raysft.search.notes import run_name  # noqa: E402
from raysft.search.results import rank  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# The space these fixtures were sampled from (lora.yaml's before issue 8 reshaped it), pinned
# here so the plots are tested on four parameters whatever the shipped spec searches.
SPACE = {
    "train.learning_rate": {"type": "loguniform", "low": 5.0e-4, "high": 1.0e-2},
    "lora.r": {"type": "choice", "values": [4, 8, 16]},
    "lora.alpha": {"type": "multiple_of", "of": "lora.r", "values": [1, 2]},
    "train.neftune_alpha": {"type": "choice", "values": [0, 5]},
}


def lora_spec(**search: Any) -> Any:
    tree = yaml.safe_load((ROOT / "search_spaces" / "lora.yaml").read_text())
    tree["search"]["params"] = SPACE
    tree["search"].update(search)
    return validate_spec(tree, source="lora.yaml")


def row(i: int, lr: float, r: int, neft: int, factor: int, *, status: str, metric: Any) -> dict:
    return {
        "trial_id": f"7c1e2_{i:05d}",
        "status": status,
        "metric": metric,
        "step": 150,
        "max_steps": 150,
        # Tune's config order: the product (lora.alpha) comes last.
        "sampled": {
            "train.learning_rate": lr,
            "lora.r": r,
            "train.neftune_alpha": neft,
            "lora.alpha": r * factor,
        },
        "checkpoint": "ckpt",
        "mlflow_run_id": None,
        "error": "boom" if status == "failed" else None,
    }


def curve(start: float, floor: float, n: int) -> list[dict[str, Any]]:
    return [
        {"step": 30 * (k + 1), "eval_loss": floor + start * math.exp(-0.8 * k)} for k in range(n)
    ]


def six_trials() -> tuple[list[dict], dict[str, list[dict]]]:
    """Four ranked trials (one stopped early by ASHA), one failed, one diverged."""
    spec = [
        (0.0032, 8, 5, 2, "finished", 5),
        (0.0007, 4, 0, 1, "finished", 5),
        (0.0095, 16, 0, 2, "stopped_early", 2),
        (0.0021, 16, 5, 1, "finished", 5),
        (0.0050, 8, 0, 1, "failed", 1),
        (0.0088, 4, 5, 2, "diverged", 2),
    ]
    rows, hists = [], {}
    for i, (lr, r, neft, factor, status, n) in enumerate(spec):
        h = curve(1.2, 1.0 + abs(math.log10(lr) + 2.5) / 3, n)
        if status == "diverged":
            h[-1]["eval_loss"] = float("nan")
        ranked = status in ("finished", "stopped_early")
        rows.append(
            row(
                i, lr, r, neft, factor, status=status, metric=h[-1]["eval_loss"] if ranked else None
            )
        )
        hists[rows[-1]["trial_id"]] = h
    return rank(rows, "min"), hists


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_six_trials_give_four_valid_pngs_in_the_experiment_dir(tmp_path: Path) -> None:
    rows, hists = six_trials()
    paths = plots.write_plots(tmp_path, lora_spec(), rows, hists)
    names = [p.name for p in paths]
    assert names == [plots.HISTORY, plots.IMPORTANCES, plots.PARALLEL, plots.CURVES]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        width, height = png_size(path)
        assert 700 <= width <= 2500 and 300 <= height <= 1500, (path.name, width, height)
        assert path.stat().st_size > 15_000, path.name  # drawn, not an empty canvas
    assert not plt.get_fignums(), "figures left open"


def test_study_holds_finished_trials_as_complete_stopped_as_pruned_the_rest_as_fail() -> None:
    rows, hists = six_trials()
    study = plots.build_study(lora_spec(), rows, hists)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    trials = study.get_trials()
    # Creation order (trial id), not rank order.
    assert [t.user_attrs["trial_id"] for t in trials] == [f"7c1e2_{i:05d}" for i in range(6)]
    states = [t.state.name for t in trials]
    by_id = {r["trial_id"]: r for r in rows}
    # As the searcher told Optuna: a value at ASHA's rung is not a final one.
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL", "FAIL"]
    assert trials[2].value is None
    assert trials[2].user_attrs["metric"] == pytest.approx(by_id["7c1e2_00002"]["metric"])
    first = trials[0]
    assert first.value == pytest.approx(by_id["7c1e2_00000"]["metric"])
    assert first.params == {"lr": 0.0032, "r": 8, "neft": 5, "alpha": 16}
    # The product is a categorical over every r x factor the space can produce.
    assert sorted(first.distributions["alpha"].choices) == [4, 8, 16, 32]
    assert first.distributions["lr"].log
    assert first.intermediate_values == {
        h["step"]: pytest.approx(h["eval_loss"]) for h in hists["7c1e2_00000"]
    }
    # The diverged trial's NaN eval is not an intermediate value.
    assert list(trials[5].intermediate_values) == [30]


def test_a_trial_outside_the_space_is_left_out_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows, hists = six_trials()
    rows[0]["sampled"]["lora.r"] = 64  # not a choice of this spec (the spec was edited)
    with caplog.at_level(logging.WARNING, logger="raysft.search.plots"):
        study = plots.build_study(lora_spec(), rows, hists)
    assert len(study.get_trials()) == 5
    assert rows[0]["trial_id"] in caplog.text


def test_one_trial_skips_importances_and_parallel_coordinates_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows, hists = six_trials()
    best = rows[0]
    with caplog.at_level(logging.INFO, logger="raysft.search.plots"):
        paths = plots.write_plots(
            tmp_path, lora_spec(), [best], {best["trial_id"]: hists[best["trial_id"]]}
        )
    assert [p.name for p in paths] == [plots.HISTORY, plots.CURVES]
    for name in ("param_importances", "parallel_coordinate"):
        said = f"{name}.png skipped: needs >= 2 finished trials with a finite eval_loss, got 1"
        assert said in caplog.text


def test_importances_without_scikit_learn_skip_that_plot_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fANOVA fits scikit-learn's forest: where it is missing, that plot is skipped with the
    reason and the plots after it are drawn (the ImportError stopped them)."""
    import optuna

    def without_sklearn(*args: Any, **kwargs: Any) -> Any:
        # What Optuna's fANOVA raises where scikit-learn is missing (whether or not another
        # test imported it in this process already).
        raise ImportError("Tried to import 'sklearn.ensemble' but failed.")

    monkeypatch.setattr(optuna.importance, "FanovaImportanceEvaluator", without_sklearn)
    rows, hists = six_trials()
    with caplog.at_level(logging.INFO, logger="raysft.search.plots"):
        paths = plots.write_plots(tmp_path, lora_spec(), rows, hists)
    assert [p.name for p in paths] == [plots.HISTORY, plots.PARALLEL, plots.CURVES]
    assert "param_importances.png skipped: " in caplog.text


def test_two_trials_alike_in_every_parameter_skip_importances(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = row(0, 0.003, 8, 5, 2, status="finished", metric=1.2)
    b = row(1, 0.003, 8, 5, 2, status="finished", metric=1.3)
    with caplog.at_level(logging.INFO, logger="raysft.search.plots"):
        paths = plots.write_plots(tmp_path, lora_spec(), [a, b], {})
    assert [p.name for p in paths] == [plots.HISTORY, plots.PARALLEL]  # no history: no curves
    assert "no parameter took two values" in caplog.text
    assert "no trial history holds eval_loss" in caplog.text


def test_only_failed_trials_draw_their_curves_and_nothing_else(tmp_path: Path) -> None:
    rows, hists = six_trials()
    failed = [r for r in rows if r["status"] in ("failed", "diverged")]
    paths = plots.write_plots(tmp_path, lora_spec(), failed, hists)
    assert [p.name for p in paths] == [plots.CURVES]


def test_curves_draw_one_labelled_line_per_trial_best_first() -> None:
    rows, hists = six_trials()
    order = list(lora_spec().search.params)
    fig = plots._curves(rows, hists, "eval_loss", order)
    try:
        ax = fig.axes[0]
        assert len(ax.lines) == 6
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert rows[0]["sampled"]["train.learning_rate"] == 0.0032  # the best of six_trials
        assert labels[0] == "best: lr=3.2e-3 r=8 alpha=16 neft=5 (7c1e2_00000)"
        assert "lr=9.5e-3 r=16 alpha=32 neft=0 (7c1e2_00002, stopped early)" in labels
        assert "lr=5.0e-3 r=8 alpha=8 neft=0 (7c1e2_00004, failed)" in labels
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "eval_loss")
        # The NaN point of the diverged trial is dropped, its finite one kept.
        diverged = labels.index("lr=8.8e-3 r=4 alpha=8 neft=5 (7c1e2_00005, diverged)")
        assert list(ax.lines[diverged].get_xdata()) == [30]
        widths = [line.get_linewidth() for line in ax.lines]
        assert widths[0] > max(widths[1:])
    finally:
        plt.close(fig)


def test_write_plots_leaves_the_process_style_alone(tmp_path: Path) -> None:
    before = dict(plt.rcParams)
    rows, hists = six_trials()
    plots.write_plots(tmp_path, lora_spec(), rows, hists)
    assert plt.rcParams["axes.facecolor"] == before["axes.facecolor"]  # ggplot would grey it


def test_distributions_of_each_parameter_type() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    spec = lora_spec(
        params={
            "train.learning_rate": {"type": "uniform", "low": 1e-4, "high": 1e-3},
            "train.warmup_ratio": {"type": "loguniform", "low": 0.01, "high": 0.1},
            "lora.r": {"type": "int", "low": 2, "high": 4},
            "lora.alpha": {"type": "multiple_of", "of": "lora.r", "values": [1, 2]},
            "lora.dropout": {"type": "multiple_of", "of": "train.learning_rate", "values": [10]},
            "train.batch_size": {"type": "multiple_of", "of": "train.grad_accum", "values": [2, 4]},
            "lora.target_modules": {"type": "choice", "values": [["q_proj"], "all-linear"]},
        }
    )
    d = plots.distributions(spec, spec.search)
    assert d["train.learning_rate"] == FloatDistribution(1e-4, 1e-3)
    assert d["train.warmup_ratio"] == FloatDistribution(0.01, 0.1, log=True)
    assert d["lora.r"] == IntDistribution(2, 4)
    assert d["lora.alpha"] == CategoricalDistribution([2, 3, 4, 6, 8])
    assert d["lora.dropout"] == FloatDistribution(1e-3, 1e-2)  # a float range times 10
    assert d["train.batch_size"] == CategoricalDistribution([2, 4])  # unsearched grad_accum = 1
    assert d["lora.target_modules"] == CategoricalDistribution(["['q_proj']", "all-linear"])


def test_display_names_are_short_unless_two_paths_share_one() -> None:
    names = plots.display_names(["train.learning_rate", "lora.r", "lora.dropout", "x.dropout"])
    assert names == {
        "train.learning_rate": "lr",
        "lora.r": "r",
        "lora.dropout": "lora.dropout",
        "x.dropout": "x.dropout",
    }


def test_histories_and_plots_through_a_real_mlflow_store(tmp_path: Path) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    mlc = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlc.create_experiment("plots", artifact_location=(tmp_path / "art").as_uri())
    run_a, run_b = (mlc.create_run(exp).info.run_id for _ in range(2))
    # Step 60 logged twice (a resumed trial): the later value wins; order by step.
    metrics = [
        Metric("eval_loss", v, ts, s) for v, ts, s in [(2.0, 1, 30), (9.0, 2, 60), (1.5, 3, 60)]
    ]
    mlc.log_batch(run_a, metrics=metrics[::-1])
    mlc.log_batch(run_b, metrics=[Metric("train_loss", 3.0, 1, 1)])
    hists = plots.histories_from_mlflow(mlc, {"t0": run_a, "t1": run_b}, "eval_loss")
    assert hists == {
        "t0": [{"step": 30, "eval_loss": 2.0}, {"step": 60, "eval_loss": 1.5}],
        "t1": [],
    }
    rows, h6 = six_trials()
    paths = plots.write_plots(tmp_path / "exp", lora_spec(), rows, h6)
    plots.log_plots(mlc, run_a, paths)
    logged = sorted(f.path for f in mlc.list_artifacts(run_a, "plots"))
    assert logged == sorted(f"plots/{p.name}" for p in paths)


def test_many_trials_name_only_the_best_in_the_legend() -> None:
    rows = [
        row(i, 0.001 + 0.0005 * i, 8, 0, 1, status="finished", metric=1.0 + i / 10)
        for i in range(15)
    ]
    hists = {r["trial_id"]: curve(1.0, r["metric"], 3) for r in rows}
    fig = plots._curves(rows, hists, "eval_loss", [])
    try:
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert len(ax.lines) == 15
        assert len(legend.get_texts()) == plots._LEGEND_MAX
        assert legend.get_title().get_text() == f"best {plots._LEGEND_MAX} of 15"
    finally:
        plt.close(fig)


def test_study_orders_trials_by_tunes_creation_counter_not_their_random_ids() -> None:
    # Under a searcher Tune names trials with 8 random hex digits (uuid4): these four, created in
    # this order, sort to 36bc1f92 first by id. The history plot's x axis is creation order.
    made = ["3bb3f45f", "5a933856", "65835288", "36bc1f92"]
    rows, _ = six_trials()
    rows = rows[:4]
    for n, (r, tid) in enumerate(zip(rows, made, strict=True), start=1):
        r["trial_id"], r["number"] = tid, n
    study = plots.build_study(lora_spec(), list(reversed(rows)), {})
    assert [t.user_attrs["trial_id"] for t in study.get_trials()] == made


def test_trial_number_is_read_from_tunes_trial_directory() -> None:
    from raysft.search.tune_results import trial_number

    name = "run_trial_on_ray_36bc1f92_4_lora_alpha=8,lora_r=4,train_learning_rate=0.0021_2026-12-04"
    assert trial_number(name, "36bc1f92") == 4
    assert trial_number("run_trial_on_ray_36bc1f92_12_x", "36bc1f92") == 12
    assert trial_number("36bc1f92", "36bc1f92") is None


def test_the_curve_labelled_best_is_the_trial_promotion_takes() -> None:
    """A trial stopped early with a lower eval loss than every finished one: the best trial
    (pick_best, the champion) is finished, and comes first in rank() too."""
    from raysft.search.results import pick_best

    rows, hists = six_trials()
    early = next(r for r in rows if r["status"] == "stopped_early")
    early["metric"] = 0.01  # lower than any finished trial's
    hists[early["trial_id"]][-1]["eval_loss"] = 0.01
    rows = rank(rows, "min")
    assert rows[0] is pick_best(rows) and rows[0]["status"] == "finished"
    assert rows.index(early) == sum(r["status"] == "finished" for r in rows)
    fig = plots._curves(rows, hists, "eval_loss", list(lora_spec().search.params))
    try:
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        top = pick_best(rows)
        best = run_name(top["sampled"], list(lora_spec().search.params))
        assert labels[0] == f"best: {best} ({top['trial_id']})"
        assert [label for label in labels if label.startswith("best: ")] == [labels[0]]
        widths = [line.get_linewidth() for line in ax.lines]
        assert widths[0] > max(widths[1:])
    finally:
        plt.close(fig)


def test_history_marks_stopped_trials_apart_and_numbers_trials_as_the_summary() -> None:
    rows, hists = six_trials()
    for r in rows:
        r["number"] = int(r["trial_id"][-5:]) + 1  # Tune's counter: 1-based
    study = plots.build_study(lora_spec(), rows, hists)
    fig = plots._history(study, "eval_loss")
    try:
        ax = fig.axes[0]
        assert "3 trials finished (+1 stopped early)" in ax.get_title()
        stopped = [c for c in ax.collections if "stopped early" in str(c.get_label())]
        assert len(stopped) == 1
        x, y = stopped[0].get_offsets()[0]
        stopped_row = next(r for r in rows if r["status"] == "stopped_early")
        assert (x, y) == (2, pytest.approx(stopped_row["metric"]))  # its place, its last eval
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and set(labels) <= {"1", "2", "3", "4", "5", "6"}  # no 0, no 0.5
        assert "3" in labels  # position 2 is summary.json's trial 3
    finally:
        plt.close(fig)


def test_importances_leave_out_a_product_of_a_searched_parameter() -> None:
    rows, hists = six_trials()
    study = plots.build_study(lora_spec(), rows, hists)
    fig = plots._importances(study, "eval_loss", ["lr", "r", "neft"])
    try:
        ax = fig.axes[0]
        names = {t.get_text() for t in ax.get_yticklabels()}
        assert names == {"lr", "r", "neft"}  # not alpha, which is r x 1 or 2
        assert "3 trials finished" in ax.get_title()
    finally:
        plt.close(fig)


def test_importances_name_the_parameter_the_metric_depends_on_in_a_small_search() -> None:
    """Eight finished trials whose eval loss depends on the rank alone (lr and NEFTune drawn at
    random): the rank is ranked first. Optuna 5's default, PED-ANOVA, put 0.98 on lr here."""
    rnd = random.Random(8)
    rows, hists = [], {}
    for i in range(8):
        lr, r, neft = 10 ** rnd.uniform(-3.3, -2), [4, 8, 16][i % 3], rnd.choice([0, 5])
        value = 1.0 + 0.5 * (r == 4) + 0.3 * (r == 8) + rnd.uniform(0, 0.01)
        rows.append(row(i, lr, r, neft, 2, status="finished", metric=value))
        hists[rows[-1]["trial_id"]] = [{"step": 150, "eval_loss": value}]
    study = plots.build_study(lora_spec(), rank(rows, "min"), hists)
    fig = plots._importances(study, "eval_loss", ["lr", "r", "neft"])
    try:
        ax = fig.axes[0]
        labels = ax.get_yticklabels()
        bars = {t.get_text(): p.get_width() for t, p in zip(labels, ax.patches, strict=True)}
        assert max(bars, key=bars.__getitem__) == "r", bars
        assert "8 trials finished, fANOVA; few trials: a rough guide" in ax.get_title()
    finally:
        plt.close(fig)


def test_curves_past_the_legend_are_grey_and_steps_are_whole() -> None:
    """Lines the legend does not name take no colour of one it names; an axis of steps shows
    no 28.5."""
    rows, hists = [], {}
    for i in range(plots._LEGEND_MAX + 6):
        rows.append(row(i, 1e-3 * (1 + i), 8, 0, 2, status="stopped_early", metric=1.0 + i))
        hists[rows[-1]["trial_id"]] = [{"step": 30, "eval_loss": 1.0 + i}]
    fig = plots._curves(rank(rows, "min"), hists, "eval_loss", list(SPACE))
    try:
        ax = fig.axes[0]
        named = {ln.get_color() for ln in ax.lines if not ln.get_label().startswith("_")}
        unnamed = [ln.get_color() for ln in ax.lines if ln.get_label().startswith("_")]
        assert len(unnamed) == 6 and not named & set(unnamed)
        fig.canvas.draw()
        ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert ticks and all("." not in t for t in ticks), ticks
    finally:
        plt.close(fig)


def test_curves_take_a_log_scale_when_early_evals_would_flatten_the_rest() -> None:
    rows, hists = six_trials()
    order = list(lora_spec().search.params)
    fig = plots._curves(rows, hists, "eval_loss", order)
    assert fig.axes[0].get_yscale() == "linear"  # six_trials' evals lie within 4x
    plt.close(fig)
    best = rows[0]["trial_id"]
    hists = {**hists, best: [{"step": 30, "eval_loss": 6.0}, *hists[best]]}
    fig = plots._curves(rows, hists, "eval_loss", order)
    assert fig.axes[0].get_yscale() == "log"
    plt.close(fig)
