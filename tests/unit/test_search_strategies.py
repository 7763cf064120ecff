"""benchmarks/search_strategies.py and benchmarks/inprocess.py: the parts that need no training.

Trial histories are put in the JSONL trial cache, so a search replays them exactly as a rerun of
the benchmark would: the budget, ASHA and the samplers' feedback run for real, nothing trains.
"""

from __future__ import annotations

import importlib
import json
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
ip = importlib.import_module("inprocess")
ss = importlib.import_module("search_strategies")
rep = importlib.import_module("search_report")

TREE = {"train": {"max_steps": 90, "eval_every": 30}, "model": {"name_or_path": "x"}}


@pytest.fixture(scope="module")
def lora():
    return ip.load(ROOT / "search_spaces" / "lora.yaml")


def _history(values: list[float], every: int = 30) -> list[dict]:
    return [{"step": every * (i + 1), "eval_loss": v} for i, v in enumerate(values)]


def _cache(tmp_path: Path, runs: dict[float, list[float]]) -> ip.TrialCache:
    """Trials of config {lr: key} with these per-eval losses, complete when they reach 90."""
    cache = ip.TrialCache(tmp_path / "trials.jsonl")
    for lr, values in runs.items():
        cache.put(
            {
                "key": ip.trial_key(TREE, {"lr": lr}),
                "sampled": {"lr": lr},
                "history": _history(values),
                "complete": len(values) == 3,
                "steps_run": 30 * len(values),
                "wall_s": 3.0 * len(values),
            }
        )
    return cache


def _search(proposals, cache: ip.TrialCache, *, asha=None, budget: int = 10_000) -> ip.Search:
    return ip.budgeted(
        "m",
        0,
        proposals,
        tree=TREE,
        metric="eval_loss",
        asha=asha,
        budget=budget,
        cache=cache,
        log=lambda _: None,
    )


# ---------------------------------------------------------------- space


def test_grid_discretizes_the_shipped_space(lora) -> None:
    _, spec = lora
    s = spec.search
    points = ip.grid(s, float_points=3)
    sizes = [3 if p.type in ("loguniform", "uniform") else len(p.values) for p in s.params.values()]
    assert len(points) == math.prod(sizes)
    assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points)
    for name, p in s.params.items():
        values = sorted({pt[name] for pt in points})
        if p.type == "loguniform":  # ends included, log-evenly spaced between
            assert values[0] == pytest.approx(p.low, rel=1e-3)
            assert values[-1] == pytest.approx(p.high, rel=1e-3)
            assert values[1] == pytest.approx(math.sqrt(p.low * p.high), rel=1e-3)
        if p.type == "multiple_of":
            assert all(pt[name] / pt[p.of] in p.values for pt in points)
    # The grid's keys are the define-by-run space's: a sampled config looks the same.
    import optuna

    sampled = next(
        ip.optuna_proposals({}, spec, optuna.samplers.RandomSampler(0), direction="minimize")
    )[0]
    assert set(sampled) == set(points[0])


# ---------------------------------------------------------------- ASHA


def test_asha_rungs_and_a_stop_by_hand() -> None:
    asha = ip.Asha(max_t=150, grace_period=30, reduction_factor=2, mode="min")
    assert [m for m, _ in asha.rungs] == [120, 60, 30]
    assert asha.on_result("a", 30, 1.0)  # first at the rung: nothing to compare with
    assert not asha.on_result("b", 30, 1.5)  # worse than the median of {1.0}
    assert asha.on_result("c", 30, 0.9)  # cutoff: median of {1.0, 1.5} = 1.25
    assert asha.on_result("a", 60, 0.8)
    assert not asha.on_result("c", 60, 0.85)
    assert not asha.on_result("a", 150, 0.5)  # max_t: done, whatever the value


