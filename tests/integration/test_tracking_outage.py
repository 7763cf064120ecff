"""A tracking server that goes away mid-search, for real: a ``mlflow server`` whose process group
is stopped while the first trial trains, then started again on the same store for ``--resume``.

The first start must end (exit 3, the failed MLflow steps said), not hang: in Ray 2.60 a trial
whose last report was still queued when Tune's loop was held up by MLflow's retries stayed
RUNNING for ever (``raysft.search.trial.let_tune_take_the_last_report``). The resume must make
the trials' MLflow runs whole from Tune's own records, writing nothing twice, and promote; it is
also the suite's resume of a search whose trials all ended (none runs again)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    assert_no_other_ray,
    free_port,
    render_spec,
    run_tune,
    serve_mlflow,
    stop_group_then_wait,
    train_checkpoints,
)

pytestmark = pytest.mark.integration

EXPERIMENT = "raysft-it-outage"
MODEL = "raysft-it-outage"
STEPS, EVAL_EVERY = 4, 2


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def first_trial_id(summary: dict[str, Any]) -> str:
    """The trial that started first (its run was made before the server went away)."""
    return min(summary["trials"], key=lambda t: t["number"])["trial_id"]


def _trial_runs(mlc: Any) -> list[Any]:
    exp = mlc.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = mlc.search_runs([exp.experiment_id])
    return [r for r in runs if "raysft.trial_id" in r.data.tags]


def test_a_search_whose_tracking_server_goes_away_loses_nothing_on_resume(
    tmp_path: Path, ray_tmp: Path
) -> None:
    assert_no_other_ray()
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    exp_dir = tmp_path / "outage"
    spec = render_spec(
        "faults.yaml",
        tmp_path / "outage.yaml",
        {
            "search.experiment_dir": str(exp_dir),
            "search.num_samples": 2,
            "train.max_steps": STEPS,
            "train.eval_every": EVAL_EVERY,
            "tracking.uri": uri,
            "tracking.experiment": EXPERIMENT,
            "promote.registered_model": MODEL,
        },
    )
    stopped: list[float] = []

    with serve_mlflow(store, port) as server:

        def stop_server_once_a_trial_runs(_proc: Any, _mark: str) -> None:
            def poll() -> None:
                mlc = _client(uri)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    if _trial_runs(mlc):  # the first trial's run: it trains now
                        stop_group_then_wait(server.proc)
                        stopped.append(time.monotonic())
                        return
                    time.sleep(0.3)

            threading.Thread(target=poll, daemon=True).start()

        # A hang (the trial RUNNING for ever) fails here, at the timeout.
        first = run_tune(
            spec, tmp_path, ray_tmp, log="first.log", timeout=400,
            on_start=stop_server_once_a_trial_runs,
        )  # fmt: skip
    assert stopped, f"the server was never stopped:\n{first.explain()}"
    assert first.rc == 3, first.explain()
    assert "error: the search finished, but " in first.output, first.explain()
    assert not first.leftovers, first.leftovers
    assert (exp_dir / "mlflow_gaps").exists(), "the failed writes were not noted"
    first_summary = json.loads((exp_dir / "summary.json").read_text())
    checkpoints = train_checkpoints(exp_dir)

    with serve_mlflow(store, port):
        resumed = run_tune(spec, tmp_path, ray_tmp, "--resume", log="resume.log", timeout=300)
        assert resumed.rc == 0, resumed.explain()
        assert not resumed.leftovers, resumed.leftovers
        assert "): written now" in resumed.output, resumed.explain()
        assert not (exp_dir / "mlflow_gaps").exists()

        summary = json.loads((exp_dir / "summary.json").read_text())
        assert summary["failed_steps"] == [], summary["failed_steps"]
        trial_ids = sorted(t["trial_id"] for t in summary["trials"])
        assert [t["status"] for t in summary["trials"]] == ["finished", "finished"]
        # A resume of a search whose trials all ended: Tune restores them and runs none.
        keys = ("trial_id", "status", "step", "metric", "sampled", "checkpoint")
        assert [{k: t[k] for k in keys} for t in summary["trials"]] == [
            {k: t[k] for k in keys} for t in first_summary["trials"]
        ]
        assert train_checkpoints(exp_dir) == checkpoints, "retrained"
        had_runs = {t["trial_id"]: t["mlflow_run_id"] for t in first_summary["trials"]}
        assert had_runs.get(first_trial_id(first_summary)), "the first trial had no run"
        for t in summary["trials"]:  # a run made before the outage is kept, not made again
            assert had_runs[t["trial_id"]] in (None, t["mlflow_run_id"]), t
        assert summary["mlflow"]["parent_run_id"] == first_summary["mlflow"]["parent_run_id"]
        # Its time: this start's, and the whole search's over both starts.
        assert first_summary["starts"] == 1 and summary["starts"] == 2
        both = first_summary["wall_seconds"] + summary["wall_seconds"]
        # (the first start counted to its exit: its summary was written a little before)
        assert both - 0.5 <= summary["wall_seconds_all_starts"] <= both + 30, summary
        assert "s over 2 starts)" in resumed.output

        mlc = _client(uri)
        exp = mlc.get_experiment_by_name(EXPERIMENT)
        every_run = mlc.search_runs([exp.experiment_id])
        assert len(every_run) == 3, "one parent and one run per trial, none made twice"
        parent = mlc.get_run(summary["mlflow"]["parent_run_id"])
        assert parent.info.status == "FINISHED"
        children = _trial_runs(mlc)
        assert sorted(r.data.tags["raysft.trial_id"] for r in children) == trial_ids
        params = [set(r.data.params) for r in children]
        assert params[0] == params[1] and "sampled.lora.r" in params[0], params
        for run in children:
            assert run.info.status == "FINISHED", run.info
            assert run.data.tags["raysft.status"] == "finished", run.data.tags
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            for key, every in (("eval_loss", EVAL_EVERY), ("train_loss", 1)):  # every step
                steps = sorted(m.step for m in mlc.get_metric_history(run.info.run_id, key))
                assert steps == list(range(every, STEPS + 1, every)), (key, steps)
        champion = mlc.get_model_version_by_alias(MODEL, "champion")
        assert champion.version == "1"
        assert len(mlc.search_model_versions(f"name='{MODEL}'")) == 1
