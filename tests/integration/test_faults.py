"""Trial faults and driver crashes, for real: a SIGKILLed Ray Train worker, an injected
out-of-memory error, and a SIGKILLed driver followed by ``--resume``."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    Ran,
    assert_no_other_ray,
    cmdline,
    kill_all,
    kill_group,
    marked_pids,
    pids_matching,
    render_spec,
    run_tune,
    train_checkpoints,
    wait_gone,
)

pytestmark = pytest.mark.integration


MAX_CRASH_STEPS = 40


def _spec(root: Path, name: str, **updates: Any) -> Path:
    return render_spec(
        "faults.yaml",
        root / f"{name}.yaml",
        {
            "search.experiment_dir": str(root / name),
            "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
            "promote.registered_model": f"raysft-it-{name}",
            **updates,
        },
    )


def _client(root: Path) -> Any:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _kill_first_worker_after_a_checkpoint(exp_dir: Path, killed: list[int]) -> Any:
    """on_start hook: once a trial has a checkpoint, SIGKILL its Ray Train worker process."""

    def watch(_proc: Any, mark: str) -> None:
        def poll() -> None:
            deadline = time.monotonic() + 480
            while time.monotonic() < deadline and not killed:
                if train_checkpoints(exp_dir):
                    for pid in pids_matching("RayTrainWorker", mark=mark):  # not another lane's
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                time.sleep(0.2)

        threading.Thread(target=poll, daemon=True).start()

    return watch


def test_killed_worker_resumes_from_its_checkpoint_and_oom_is_not_retried(
    tmp_path: Path, ray_tmp: Path
) -> None:
    from raysft.config import load_config
    from raysft.train.recipe import run_trial

    assert_no_other_ray()
    spec = _spec(tmp_path, "faults")
    exp_dir = tmp_path / "faults"
    killed: list[int] = []
    ran = run_tune(
        spec,
        tmp_path,
        ray_tmp,
        env={"RAYSFT_INJECT_OOM": "lora.r=8"},
        timeout=600,
        on_start=_kill_first_worker_after_a_checkpoint(exp_dir, killed),
    )
    assert ran.rc == 0, ran.explain()
    assert killed, "no Ray Train worker was killed"
    summary = json.loads((exp_dir / "summary.json").read_text())
    by_r = {8: [], 4: []}  # type: dict[int, list[dict[str, Any]]]
    for t in summary["trials"]:
        by_r[t["sampled"]["lora.r"]].append(t)
    assert by_r[8] and by_r[4], summary["trials"]

    for t in by_r[8]:  # the injected OOM: failed at once, one attempt, not retried
        assert t["status"] == "failed", t
        assert t["error"].startswith("out of memory: OutOfMemoryError: injected"), t["error"]
        assert [a["retried"] for a in t["attempts"]] == [False], t["attempts"]
    (survivor,) = by_r[4]
    assert survivor["status"] == "finished", survivor
    assert [a["retried"] for a in survivor["attempts"]] == [True], survivor["attempts"]
    assert survivor["attempts"][0]["error"], "the retried attempt names its cause"
    assert summary["best"]["trial_id"] == survivor["trial_id"]
    assert summary["counts"]["failed"] == len(by_r[8])

    # It resumed from its checkpoint and ended where an uninterrupted trial ends.
    trial_dir = exp_dir / "trials" / survivor["trial_id"]
    metrics = json.loads((trial_dir / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(1, 13))
    cfg = load_config(trial_dir / "config.yaml", {"output_dir": str(tmp_path / "again")})
    uninterrupted = run_trial(cfg)
    assert survivor["metric"] == pytest.approx(uninterrupted.final["eval_loss"], abs=1e-4)

    mlc = _client(tmp_path)
    run = mlc.get_run(survivor["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["raysft.retries"] == "1"
    steps = [m.step for m in mlc.get_metric_history(run.info.run_id, "eval_loss")]
    assert steps == [4, 8, 12], "a repeated report was logged twice"
    for t in by_r[8]:
        failed = mlc.get_run(t["mlflow_run_id"])
        assert failed.info.status == "FAILED"
        assert failed.data.tags["raysft.status"] == "failed"
        assert failed.data.tags["raysft.error"].startswith("out of memory")
        assert failed.data.tags["mlflow.note.content"].startswith("Failed before its first eval")
    assert not ran.leftovers, ran.leftovers


def test_driver_killed_mid_search_resumes_without_rerunning_or_duplicating(
    tmp_path: Path, ray_tmp: Path
) -> None:
    assert_no_other_ray()
    # 40 steps: checkpoints upload in the background, so Ray Train registers one (its snapshot)
    # a moment after the report; a 12-step trial could finish before the kill window opened.
    crash = {"search.num_samples": 2, "search.seed": 2, "train.max_steps": MAX_CRASH_STEPS}
    spec = _spec(tmp_path, "crash", **crash)
    exp_dir = tmp_path / "crash"
    state: dict[str, Any] = {}

    def tune_saved(snapshots: list[Path]) -> bool:
        # Tune's saved state (what --resume restores) holds both trials. A kill before that
        # loses the second one (test_lost_trials.py): Tune saves at most once every 10 s, so this
        # search saves every second (TUNE_GLOBAL_CHECKPOINT_S below) to leave the trial time.
        try:
            saved = "".join(p.read_text() for p in exp_dir.glob("tune/experiment_state-*.json"))
        except OSError:  # replaced as it was read
            return False
        return all(p.parent.name.removeprefix("train-") in saved for p in snapshots)

    def kill_driver_mid_second_trial(proc: Any, _mark: str) -> None:
        def poll() -> None:
            deadline = time.monotonic() + 450
            while time.monotonic() < deadline:
                done = list(exp_dir.glob("trials/*/metrics.json"))
                ckpts = train_checkpoints(exp_dir)
                # The first trial finished; Ray Train registered a checkpoint of the second one
                # (in its snapshot: a checkpoint folder alone may be half-written) and it runs on.
                snapshots = list(exp_dir.glob("train/train-*/checkpoint_manager_snapshot.json"))
                if len(done) == 1 and len(snapshots) == 2 and tune_saved(snapshots):
                    state["finished"] = done[0].parent.name
                    state["checkpoints"] = {p: p.stat().st_mtime for p in ckpts}
                    os.kill(proc.pid, signal.SIGKILL)  # the driver only, not its group
                    return
                time.sleep(0.2)

        threading.Thread(target=poll, daemon=True).start()

    crashed: Ran = run_tune(
        spec,
        tmp_path,
        ray_tmp,
        log="crash.log",
        timeout=450,
        env={"TUNE_GLOBAL_CHECKPOINT_S": "1"},
        # Ray's processes follow the driver within seconds, except its dashboard and runtime-env
        # agents: they see their raylet die within 2 s, then try for 60 s (a timeout hard-coded
        # in ray._private.utils.publish_error_to_driver) to report it to the GCS, which died with
        # the driver. Measured: gone 60-65 s after the kill. They get 120 s, checked after the
        # resume below, which runs meanwhile as a user's would.
        settle=None,
        on_start=kill_driver_mid_second_trial,
    )
    killed_at = time.monotonic()
    try:
        assert crashed.rc == -signal.SIGKILL, crashed.explain()
        assert "finished" in state, "the driver was never killed"
        resumed = run_tune(
            spec,
            tmp_path,
            ray_tmp,
            "--resume",
            log="resume.log",
            timeout=450,
        )
        left = wait_gone(killed_at + 120 - time.monotonic(), pgid=crashed.pgid, mark=crashed.mark)
        outlived = "; ".join(cmdline(p) for p in left)
    finally:  # whatever happened above, nothing of the killed search lingers into later tests
        kill_group(crashed.pgid)
        kill_all(marked_pids(crashed.mark))
    assert not left, f"Ray processes of the killed search outlived it by 120 s: {outlived}"
    assert resumed.rc == 0, resumed.explain()
    assert not resumed.leftovers, resumed.leftovers
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"], summary["trials"]
    # The finished trial was not re-run: its checkpoint is the one it had.
    first = state["finished"]
    for path, mtime in state["checkpoints"].items():
        if first in str(path):
            assert path.stat().st_mtime == mtime, f"{first} was trained again"
    # The unfinished one went on from its checkpoint, not from step 0.
    second = next(p.parent.name for p in state["checkpoints"] if first not in str(p))
    log = (tmp_path / "resume.log").read_text(encoding="utf-8", errors="replace")
    resumed_at = re.search(rf"resumed from \S*/{second}/checkpoint_\S* at step (\d+)\b", log)
    assert resumed_at, f"{second} did not resume from its checkpoint"
    assert 4 <= int(resumed_at.group(1)) < MAX_CRASH_STEPS, resumed_at.group(0)
    # Train keeps 2 per trial (num_to_keep); one the killed run uploaded unnamed is deleted.
    for run_dir in exp_dir.glob("train/train-*"):
        kept = [p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()]
        assert len(kept) <= 2, (run_dir.name, kept)

    mlc = _client(tmp_path)
    exp = mlc.get_experiment_by_name("raysft-it-faults")
    children = mlc.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow']['parent_run_id']}'",
    )
    assert sorted(r.data.tags["raysft.trial_id"] for r in children) == sorted(
        t["trial_id"] for t in summary["trials"]
    ), "one child run per trial"
    for run in children:
        for key, every in (("eval_loss", 4), ("train_loss", 1)):  # train_loss: every step
            steps = [m.step for m in mlc.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(every, MAX_CRASH_STEPS + 1, every)), (key, steps)
    versions = mlc.search_model_versions("name='raysft-it-crash'")
    assert len(versions) == 1, "promotion ran more than once"


def test_a_really_diverging_trial_is_stopped_at_once_and_never_promoted(
    tmp_path: Path, ray_tmp: Path
) -> None:
    # learning_rate 80 turns the embedded default's loss into NaN by step 4 (checked): TPE
    # (seed 0) samples 80 first, then 2e-3.
    assert_no_other_ray()
    spec = _spec(
        tmp_path,
        "diverge",
        **{
            "search.params": {"train.learning_rate": {"type": "choice", "values": [2e-3, 80.0]}},
            "search.num_samples": 2,
            "lora.r": 4,
            "train.max_steps": 8,
            "train.eval_every": 2,
            "data.max_eval_samples": 10,
        },
    )
    exp_dir = tmp_path / "diverge"
    ran = run_tune(spec, tmp_path, ray_tmp, timeout=450)
    assert ran.rc == 0, ran.explain()
    assert not ran.leftovers, ran.leftovers

    def strict(constant: str) -> Any:
        raise AssertionError(f"summary.json holds {constant}: not JSON")

    summary = json.loads((exp_dir / "summary.json").read_text(), parse_constant=strict)
    by_lr = {t["sampled"]["train.learning_rate"]: t for t in summary["trials"]}
    bad, good = by_lr[80.0], by_lr[2e-3]
    assert bad["status"] == "diverged", bad
    assert bad["step"] == 4, "stopped at its first non-finite eval, not run on to max_steps"
    assert bad["metric"] is None, bad
    # The worker stopped by itself at that step (Tune's stop would have come a report or more
    # later) and wrote no checkpoint of its NaN weights: step 2's is its only one.
    assert "step 4 train_loss nan eval_loss nan: training diverged, stopped" in ran.output
    assert len(train_checkpoints(exp_dir, bad["trial_id"])) == 1
    assert good["status"] == "finished", good
    assert summary["counts"]["diverged"] == 1
    assert summary["best"]["trial_id"] == good["trial_id"]
    assert summary["promotion"]["promoted"] is True
    assert summary["promotion"]["trial_id"] == good["trial_id"], summary["promotion"]

    mlc = _client(tmp_path)
    failed = mlc.get_run(bad["mlflow_run_id"])
    assert failed.info.status == "FAILED"
    assert failed.data.tags["raysft.status"] == "diverged"
    (version,) = mlc.search_model_versions("name='raysft-it-diverge'")
    assert version.run_id == good["mlflow_run_id"], (version.run_id, good["mlflow_run_id"])
