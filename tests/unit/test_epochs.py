"""``train.epochs``: a run's length in passes over its rows, resolved into ``train.max_steps``
once the data is read (``raysft.train.epochs``), by the train CLI, the search's driver and a
trial's setup."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import raysft.search.spec as spec_module
from raysft.config import TrainSection, load_config
from raysft.config.loading import saved_tree
from raysft.data.batching import make_bins, training_stream
from raysft.data.tokens import Example
from raysft.errors import ConfigError
from raysft.search.spec import read_spec
from raysft.train.epochs import micro_batches_per_epoch, resolve_epochs

ROOT = Path(__file__).resolve().parents[2]


def _examples(n: int = 37) -> list[Example]:
    # Lengths 5..60: packed, padded and grouped layouts all differ in their batch counts.
    lengths = [5 + (7 * i) % 56 for i in range(n)]
    return [Example(list(range(k)), [1] * k, False) for k in lengths]


def _micro_batches_of_one_epoch(cfg: Any, examples: list[Example], world: int) -> int:
    """Counted as a run takes them: micro-batches until the stream's second epoch begins."""
    bins = make_bins(examples, packing=cfg.data.packing, max_len=cfg.data.max_seq_len)
    stream = training_stream(cfg, examples, bins, pad_id=0, shard=(0, world))
    taken = 0
    while stream.epoch == 0:
        next(stream)
        taken += 1
        if stream.position == stream.batches_per_epoch:
            return taken
    raise AssertionError("the epoch never ended")


@pytest.mark.parametrize(
    "layout",
    [
        {"data.packing": True},
        {"data.packing": False},
        {"data.packing": False, "data.group_by_length": True},
        {"data.packing": True, "train.compile": True},
    ],
    ids=["packed", "padded", "grouped", "packed-fixed-width"],
)
@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_is_the_micro_batches_a_worker_takes_before_its_rows_repeat(
    layout: dict[str, Any], world: int
) -> None:
    cfg = load_config(
        None,
        {"data.max_seq_len": 64, "train.batch_size": 3, "train.grad_accum": 2,
         "train.epochs": 2.5, **layout},
    )  # fmt: skip
    examples = _examples()
    micro = _micro_batches_of_one_epoch(cfg, examples, world)
    assert micro_batches_per_epoch(cfg, examples, world_size=world) == micro
    resolved = resolve_epochs(cfg, examples, world_size=world)
    assert resolved.train.epochs is None
    assert resolved.train.max_steps == math.ceil(2.5 * micro / 2)
    assert cfg.train.epochs == 2.5  # the caller's config is left as it was


def test_whole_epochs_are_not_rounded_up_by_a_step_and_a_sliver_is_one_step() -> None:
    # 30 rows, batch 1, grad_accum 9: an epoch is 30/9 = 3.33 steps; 3 epochs are exactly 10.
    examples = [Example([1, 2, 3], [1, 2, 3], False) for _ in range(30)]
    base = {"data.packing": False, "train.batch_size": 1, "train.grad_accum": 9,
            "train.warmup_ratio": 0}  # fmt: skip
    three = resolve_epochs(load_config(None, {**base, "train.epochs": 3}), examples, world_size=1)
    assert three.train.max_steps == 10
    sliver_cfg = load_config(None, {**base, "train.epochs": 0.01})
    sliver = resolve_epochs(sliver_cfg, examples, world_size=1)
    assert sliver.train.max_steps == 1


def test_epochs_that_come_to_one_step_with_warmup_are_refused_naming_the_epochs() -> None:
    examples = [Example([1, 2, 3], [1, 2, 3], False) for _ in range(30)]
    cfg = load_config(
        None,
        {
            "data.packing": False,
            "train.batch_size": 1,
            "train.grad_accum": 1,
            "train.epochs": 0.01,
        },  # fmt: skip
    )
    with pytest.raises(ConfigError) as err:
        resolve_epochs(cfg, examples, world_size=1, source="run.yaml")
    (problem,) = err.value.problems
    assert str(err.value).startswith("run.yaml: train.epochs 0.01 is 1 optimizer step(s)")
    assert "train.warmup_ratio" in problem


def test_epochs_of_more_steps_than_max_steps_takes_are_refused() -> None:
    from raysft.config.fields import MAX_INT

    cfg = load_config(None, {"train.epochs": 1e12, "train.batch_size": 1, "train.grad_accum": 1})
    with pytest.raises(ConfigError) as err:
        resolve_epochs(cfg, _examples(), world_size=1, source="run.yaml")
    steps = micro_batches_per_epoch(cfg, _examples(), world_size=1) * 10**12
    assert err.value.problems == [
        f"train.epochs: 1e+12 is {steps:,} optimizer steps of this data, more than "
        f"train.max_steps takes ({MAX_INT:,})"
    ]


