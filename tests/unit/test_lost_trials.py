"""A trial begun just before the driver was killed, which Tune's saved state never held: lost,
not interrupted (``raysft.search.lost_trials``)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from raysft.search import interrupt
from raysft.search.lost_trials import LOST, set_lost_apart
from raysft.search.tracking import ENDED_FILE, STATUS_TAG, ended_trials, note_trial_end
from raysft.search.tune_results import trial_id_of


@pytest.fixture
def mlc(tmp_path: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_trial_tunes_saved_state_never_held_is_closed_as_lost_not_interrupted(
    tmp_path: Path, mlc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen in the driver-kill test: the kill came after Tune started trial faacafaf (its run
    opened) and before Tune saved its state; --resume sampled 8bd26c6e in its place and, with
    faacafaf's run still open, ended as an interrupted search (exit 130) at every start."""
    exp_id = mlc.create_experiment("lost")
    finished, resumed, lost_run = (mlc.create_run(exp_id).info.run_id for _ in range(3))
    for run in (finished, resumed):
        mlc.set_terminated(run, "FINISHED")
    note_trial_end(tmp_path / ENDED_FILE, "d0f2020a", "finished")
    note_trial_end(tmp_path / ENDED_FILE, "8bd26c6e", "finished")
    known = {
        "d0f2020a": (finished, "finished"),
        "8bd26c6e": (resumed, "finished"),
        "faacafaf": (lost_run, None),  # open: no end status
    }
    run_ids: list[str | None] = ["d0f2020a", "8bd26c6e"]  # Tune's restored run
    # Before: the open run reads as a trial a Ctrl-C tore down.
    assert interrupt.interrupted_trials(known, created=2, num_samples=2) == ["faacafaf"]

    with caplog.at_level(logging.WARNING, "raysft.search.lost_trials"):
        in_run, lost = set_lost_apart(mlc, known, run_ids, exp_dir=tmp_path)
    assert in_run == {"d0f2020a": (finished, "finished"), "8bd26c6e": (resumed, "finished")}
    assert lost == [{"trial_id": "faacafaf", "mlflow_run_id": lost_run, "status": LOST}]
    assert interrupt.interrupted_trials(in_run, created=2, num_samples=2) is None
    run = mlc.get_run(lost_run)
    assert run.info.status == "KILLED"
    assert run.data.tags[STATUS_TAG] == LOST
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**Lost.**") and str(tmp_path / "train" / "train-faacafaf") in note
    assert ended_trials(tmp_path / ENDED_FILE)["faacafaf"] == LOST
    assert "lost: faacafaf, begun by an earlier start" in caplog.text
    assert {mlc.get_run(r).info.status for r in (finished, resumed)} == {"FINISHED"}

    # The next start reads it back lost (MLflow's tag, or the note beside the search): still
    # set apart, and noted once.
    again = {**in_run, "faacafaf": (lost_run, LOST)}
    assert set_lost_apart(mlc, again, run_ids, exp_dir=tmp_path) == (in_run, lost)
    lines = (tmp_path / ENDED_FILE).read_text(encoding="utf-8").splitlines()
    assert sum("faacafaf" in line for line in lines) == 1


def test_a_lost_trial_whose_run_mlflow_could_not_close_is_closed_by_the_next_start(
    tmp_path: Path, mlc: Any
) -> None:
    exp_id = mlc.create_experiment("lost-later")
    run_id = mlc.create_run(exp_id).info.run_id

    class Away:
        def set_tag(self, *args: Any) -> None:
            raise ConnectionError("Connection refused")

    known: dict[str, tuple[str | None, str | None]] = {"faacafaf": (run_id, None)}
    _, lost = set_lost_apart(Away(), known, [], exp_dir=tmp_path)
    assert lost[0]["status"] == LOST
    assert mlc.get_run(run_id).info.status == "RUNNING"  # MLflow was away
    # The next start: MLflow's run has no tag yet; the note beside the search says lost.
    known = interrupt.with_local_ends({"faacafaf": (run_id, None)}, tmp_path, [])
    assert known == {"faacafaf": (run_id, LOST)}
    set_lost_apart(mlc, known, [], exp_dir=tmp_path)
    assert mlc.get_run(run_id).info.status == "KILLED"
    assert mlc.get_run(run_id).data.tags[STATUS_TAG] == LOST


def test_nothing_is_set_apart_where_a_trial_of_tunes_run_cannot_be_named() -> None:
    known: dict[str, tuple[str | None, str | None]] = {"faacafaf": ("r1", None)}
    assert set_lost_apart(None, known, [None], exp_dir=Path("/nonexistent")) == (known, [])


def test_a_trial_that_never_reported_is_named_by_its_directory() -> None:
    def result(metrics: dict[str, Any], name: str) -> Any:
        return SimpleNamespace(metrics=metrics, path=f"/exp/tune/{name}")

    dirname = "run_trial_on_ray_8bd26c6e_2_lora_r=4_2026-12-07_23-49-22"
    assert trial_id_of(result({"trial_id": "d0f2020a"}, dirname)) == "d0f2020a"
    assert trial_id_of(result({}, dirname)) == "8bd26c6e"
    assert trial_id_of(result({}, "run_trial_on_ray_8bd26c6e_12")) == "8bd26c6e"
    assert trial_id_of(result({}, "somewhere_else")) is None
