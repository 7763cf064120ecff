"""The MLflow tracking store: its URI, a client, how to open its UI, where a new experiment
keeps its artifacts, and the checks that a search can use it, made before Ray starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raysft.config import SearchSpec, TrackingSection
from raysft.errors import ConfigError
from raysft.paths import writable_dir_problem
from raysft.search.notes import clipped
from raysft.search.redact import redact, scrubbed
from raysft.search.tracking_requests import FAST_REQUESTS, capped_environ

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(cfg: TrackingSection) -> str:
    """Spec, then $MLFLOW_TRACKING_URI, then a local SQLite file (absolute, so workers agree)."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def local_store(uri: str) -> Path | None:
    """The directory or file of a local MLflow store (``sqlite:///``, ``file:``, a plain path),
    resolved; None for a server (http, databricks, ...)."""
    if uri.startswith("sqlite:///"):  # ?timeout=30 and the like are SQLAlchemy's, not the path's
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file:").removeprefix("//")).resolve()
    if "://" in uri or ":" in uri.split("/", 1)[0] or uri.startswith("databricks"):
        return None
    return Path(uri).resolve()  # MLflow takes a plain path as a file store


def ui_command(uri: str, page: str = "") -> str:
    """How to see the runs; ``page`` (``runs_page``) is appended to the server's address."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page} in a browser"
    cmd = f"{_mlflow_command()} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"{cmd}, then open http://127.0.0.1:5000{page}" if page else cmd


def _mlflow_command() -> str:
    """``mlflow`` where the shell finds this Python's, else its path: a search run as
    ``.venv/bin/python -m raysft.tune`` (``make demo``) from a shell that did not activate the
    venv has no ``mlflow`` on its PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "mlflow"
    found = shutil.which("mlflow")
    if found is None and beside.is_file():
        return str(beside)
    return "mlflow"


def runs_page(exp_id: str, *, metric: str, mode: str) -> str:
    """The UI page of an experiment's runs, best trial first, trials unfolded.

    MLflow 3.17's UI ignores the experimentKind tag: a browser-wide GenAI / Model training
    switch (default GenAI) decides, and ``workflowType`` in the address overrides it. Sorting by a
    metric also lists the child runs flat instead of folded under their parent.
    """
    from urllib.parse import quote, urlencode

    query = {
        "workflowType": "machine_learning",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": "true" if mode == "min" else "false",
    }
    return f"/#/experiments/{exp_id}/runs?{urlencode(query, quote_via=quote)}"


def client(uri: str) -> Any:
    """An MLflow client of ``uri``, the process's tracking URI from now on. A SQLite file's
    missing folder is made (``sqlite:///runs/mlflow.db`` in a fresh checkout)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    store = local_store(uri) if uri.startswith("sqlite:") else None
    if store is not None and store.name != ":memory:":
        store.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def store_problem(uri: str) -> str | None:
    """Why a search could not track in ``uri``, found in seconds before Ray starts; None when it
    can. A local store is checked where it would be written (nothing is made: a search refused
    later leaves no store behind); any other is asked once, without retries."""
    store = local_store(uri)
    if store is not None:
        if not uri.startswith("sqlite:"):
            return writable_dir_problem(store)  # a file store: a directory
        if store.is_dir():
            return f"{store} is a directory, not a database file"
        if store.is_file():
            with store.open("rb") as fh:
                if store.stat().st_size and fh.read(16) != b"SQLite format 3\x00":
                    return f"{store} is not a SQLite database"
            return None if os.access(store, os.W_OK) else f"{store} is not writable"
        return writable_dir_problem(store.parent)
    try:
        with capped_environ(FAST_REQUESTS):
            client(uri).search_experiments(max_results=1)
    except Exception as err:
        return f"cannot use this MLflow store ({clipped(scrubbed(err), 300)})"
    return None


def deleted_experiment(uri: str, name: str) -> str | None:
    """Why the search cannot log to experiment ``name``, or None: one deleted in the UI stays in
    MLflow's trash under its name, and MLflow refuses every new run in it (after Ray started,
    were it not asked before)."""
    local = local_store(uri)
    if local is not None and not local.exists():  # a new store: no experiment, and none made
        return None
    try:
        with capped_environ(FAST_REQUESTS):
            exp = client(uri).get_experiment_by_name(name)
    except Exception:  # store_problem has just reached the store: what fails now fails later
        return None
    if exp is None or exp.lifecycle_stage != "deleted":
        return None
    return (
        f"{name} was deleted (MLflow keeps it in its trash and adds no run to it): restore it "
        f"(mlflow experiments restore --experiment-id {exp.experiment_id}), delete it for good "
        "(mlflow gc), or choose another tracking.experiment"
    )


def unusable_run(uri: str, run_id: str) -> str | None:
    """Why ``--resume`` cannot reopen the search's parent run ``run_id``, or None: one deleted
    in the UI (MLflow refuses to update it) or not in this store (purged, or another store)."""
    local = local_store(uri)
    missing = local is not None and not local.exists()  # asking would make a new, empty one
    try:
        if missing:
            raise FileNotFoundError(local)
        with capped_environ(FAST_REQUESTS):
            run = client(uri).get_run(run_id)
    except Exception as err:
        if not missing and getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            return None  # store_problem has just reached the store: what fails now fails later
        return (
            f"the search's parent run {run_id} is not in this MLflow store (deleted for good?): "
            "start the search anew in another search.experiment_dir"
        )
    if run.info.lifecycle_stage != "deleted":
        return None
    return (
        f"the search's parent run {run_id} was deleted (MLflow keeps it in its trash and updates "
        f"it no more): restore it (mlflow runs restore --run-id {run_id}), or start the search "
        "anew in another search.experiment_dir"
    )


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns`` beside the
    database file. MLflow's own default is ``./mlruns`` of the process's working directory,
    which under ``ray job submit`` is the job's temporary copy of ``--working-dir``: plots,
    adapters and registered models would go with it. None (MLflow's default) for a server,
    which has its own artifact store, and for a file store, which holds its artifacts."""
    if not uri.startswith("sqlite:///"):
        return None
    store = local_store(uri)
    return (store.parent / "mlruns").as_uri() if store is not None else None


def spec_store_error(spec_path: str, cfg: SearchSpec) -> ConfigError | None:
    """The error a search gives when its MLflow store cannot be used
    (``store_problem``: nothing is made, a server is asked once) or its experiment
    was deleted; None when it can."""
    uri = tracking_uri(cfg.tracking)
    unusable = store_problem(uri)
    if unusable is None:
        gone = deleted_experiment(uri, cfg.tracking.experiment)
        return None if gone is None else ConfigError(spec_path, [f"tracking.experiment: {gone}"])
    where = (
        "tracking.uri"
        if cfg.tracking.uri or "MLFLOW_TRACKING_URI" not in os.environ
        else "tracking.uri (from $MLFLOW_TRACKING_URI)"
    )
    redacted = redact("tracking_uri", uri)
    return ConfigError(spec_path, [f"{where}: {redacted}: {redact('error', unusable)}"])
