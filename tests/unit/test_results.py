"""Trial status, ranking and summary.json with non-finite metrics; a failed trial's cause.

Ray's errors are built with Ray's own exception classes (no cluster needed), the way Tune hands
them to the driver: ``RayTaskError`` around Ray Train's ``WorkerGroupError`` around the worker's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflowkit import OutOfReach

from raysft.search.callback import make_callback
from raysft.search.results import (
    DivergedStopper,
    TrialStatus,
    classify,
    counts,
    error_cause,
    is_diverged,
    json_safe,
    pick_best,
    rank,
    trial_row,
    write_summary,
)

NAN, INF = float("nan"), float("inf")


def row(trial_id: str, metric: float | None, *, step: int = 10, **kw: Any) -> dict[str, Any]:
    metrics = {"step": step, "checkpoint_path": f"/ckpt/{trial_id}"}
    if metric is not None:
        metrics["eval_loss"] = metric
    return trial_row(
        trial_id=trial_id,
        metrics=metrics,
        sampled=kw.pop("sampled", {"train.learning_rate": 1e-3}),
        max_steps=10,
        objective="eval_loss",
        error=kw.pop("error", None),
        mlflow_run_id=None,
        **kw,
    )


# ---------------------------------------------------------------- status


def test_mlflow_statuses_keep_killed_for_interrupted_runs() -> None:
    # An ASHA stop is how a search is meant to end a trial: FINISHED, not the UI's red KILLED
    # (an interrupted run's); a diverged trial is FAILED, told apart by the status tag.
    assert TrialStatus.DIVERGED.value == "diverged"
    assert {s.value: s.mlflow for s in TrialStatus} == {
        "finished": "FINISHED",
        "stopped_early": "FINISHED",
        "failed": "FAILED",
        "diverged": "FAILED",
    }


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"last_step": 10, "error": False, "diverged": False}, TrialStatus.FINISHED),
        ({"last_step": 4, "error": False, "diverged": False}, TrialStatus.STOPPED_EARLY),
        ({"last_step": 4, "error": False, "diverged": True}, TrialStatus.DIVERGED),
        ({"last_step": 10, "error": False, "diverged": True}, TrialStatus.DIVERGED),
        ({"last_step": 4, "error": True, "diverged": True}, TrialStatus.FAILED),
        ({"last_step": None, "error": True, "diverged": False}, TrialStatus.FAILED),
    ],
)
def test_classify(kw: dict[str, Any], expected: TrialStatus) -> None:
    assert classify(max_steps=10, **kw) is expected


@pytest.mark.parametrize(
    ("result", "diverged"),
    [
        ({"step": 5, "eval_loss": 1.2, "train_loss": 1.3}, False),
        ({"step": 5, "eval_loss": NAN}, True),
        ({"step": 5, "train_loss": INF}, True),  # NaN weights: every later score is void
        ({"step": 5, "train_loss": -INF}, True),
        ({"step": 5, "perplexity": INF, "eval_loss": 800.0}, True),
        ({"step": 10, "exact_match": NAN}, True),
        ({"step": 5, "lr": NAN, "eval_loss": 1.0}, False),  # not a score
        ({"step": 5}, False),
        ({"step": 5, "eval_loss": True}, False),
    ],
)
def test_is_diverged(result: dict[str, Any], diverged: bool) -> None:
    assert is_diverged(result) is diverged
    assert DivergedStopper()("t1", result) is diverged


def test_diverged_stopper_is_a_tune_stop_condition() -> None:
    from ray.tune.stopper.function_stopper import FunctionStopper

    stopper = DivergedStopper()
    # What Tune does with RunConfig(stop=...): a plain callable becomes a FunctionStopper.
    assert FunctionStopper.is_valid_function(stopper)
    wrapped = FunctionStopper(stopper)
    assert wrapped("t1", {"eval_loss": NAN}) is True
    assert wrapped("t1", {"eval_loss": 0.5}) is False
    assert wrapped.stop_all() is False
    import pickle

    assert pickle.loads(pickle.dumps(stopper))("t", {"train_loss": NAN}) is True


# ---------------------------------------------------------------- rows, ranking, best


def test_non_finite_metrics_are_never_ranked_best() -> None:
    rows = [
        row("nan", NAN),
        row("good", 0.3),
        row("inf", INF),
        row("ok", 0.5),
        row("neg-inf", -INF),  # "lowest" of all, and meaningless
    ]
    assert [r["status"] for r in rows] == [
        "diverged",
        "finished",
        "diverged",
        "finished",
        "diverged",
    ]
    assert [r["metric"] for r in rows] == [None, 0.3, None, 0.5, None]
    ranked = rank(rows, "min")
    assert [r["trial_id"] for r in ranked][:2] == ["good", "ok"]
    best = pick_best(ranked)
    assert best is not None and best["trial_id"] == "good"
    assert counts(rows) == {
        "finished": 2,
        "stopped_early": 0,
        "failed": 0,
        "diverged": 3,
    }
    # mode max: +inf would be "best" if it were compared.
    max_rows = [row("inf", INF), row("b", 0.2), row("a", 0.7)]
    assert pick_best(rank(max_rows, "max"))["trial_id"] == "a"  # type: ignore[index]


def test_the_first_ranked_trial_is_the_best_one() -> None:
    """A failed trial's last eval and a stopped one's lower than every finished trial's: the
    finished one is ranked first (it is the one promoted), then the stopped, then the failed."""
    rows = [
        {**row("failed", 1.1), "status": "failed"},
        {**row("stopped", 1.2, step=60), "status": "stopped_early"},
        row("finished-a", 1.3),
        row("finished-b", 1.4),
    ]
    ranked = rank(rows, "min")
    assert [r["trial_id"] for r in ranked] == ["finished-a", "finished-b", "stopped", "failed"]
    assert ranked[0] is pick_best(ranked)
    ranked = rank(rows, "max")
    assert [r["trial_id"] for r in ranked] == ["finished-b", "finished-a", "stopped", "failed"]


def test_a_search_whose_every_trial_diverged_has_no_best() -> None:
    rows = rank([row("a", NAN), row("b", INF, step=3)], "min")
    assert pick_best(rows) is None


def test_diverged_earlier_is_diverged_even_if_the_last_report_is_finite() -> None:
    r = row("t", 0.1, diverged=True)
    assert r["status"] == "diverged"
    assert pick_best([r]) is None


def test_pick_best_refuses_a_non_finite_metric_however_the_row_was_made() -> None:
    forged = {**row("t", 0.1), "metric": NAN}  # e.g. a summary written by an older version
    assert pick_best([forged]) is None


def test_summary_with_non_finite_values_is_strict_json(tmp_path: Path) -> None:
    rows = [
        row("nan", NAN, sampled={"train.learning_rate": NAN, "lora.r": 8}),
        row("good", 0.25),
    ]
    assert "eval_loss" not in rows[0]["metrics"] and rows[1]["metrics"]["eval_loss"] == 0.25
    assert rows[0]["sampled"] == {"train.learning_rate": None, "lora.r": 8}
    summary = {"trials": rows, "best": pick_best(rank(rows, "min")), "counts": counts(rows)}
    path = write_summary(tmp_path, summary)

    def no_constants(name: str) -> Any:
        raise AssertionError(f"{name} in summary.json")

    loaded = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
    assert loaded["best"]["trial_id"] == "good"
    assert loaded["trials"][0]["status"] == "diverged"


def test_write_summary_refuses_a_nan_it_was_handed(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_summary(tmp_path, {"value": NAN})
    assert not (tmp_path / "summary.json").exists()


def test_json_safe() -> None:
    value = {"a": [1.0, NAN, {"b": -INF}], "c": (INF, "x"), "d": 3, "e": None, "f": True}
    assert json_safe(value) == {"a": [1.0, None, {"b": None}], "c": [None, "x"], "d": 3,
                                "e": None, "f": True}  # fmt: skip


# ---------------------------------------------------------------- error_cause


def _ray_task_error(exc: BaseException) -> BaseException:
    """``exc`` raised inside a Tune function trainable, as the driver receives it."""
    from ray.exceptions import RayTaskError

    try:
        raise exc
    except BaseException as err:
        tb = traceback.format_exc()
        task = RayTaskError(
            "train", tb, err, proctitle="ray::ImplicitFunc.train()", pid=4242, ip="10.0.0.7"
        )
        return task.as_instanceof_cause()


def _worker_group_error(worker_error: BaseException, *, running: bool = False) -> BaseException:
    """What Ray Train raises in the trial when a worker fails: built by Ray's own poll code."""
    from ray.train.v2._internal.execution.worker_group.poll import (
        WorkerGroupPollStatus,
        WorkerStatus,
    )

    status = WorkerGroupPollStatus({0: WorkerStatus(running=running, error=worker_error)})
    return status.get_worker_group_error()


