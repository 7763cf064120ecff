"""Local-mode search end to end: ``python -m raysft.tune SPEC`` starts its own Ray, runs an
ASHA search of the embedded default, mirrors it into a real ``mlflow server`` and promotes the
best adapter; then ``raysft.promote``, ``--resume`` and a second run into the same directory.

One search (module-scoped fixture, ~2 minutes on 2 cores) serves every test but the first.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from raysft.search.experiment import SEARCH_OUTPUTS, STATE_FILE

from .conftest import (
    PYTHON,
    MlflowServer,
    Ran,
    assert_no_other_ray,
    asset_dir,
    asset_ref,
    base_env,
    gcs_server_pids,
    render_spec,
    run_cmd,
    train_checkpoints,
)

pytestmark = pytest.mark.integration

MODEL_NAME = "raysft-it-local"
EXPERIMENT = "raysft-it-local"  # tracking.experiment in specs/local_asha.yaml
MAX_STEPS, EVAL_EVERY = 12, 4  # train.* in specs/local_asha.yaml


# ---------------------------------------------------------------- spec validation (no Ray)

# Runs raysft.tune in-process and reports afterwards whether it had initialised Ray.
_TUNE_AND_REPORT_RAY = """
import runpy, sys
try:
    runpy.run_module("raysft.tune", run_name="__main__", alter_sys=True)
finally:
    ray = sys.modules.get("ray")
    print("ray initialized:", bool(ray is not None and ray.is_initialized()), file=sys.stderr)