def test_asha_decides_as_rays_scheduler() -> None:
    """Same decisions as Ray's own bracket on random result streams (min and max)."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    class T:
        def __init__(self, trial_id: str):
            self.trial_id = trial_id

    for seed in range(20):
        rng = random.Random(seed)
        rf = rng.choice([2, 3, 4])
        mode = rng.choice(["min", "max"])
        mine = ip.Asha(max_t=240, grace_period=20, reduction_factor=rf, mode=mode)
        ray = _Bracket(min_t=20, max_t=240, reduction_factor=rf, s=0)
        for n in range(12):
            trial = T(f"t{n}")
            for step in range(20, 240, 20):
                value = rng.random()
                theirs = ray.on_result(trial, step, value if mode == "max" else -value)
                ours = mine.on_result(trial.trial_id, step, value)
                assert ours == (theirs == "CONTINUE"), (seed, n, step)
                if not ours:
                    break


# ---------------------------------------------------------------- budgeted searches from the cache


def test_budget_stops_a_trial_at_the_eval_where_it_runs_out(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {1.0: [3.0, 2.0, 1.0], 2.0: [2.5, 1.5, 0.5], 3.0: [2.0, 1.0, 0.2]})
    configs = [{"lr": 1.0}, {"lr": 2.0}, {"lr": 3.0}]
    search = _search(ip.fixed_proposals(configs), cache, budget=150)
    assert [t.steps for t in search.trials] == [90, 60]
    assert [t.stopped for t in search.trials] == [None, "budget"]
    assert search.spent_after == [90, 150]
    assert all(t.cached for t in search.trials)
    best = ip.best_finished(search.trials, "min")
    assert best is not None and best.sampled == {"lr": 1.0}  # the stopped better one never counts


def test_asha_in_a_search_and_the_cache_resumes(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {1.0: [2.0, 1.0, 0.5], 2.0: [3.0, 2.0, 1.0], 3.0: [1.0, 0.5, 0.1]})
    told: list[tuple[dict, float, str | None]] = []

    def proposals():
        for lr in (1.0, 2.0, 3.0):
            yield {"lr": lr}, lambda out: told.append((out.sampled, out.value, out.stopped))

    asha = ip.Asha(max_t=90, grace_period=30, reduction_factor=2, mode="min")
    search = _search(proposals(), cache, asha=asha)
    # lr=2 is worse than lr=1 at the first rung: stopped after 30 steps, told its value then.
    assert told == [({"lr": 1.0}, 0.5, None), ({"lr": 2.0}, 3.0, "asha"), ({"lr": 3.0}, 0.1, None)]
    assert search.spent == 90 + 30 + 90
    # A fresh cache object reads the same file back (the longest history per config wins).
    again = ip.TrialCache(tmp_path / "trials.jsonl")
    assert again.get(ip.trial_key(TREE, {"lr": 3.0}))["complete"]
    assert again.seconds_per_step() == pytest.approx(0.1)


def test_a_diverged_trial_stops_and_is_never_best(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {1.0: [2.0, math.nan, math.nan], 2.0: [2.0, 1.0, 0.9]})
    search = _search(ip.fixed_proposals([{"lr": 1.0}, {"lr": 2.0}]), cache)
    assert search.trials[0].stopped == "diverged" and search.trials[0].steps == 60
    assert ip.best_finished(search.trials, "min").sampled == {"lr": 2.0}


# ---------------------------------------------------------------- curves and the table


def _outcome(value: float, steps: int = 90, stopped: str | None = None) -> ip.Outcome:
    return ip.Outcome("t", {}, history=[(steps, value)], stopped=stopped)


def test_curve_counts_every_step_but_only_finished_trials_as_best() -> None:
    trials = [_outcome(1.0), _outcome(0.2, 30, "asha"), _outcome(1.2), _outcome(0.8)]
    points = rep.curve(trials, "min")
    assert points == [(90, 1.0), (300, 0.8)]
    assert math.isnan(rep.best_at(points, 89))
    assert rep.best_at(points, 299) == 1.0 and rep.best_at(points, 300) == 0.8
    assert rep.steps_to_reach(points, rep.within(0.8, 0.01, "min"), "min") == 300
    assert rep.steps_to_reach(points, 0.5, "min") is None
    assert rep.curve([_outcome(0.5), _outcome(0.7)], "max") == [(90, 0.5), (180, 0.7)]


def test_budget_and_grid_orders() -> None:
    assert ss.budget_steps(2250, 1 / 3, 30) == 750
    assert ss.budget_steps(2000, 1 / 3, 30) == 660  # down to whole evals
    orders = ss.grid_orders(10, 3)
    assert all(sorted(o) == list(range(10)) for o in orders) and orders[0] != orders[1]
    assert orders == ss.grid_orders(10, 3)


def test_summary_table_and_verdict() -> None:
    searches = [
        {
            "method": "tpe-asha",
            "spent": 300,
            "curve": [(90, 1.0), (200, 0.505)],
            "trials": [{"stopped": None}, {"stopped": "asha"}, {"stopped": None}],
        },
        {"method": "tpe-asha", "spent": 300, "curve": [(90, 0.7)], "trials": [{"stopped": None}]},
        {
            "method": "grid",
            "spent": 900,
            "curve": [(90, 0.9), (600, 0.5)],
            "trials": [{"stopped": None}] * 10,
        },
    ]
    rows = rep.summarize(searches, grid_best=0.5, budget=300, mode="min")
    tpe, grid = rows
    assert tpe["best_per_seed"] == [0.505, 0.7] and tpe["best_mean"] == pytest.approx(0.6025)
    assert tpe["within_1pct"] == 1 and tpe["steps_to_1pct"] == 200
    assert tpe["finished"] == 1.5 and tpe["trials"] == 2
    assert grid["best_per_seed"] == [0.9] and grid["within_1pct"] == 0  # 0.5 came after 300
    text = rep.markdown(
        rows, metric="eval_loss", grid_best=0.5, grid_steps=900, budget=300, context="ctx"
    )
    assert "| tpe-asha | 2 | 2.0 | 1.5 | 0.6025 ± 0.1379 | 0.5050, 0.7000 |" in text
    assert "**not met**: 1 of 2 seeds" in text
    # std of (0.505, 0.7) is 0.1379, over sqrt(2) 0.0975: 19.50% of 0.5
    assert "Their mean, 0.6025, is +20.50% from it (standard error of the mean 19.50%)." in text
    assert "| 0.5050, 0.7000 | +20.50% | 1/2 | 200 |" in text  # 0.6025 is 20.5% worse than 0.5
    one = rep.markdown(
        [{**tpe, "seeds": 1, "best_per_seed": [0.505], "within_1pct": 1}],
        metric="eval_loss", grid_best=0.5, grid_steps=900, budget=300, context="ctx",
    )  # fmt: skip
    assert "**met**: 1 of 1 seeds" in one and "Their mean" not in one  # no spread of one
    assert rep.gap_pct(0.49, 0.5, "min") == pytest.approx(-2.0)  # better: below zero
    assert rep.gap_pct(0.49, 0.5, "max") == pytest.approx(2.0)
    readme = f"a\n{rep.README_START}\nold\n{rep.README_END}\nb\n"
    assert (
        rep.splice_readme(readme, text)
        == f"a\n{rep.README_START}\n{text.strip()}\n{rep.README_END}\nb\n"
    )


def test_champions_are_retrained_on_other_seeds_and_compared_by_their_means() -> None:
    def t(lr: float, value: float, stopped: str | None = None) -> dict:
        return {"sampled": {"lr": lr}, "value": value, "stopped": stopped}

    searches = [
        {"method": "grid", "trials": [t(1.0, 0.5), t(2.0, 0.6)]},
        {"method": "tpe-asha", "trials": [t(3.0, 0.4, "asha"), t(2.0, 0.6), t(4.0, 0.55)]},
        {"method": "tpe-asha", "trials": [t(2.0, 0.6), t(5.0, math.nan, "diverged")]},
    ]
    # A stopped trial (0.4) is never a champion; the same config twice is trained once.
    assert ss.champions(searches, "min") == [{"lr": 1.0}, {"lr": 4.0}, {"lr": 2.0}]
    result = {
        "mode": "min",
        "grid_best_config": {"lr": 1.0},
        "searches": searches,
        "reseeded": {
            "seeds": [42, 43, 44],
            "values": {
                '{"lr": 1.0}': [0.5, 0.56, 0.53],  # mean 0.53, std 0.03
                '{"lr": 4.0}': [0.55, 0.5, 0.51],  # mean 0.52
                '{"lr": 2.0}': [0.6, 0.58, 0.62],  # mean 0.60
            },
        },
    }
    grid, tpe = rep.reseed_rows(result)
    assert grid["mean"] == pytest.approx(0.53) and grid["gap_pct"] == pytest.approx(0.0)
    # tpe-asha: champions lr 4 (0.52) and lr 2 (0.60): mean 0.56, 0.03 / 0.53 = 5.66% behind
    assert tpe["champion_means"] == pytest.approx([0.52, 0.60])
    assert tpe["gap_pct"] == pytest.approx(100 * 0.03 / 0.53)
    text = rep.reseed_markdown(result)
    assert "seed-to-seed std of 0.0300 (5.7% of its mean)" in text
    assert "| lr=4 | 0.5500, 0.5000, 0.5100 | 0.5200 ± 0.0265 |" in text
    assert "| tpe-asha | 0.5600 | +5.66% |" in text


# ---------------------------------------------------------------- heldout_effects.py

he = importlib.import_module("heldout_effects")


def test_effect_arms_share_the_champions_own_settings() -> None:
    off = he.arms(
        {"train.learning_rate": 0.01, "train.neftune_alpha": 0}, neftune_alpha=5, naive=False
    )
    assert off["champion, NEFTune off"] == off["champion"]  # trained once: same key
    assert off["champion, NEFTune 5"]["train.neftune_alpha"] == 5
    assert off["champion, padding (same rows/step)"]["data.packing"] is False
    grouped = off["champion, grouped by length"]
    assert grouped["data.group_by_length"] is True and grouped["data.packing"] is False
    assert off["base values"] == {}
    on = he.arms({"train.neftune_alpha": 5}, neftune_alpha=5, naive=True)
    assert on["champion, NEFTune 5"] == on["champion"]
    assert on["champion, NEFTune off"]["train.neftune_alpha"] == 0
    assert "champion, padding (same batch_size)" in on


def test_effect_statistics() -> None:
    e = he.effect([60.0, 62.0, 64.0], [80.0, 82.0, 84.0])
    assert e["diff"] == pytest.approx(20.0)
    assert e["se"] == pytest.approx(math.sqrt(4 / 3 + 4 / 3))
    assert e["beyond_noise"]
    assert not he.effect([60.0, 70.0, 80.0], [62.0, 72.0, 82.0])["beyond_noise"]
    assert he.mean_std([1.0, math.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    # 8 packed rows holding 500 samples in 250 rows -> 16 padded rows per step.
    assert he.padded_batch_size(8, {"train_examples": 500, "packed_rows": 250}) == 16


def test_effects_report_names_each_effect() -> None:
    def rows(em: list[float], loss: float) -> list[dict]:
        return [{"final": {"exact_match": v / 100, "eval_loss": loss}} for v in em]

    result = {
        "champion": {"train.learning_rate": 0.01},
        "champion_from": "in-process search",
        "seeds": [42, 43, 44],
        "arms": {
            "base model": rows([0], 2.5),
            "base values": rows([60, 62, 64], 0.6),
            "champion": rows([80, 82, 84], 0.4),
            "champion, NEFTune off": rows([80, 82, 84], 0.4),
            "champion, NEFTune 5": rows([79, 83, 84], 0.41),
            "champion, padding (same rows/step)": rows([81, 82, 83], 0.4),
            "champion, grouped by length": rows([78, 80, 82], 0.45),
        },
    }
    text = he.report(result)
    assert "| grouped vs packing (same tokens/step) | -2.0 ± 1.6 | +0.0500 ± 0.0000 |" in text
    assert "| champion vs base values | +20.0 ± 1.6 |" in text
    assert "| NEFTune on vs off | +0.0 ± 1.9 | +0.0100 ± 0.0000 | no (EM), yes (loss) |" in text
    assert "champion 82.0% (lift +82.0 points)" in text
    assert "over the base model: **met**; champion beats" in text
    assert "seed-to-seed noise: **met**" in text
    assert result["effects"]["champion vs base values"]["exact_match"]["beyond_noise"]