def _user_error(exc: BaseException) -> BaseException:
    """A worker's exception with its traceback, as Ray Train carries it to the controller."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    def recipe_step() -> None:
        raise exc

    try:
        recipe_step()
    except BaseException as err:
        return UserExceptionWithTraceback(err, traceback.format_exc())
    raise AssertionError("unreachable")


def test_cause_of_an_exception_in_a_worker() -> None:
    err = _ray_task_error(_worker_group_error(_user_error(ValueError("boom: rows 3-4"))))
    text = str(err)
    assert text.startswith("\x1b[36mray::ImplicitFunc.train()")  # what the summary showed
    assert error_cause(err) == "ValueError: boom: rows 3-4"
    assert error_cause(text) == "ValueError: boom: rows 3-4"


def test_cause_of_a_torch_out_of_memory_error() -> None:
    import torch

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    err = _ray_task_error(_worker_group_error(_user_error(oom)))
    assert error_cause(err) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_cause_of_a_killed_worker_is_ray_s_own_account() -> None:
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError("Worker health check failed.", ActorDiedError())
    err = _ray_task_error(_worker_group_error(died, running=True))
    assert error_cause(err) == (
        "WorkerGroupError: Worker health check failed. "
        "The actor died unexpectedly before finishing this task."
    )


def test_cause_of_a_chained_exception_is_the_last_raised() -> None:
    def load() -> None:
        try:
            {}["model"]
        except KeyError as err:
            raise RuntimeError("cannot build the model") from err

    try:
        load()
    except RuntimeError:
        tb = traceback.format_exc()
    assert "KeyError: 'model'" in tb
    assert error_cause(tb) == "RuntimeError: cannot build the model"


def test_cause_survives_ray_s_truncation_of_a_long_traceback() -> None:
    deep = "\n".join(f'  File "/x/mod{i}.py", line {i}, in f{i}' for i in range(200))
    text = f"Traceback (most recent call last):\n{deep}\nKeyError: 'eval_loss'"
    from ray.train.v2._internal.execution.worker_group.poll import _truncate_error_string

    assert error_cause(_truncate_error_string(text)) == "KeyError: 'eval_loss'"


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (ValueError("bad value"), "ValueError: bad value"),
        (AssertionError(), "AssertionError"),
        (
            "\x1b[31mtorch.cuda.OutOfMemoryError: out of memory\x1b[0m",
            "OutOfMemoryError: out of memory",
        ),
        ("something odd happened", "something odd happened"),
        ("", ""),
    ],
)
def test_error_cause_of_plain_errors(error: BaseException | str, cause: str) -> None:
    assert error_cause(error) == cause


def test_error_cause_is_bounded() -> None:
    assert len(error_cause("ValueError: " + "x" * 5000)) == 500


# ---------------------------------------------------------------- MLflow status of a diverged trial


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """A real MLflow tracking store (SQLite) and an experiment in it."""
    import mlflow

    from raysft.search import tracking_store

    before = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("mlflow")
    mlc = tracking_store.client(f"sqlite:///{root / 'mlflow.db'}")
    yield mlc, mlc.create_experiment("t", artifact_location=str(root / "artifacts"))
    mlflow.set_tracking_uri(before)  # tracking_store.client sets the process-wide URI


def _trial_callback(mlc: Any, exp_id: str, cfg: Any, ended_file: Path | None = None) -> Any:

    parent = mlc.create_run(exp_id).info.run_id
    return make_callback(
        mlc,
        exp_id=exp_id,
        parent_id=parent,
        resolve_trial=lambda trial_id, sampled: cfg,
        ended_file=ended_file,
    )


def _start_trials(callback: Any, *trial_ids: str) -> list[SimpleNamespace]:
    """Tune's trials as the callback sees them (no sampled values), each started."""
    trials = [SimpleNamespace(trial_id=t, config={}) for t in trial_ids]
    for trial in trials:
        callback.on_trial_start(0, [], trial)
    return trials


