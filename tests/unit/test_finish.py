"""A search's finish (raysft.search.finish.finish_search) with a real MLflow store: a finishing step
that fails (MLflow refusing a write, a plot that cannot be saved) is recorded in summary.json,
and the rest of the finish, promotion and the summary included, still happens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from evalkit import moved_lora_dir
from mlflowkit import OutOfReach

from raysft.cli import EXIT_FINISH_FAILED
from raysft.config import validate_spec
from raysft.search.experiment import spec_record
from raysft.search.finish import finish_search
from raysft.search.plots import HISTORY, IMPORTANCES, PARALLEL
from raysft.search.results import CHECKPOINT_PATH_KEY, SUMMARY_FILE
from raysft.search.space import TrialConfigs
from raysft.train.metrics import objective_mode


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA checkpoint on the embedded base, as a trial writes it."""
    out = moved_lora_dir(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001")
    (out / "training_state.pt").write_bytes(b"optimizer and RNG state")
    return out


def _search(tmp_path: Path, checkpoint: Path, name: str) -> dict[str, Any]:
    """Two ended trials of a LoRA search, mirrored in a real MLflow store, ready to finish."""
    import mlflow

    from raysft.search import tracking_store

    tree: dict[str, Any] = {
        "model": {"name_or_path": "embedded:tiny-base"},
        "train": {"max_steps": 10, "eval_every": 5, "eval_base": False},
        "search": {
            "params": {"lora.r": {"type": "choice", "values": [8, 16]}},
            "experiment_dir": str(tmp_path / "exp"),
            "num_samples": 2,
        },
        "promote": {"registered_model": name},
    }
    cfg = validate_spec(tree)
    cfg.search.mode = objective_mode(cfg.search.metric, cfg.search.mode)
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlc = tracking_store.client(uri)
    exp_id = mlc.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    parent = mlc.create_run(exp_id).info.run_id
    runs, results = {}, []
    for trial_id, value, r in (("a1", 0.5, 16), ("b2", 0.7, 8)):
        tags = {"mlflow.parentRunId": parent, "raysft.trial_id": trial_id}
        runs[trial_id] = mlc.create_run(exp_id, tags=tags).info.run_id
        for step, loss in ((5, value + 0.2), (10, value)):
            mlc.log_metric(runs[trial_id], "eval_loss", loss, step=step)
        metrics = {"trial_id": trial_id, "step": 10, "eval_loss": value}
        if trial_id == "a1":
            metrics[CHECKPOINT_PATH_KEY] = str(checkpoint)
        results.append(
            {"trial_id": trial_id, "number": len(results) + 1, "metrics": metrics,
             "sampled": {"lora.r": r}, "error": None, "attempts": []}
        )  # fmt: skip
    tracked = {
        "mlc": mlc, "uri": uri, "exp_id": exp_id, "parent_id": parent, "runs": runs,
        "statuses": {"a1": "finished", "b2": "finished"},  # the callback closed both runs
        "diverged": set(), "timing": {},
    }  # fmt: skip
    return {
        "cfg": cfg, "exp_dir": exp_dir, "results": results, "tracked": tracked,
        "resolve": TrialConfigs(tree, str(exp_dir)), "restore_uri": before,
    }  # fmt: skip


def _run_finish(s: dict[str, Any]) -> dict[str, Any]:
    import mlflow

    try:
        return finish_search(
            "spec.yaml", s["cfg"], s["exp_dir"], s["results"],
            tracked=s["tracked"], resolve=s["resolve"], t0=time.perf_counter(),
            resolved_spec=spec_record(s["cfg"]),
        )  # fmt: skip
    finally:
        mlflow.set_tracking_uri(s["restore_uri"])  # tracking_store.client sets the process-wide URI


def test_a_finish_without_failures_records_none(tmp_path: Path, checkpoint: Path) -> None:
    s = _search(tmp_path, checkpoint, "clean")
    summary = _run_finish(s)
    assert summary["failed_steps"] == []
    assert summary["lost_trials"] == []
    assert summary["promotion"]["promoted"] is True
    mlc, parent = s["tracked"]["mlc"], s["tracked"]["parent_id"]
    assert mlc.get_run(parent).info.status == "FINISHED"
    # The best adapter is logged without its training state (for resuming, not for use).
    logged = {f.path for f in mlc.list_artifacts(parent, "best_adapter")}
    assert "best_adapter/adapter_model.safetensors" in logged
    assert "best_adapter/training_state.pt" not in logged


def test_mlflow_refusing_every_write_to_the_parent_run_loses_nothing_else(
    tmp_path: Path, checkpoint: Path
) -> None:
    s = _search(tmp_path, checkpoint, "refused")
    mlc, parent = s["tracked"]["mlc"], s["tracked"]["parent_id"]
    mlc.delete_run(parent)  # MLflow refuses writes to a deleted run: a real failure
    summary = _run_finish(s)

    failures = summary["failed_steps"]
    # (Artifacts go to the run's artifact folder, which MLflow does not check.)
    assert [f[: f.find(": MlflowException: ")] for f in failures] == [
        "MLflow: the best metric",
        "MLflow: the promotion tag",
        "MLflow: the parent run's description",
        "MLflow: closing the parent run",
    ], failures
    assert all("must be in the 'active' state" in f for f in failures), failures
    # The search's results are all there: ranked rows, promotion, plots, the summary on disk.
    assert [t["trial_id"] for t in summary["trials"]] == ["a1", "b2"]
    assert summary["promotion"]["promoted"] is True, summary["promotion"]
    assert (s["exp_dir"] / "champion" / "adapter_model.safetensors").is_file()
    assert len(summary["plots"]) == 4
    on_disk = json.loads((s["exp_dir"] / SUMMARY_FILE).read_text())
    assert on_disk["failed_steps"] == failures  # written again with the last one


def test_a_tracking_server_out_of_reach_is_asked_once_and_the_rest_is_recorded_not_tried(
    tmp_path: Path, checkpoint: Path
) -> None:
    """Each MLflow call spends its retries before it fails (tens of seconds on a server that
    takes connections and never answers): once one step finds the server out of reach, the
    later MLflow steps and the registry are not asked. Each is recorded, so the search exits 3
    and --resume writes them; plots, the summary and the ranking are unaffected."""
    s = _search(tmp_path, checkpoint, "unreachable")
    link = OutOfReach(s["tracked"]["mlc"])
    s["tracked"]["mlc"] = link
    missed = "MLflow: trial b2's metrics at step 10: MlflowException: (as the callback saw it)"
    s["tracked"]["tracking_failures"] = [missed]  # so the finish reads every trial's run
    summary = _run_finish(s)

    assert link.calls == 1, link.calls
    failures = summary["failed_steps"]
    assert failures[0] == missed, failures
    assert failures[1].startswith("MLflow: the trials' runs: MlflowException: "), failures
    not_tried = "not tried (the tracking server was out of reach at: MLflow: the trials' runs)"
    # Each trial run's description (how it ended) is not written either.
    assert [f.removesuffix(f": {not_tried}") for f in failures[2:]] == [
        "MLflow tags of trial a1",
        "MLflow tags of trial b2",
        "MLflow: the best metric",
        "MLflow: the best adapter",
        "MLflow: the trials' eval curves",
        "MLflow: the plots",
        "promotion",
        "MLflow: the promotion tag",
        "MLflow: the parent run's description",
        "MLflow: summary.json",
        "MLflow: closing the parent run",
    ], failures
    assert summary["promotion"]["failed"] is True
    assert summary["promotion"]["reason"] == not_tried
    assert not (s["exp_dir"] / "champion").exists()
    assert [t["trial_id"] for t in summary["trials"]] == ["a1", "b2"]
    # All but the eval curves, which these trials left only in MLflow (no Tune history).
    drawn = sorted(Path(p).name for p in summary["plots"])
    assert drawn == sorted({HISTORY, IMPORTANCES, PARALLEL}), drawn
    assert json.loads((s["exp_dir"] / SUMMARY_FILE).read_text())["failed_steps"] == failures
    from raysft.tune import exit_code

    assert exit_code(summary) == EXIT_FINISH_FAILED


def test_a_finish_after_a_read_that_found_the_server_out_of_reach_asks_nothing(
    tmp_path: Path, checkpoint: Path
) -> None:
    """The driver reads the trial runs just before the finish: when that read found the server
    out of reach, the finish starts where it left off."""
    s = _search(tmp_path, checkpoint, "read-first")
    link = OutOfReach(s["tracked"]["mlc"])
    s["tracked"].update(mlc=link, unreachable="MLflow: reading the search's trial runs")
    s["tracked"]["tracking_failures"] = ["MLflow: reading the search's trial runs: (its error)"]
    summary = _run_finish(s)
    assert link.calls == 0, link.calls
    reason = "not tried (the tracking server was out of reach at: MLflow: reading the search's"
    assert all(reason in f for f in summary["failed_steps"][1:]), summary["failed_steps"]
    assert summary["promotion"]["failed"] is True


def test_a_registry_found_out_of_reach_by_the_promotion_stops_the_later_steps(
    tmp_path: Path, checkpoint: Path
) -> None:
    s = _search(tmp_path, checkpoint, "registry-gone")
    link = OutOfReach(s["tracked"]["mlc"])
    link.down, link.down_from = False, "get_registered_model"  # up until the promotion asks
    s["tracked"]["mlc"] = link
    summary = _run_finish(s)
    promotion = summary["promotion"]
    assert promotion["failed"] is True and promotion["out_of_reach"] is True, promotion
    assert promotion["reason"].startswith("could not read the current champion"), promotion
    not_tried = "not tried (the tracking server was out of reach at: promotion)"
    assert [f.removesuffix(f": {not_tried}") for f in summary["failed_steps"][1:]] == [
        "MLflow: the promotion tag",
        "MLflow: the parent run's description",
        "MLflow: summary.json",
        "MLflow: closing the parent run",
    ], summary["failed_steps"]
    assert summary["failed_steps"][0].startswith("promotion: could not read the current champion")
    # The plots and the best adapter were logged before it went down.
    logged = {f.path for f in link.mlc.list_artifacts(s["tracked"]["parent_id"])}
    assert {"best_adapter", "plots"} <= logged, logged


def test_a_failed_upload_does_not_stop_the_later_mlflow_steps(
    tmp_path: Path, checkpoint: Path
) -> None:
    """An upload's error may come from an artifact store that is not the tracking server: it
    fails alone, and promotion and the parent run's metadata are still written."""
    s = _search(tmp_path, checkpoint, "upload-gone")
    link = OutOfReach(s["tracked"]["mlc"])
    link.only = {"log_artifact", "log_artifacts"}
    s["tracked"]["mlc"] = link
    summary = _run_finish(s)
    failed = [f.split(": ", 2)[1] for f in summary["failed_steps"]]
    assert failed == ["the best adapter", "the plots", "summary.json"], summary["failed_steps"]
    assert not any("not tried" in f for f in summary["failed_steps"])
    assert summary["promotion"]["promoted"] is True, summary["promotion"]
    assert link.mlc.get_run(s["tracked"]["parent_id"]).info.status == "FINISHED"


def test_a_failed_scoring_is_tagged_on_the_parent_run(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base vs tuned runs as a Ray task (``compare.start``); here its handle raises as a task
    whose worker died raises, and the finish tags the failure on the parent run."""
    from raysft.search import compare

    def scores() -> Any:
        raise RuntimeError("the scoring task's worker died")

    monkeypatch.setattr(compare, "start", lambda *args: scores)
    s = _search(tmp_path, checkpoint, "scoring-failed")
    s["cfg"].train.eval_base = True
    summary = _run_finish(s)
    assert summary["failed_steps"] == [
        "base vs tuned: RuntimeError: the scoring task's worker died"
    ], summary["failed_steps"]
    tags = s["tracked"]["mlc"].get_run(s["tracked"]["parent_id"]).data.tags
    assert tags["raysft.base_vs_tuned"] == "failed: RuntimeError: the scoring task's worker died"
    assert summary["promotion"]["promoted"] is True  # no base score: nothing to gate on
    # ...which the promotion's record and tag say, rather than leave it to be assumed.
    skipped = "not checked: base vs tuned failed (RuntimeError: the scoring task's worker died)"
    assert summary["promotion"]["base_gate"] == skipped
    assert json.loads(tags["raysft.promotion"])["base_gate"] == skipped


def test_a_trials_failures_are_tagged_on_its_run_and_nothing_on_the_others(
    tmp_path: Path, checkpoint: Path
) -> None:
    s = _search(tmp_path, checkpoint, "tagged")
    attempts = [{"error": "RayActorError: the worker died", "retried": True}]
    b2 = s["results"][1]
    b2.update(error="out of memory: OutOfMemoryError: injected", attempts=attempts)
    summary = _run_finish(s)
    assert summary["failed_steps"] == []
    mlc, runs = s["tracked"]["mlc"], s["tracked"]["runs"]
    tags = mlc.get_run(runs["b2"]).data.tags
    assert tags["raysft.error"] == "out of memory: OutOfMemoryError: injected"
    assert tags["raysft.retries"] == "1"
    assert json.loads(tags["raysft.attempts"]) == attempts
    assert not {"raysft.error", "raysft.retries"} & set(mlc.get_run(runs["a1"]).data.tags)


def test_plots_that_cannot_be_saved_are_recorded_and_the_rest_goes_on(
    tmp_path: Path, checkpoint: Path
) -> None:
    s = _search(tmp_path, checkpoint, "noplots")
    (s["exp_dir"] / "plots").write_text("a file where the plots' folder goes")
    summary = _run_finish(s)
    assert len(summary["failed_steps"]) == 1, summary["failed_steps"]
    assert summary["failed_steps"][0].startswith("plots: FileExistsError: ")
    assert summary["plots"] == []
    assert summary["promotion"]["promoted"] is True
    mlc, parent = s["tracked"]["mlc"], s["tracked"]["parent_id"]
    assert mlc.get_run(parent).info.status == "FINISHED"


def test_raysft_tune_exits_3_when_a_finishing_step_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raysft.tune import exit_code

    ok = {"counts": {"finished": 2}, "failed_steps": [], "experiment_dir": str(tmp_path)}
    assert exit_code(ok) == 0
    assert exit_code({**ok, "counts": {"failed": 2}}) == 1  # no trial finished
    assert capsys.readouterr().err == (  # what to do: --resume would fail them again
        "error: no trial finished (see each trial's error above); a trial that failed for good "
        "fails again on --resume: fix the cause, then start the search in another "
        "search.experiment_dir\n"
    )
    failed = {**ok, "failed_steps": ["plots: FileExistsError: x"]}
    assert exit_code(failed) == EXIT_FINISH_FAILED == 3
    capsys.readouterr()
    # No trial finished and a finishing step failed too: both said.
    assert exit_code({**failed, "counts": {"failed": 2}}) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: plots: FileExistsError: x\nerror: no trial finished"), err


def _history(value: float) -> list[dict[str, Any]]:
    """A trial's reports as read from Tune's result.json (``tracking.trial_history``)."""
    return [
        {
            "step": 5,
            "timestamp": 1_800_000_000,
            "train_loss": value + 0.4,
            "eval_loss": value + 0.2,
        },
        {"step": 10, "timestamp": 1_800_000_060, "train_loss": value + 0.3, "eval_loss": value},
    ]


def test_what_the_trials_callback_could_not_write_is_written_at_the_finish(
    tmp_path: Path, checkpoint: Path
) -> None:
    """A tracking server away while the trials ran: one trial's run was never made, another
    lost its last report. The finish writes both from the trials' own reports, and the search
    has nothing left to report as failed."""
    s = _search(tmp_path, checkpoint, "mended")
    mlc, tracked = s["tracked"]["mlc"], s["tracked"]
    for r in s["results"]:
        r["history"] = _history(r["metrics"]["eval_loss"])
    b2_run = tracked["runs"].pop("b2")  # its run "could not be created": made afresh
    mlc.delete_run(b2_run)
    a1_run = tracked["runs"].pop("a1")  # unknown to the driver, but there: found, not made again
    tracked["statuses"] = {}  # neither run was closed
    mlc.log_metric(a1_run, "train_loss", 0.9, step=5)  # step 10's report was lost
    tracked["tracking_failures"] = [
        "MLflow: creating trial b2's run: MlflowException: gone",
        "MLflow: trial a1's metrics at step 10: MlflowException: gone",
    ]
    summary = _run_finish(s)
    assert summary["failed_steps"] == []
    rows = {t["trial_id"]: t for t in summary["trials"]}
    assert rows["a1"]["mlflow_run_id"] == a1_run
    b2 = mlc.get_run(rows["b2"]["mlflow_run_id"])
    assert b2.info.run_id != b2_run and b2.info.lifecycle_stage == "active"
    assert b2.data.tags["mlflow.parentRunId"] == tracked["parent_id"]
    assert b2.data.tags["raysft.trial_id"] == "b2"
    assert b2.data.tags["raysft.status"] == "finished" and b2.info.status == "FINISHED"
    assert b2.info.run_name == "r=8 (b2)"
    assert b2.data.params["sampled.lora.r"] == "8" and b2.data.params["lora.r"] == "8"

    def points(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, round(m.value, 6)) for m in mlc.get_metric_history(run_id, key))

    # Nothing logged twice: a1's step 5 points stay as they were.
    assert points(a1_run, "eval_loss") == [(5, 0.7), (10, 0.5)]
    assert points(a1_run, "train_loss") == [(5, 0.9), (10, 0.8)]
    assert points(b2.info.run_id, "eval_loss") == [(5, 0.9), (10, 0.7)]
    assert mlc.get_run(a1_run).data.tags["raysft.status"] == "finished"
    # Run again (--resume of the finished search): the runs are whole, nothing is written.
    assert _complete_again(s) == 0


def _complete_again(s: dict[str, Any]) -> int:
    from raysft.search.finish import complete_trial_runs

    summary = json.loads((s["exp_dir"] / SUMMARY_FILE).read_text())
    s["tracked"]["tracking_failures"] = ["as if the callback had failed: every run checked"]
    return complete_trial_runs(
        s["cfg"], s["exp_dir"], summary["trials"], s["results"],
        tracked=s["tracked"], resolve=s["resolve"],
    )  # fmt: skip


def test_the_trials_records_stay_failed_when_mlflow_refuses_them_at_the_finish_too(
    tmp_path: Path, checkpoint: Path
) -> None:
    s = _search(tmp_path, checkpoint, "unmended")
    mlc, tracked = s["tracked"]["mlc"], s["tracked"]
    for r in s["results"]:
        r["history"] = _history(r["metrics"]["eval_loss"])
    mlc.delete_run(tracked["runs"]["a1"])  # MLflow refuses writes to a deleted run
    missed = "MLflow: trial a1's metrics at step 10: MlflowException: gone"
    tracked["tracking_failures"] = [missed]
    summary = _run_finish(s)
    failures = summary["failed_steps"]
    # What the callback could not write comes first, then the finish's own try.
    assert failures[0] == missed, failures
    assert failures[1].startswith("MLflow: the trials' runs: MlflowException: "), failures
    # Nor can the deleted run take its description (how the trial ended).
    assert failures[2].startswith("MLflow tags of trial a1: MlflowException: "), failures
    assert len(failures) == 3, failures
    # The plots drew the eval curves from the trials' own reports, not from MLflow.
    assert len(summary["plots"]) == 4
    assert summary["promotion"]["promoted"] is True


def test_a_trials_history_is_its_reports_and_their_replayed_records_latest_per_step() -> None:
    from raysft.search.tracking import trial_history
    from raysft.train.metrics import REPLAYED

    lines = [
        json.dumps({"step": 4, "timestamp": 10, "eval_loss": 2.0, "trial_id": "x", "config": {}}),
        json.dumps({"step": 8, "timestamp": 20, "eval_loss": 1.5, "done": False}),
        "",
        '{"step": 12, "timestamp": 25, "eval_lo',  # cut short by a kill: passed over
        # Restarted from step 4's checkpoint (--resume): step 8 again, with step 4 replayed.
        json.dumps(
            {
                "step": 8,
                "timestamp": 30,
                "eval_loss": 1.4,
                REPLAYED: [{"step": 4, "eval_loss": 2.0}],
            }
        ),
    ]
    assert trial_history(lines) == [
        {"step": 4, "timestamp": 30, "eval_loss": 2.0},
        {"step": 8, "timestamp": 30, "eval_loss": 1.4},
    ]


def test_runs_are_checked_only_where_the_trials_callback_may_have_missed_a_write(
    tmp_path: Path, checkpoint: Path
) -> None:
    """A search whose callback wrote every record asks MLflow nothing more at the finish (a
    search of many trials on a remote server would otherwise pay a request per metric and
    trial); a failed write, noted beside the search, has every run checked, once."""
    from raysft.search.finish import complete_trial_runs
    from raysft.search.tracking import GAPS_FILE

    s = _search(tmp_path, checkpoint, "checked")
    tracked, mlc = s["tracked"], s["tracked"]["mlc"]
    for r in s["results"]:
        r["history"] = _history(r["metrics"]["eval_loss"])
    rows = [
        {"trial_id": r["trial_id"], "sampled": r["sampled"], "status": "finished",
         "mlflow_run_id": tracked["runs"][r["trial_id"]]}
        for r in s["results"]
    ]  # fmt: skip
    tracked["statuses"] = {"a1": "finished", "b2": "finished"}
    asked: list[str] = []
    history = mlc.get_metric_history
    mlc.get_metric_history = lambda run_id, key: asked.append(key) or history(run_id, key)

    def complete() -> int:
        return complete_trial_runs(
            s["cfg"], s["exp_dir"], rows, s["results"], tracked=tracked, resolve=s["resolve"]
        )

    assert complete() == 0 and asked == []
    (s["exp_dir"] / GAPS_FILE).touch()  # an earlier start's callback failed a write
    assert complete() > 0 and asked  # the train_loss points and params it lacked
    assert not (s["exp_dir"] / GAPS_FILE).exists()
    asked.clear()
    assert complete() == 0 and asked == []


def test_a_trial_whose_reports_cannot_be_read_leaves_its_gaps_said(
    tmp_path: Path, checkpoint: Path
) -> None:
    """Tune's result.json unreadable: the run cannot be made whole, so the callback's failures
    stay listed (and mlflow_gaps stays for a later --resume) instead of a clean exit."""
    from raysft.search.tracking import GAPS_FILE

    s = _search(tmp_path, checkpoint, "unread")
    missed = "MLflow: trial a1's metrics at step 10: MlflowException: gone"
    s["tracked"]["tracking_failures"] = [missed]
    (s["exp_dir"] / GAPS_FILE).touch()
    summary = _run_finish(s)  # no "history" in the results: their reports were not read
    failures = summary["failed_steps"]
    assert failures[0] == missed, failures
    assert failures[1].startswith("MLflow: the trials' runs: RuntimeError: the reports of "), (
        failures
    )
    assert (s["exp_dir"] / GAPS_FILE).exists()


def test_the_best_adapter_artifact_holds_no_tracking_password(tmp_path: Path) -> None:
    # A checkpoint written before config.yaml was saved redacted: the artifact is scrubbed.
    from raysft.search.finish import _log_best_adapter

    ckpt = tmp_path / "checkpoint"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.yaml").write_text(
        "method: lora\ntracking:\n  uri: https://alice:s3cretpw@mlflow.example.com\n",
        encoding="utf-8",
    )
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
    (ckpt / "training_state.pt").write_bytes(b"state")
    uploaded: dict[str, str] = {}

    class Client:
        def log_artifact(self, run_id: str, path: str, artifact_path: str) -> None:
            uploaded[f"{artifact_path}/{Path(path).name}"] = Path(path).read_text(errors="replace")

        def log_artifacts(self, run_id: str, path: str, artifact_path: str) -> None:
            uploaded[artifact_path] = "dir"

    _log_best_adapter(Client(), "run", str(ckpt))
    assert sorted(uploaded) == [
        "best_adapter/adapter_model.safetensors", "best_adapter/config.yaml", "best_adapter/sub",
    ]  # fmt: skip
    assert "s3cretpw" not in uploaded["best_adapter/config.yaml"]
    assert "https://alice:***@mlflow.example.com" in uploaded["best_adapter/config.yaml"]


def test_a_lost_trial_is_listed_and_said_apart_from_the_ranked_ones(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trial an earlier start began just before its driver was killed, unknown to Tune's
    saved state (``lost_trials.set_lost_apart``): in summary.json and the printed summary,
    never among the trials ranked."""
    from raysft.tune import _print_summary

    s = _search(tmp_path, checkpoint, "lost")
    lost = [{"trial_id": "faacafaf", "mlflow_run_id": "r9", "status": "lost"}]
    s["tracked"]["lost"] = lost
    summary = _run_finish(s)
    assert summary["lost_trials"] == lost
    assert [t["trial_id"] for t in summary["trials"]] == ["a1", "b2"]
    assert json.loads((s["exp_dir"] / SUMMARY_FILE).read_text())["lost_trials"] == lost
    capsys.readouterr()
    _print_summary(summary, "eval_loss")
    out = capsys.readouterr().out
    assert "\nlost: faacafaf (begun just before an earlier start's driver was killed, " in out
