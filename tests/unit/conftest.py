"""Fixtures shared by the data/config unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MLFLOW_REQUEST_VARIABLES = tuple(
    f"MLFLOW_HTTP_REQUEST_{name}" for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT")
)


@pytest.fixture(autouse=True)
def _mlflow_request_variables() -> Iterator[None]:
    """MLflow's request variables back as they were after each test: a search's driver sets
    them for its whole process (``tracking_requests.bound_retries``, a failure of the trials'
    callback), and a test that runs its code would leave them to the tests after it."""
    saved = {name: os.environ.get(name) for name in MLFLOW_REQUEST_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tok() -> Any:
    """The embedded byte-level tokenizer (id == byte, plus <s> </s> <pad> <unk> ChatML tokens)."""
    from raysft.assets.tokenizer import build_tokenizer

    return build_tokenizer()


def _uses_cli_runs(item: pytest.Item) -> bool:
    return "cli_runs" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """test_cli's subprocess runs take seconds each (they import torch and peft): its tests that
    check them go last, so the runs overlap with every other test instead of being waited for."""
    items[:] = [i for i in items if not _uses_cli_runs(i)] + [i for i in items if _uses_cli_runs(i)]


_STARTED: list[Any] = []  # the test_cli module, once its runs are started


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start those runs as soon as the selected tests are known (unless none will run)."""
    opt = session.config.option
    if opt.collectonly or (session.testsfailed and not opt.continue_on_collection_errors):
        return
    for item in session.items:
        if _uses_cli_runs(item):
            item.module.start_cli_runs()  # type: ignore[attr-defined]
            _STARTED.append(item.module)  # type: ignore[attr-defined]
            return


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Interrupted or not, leave no test_cli subprocess behind."""
    for module in _STARTED:
        module.stop_cli_runs()


@pytest.fixture(autouse=True)
def _promotion_locks_of_the_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Promotion locks (``promotion_lock._lock_path``: the user's cache dir) in the test's own
    dir."""
    from raysft.search import promotion_lock

    real = promotion_lock._lock_path
    monkeypatch.setattr(
        promotion_lock, "_lock_path", lambda mlc, name: tmp_path / "locks" / real(mlc, name).name
    )