def test_tracking_marks_a_diverged_trial_failed_with_its_status_tag(
    mlflow_store: tuple[Any, str],
) -> None:
    from raysft.config import validate_tree

    mlc, exp_id = mlflow_store
    cfg = validate_tree({"train": {"max_steps": 10, "eval_every": 5}})
    callback = _trial_callback(mlc, exp_id, cfg)
    ok, bad = _start_trials(callback, "ok", "bad")
    callback.on_trial_result(0, [], ok, {"step": 5, "eval_loss": 1.0, "timestamp": 1})
    callback.on_trial_result(0, [], bad, {"step": 5, "eval_loss": NAN, "timestamp": 1})
    callback.on_trial_result(0, [], ok, {"step": 10, "eval_loss": 0.8, "timestamp": 2})
    for trial in (ok, bad):
        callback.on_trial_complete(0, [], trial)
    runs = {t: mlc.get_run(r) for t, r in callback.runs.items()}
    assert (
        runs["ok"].info.status == "FINISHED" and runs["ok"].data.tags["raysft.status"] == "finished"
    )
    assert runs["bad"].info.status == "FAILED"
    assert runs["bad"].data.tags["raysft.status"] == "diverged"
    assert "eval_loss" not in runs["bad"].data.metrics  # NaN never logged
    assert not math.isnan(runs["ok"].data.metrics["eval_loss"])