def test_epochs_and_an_explicit_max_steps_are_refused_but_a_resolved_config_loads(
    tmp_path: Path,
) -> None:
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  max_steps: 100\n  epochs: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(both)
    assert err.value.problems == [
        "train.epochs: 2 with train.max_steps 100 set too: a run's length is one or the "
        "other; remove train.max_steps (on the command line: --set train.max_steps=null)"
    ]
    with pytest.raises(ConfigError) as err:  # the file's length, the command line's epochs
        load_config(tmp_path / "both.yaml", ["train.epochs=3"])
    assert err.value.problems[0].startswith("--set train.epochs: 3 with train.max_steps 100")
    # null unsets a setting that takes no null: the file's steps go, the epochs stay.
    unset = load_config(tmp_path / "both.yaml", ["train.max_steps=null", "train.epochs=3"])
    assert unset.train.epochs == 3 and "max_steps" not in unset.train.model_fields_set
    assert unset.train.max_steps == TrainSection.model_fields["max_steps"].default
    given = load_config(None, {"train.epochs": 2, "train.batch_size": 1, "train.grad_accum": 2})
    assert given.train.max_steps == 200  # the default: not read while epochs are set
    resolved = resolve_epochs(given, _examples(), world_size=1)
    assert resolved.train.max_steps == micro_batches_per_epoch(given, _examples(), world_size=1)
    saved = tmp_path / "config.yaml"  # as a run saves it: max_steps set, epochs null
    saved.write_text(yaml.safe_dump(saved_tree(resolved)), encoding="utf-8")
    again = load_config(saved)
    assert (again.train.epochs, again.train.max_steps) == (None, resolved.train.max_steps)


def test_a_run_given_epochs_trains_them_and_saves_the_steps(tmp_path: Path) -> None:
    """The train CLI resolves the epochs before its checks and hands the run the data it read;
    the run trains exactly that many epochs and saves the steps in its config.yaml."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "lora",
                "output_dir": str(tmp_path / "out"),
                "data": {"max_seq_len": 256},
                "train": {"epochs": 0.5, "batch_size": 8, "grad_accum": 1, "eval_every": 100,
                          "exact_match": False, "eval_base": False, "learning_rate": 1e-3},
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
    dry = subprocess.run(
        [sys.executable, "-m", "raysft.train", str(cfg), "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    # The embedded rows packed into rows of 256: an epoch is 28 micro-batches of 8 rows.
    assert "train.epochs 0.5: 14 optimizer steps (train.max_steps)" in dry.stdout
    assert "  max_steps: 14\n  epochs: null\n" in dry.stdout
    run = subprocess.run(
        [sys.executable, "-m", "raysft.train", str(cfg)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "no second read" in run.stderr  # the data the CLI read for the epochs
    assert "train.epochs 0.5 is 14 optimizer step(s) of this data" in run.stderr
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text(encoding="utf-8"))
    assert (saved["train"]["max_steps"], saved["train"]["epochs"]) == (14, None)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert history[-1]["step"] == 14
    assert "one epoch: 28 micro-batches per worker" in run.stderr
    assert history[-1]["epoch"] == 0.5


@pytest.fixture
def epochs_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.setattr(spec_module, "local_nodes", lambda: [{"CPU": 8.0, "GPU": 0.0}])
    tree = yaml.safe_load((ROOT / "search_spaces" / "lora.yaml").read_text(encoding="utf-8"))
    tree["search"]["experiment_dir"] = str(tmp_path / "exp")
    del tree["train"]["max_steps"]
    tree["train"]["epochs"] = 5
    return tree


def _read(tmp_path: Path, tree: dict[str, Any], overrides: list[str] = ()) -> Any:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return read_spec(str(path), list(overrides))


def test_a_search_counts_its_epochs_in_steps_for_every_trial_and_asha(
    tmp_path: Path, epochs_spec: dict[str, Any]
) -> None:
    tree, spec, shared = _read(tmp_path, epochs_spec)
    assert shared is not None
    # lora.yaml's rows packed into rows of 256, batch 8, grad_accum 1: 28 steps an epoch.
    assert spec.train.max_steps == 140 and spec.train.epochs is None
    # The trials and the saved spec are built from the tree: it holds the steps, not the epochs.
    assert tree["train"]["max_steps"] == 140 and "epochs" not in tree["train"]
    assert epochs_spec["train"]["epochs"] == 5  # the caller's tree is its own


def test_epochs_too_short_for_asha_are_refused_with_their_steps(
    tmp_path: Path, epochs_spec: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as err:
        _read(tmp_path, epochs_spec, ["train.epochs=1"])
    assert err.value.problems == [
        "train.epochs 1 is 28 optimizer step(s) of this data: search.scheduler: asha needs at "
        "least 2 evals per trial, this one has 1 (train.max_steps 28, train.eval_every 30)"
    ]


@pytest.mark.parametrize(
    ("param", "said"),
    [
        (
            {"type": "int", "low": 0, "high": 50},
            "value 50: train.warmup_steps: 50 of train.max_steps 28: the learning rate would "
            "still be rising at the last step, never reaching train.learning_rate; set fewer "
            "than 28",
        ),
        (
            {"type": "multiple_of", "of": "train.max_steps", "values": [0.1, 0.25]},
            "value 2.8000000000000003: train.warmup_steps: Input should be a valid integer, "
            "got a number with a fractional part",
        ),
    ],
    ids=["range", "multiple_of"],
)
def test_searched_values_are_checked_against_the_steps_the_epochs_come_to(
    tmp_path: Path, epochs_spec: dict[str, Any], param: dict[str, Any], said: str
) -> None:
    """Probed at first against the default max_steps (the data unread), a searched warmup
    must be probed again against the epochs' 28 steps: else trials fail once Ray is up."""
    tree = copy.deepcopy(epochs_spec)
    tree["train"].update({"epochs": 1, "eval_every": 5})
    tree["train"].pop("warmup_ratio", None)
    tree["search"]["params"]["train.warmup_steps"] = param
    with pytest.raises(ConfigError) as err:
        _read(tmp_path, tree)
    assert err.value.problems == [
        f"train.epochs 1 is 28 optimizer step(s) of this data: search.params.train.warmup_steps: "
        f"{said}"
    ]
    # Values that fit those steps search as before.
    tree["search"]["params"]["train.warmup_steps"] = {"type": "int", "low": 0, "high": 20}
    assert _read(tmp_path, tree)[1].train.max_steps == 28


