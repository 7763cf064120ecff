"""Base vs tuned after a search (raysft.search.compare): the task scores rows the driver read, and
a scoring that fails is recorded without sinking the search's finish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from evalkit import moved_lora_dir

from raysft.config import validate_tree
from raysft.errors import ModelError
from raysft.search import compare

ROWS = 4


def _cfg(eval_file: str) -> Any:
    return validate_tree(
        {
            "data": {"eval": eval_file},
            "train": {"max_new_tokens": 8},
        },
        source="test",
    )


@pytest.fixture
def mlflow_run(tmp_path: Path) -> tuple[Any, str]:
    """A real MLflow store (SQLite) and a parent run in it."""
    import mlflow

    from raysft.search import tracking_store

    before = mlflow.get_tracking_uri()
    mlc = tracking_store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = mlc.create_experiment("cmp", artifact_location=str(tmp_path / "artifacts"))
    yield mlc, str(mlc.create_run(exp_id).info.run_id)
    mlflow.set_tracking_uri(before)  # tracking_store.client sets the process-wide URI


def test_the_task_scores_the_rows_it_is_given_and_reads_no_data_file(tmp_path: Path) -> None:
    from raysft.assets import asset_path
    from raysft.train.score_saved import eval_rows

    rows = eval_rows(_cfg("embedded:tasks-eval.jsonl"))[:ROWS]
    # On the task's node the eval file is not there: the rows come from the driver.
    tree = _cfg(str(tmp_path / "not-on-this-node.jsonl")).model_dump(mode="json")
    same = compare._score_pair(tree, str(asset_path("tiny-base")), rows)
    assert same["scores"]["base"]["rows"] == same["scores"]["tuned"]["rows"] == ROWS
    # The same model on both sides: the same scores.
    assert same["scores"]["base"]["metrics"] == same["scores"]["tuned"]["metrics"]
    assert "eval_loss" in same["table"] and "exact_match" in same["table"]
    # The tuned side scores the adapter it is given, on the base the config names.
    out = compare._score_pair(tree, str(moved_lora_dir(tmp_path / "adapter")), rows)
    assert out["scores"]["base"]["metrics"] == same["scores"]["base"]["metrics"]
    tuned, base = out["scores"]["tuned"]["metrics"], out["scores"]["base"]["metrics"]
    assert abs(tuned["eval_loss"] - base["eval_loss"]) > 1e-3, (tuned, base)


def test_a_failed_scoring_is_recorded_with_its_reason_and_writes_nothing(tmp_path: Path) -> None:
    """(The finish tags the failure on the parent run: test_finish.py.)"""
    from ray.exceptions import RayTaskError

    cause = ModelError("/tmp/ray/job/base: no such model directory\nmore detail")

    def scores() -> dict[str, Any]:
        raise RayTaskError("_score_pair", "Traceback (most recent call last): ...", cause)

    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    cfg = _cfg("embedded:tasks-eval.jsonl")
    out = compare.collect(scores, cfg, "ckpt", exp_dir)
    reason = "ModelError: /tmp/ray/job/base: no such model directory"
    assert out == {"failed": True, "reason": reason}
    assert list(exp_dir.iterdir()) == []  # no half-written comparison


def test_a_scoring_that_succeeds_is_written_and_logged(
    tmp_path: Path, mlflow_run: tuple[Any, str]
) -> None:
    mlc, parent = mlflow_run
    result = {
        "table": "metric  base  tuned",
        "side_by_side": "prompt ...",
        "scores": {
            "base": {"rows": 2, "metrics": {"exact_match": 0.0, "bleu": None}},
            "tuned": {"rows": 2, "metrics": {"exact_match": 0.5, "bleu": None}},
        },
    }
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    cfg = _cfg("embedded:tasks-eval.jsonl")
    out = compare.collect(lambda: result, cfg, "ckpt", exp_dir)
    assert out["base"] == result["scores"]["base"] and out["table"] == result["table"]
    assert (exp_dir / compare.COMPARISON_MD).is_file()
    assert (exp_dir / compare.COMPARISON_JSON).is_file()
    assert mlc.get_run(parent).data.metrics == {}  # logging is log_comparison's
    compare.log_comparison(mlc, parent, exp_dir, out)
    metrics = mlc.get_run(parent).data.metrics
    assert metrics == {"base_exact_match": 0.0, "tuned_exact_match": 0.5}  # None is not logged
    names = {f.path for f in mlc.list_artifacts(parent)}
    assert names == {compare.COMPARISON_MD, compare.COMPARISON_JSON}


def test_eval_rows_the_driver_cannot_read_fail_the_scoring_not_the_search(tmp_path: Path) -> None:
    from raysft.config import validate_spec

    spec = validate_spec({"search": {"params": {"lora.r": {"type": "choice", "values": [8, 16]}}}})
    cfg = _cfg(str(tmp_path / "gone.jsonl"))  # deleted since the search read it
    scores = compare.start(spec, cfg, "ckpt")  # no Ray task is started for it
    out = compare.collect(scores, cfg, "ckpt", tmp_path)
    assert out["failed"] is True and "gone.jsonl" in out["reason"], out


def test_a_comparison_without_answers_writes_no_side_by_side_block(tmp_path: Path) -> None:
    """Held-out rows of plain text alone: scored on their loss, no answer generated."""
    result = {
        "table": "metric  base  tuned",
        "side_by_side": "",
        "scores": {"base": {"rows": 2, "metrics": {}}, "tuned": {"rows": 2, "metrics": {}}},
    }
    compare.collect(lambda: result, _cfg("embedded:tasks-eval.jsonl"), "ckpt", tmp_path)
    md = (tmp_path / compare.COMPARISON_MD).read_text(encoding="utf-8")
    assert "metric  base  tuned" in md and "side by side" not in md