def test_a_resumed_trials_replayed_records_reach_mlflow_once(
    mlflow_store: tuple[Any, str],
) -> None:
    """A driver killed before it heard steps 4 and 8; the trial, resumed from step 8's
    checkpoint, reports step 8 carrying step 4. Each step lands once, the earlier ones too."""
    from raysft.config import validate_tree
    from raysft.train.metrics import REPLAYED

    mlc, exp_id = mlflow_store
    cfg = validate_tree({"train": {"max_steps": 12, "eval_every": 4}})
    callback = _trial_callback(mlc, exp_id, cfg)
    lost, heard = _start_trials(callback, "lost", "heard")
    # "heard": the old driver logged step 4 before it died; only 8 is new.
    callback.on_trial_result(0, [], heard, {"step": 4, "eval_loss": 2.0, "timestamp": 1})
    r4, r8 = {"step": 4, "eval_loss": 2.0}, {"step": 8, "eval_loss": 1.5}
    for trial in (lost, heard):
        callback.on_trial_result(0, [], trial, {**r8, REPLAYED: [r4], "timestamp": 5})
        callback.on_trial_result(0, [], trial, {"step": 12, "eval_loss": 1.2, "timestamp": 6})
    for trial in (lost, heard):
        history = mlc.get_metric_history(callback.runs[trial.trial_id], "eval_loss")
        assert [(m.step, m.value) for m in history] == [(4, 2.0), (8, 1.5), (12, 1.2)]
    assert REPLAYED not in callback.last["lost"]  # the summary's last record stays flat


def test_every_steps_records_reach_mlflow_in_one_request_per_report(
    mlflow_store: tuple[Any, str],
) -> None:
    """Reports come at evals, carrying the steps since the last one: MLflow gets a point per
    step for the per-step metrics (train_loss, lr, tokens), one request per report."""
    from raysft.config import validate_tree
    from raysft.train.metrics import REPLAYED

    mlc, exp_id = mlflow_store
    cfg = validate_tree({"train": {"max_steps": 4, "eval_every": 2}})
    callback = _trial_callback(mlc, exp_id, cfg)
    (trial,) = _start_trials(callback, "steps")
    calls = []
    real = mlc.log_batch
    mlc.log_batch = lambda *a, **k: (calls.append(k), real(*a, **k))[1]
    try:
        for last in (2, 4):
            earlier = {"step": last - 1, "train_loss": 3.0 / last, "lr": 1e-3}
            report = {"step": last, "train_loss": 2.0 / last, "lr": 1e-3, "eval_loss": 1.0 / last}
            callback.on_trial_result(0, [], trial, {**report, REPLAYED: [earlier], "timestamp": 1})
    finally:
        mlc.log_batch = real
    run_id = callback.runs["steps"]
    assert [m.step for m in mlc.get_metric_history(run_id, "train_loss")] == [1, 2, 3, 4]
    assert [m.step for m in mlc.get_metric_history(run_id, "eval_loss")] == [2, 4]
    assert len(calls) == 2  # one per report


TOKEN = "hf_" + "Xy7" * 12  # shaped like a Hugging Face token: hf_ + 30 or more letters/digits