@pytest.mark.parametrize(
    "param",
    ["train.batch_size", "train.grad_accum", "data.packing", "data.group_by_length",
     "train.compile", "data.train_on_prompt", "train.epochs"],
)  # fmt: skip
def test_what_sets_an_epochs_steps_cannot_be_searched_with_epochs(
    tmp_path: Path, epochs_spec: dict[str, Any], param: str
) -> None:
    tree = copy.deepcopy(epochs_spec)
    values = {"train.batch_size": [4, 8], "train.grad_accum": [1, 2], "train.epochs": [2, 5]}
    tree["search"]["params"][param] = {"type": "choice", "values": values.get(param, [False, True])}
    with pytest.raises(ConfigError) as err:
        _read(tmp_path, tree)
    (problem,) = err.value.problems
    assert problem.startswith(f"search.params.{param}: {param} cannot be searched: it sets ")
    if param != "train.epochs":
        assert "give train.max_steps instead of train.epochs to search it" in problem
    # Without epochs, the batching settings search as before.
    if param != "train.epochs":
        tree["train"]["max_steps"] = 140
        del tree["train"]["epochs"]
        if param == "data.group_by_length":
            tree["data"]["packing"] = False
        _read(tmp_path, tree)


def test_a_run_started_with_epochs_unresolved_resolves_them_itself(tmp_path: Path) -> None:
    """``run_trial`` called directly (the benchmark, a script): its setup counts the epochs."""
    from raysft.train.recipe import run_trial

    cfg = load_config(
        None,
        {"output_dir": str(tmp_path / "out"), "data.max_seq_len": 256, "train.epochs": 0.1,
         "train.batch_size": 8, "train.grad_accum": 1, "train.eval_every": 100,
         "train.exact_match": False, "train.eval_base": False, "train.warmup_ratio": 0},
    )  # fmt: skip
    result = run_trial(cfg)
    # 28 micro-batches an epoch (as above): 0.1 epochs is 3 steps.
    assert [h["step"] for h in result.history][-1] == 3
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text(encoding="utf-8"))
    assert (saved["train"]["max_steps"], saved["train"]["epochs"]) == (3, None)


def test_a_cluster_specs_dry_run_keeps_the_epochs_and_says_when_they_are_counted(
    tmp_path: Path, epochs_spec: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU spec checked on a GPU-less machine before submission reads no data here (it may
    live on the cluster only): its epochs stay epochs until the search itself reads it."""
    from raysft.tune import _print_plan

    tree = copy.deepcopy(epochs_spec)
    tree["search"]["resources"]["gpus_per_worker"] = 1
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    _, spec, shared = read_spec(str(path), [], dry_run=True)
    assert shared is None and spec.train.epochs == 5
    _print_plan(spec, [{"CPU": 8.0, "GPU": 0.0}], cluster=True)
    out = capsys.readouterr().out
    said = "trial length: train.epochs 5 (counted in steps where the search reads its data), "
    assert said in out


def test_an_epochs_run_into_a_finished_runs_folder_is_refused_before_its_data_is_read(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}\n", encoding="utf-8")  # a run that ended
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump({"output_dir": str(out), "data": {"train": str(tmp_path / "absent.jsonl")},
                        "train": {"epochs": 1}}),
        encoding="utf-8",
    )  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "raysft.train", str(cfg)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {cfg}: output_dir: {out} already holds a training run that ended (its "
        "metrics.json); choose another (--set output_dir=...) or remove it"
    ]


def test_a_shipped_spec_given_in_steps_runs_epochs_from_the_command_line() -> None:
    from raysft.search.spec import load_spec

    spec_path = str(Path(__file__).resolve().parents[2] / "search_spaces" / "lora.yaml")
    with pytest.raises(ConfigError, match=r"--set train.max_steps=null"):
        load_spec(spec_path, ["train.epochs=2"], preflight=False)
    tree, spec = load_spec(
        spec_path, ["train.max_steps=null", "train.epochs=2", "train.eval_every=10"]
    )
    assert spec.train.epochs is None and spec.train.max_steps == tree["train"]["max_steps"] > 0
