"""What a user meets in the MLflow UI: the experiment marked as model training, trial runs named
by their sampled values, the parent run's description. A real MlflowClient on a SQLite store in
tmp_path; the Tune callback is driven with stand-in trials (ray is imported, never started)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from raysft.config import validate_spec
from raysft.search import notes, tracking, tracking_store
from raysft.search.callback import make_callback
from raysft.search.space import TrialConfigs

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "search_spaces" / "lora.yaml"


@pytest.fixture(scope="module")
def mlc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One store for the module (a new SQLite store costs seconds of migrations); each test
    uses its own experiment names."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}")


def test_a_new_experiment_is_marked_as_model_training(mlc: Any) -> None:
    exp_id = tracking.experiment_id(mlc, "new")
    tags = mlc.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow 3.17's UI ignores the kind: the description says how to reach the runs.
    note = tags["mlflow.note.content"]
    assert "Model training" in note and f"#/experiments/{exp_id}/runs?workflowType=" in note
    assert tracking.experiment_id(mlc, "new") == exp_id  # found, not made twice


def test_a_sqlite_stores_artifacts_stay_beside_it_not_in_the_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under ray job submit the working dir is the job's temporary copy: MLflow's ./mlruns
    # default would put plots, adapters and registered models there.
    from mlflow.tracking import MlflowClient

    store, job_copy = tmp_path / "shared", tmp_path / "job-copy"
    store.mkdir()
    job_copy.mkdir()
    monkeypatch.chdir(job_copy)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlc = MlflowClient(tracking_uri=uri)
    exp_id = tracking.experiment_id(mlc, "beside", uri=uri)
    assert mlc.get_experiment(exp_id).artifact_location == (store / "mlruns").as_uri()
    run = mlc.create_run(exp_id)
    (tmp_path / "a.txt").write_text("x")
    mlc.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
    assert (store / "mlruns").is_dir() and not (job_copy / "mlruns").exists()
    assert tracking_store.artifact_root("http://127.0.0.1:5000") is None
    assert tracking_store.artifact_root(f"file://{tmp_path}/store") is None


def test_a_users_own_experiment_description_is_kept(mlc: Any) -> None:
    own = mlc.create_experiment("described", tags={"mlflow.note.content": "my notes"})
    bare = mlc.create_experiment("undescribed")
    tracking.experiment_id(mlc, "described")
    tracking.experiment_id(mlc, "undescribed")
    assert mlc.get_experiment(own).tags["mlflow.note.content"] == "my notes"
    assert "Model training" in mlc.get_experiment(bare).tags["mlflow.note.content"]


def test_an_existing_experiment_gets_the_kind_unless_it_has_one(mlc: Any) -> None:
    old = mlc.create_experiment("made-by-hand")
    genai = mlc.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.experiment_id(mlc, "made-by-hand") == old
    assert mlc.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    tracking.experiment_id(mlc, "genai")
    assert mlc.get_experiment(genai).tags["mlflow.experimentKind"] == "genai_development"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0032, "3.2e-3"),
        (0.00071, "7.1e-4"),
        (1e-5, "1.0e-5"),
        (0.05, "5.0e-2"),
        # One notation on both sides of 0.01, where learning rate ranges cross it.
        (0.0099, "9.9e-3"),
        (0.012, "1.2e-2"),
        (0.5, "0.5"),
        (99.5, "1.0e2"),  # not .2g's 1e+02
        (12.0, "12"),
        (150.0, "1.5e2"),
        (0.0, "0"),
        (8, "8"),
        (True, "True"),
        ("chatml", "chatml"),
    ],
)
def test_values_in_run_names_have_two_significant_digits(value: Any, text: str) -> None:
    assert notes.format_value(value) == text


def test_run_names_use_short_names_in_the_spec_order() -> None:
    # Tune's config order: the product (lora.alpha) comes after the others.
    sampled = {
        "train.learning_rate": 0.0032,
        "lora.r": 8,
        "train.neftune_alpha": 5,
        "data.template": "chatml",
        "lora.alpha": 16,
    }
    order = ["train.learning_rate", "lora.r", "lora.alpha", "train.neftune_alpha"]
    assert notes.run_name(sampled, order) == "lr=3.2e-3 r=8 alpha=16 neft=5 template=chatml"
    assert notes.run_name(sampled) == "lr=3.2e-3 r=8 neft=5 template=chatml alpha=16"


def test_a_trial_run_name_keeps_its_trial_id_however_long_its_values() -> None:
    sampled = {f"data.field_{i}": "x" * 40 for i in range(10)}
    name = notes.trial_run_name(sampled, [], "b3d53107")
    assert len(name) == 250 and name.endswith(" (b3d53107)")
    assert notes.trial_run_name({"lora.r": 8}, [], "t0") == "r=8 (t0)"


def _trial(trial_id: str, **config: Any) -> Any:
    return SimpleNamespace(trial_id=trial_id, config=config)


def test_trial_runs_are_named_by_their_sampled_values(mlc: Any, tmp_path: Path) -> None:
    tree = yaml.safe_load(SPEC.read_text())
    spec = validate_spec(tree, source=str(SPEC))
    exp_id = tracking.experiment_id(mlc, "named-trials")
    parent = tracking.start_parent(mlc, exp_id, name="lora-search", cfg=spec, spec_path=str(SPEC))
    callback = make_callback(
        mlc,
        exp_id=exp_id,
        parent_id=parent,
        resolve_trial=TrialConfigs(tree, str(tmp_path / "exp")),
        order=list(spec.search.params),
    )
    callback.setup()
    trials = [
        _trial(
            "t0",
            **{
                "train.learning_rate": 0.0032,
                "lora.r": 8,
                "train.neftune_alpha": 5,
                "lora.alpha": 16,
            },
        ),
        _trial(
            "t1",
            **{
                "train.learning_rate": 0.00071,
                "lora.r": 4,
                "train.neftune_alpha": 0,
                "lora.alpha": 4,
            },
        ),
        # The same values to 2 significant digits as t0: its run must still be told apart.
        _trial(
            "t2",
            **{
                "train.learning_rate": 0.00324,
                "lora.r": 8,
                "train.neftune_alpha": 5,
                "lora.alpha": 16,
            },
        ),
    ]
    for t in trials:
        callback.on_trial_start(0, trials, t)
    runs = {
        r.data.tags["raysft.trial_id"]: r
        for r in mlc.search_runs([exp_id], "tags.`raysft.kind` = 'trial'")
    }
    assert runs["t0"].info.run_name == "lr=3.2e-3 r=8 alpha=16 neft=5 (t0)"
    assert runs["t1"].info.run_name == "lr=7.1e-4 r=4 alpha=4 neft=0 (t1)"
    assert runs["t2"].info.run_name == "lr=3.2e-3 r=8 alpha=16 neft=5 (t2)"
    assert runs["t0"].data.tags["mlflow.parentRunId"] == parent
    # The parent's searched settings show what was searched, not the spec's value, which no
    # trial trained (lora.yaml's r 8, in one column with the trials' own).
    params = mlc.get_run(parent).data.params
    assert params["lora.r"] == "searched: choice[4, 8, 16]"
    assert params["lora.alpha"] == "searched: lora.r x choice[2]"
    assert params["train.learning_rate"] == "searched: loguniform(0.001, 0.02)"
    assert params["train.batch_size"] == "8" and params["train.max_steps"] == "150"
    assert runs["t0"].data.params["lora.r"] == "8"


def summary(**over: Any) -> dict[str, Any]:
    best = {
        "trial_id": "a0003",
        "status": "finished",
        "metric": 1.1034,
        "step": 150,
        "max_steps": 150,
        "sampled": {
            "train.learning_rate": 0.0095,
            "lora.r": 16,
            "train.neftune_alpha": 0,
            "lora.alpha": 32,
        },
    }
    out = {
        "metric": "eval_loss",
        "mode": None,  # the metric's own direction
        "best": best,
        "counts": {"finished": 2, "stopped_early": 1, "failed": 0},
        "promotion": {
            "promoted": True,
            "registered_model": "raysft-tiny-lora",
            "version": 3,
            "alias": "champion",
            "reason": "beats v2",
        },
        "resolved_spec": yaml.safe_load(SPEC.read_text()),
    }
    out.update(over)
    return out


def test_parent_description_names_best_trial_metric_and_promotion(mlc: Any) -> None:
    exp_id = tracking.experiment_id(mlc, "described")
    parent = mlc.create_run(exp_id, run_name="lora-search").info.run_id
    text = notes.describe_parent(mlc, parent, summary())
    assert mlc.get_run(parent).data.tags["mlflow.note.content"] == text
    assert "Best trial: **lr=9.5e-3 r=16 alpha=32 neft=0** (trial `a0003`" in text
    assert "**eval_loss = 1.103** (lower is better)" in text
    assert "Trials: 2 finished, 1 stopped early." in text
    assert "**promoted** as `raysft-tiny-lora` v3 (alias `champion`): beats v2." in text


def test_parent_description_lists_the_ranked_trials_linked_to_their_runs() -> None:
    def row(tid: str, lr: float, status: str, step: int, metric: float | None) -> dict:
        sampled = {"train.learning_rate": lr, "lora.r": 8, "lora.alpha": 16}
        return {"trial_id": tid, "status": status, "step": step, "max_steps": 150,
                "metric": metric, "sampled": sampled, "mlflow_run_id": f"run-{tid}"}  # fmt: skip

    rows = [
        row("a", 3.6e-3, "finished", 150, 0.49171),
        row("b", 1.8e-2, "stopped_early", 30, 2.198),
        row("c", 5e-3, "failed", 4, None),
    ]
    text = notes.describe(summary(trials=rows, mlflow={"experiment_id": "7"}))
    table = text.split("\n\n")[-1].splitlines()
    assert table[0] == "| # | trial | status | step | eval_loss |"
    assert table[2] == (
        "| 1 | [lr=3.6e-3 r=8 alpha=16 (a)](#/experiments/7/runs/run-a) | finished | 150/150 | "
        "0.4917 |"
    )
    assert table[3].endswith("| stopped early | 30/150 | 2.198 |")
    assert table[4].endswith("| failed | 4/150 | - |")
    many = notes.describe(summary(trials=rows * 9, mlflow={"experiment_id": "7"}))
    assert many.endswith("7 more in summary.json.")  # 27 trials, 20 listed
    long = [{**r, "sampled": {**r["sampled"], "data.system_prompt": "y" * 240}} for r in rows * 9]
    text = notes.describe(summary(trials=long, mlflow={"experiment_id": "7"}))
    assert len(text) < 8000  # MLflow's cap on a tag
    assert "more in summary.json." in text


def test_parent_description_when_nothing_is_promoted() -> None:
    text = notes.describe(
        summary(
            promotion={
                "promoted": False,
                "reason": "eval_loss 1.2 does not beat champion v2 (1.1)",
            },
            metric="exact_match",
            mode="max",
        )
    )
    assert "**exact_match = 1.103** (higher is better)" in text
    assert "Promotion: **not promoted**: eval_loss 1.2 does not beat champion v2 (1.1)." in text
    empty = notes.describe(summary(best=None, counts={"failed": 3}, promotion={}))
    assert empty.startswith("No trial reported a finite `eval_loss`")
    # Failed trials with a last eval: the best is None for another reason than no metric.
    rows = [{"trial_id": "a", "sampled": {}, "status": "failed", "metric": 1.4, "step": 60,
             "max_steps": 150}]  # fmt: skip
    failed = notes.describe(summary(best=None, counts={"failed": 1}, promotion={}, trials=rows))
    assert failed.startswith(
        "No finished or stopped-early trial has a finite `eval_loss` and a checkpoint (failed "
        "and diverged trials are never promoted): nothing to promote."
    )
    assert "Trials: 3 failed." in empty
    assert "Promotion: **not promoted**: promotion did not run." in empty


def test_the_runs_page_opens_on_model_training_best_trial_first() -> None:
    page = tracking_store.runs_page("7", metric="eval_loss", mode="min")
    assert page == (
        "/#/experiments/7/runs?workflowType=machine_learning"
        "&orderByKey=metrics.%60eval_loss%60&orderByAsc=true"
    )
    assert "orderByAsc=false" in tracking_store.runs_page("7", metric="exact_match", mode="max")
    assert tracking_store.ui_command("sqlite:///m.db", page).endswith(
        "--port 5000, then open http://127.0.0.1:5000" + page
    )
    assert (
        tracking_store.ui_command("http://h:5000/", page)
        == f"open http://h:5000{page} in a browser"
    )
    assert tracking_store.ui_command("http://h:5000") == "open http://h:5000 in a browser"


@pytest.mark.parametrize(
    ("row", "best", "said"),
    [
        (
            {"status": "finished", "step": 150, "max_steps": 150, "metric": 0.49171},
            True,
            "**The search's best trial.** Finished at step 150 of 150: eval_loss 0.4917.",
        ),
        (
            {"status": "stopped_early", "step": 30, "max_steps": 150, "metric": 2.19812},
            False,
            "Stopped early by the ASHA scheduler at step 30 of 150: eval_loss 2.198 at its last "
            "eval. Not a failure",
        ),
        (
            {
                "status": "failed",
                "step": 4,
                "max_steps": 12,
                "metric": None,
                "error": "Traceback ...\nout of memory: CUDA",
            },
            False,
            "Failed at step 4 of 12: out of memory: CUDA (tag `raysft.error`",
        ),
        (
            {"status": "failed", "step": None, "max_steps": 12, "metric": None, "error": None},
            False,
            "Failed before its first eval (of 12 steps): no error recorded",
        ),
        (
            {"status": "diverged", "step": 8, "max_steps": 12, "metric": None},
            False,
            "Diverged at step 8 of 12: a non-finite metric",
        ),
    ],
)
def test_a_trial_runs_description_says_how_it_ended(
    row: dict[str, Any], best: bool, said: str
) -> None:
    note = notes.trial_note(row, metric="eval_loss", scheduler="ASHA", best=best)
    assert note.startswith(said), note


def test_the_ui_command_names_the_venvs_mlflow_when_the_shell_has_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # make demo runs .venv/bin/python from a shell that did not activate .venv.
    import shutil
    import sys

    monkeypatch.setattr(shutil, "which", lambda name: None)
    beside = str(Path(sys.executable).parent / "mlflow")
    assert tracking_store.ui_command("sqlite:///m.db").startswith(
        f"{beside} ui --backend-store-uri"
    )
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/mlflow")
    assert tracking_store.ui_command("sqlite:///m.db").startswith("mlflow ui --backend-store-uri")