def test_no_secret_reaches_a_trial_run_s_params(
    mlflow_store: tuple[Any, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A trial's params: its resolved config (a careless path holding the token, a tracking URI
    with a password) and its sampled values; and the summary row built from the same trial."""
    from raysft.config import validate_tree

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    mlc, exp_id = mlflow_store
    cfg = validate_tree(
        {
            "output_dir": f"runs/{TOKEN}/t1",
            "tracking": {"uri": "https://bob:pa55word@mlflow.example:5000/"},
            "data": {"system_prompt": f"token {TOKEN}"},
        }
    )
    callback = _trial_callback(mlc, exp_id, cfg)
    sampled = {"train.learning_rate": 1e-3, "data.system_prompt": f"use {TOKEN}"}
    trial = SimpleNamespace(trial_id="t1", config=sampled)
    callback.on_trial_start(0, [], trial)
    run = mlc.get_run(callback.runs["t1"])
    params = json.dumps(run.data.params)
    assert TOKEN not in params and "pa55word" not in params
    assert run.data.params["output_dir"] == "runs/***/t1"
    assert run.data.params["sampled.train.learning_rate"] == "0.001"
    # The run's name (tag mlflow.runName) is made of the sampled values (notes.run_name).
    assert TOKEN not in json.dumps(run.data.tags), run.data.tags.get("mlflow.runName")


def test_a_row_never_names_a_checkpoint_that_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Train keeps a trial's 2 newest checkpoints; a stopped trial whose worker ran 2 past the
    report ASHA stopped it on has lost the one that report names: the row says so (None) and
    the driver warns, so nothing promotes or links a missing directory."""
    import logging

    from raysft.search.finish import check_checkpoint

    kept = tmp_path / "checkpoint_b"
    kept.mkdir()
    rows = [
        {"trial_id": "lost", "step": 4, "checkpoint": str(tmp_path / "checkpoint_a")},
        {"trial_id": "kept", "step": 8, "checkpoint": str(kept)},
        {"trial_id": "none", "step": 2, "checkpoint": None},
    ]
    with caplog.at_level(logging.WARNING, logger="raysft.search.driver"):
        for row in rows:
            check_checkpoint(row)
    assert [r["checkpoint"] for r in rows] == [None, str(kept), None]
    assert "trial lost: its checkpoint at step 4 was replaced" in caplog.text
    assert "trial kept" not in caplog.text and "trial none" not in caplog.text


def test_mlflow_refusing_the_callbacks_writes_never_ends_the_trials(
    mlflow_store: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raised from a Tune callback, an MLflow error would end every running trial: each one is
    logged and noted (summary.json's failed_steps), and the trials' outcomes are still known to
    the search; after the first, MLflow asks once per call instead of retrying for minutes."""
    from raysft.config import validate_tree
    from raysft.search import tracking_requests

    mlc, _ = mlflow_store
    tracking_requests.callback_failures(reset=True)
    # MLflow's defaults, as a user has them; put back after the test (the callback changes them).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    exp_id = mlc.create_experiment("refusing")
    cfg = validate_tree({"train": {"max_steps": 10, "eval_every": 5}})
    callback = _trial_callback(mlc, exp_id, cfg)
    (tracked,) = _start_trials(callback, "tracked")
    mlc.delete_run(callback.runs["tracked"])  # MLflow refuses writes to a deleted run...
    mlc.delete_experiment(exp_id)  # ... and new runs in a deleted experiment
    (untracked,) = _start_trials(callback, "untracked")
    assert "untracked" not in callback.runs
    for trial in (tracked, untracked):
        callback.on_trial_result(0, [], trial, {"step": 10, "eval_loss": 0.5, "timestamp": 1})
        callback.on_trial_complete(0, [], trial)
    failures = tracking_requests.callback_failures(reset=True)
    assert [f[: f.find(": MlflowException")] for f in failures] == [
        "MLflow: creating trial untracked's run",
        "MLflow: trial tracked's metrics at step 10",
        "MLflow: closing trial tracked's run",
    ], failures
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert callback.status == {"tracked": "finished", "untracked": "finished"}
    assert callback.last["untracked"]["eval_loss"] == 0.5
    # Past the first few, they are counted, not listed.
    for i in range(7):
        tracking_requests.note_callback_failure(f"MLflow: trial t{i}'s metrics at step 5: gone")
    lines = tracking_requests.callback_failures(reset=True)
    assert len(lines) == 6 and lines[-1].startswith("MLflow: 2 more of the trials' records")
    assert tracking_requests.callback_failures() == []


def test_a_search_bounds_mlflows_retries_and_waits_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from raysft.search import tracking_requests

    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "90")  # the user's own
    tracking_requests.bound_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "90"
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    tracking_requests.bound_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


class HungServer:
    """A tracking server that takes connections and never answers (a hung process): a real
    socket; ``connections`` counts the requests MLflow made, retries included."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        return len(self.held)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_the_trials_callback_asks_a_hung_server_twice_with_shorter_waits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every trial's report waits for the callback (Tune's loop): a server that never answers
    holds it for one request and one retry at the callback's wait, not at the search's (3
    retries of 30 s each, 127 s in all). After that first failure the process asks once, and
    the callback asks again only once its quiet period is over."""
    from mlflow.tracking import MlflowClient

    from raysft.config import validate_tree
    from raysft.search import tracking, tracking_requests

    monkeypatch.setitem(tracking_requests._CALLBACK_REQUESTS, "MLFLOW_HTTP_REQUEST_TIMEOUT", 1)
    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    tracking_requests.bound_retries()  # as a search: 3 retries, 30 s each
    now = [1000.0]
    server = HungServer()
    try:
        callback = make_callback(
            MlflowClient(tracking_uri=server.uri), exp_id="1", parent_id="p",
            resolve_trial=lambda trial_id, sampled: validate_tree({}),
            ended_file=tmp_path / tracking.ENDED_FILE, clock=lambda: now[0],
        )  # fmt: skip
        tracking_requests.callback_failures(reset=True)
        callback.setup()  # reads the search's trial runs: no answer
        assert server.connections == 2  # the request and its one retry
        (failure,) = tracking_requests.callback_failures(reset=True)
        assert failure.startswith("MLflow: reading the search's trial runs: ")
        assert "timed out" in failure
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"

        trial = SimpleNamespace(trial_id="t1", config={})
        now[0] += 29
        callback.on_trial_start(0, [], trial)  # left alone: not asked
        assert server.connections == 2
        now[0] += 2  # the 30 s are over: asked again, once
        callback.on_trial_start(0, [], trial)
        assert server.connections == 3
    finally:
        server.close()
        tracking_requests.callback_failures(reset=True)


def test_a_busy_servers_retry_after_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server answering 503 with "Retry-After: 55" (a maintenance proxy): urllib3 would wait
    55 s before each retry, holding Tune's loop and so every trial's report. The callback's one
    retry comes at once instead."""
    import http.server
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from raysft.search import tracking_requests

    for name in ("MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(name, "")  # so that the test's values are undone after it
        monkeypatch.delenv(name)
    tracking_requests.bound_retries()  # as a search
    asked: list[float] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(time.monotonic())
            self.send_response(503)
            self.send_header("Retry-After", "55")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mlc = MlflowClient(tracking_uri=f"http://127.0.0.1:{server.server_address[1]}")
        t0 = time.monotonic()
        with tracking_requests.callback_requests(), pytest.raises(Exception, match="503"):
            mlc.get_experiment("1")
        assert len(asked) == 2  # the request and its one retry
        assert time.monotonic() - t0 < 20
    finally:
        server.shutdown()
        server.server_close()


def test_the_callbacks_request_figures_are_the_lower_and_last_only_for_its_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from raysft.search import tracking_requests

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")  # the user's, lower than 10
    with tracking_requests.callback_requests():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    tracking_requests.note_callback_failure("MLflow: x: gone")  # the process asks once from now on
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"  # the user's lower figure stays
    tracking_requests.callback_failures(reset=True)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    with pytest.raises(RuntimeError), tracking_requests.callback_requests():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
        raise RuntimeError("the call failed")
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # unset again, as it was


def test_out_of_reach_is_a_server_that_did_not_answer_not_one_that_said_no() -> None:
    import requests
    from mlflow.exceptions import MlflowException

    from raysft.search.tracking_requests import out_of_reach

    def raised(cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except Exception as err:  # as MLflow wraps it: the cause is the context
                raise MlflowException(f"API request failed with exception {err}")  # noqa: B904
        except MlflowException as wrapped:
            return wrapped

    assert out_of_reach(raised(requests.exceptions.ConnectionError("Connection refused")))
    assert out_of_reach(raised(requests.exceptions.ReadTimeout("read timed out")))
    assert out_of_reach(raised(requests.exceptions.RetryError("too many 503 error responses")))
    assert not out_of_reach(raised(requests.exceptions.HTTPError("413 Payload Too Large")))
    assert not out_of_reach(MlflowException("RESOURCE_DOES_NOT_EXIST"))


def test_a_tracking_server_out_of_reach_is_left_alone_for_a_while(
    mlflow_store: tuple[Any, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each trial report waits for Tune's loop, where the callback runs: a server that does not
    answer is asked again only after 30 s, then 60 s, ... (what is skipped is a gap the finish
    fills). Back, the callback picks up the runs it could not read at the start, so a resumed
    trial keeps its run; a trial that started meanwhile gets its run at its next report; and a
    later failure waits 30 s again, as after an answered refusal."""
    from raysft.config import validate_tree
    from raysft.search import tracking, tracking_requests

    mlc, _ = mlflow_store
    exp_id = mlc.create_experiment("out-of-reach")
    parent = mlc.create_run(exp_id).info.run_id
    earlier = mlc.create_run(  # a trial of an earlier start of this search
        exp_id, tags={"mlflow.parentRunId": parent, "raysft.trial_id": "t0"}
    ).info.run_id
    mlc.set_terminated(earlier, "KILLED")
    link = OutOfReach(mlc)
    cfg = validate_tree({"train": {"max_steps": 10, "eval_every": 5}})
    now = [1000.0]
    callback = make_callback(
        link,
        exp_id=exp_id,
        parent_id=parent,
        resolve_trial=lambda trial_id, sampled: cfg,
        ended_file=tmp_path / tracking.ENDED_FILE,
        clock=lambda: now[0],
    )
    tracking_requests.callback_failures(reset=True)
    t0, t1, t2 = (SimpleNamespace(trial_id=t, config={}) for t in ("t0", "t1", "t2"))

    with caplog.at_level("WARNING", logger="raysft.search.callback"):
        callback.setup()  # reading the earlier start's runs: out of reach
        assert link.calls == 1 and (tmp_path / tracking.GAPS_FILE).exists()
        now[0] += 29
        callback.on_trial_start(0, [], t1)  # not asked
        callback.on_trial_result(0, [], t1, {"step": 10, "eval_loss": 0.5, "timestamp": 1})
        callback.on_trial_complete(0, [], t1)
        assert link.calls == 1
        now[0] += 2
        callback.on_trial_start(0, [], t2)  # asked again: still out of reach, left 60 s
        assert link.calls == 2
        now[0] += 59
        callback.on_trial_start(0, [], t0)
        assert link.calls == 2
    assert [m.split(" (")[0] for m in caplog.messages] == [
        "MLflow: reading the search's trial runs failed",
        "MLflow: creating trial t2's run failed",
    ]
    assert caplog.messages[0].endswith(
        "the trials go on, and MLflow is left alone for 30 s (what goes unwritten is written "
        "at the search's finish)"
    )
    assert "left alone for 60 s" in caplog.messages[1]
    failures = tracking_requests.callback_failures(reset=True)
    assert [f.split(": ")[1] for f in failures] == [
        "reading the search's trial runs",
        "creating trial t1's run",  # never made: nothing to close either
        "creating trial t2's run",
        "creating trial t0's run",
    ]
    assert failures[1].split(": ", 2)[2].startswith("not tried (the tracking server was out of")
    assert callback.status == {"t1": "finished"}  # the trial's outcome is known all the same

    link.down = False
    now[0] += 2
    callback.on_trial_start(0, [], t0)  # resumed: its run of the earlier start, reopened
    assert callback.runs["t0"] == earlier and mlc.get_run(earlier).info.status == "RUNNING"
    callback.on_trial_result(0, [], t2, {"step": 5, "eval_loss": 1.0, "timestamp": 1})
    runs = mlc.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["raysft.trial_id"] for r in runs) == ["t0", "t2"]
    history = mlc.get_metric_history(callback.runs["t2"], "eval_loss")
    assert [(m.step, m.value) for m in history] == [(5, 1.0)]
    assert callback.unstarted == {"t1"}  # ended unseen: its run is the finish's to make
    assert tracking_requests.callback_failures() == []

    link.down = True  # out of reach again: 30 s, not twice the last wait
    callback.on_trial_result(0, [], t2, {"step": 6, "eval_loss": 0.9, "timestamp": 2})
    assert callback.quiet_s == 30.0 and callback.quiet_until == now[0] + 30
    now[0] += 31
    link.refuse = {"*"}  # an answer: the next time it is away waits 30 s again
    callback.on_trial_result(0, [], t2, {"step": 7, "eval_loss": 0.8, "timestamp": 3})
    assert callback.quiet_s == 0.0 and not callback.quiet()
    link.refuse = set()
    callback.on_trial_result(0, [], t2, {"step": 8, "eval_loss": 0.7, "timestamp": 4})
    assert callback.quiet_s == 30.0
    tracking_requests.callback_failures(reset=True)


def test_a_start_whose_runs_cannot_be_read_still_makes_its_trials_runs(
    mlflow_store: tuple[Any, str], tmp_path: Path
) -> None:
    """A server that answers the search's read of its runs with a refusal (not out of reach):
    each trial's run is made all the same (the finish finds runs by their tag)."""
    from raysft.config import validate_tree
    from raysft.search import tracking, tracking_requests

    mlc, _ = mlflow_store
    exp_id = mlc.create_experiment("refused-read")
    parent = mlc.create_run(exp_id).info.run_id
    link = OutOfReach(mlc)
    link.down, link.refuse = False, {"search_runs"}
    callback = make_callback(
        link, exp_id=exp_id, parent_id=parent,
        resolve_trial=lambda trial_id, sampled: validate_tree({}),
        ended_file=tmp_path / tracking.ENDED_FILE,
    )  # fmt: skip
    tracking_requests.callback_failures(reset=True)
    callback.setup()
    (trial,) = _start_trials(callback, "t1")
    assert mlc.get_run(callback.runs["t1"]).data.tags["raysft.trial_id"] == "t1"
    assert not callback.quiet() and callback.unstarted == set()
    failures = tracking_requests.callback_failures(reset=True)
    assert [f.split(": ")[1] for f in failures] == ["reading the search's trial runs"]


def test_each_trials_end_is_noted_in_the_experiment_dir_too(
    mlflow_store: tuple[Any, str], tmp_path: Path
) -> None:
    """MLflow's status tag may not be written (a tracking server away): the end noted beside
    the search tells a finished trial from one torn down by Ctrl-C (interrupt.with_local_ends)."""
    from raysft.config import validate_tree
    from raysft.search.tracking import ENDED_FILE, ended_trials

    mlc, exp_id = mlflow_store
    cfg = validate_tree({"train": {"max_steps": 10, "eval_every": 5}})
    ended_file = tmp_path / ENDED_FILE
    callback = _trial_callback(mlc, exp_id, cfg, ended_file)
    done, stopped, failed = _start_trials(callback, "done", "stopped", "failed")
    callback.on_trial_result(0, [], done, {"step": 10, "eval_loss": 1.0, "timestamp": 1})
    callback.on_trial_result(0, [], stopped, {"step": 5, "eval_loss": 2.0, "timestamp": 1})
    callback.on_trial_complete(0, [], done)
    callback.on_trial_complete(0, [], stopped)
    callback.on_trial_error(0, [], failed)
    with ended_file.open("a", encoding="utf-8") as fh:
        fh.write('{"trial_id": "cut')  # a line a kill cut short is passed over
    assert ended_trials(ended_file) == {
        "done": "finished", "stopped": "stopped_early", "failed": "failed"
    }  # fmt: skip


def test_a_server_found_out_of_reach_after_the_trials_is_asked_once_from_then_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a Ctrl-C the driver closes each open trial run and the parent: at the search's
    figures (3 retries of up to 30 s each) that is minutes per run on a server known to be out
    of reach since reading the trial runs."""
    import requests

    from raysft.search import tracking_requests
    from raysft.search.interrupt import known_trial_runs

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # the search's
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    class Gone:
        def search_runs(self, *args: Any, **kwargs: Any) -> None:
            raise requests.exceptions.ConnectionError("Connection refused")

    callback = SimpleNamespace(runs={"t1": "r1"}, status={})
    failures: list[str] = []
    known, unreachable = known_trial_runs(Gone(), "1", "p", callback, failures)
    assert known == {"t1": ("r1", None)}
    assert unreachable == "MLflow: reading the search's trial runs"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    tracking_requests.callback_failures(reset=True)
