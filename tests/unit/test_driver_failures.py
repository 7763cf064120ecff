"""A search that stops between its parent run and the end of Tune's run: no MLflow run left
RUNNING, and the next step it names is one raysft accepts. Ray is not started (``_connect`` is
stubbed); MLflow is a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from raysft.errors import ConfigError, SearchStateError
from raysft.search import driver, experiment
from raysft.search.spec import validate_spec

ROOT = Path(__file__).resolve().parents[2]


class _Plan:
    concurrent = 1


@pytest.fixture
def search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """(spec path, tree, cfg, MLflow client) of lora.yaml tracked in a SQLite store, Ray
    stubbed out. The process-wide MLflow URI (the driver's client sets it) is put back."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tree = yaml.safe_load((ROOT / "search_spaces" / "lora.yaml").read_text(encoding="utf-8"))
    tree["search"]["experiment_dir"] = str(tmp_path / "exp")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tree["tracking"]["uri"] = uri
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tree), encoding="utf-8")
    monkeypatch.setattr(driver, "_connect", lambda *a, **k: _Plan())
    before = mlflow.get_tracking_uri()
    yield str(spec), tree, validate_spec(tree, source=str(spec)), MlflowClient(uri)
    mlflow.set_tracking_uri(before)


def _statuses(mlc: Any) -> dict[str, str]:
    ids = [e.experiment_id for e in mlc.search_experiments()]
    return {r.info.run_name: r.info.status for r in mlc.search_runs(ids)}


def test_a_ctrl_c_before_tune_saved_the_search_kills_its_run_and_says_run_it_again(
    search: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted once its parent run exists but before Tune saved anything (no tune/): the
    parent run is KILLED (it was left RUNNING), and the CLI's line says to run the command
    again: ``--resume``, which it said before, is refused there."""
    spec, tree, cfg, mlc = search

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "build_tuner", interrupted)
    with pytest.raises(KeyboardInterrupt) as err:
        driver.run_search(spec, tree, cfg, resume=False)
    exp_dir = Path(cfg.search.experiment_dir).resolve()
    assert str(err.value) == (
        "no trial had started: run the same command again, without --resume "
        f"(search.experiment_dir {exp_dir})"
    )
    assert _statuses(mlc) == {"exp": "KILLED"}
    with pytest.raises(SearchStateError, match="no search to resume"):
        experiment.check_experiment_dir(spec, cfg, resume=True)
    # The command it names is accepted.
    assert experiment.check_experiment_dir(spec, cfg, resume=False) == exp_dir


def test_a_failed_run_of_tune_closes_the_trial_runs_it_left_open(
    search: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Tune's run raised (Ray's control store lost, ...) with one trial's run open and one
    closed: the open one is marked FAILED with the parent, the closed one keeps its status,
    and the log says --resume (Tune had saved the search)."""
    spec, tree, cfg, mlc = search

    def fails(tree: Any, cfg: Any, plan: Any, exp_dir: Path, callback: Any, *a: Any, **k: Any):
        (exp_dir / "tune").mkdir()
        exp_id = mlc.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        for trial_id in ("open", "done"):
            callback.runs[trial_id] = mlc.create_run(exp_id, run_name=trial_id).info.run_id
        mlc.set_terminated(callback.runs["done"], "FINISHED")
        callback.status["done"] = "finished"
        raise RuntimeError("GcsRpcError: the control store is gone")

    monkeypatch.setattr(driver, "_run_trials", fails)
    with pytest.raises(RuntimeError, match="GcsRpcError"):
        driver.run_search(spec, tree, cfg, resume=False)
    assert _statuses(mlc) == {"exp": "FAILED", "open": "FAILED", "done": "FINISHED"}
    exp_dir = Path(cfg.search.experiment_dir).resolve()
    assert (
        f"the search failed before its trials ended; continue it with --resume "
        f"(search.experiment_dir {exp_dir})"
    ) in caplog.text


def test_a_parent_run_that_cannot_be_written_whole_is_one_error_and_not_left_running(
    search: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store answers, but the spec cannot be uploaded to its artifact store (no
    credentials for it, most often): one line naming tracking.uri, the run marked FAILED,
    and the experiment dir left as it was."""
    from mlflow.tracking import MlflowClient

    spec, tree, cfg, mlc = search

    def no_upload(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("Unable to locate credentials")

    monkeypatch.setattr(MlflowClient, "log_artifact", no_upload)
    with pytest.raises(ConfigError) as err:
        driver.run_search(spec, tree, cfg, resume=False)
    (line,) = err.value.lines()
    assert line == (
        f"{spec}: tracking.uri: {cfg.tracking.uri}: the search's parent run could not be "
        "written (OSError: Unable to locate credentials)"
    )
    assert _statuses(mlc) == {"exp": "FAILED"}
    assert not Path(cfg.search.experiment_dir).exists()


def test_an_experiment_that_cannot_be_set_up_once_ray_is_up_is_one_line_without_the_password(
    search: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store answered before Ray started, then refused (a read-only user on an experiment
    made by hand, a server gone): one line, and MLflow's message, which holds the request's
    address with its password, scrubbed."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    spec, tree, cfg, mlc = search

    def refused(self: Any, *args: Any, **kwargs: Any) -> None:
        raise MlflowException("API request to http://alice:s3cretpw@127.0.0.1:9/api failed: 403")

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", refused)
    with pytest.raises(ConfigError) as err:
        driver.run_search(spec, tree, cfg, resume=False)
    (line,) = err.value.lines()
    assert line == (
        f"{spec}: tracking.uri: {cfg.tracking.uri}: experiment 'raysft-lora' could not be read "
        "or set up (MlflowException: API request to http://alice:***@127.0.0.1:9/api failed: 403)"
    )


def test_a_parent_run_that_cannot_be_reopened_on_resume_is_one_line(tmp_path: Path) -> None:
    class Gone:
        def update_run(self, run_id: str, status: str) -> None:
            raise ConnectionError("http://bob:pw99@mlflow.example/api: Connection refused")

    with pytest.raises(ConfigError) as err:
        driver._parent_run(
            Gone(), "1", tmp_path, None, "s.yaml",  # type: ignore[arg-type]
            uri="http://bob:pw99@mlflow.example", state={"parent_run_id": "abc"},
        )  # fmt: skip
    assert err.value.lines() == [
        "s.yaml: tracking.uri: http://bob:***@mlflow.example: the parent run could not be "
        "reopened (ConnectionError: http://bob:***@mlflow.example/api: Connection refused)"
    ]