"""


def test_invalid_spec_reports_every_problem_before_ray_starts(tmp_path: Path) -> None:
    exp_dir = tmp_path / "exp"
    spec = render_spec(
        "bad_search.yaml", tmp_path / "bad.yaml", {"search.experiment_dir": str(exp_dir)}
    )
    seen_gcs: set[int] = set()
    done = threading.Event()

    def watch_for_gcs(_proc: Any, mark: str) -> None:
        def poll() -> None:
            while not done.is_set():
                seen_gcs.update(gcs_server_pids(mark=mark))  # not another lane's
                time.sleep(0.1)

        threading.Thread(target=poll, daemon=True).start()

    try:
        ran = run_cmd(
            [PYTHON, "-c", _TUNE_AND_REPORT_RAY, str(spec)],
            log=tmp_path / "tune.log",
            cwd=tmp_path,
            timeout=60,
            settle=5,
            on_start=watch_for_gcs,
        )
    finally:
        done.set()

    assert ran.rc == 2, ran.explain()
    out = ran.output
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    expected = {
        "search.params.train.no_such_knob": "no field 'no_such_knob'",
        "search.params.train.learning_rate": "low (0.01) > high (0.0001)",
        "search.metric": "'accuracy'",
        "search.resources": "1 GPU",
    }
    for path, detail in expected.items():
        hits = [e for e in errors if f": {path}: " in e]
        assert len(hits) == 1, f"expected one error for {path} in:\n{out}"
        assert detail in hits[0], hits[0]
        assert str(spec) in hits[0], "each error names the spec file"
    assert len(errors) == len(expected), out
    # Ray never started: not initialised in the process, no gcs_server came up, nothing written.
    assert "ray initialized: False" in out, out
    assert not seen_gcs, f"a gcs_server started during validation: {seen_gcs}"
    assert not exp_dir.exists()
    # No wall-time bound: it measured the machine's load (22.9 s once in CI beside other work),
    # not whether Ray started, which the lines above check.


# ---------------------------------------------------------------- the search


@dataclass
class LocalSearch:
    root: Path
    spec: Path
    exp_dir: Path
    server: MlflowServer
    ray_tmp: Path  # RAY_TMPDIR of its runs
    run: Ran = field(init=False)
    summary: dict[str, Any] = field(init=False)

    def ok(self) -> None:
        assert self.run.rc == 0, self.run.explain()
        assert self.summary, f"no summary.json in {self.exp_dir}\n{self.run.tail()}"

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.server.uri, registry_uri=self.server.uri)

    def runs(self) -> list[Any]:
        mlc = self.client()
        exp = mlc.get_experiment_by_name(EXPERIMENT)
        assert exp is not None, f"no MLflow experiment {EXPERIMENT}"
        return mlc.search_runs([exp.experiment_id], max_results=1000)

    def tune(self, *args: str, log: str, timeout: float = 300) -> Ran:
        return run_cmd(
            [PYTHON, "-m", "raysft.tune", str(self.spec), *args],
            log=self.root / log,
            cwd=self.root,
            env=base_env(RAY_TMPDIR=str(self.ray_tmp)),
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def local_search(mlflow_server: MlflowServer, ray_tmp: Path, tmp_path_factory) -> LocalSearch:
    assert_no_other_ray()
    root = tmp_path_factory.mktemp("local-search")
    exp_dir = root / "exp"
    # The held-out rows by a path relative to where the search runs (its cwd is root), as a
    # user's own data: Ray moved each trial into a directory of its own, where it was not found.
    shutil.copy(asset_dir("tasks-eval.jsonl"), root / "heldout.jsonl")
    spec = render_spec(
        "local_asha.yaml",
        root / "spec.yaml",
        {
            "search.experiment_dir": str(exp_dir),
            "tracking.uri": mlflow_server.uri,
            "promote.registered_model": MODEL_NAME,
            "data.eval": "heldout.jsonl",
        },
    )
    search = LocalSearch(root, spec, exp_dir, mlflow_server, ray_tmp)
    # ~2 min alone on 2 cores; 3.5-4.5 min beside the other integration lane (2026-12-04).
    search.run = search.tune(log="tune.log", timeout=600)
    summary_path = exp_dir / "summary.json"
    search.summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return search


def _eval_steps(step: int) -> list[int]:
    return list(range(EVAL_EVERY, step + 1, EVAL_EVERY))


def test_search_stops_some_trials_early_and_reports_the_best(local_search: LocalSearch) -> None:
    local_search.ok()
    s = local_search.summary
    trials = s["trials"]
    assert len(trials) >= 4
    assert len({t["trial_id"] for t in trials}) == len(trials)
    statuses = [t["status"] for t in trials]
    assert set(statuses) <= {"finished", "stopped_early"}, statuses
    assert "finished" in statuses and "stopped_early" in statuses, statuses
    assert s["counts"] == {
        "finished": statuses.count("finished"),
        "stopped_early": statuses.count("stopped_early"),
        "failed": 0,
        "diverged": 0,
    }
    # The driver's time, from reading the spec and its data (preflight) to the summary.
    timing = s["timing"]
    assert list(timing) == [
        "preflight_s", "ray_start_s", "mlflow_setup_s", "trials_s", "finish_s"
    ], timing  # fmt: skip
    assert timing["preflight_s"] > 0
    assert sum(timing.values()) <= s["wall_seconds"] + 0.5, s
    for t in trials:
        assert isinstance(t["metric"], float) and math.isfinite(t["metric"]), t
        # Nothing failed: a trial ASHA stopped is not a failed attempt, nor retried.
        assert t["attempts"] == [], t["attempts"]
        assert t["mlflow_run_id"], t
        if t["checkpoint"] is None:  # lost: its worker ran 2 checkpoints past the stop report
            assert t["status"] == "stopped_early", t
            kept = train_checkpoints(local_search.exp_dir, t["trial_id"])
            assert len(kept) == 2, t  # Train keeps the trial's 2 newest
        else:
            assert Path(t["checkpoint"], "adapter_model.safetensors").is_file(), t
        if t["status"] == "finished":
            assert t["step"] == MAX_STEPS, t
            assert t["exact_match"] is not None, "a full trial ends with exact match"
        else:  # ASHA stopped it at a rung: after an eval, before the last one
            assert t["step"] in _eval_steps(MAX_STEPS - 1), t
            assert t["exact_match"] is None, t

    finished = [t for t in trials if t["status"] == "finished"]
    best = s["best"]
    assert best["status"] == "finished"
    assert best["metric"] == min(t["metric"] for t in finished)
    assert best == next(t for t in trials if t["trial_id"] == best["trial_id"])

    out = local_search.run.output
    assert re.search(r"^trial\s+status\s+step\s+eval_loss\s+exact_match", out, re.M), out
    for t in trials:
        row = rf"^{t['trial_id']}\s+{t['status']}\s+{t['step']}\s+{t['metric']:.4g}\s"
        assert re.search(row, out, re.M), f"no table row for {t['trial_id']}:\n{out[-3000:]}"
    assert f"best trial {best['trial_id']}: eval_loss={best['metric']:.4g}" in out
    page = rf"{re.escape(local_search.server.uri)}/#/experiments/\d+/runs\?workflowType="
    assert re.search(rf"compare trials: open {page}machine_learning\S* in a browser", out), out
    # The base model, scored once after the trials on the same rows as the best trial.
    cmp = s["base_vs_tuned"]
    assert cmp["base"]["rows"] == cmp["tuned"]["rows"] == 20
    assert cmp["tuned"]["metrics"]["exact_match"] == pytest.approx(best["exact_match"])
    assert cmp["base"]["metrics"]["eval_loss"] > cmp["tuned"]["metrics"]["eval_loss"]
    assert "base vs tuned on the same held-out rows:" in out
    assert (local_search.exp_dir / "base_vs_tuned.md").is_file()
    for png in ("optimization_history", "param_importances", "parallel_coordinate", "eval_curves"):
        assert (local_search.exp_dir / "plots" / f"{png}.png").is_file(), png
    assert "promotion: v1 is now @champion" in out
    # Every name it wrote at the top is one a new search refuses to write over where no
    # search is (experiment.SEARCH_OUTPUTS), or the search's own.
    written = {p.name for p in local_search.exp_dir.iterdir() if not p.name.startswith(".")}
    assert written - {"tune", STATE_FILE} <= set(SEARCH_OUTPUTS), written
    assert {"trials", "plots", "champion", "summary.json"} <= written, written
    # The steps each report carries stay off the console (Ray Train's report lines, Tune's
    # result tables, its TensorBoard logger's warnings), and in Tune's result.json.
    assert "Reporting training result" not in out and "replayed_records" not in out
    assert "tensorboard" not in out.lower()
    tune_dir = local_search.exp_dir / "tune"
    assert not list(tune_dir.rglob("progress.csv")) and list(tune_dir.rglob("result.json"))
    # The local Ray went down with the driver.
    assert not local_search.run.leftovers, f"processes left behind: {local_search.run.leftovers}"


def test_mlflow_has_a_parent_run_and_one_child_per_trial(local_search: LocalSearch) -> None:
    local_search.ok()
    s = local_search.summary
    mlc = local_search.client()
    runs = local_search.runs()
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert parent.info.run_id == s["mlflow"]["parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("raysft.kind") == "search"
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(s["best"]["metric"], rel=1e-9)

    children = {r.data.tags["raysft.trial_id"]: r for r in runs if r is not parent}
    assert len(children) == len(runs) - 1, "every child run names its trial"
    assert sorted(children) == sorted(t["trial_id"] for t in s["trials"])
    for t in s["trials"]:
        child = children[t["trial_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_id == t["mlflow_run_id"]
        for key, value in t["sampled"].items():
            assert child.data.params[f"sampled.{key}"] == str(value), (t["trial_id"], key)
            # The resolved config's value (lora.alpha is a float field: 8 -> "8.0").
            got = child.data.params[key]
            same = float(got) == float(value) if isinstance(value, (int, float)) else got == value
            assert same, f"{key}: {got}, not the trial's {value}"
        # The trial's own resolved config, not the base spec's.
        own_dir = local_search.exp_dir / "trials" / t["trial_id"]
        assert child.data.params["output_dir"] == str(own_dir), t["trial_id"]
        history = mlc.get_metric_history(child.info.run_id, "eval_loss")
        steps = sorted(m.step for m in history)
        assert steps == _eval_steps(t["step"]), (t["trial_id"], steps)
        last = max(history, key=lambda m: m.step)
        assert last.value == pytest.approx(t["metric"], rel=1e-9)
        assert child.info.status == "FINISHED", t["trial_id"]  # stopped early too
        assert child.data.tags["raysft.status"] == t["status"]
        note = child.data.tags["mlflow.note.content"]
        best = t["trial_id"] == local_search.summary["best"]["trial_id"]
        assert note.startswith("**The search's best trial.** ") == best, note
        said = {"finished": "Finished", "stopped_early": "Stopped early by the ASHA scheduler"}
        assert note.removeprefix("**The search's best trial.** ").startswith(said[t["status"]])
        assert f"step {t['step']} of {t['max_steps']}" in note, note

    spec_files = [a.path for a in mlc.list_artifacts(parent.info.run_id, "spec")]
    assert spec_files == ["spec/spec.yaml"]
    logged = Path(
        mlc.download_artifacts(parent.info.run_id, "spec/spec.yaml", str(local_search.root))
    )
    assert logged.read_text() == local_search.spec.read_text()
    top = {a.path for a in mlc.list_artifacts(parent.info.run_id)}
    assert {"spec", "summary.json", "best_adapter"} <= top, top


def test_every_number_a_trial_reports_reaches_its_mlflow_run(local_search: LocalSearch) -> None:
    """The recipe's own record of each report against MLflow's metric histories: every
    registry metric, at its step, with its value; none missing, none extra. A finished trial's
    reports carry every step of its metrics.json history (the steps between evals ride with the
    next eval's report); an ASHA-stopped trial is checked on
    its last report, which summary.json keeps. (Its worker may run on to the end and write
    metrics.json while Tune tears it down: these trials train 8 steps in 2 s. Tune, and so
    MLflow, never hears of those steps.)"""
    from raysft.train.metrics import METRICS

    local_search.ok()
    mlc = local_search.client()
    checked = 0
    for t in local_search.summary["trials"]:
        out = local_search.exp_dir / "trials" / t["trial_id"] / "metrics.json"
        finished = t["status"] == "finished"
        assert finished or t["status"] == "stopped_early", t
        if finished:
            reports = json.loads(out.read_text())["history"]
        else:
            reports = [{**t["metrics"], "step": t["step"]}]
        points: dict[str, set[tuple[int, float]]] = {}
        for rec in reports:
            for name, value in rec.items():
                if name in METRICS and isinstance(value, (int, float)) and math.isfinite(value):
                    points.setdefault(name, set()).add((rec["step"], float(value)))
        assert {"train_loss", "eval_loss", "lr", "tokens", "elapsed_s"} <= set(points), points
        run_id = t["mlflow_run_id"]
        logged = set(mlc.get_run(run_id).data.metrics)
        if finished:
            assert logged == set(points), (t["trial_id"], logged ^ set(points))
        for name, want in points.items():
            history = {(m.step, m.value) for m in mlc.get_metric_history(run_id, name)}
            assert want == history if finished else want <= history, (t, name)
        checked += 1
    assert checked == len(local_search.summary["trials"])


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_best_adapter_is_registered_as_champion_and_exported(
    local_search: LocalSearch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_search.ok()
    best, promo = local_search.summary["best"], local_search.summary["promotion"]
    mlc = local_search.client()
    versions = mlc.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1
    champ = mlc.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champ.version) == str(versions[0].version) == str(promo["version"])
    assert champ.run_id == best["mlflow_run_id"]
    assert champ.tags["raysft.metric"] == "eval_loss"
    assert float(champ.tags["raysft.metric_value"]) == best["metric"]
    assert champ.tags["raysft.eval_fingerprint"] == promo["eval_fingerprint"]
    assert champ.tags["raysft.base_model"] == asset_ref("tiny-base")
    assert promo["promoted"] is True
    assert promo["alias"] == "champion" and promo["registered_model"] == MODEL_NAME
    assert promo["value"] == best["metric"]
    assert promo["reason"] == "first champion"

    # The export is a plain PEFT adapter dir: it loads on the base with stock transformers/peft.
    export = Path(promo["export_dir"])
    base_dir = asset_dir("tiny-base")
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export)
    model.eval()
    enc = tok("Convert this word to uppercase: stone", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
        tuned = model(**enc).logits
        with model.disable_adapter():
            plain = model(**enc).logits
    assert out.shape[1] > enc["input_ids"].shape[1], "generate() produced no token"
    assert not torch.allclose(tuned, plain), "the exported adapter does not change the model"

    # The registry version holds the same adapter weights as the export and the best checkpoint.
    # models:/ URIs resolve through the registry URI, which tracking_uri= does not set.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_search.server.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", local_search.server.uri)
    got = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path / "champion")
        )
    )
    registered, exported = _tensors(got), _tensors(export)
    checkpoint = _tensors(Path(best["checkpoint"]))
    assert registered.keys() == exported.keys() == checkpoint.keys() and registered
    for key in registered:
        assert torch.equal(registered[key], exported[key]), key
        assert torch.equal(registered[key], checkpoint[key]), key


def test_promote_rerun_keeps_the_champion(local_search: LocalSearch) -> None:
    local_search.ok()
    mlc = local_search.client()
    before = mlc.get_model_version_by_alias(MODEL_NAME, "champion")
    ran = run_cmd(
        [PYTHON, "-m", "raysft.promote", str(local_search.exp_dir)],
        log=local_search.root / "promote.log",
        cwd=local_search.root,
        env=base_env(),
        timeout=120,
        settle=5,
    )
    assert ran.rc == 0, ran.explain()
    assert len(mlc.search_model_versions(f"name='{MODEL_NAME}'")) == 1, "a new version was made"
    after = mlc.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(after.version) == str(before.version)

    # Its best already holds the alias: the record says so, and keeps version and export.
    first = local_search.summary["promotion"]
    record = json.loads((local_search.exp_dir / "summary.json").read_text())["promotion"]
    assert record["promoted"] is True
    assert record["reason"] == f"already champion v{before.version}"
    assert record["version"] == str(before.version)
    assert record["export_dir"] == first["export_dir"]
    assert '"promoted": true' in ran.output


def test_rerun_into_the_same_experiment_dir_exits_2(local_search: LocalSearch) -> None:
    local_search.ok()
    n_runs = len(local_search.runs())
    ran = local_search.tune(log="rerun.log")
    assert ran.rc == 2, ran.explain()
    assert "Traceback" not in ran.output
    assert (
        f"error: {local_search.spec}: search.experiment_dir: {local_search.exp_dir} already holds "
        "a search; pass --resume to continue it or choose another directory"
    ) in ran.output
    assert "Started a local Ray instance" not in ran.output, "the check comes before Ray starts"
    assert len(local_search.runs()) == n_runs, "a refused run must not touch MLflow"
