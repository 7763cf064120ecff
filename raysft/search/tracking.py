"""MLflow: one parent run per search, one nested child run per trial.

Only the driver talks to MLflow (through a Tune callback fed by trial results,
``raysft.search.callback``, and at the search's finish), so workers need no tracking
credentials and a SQLite store never sees concurrent writers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raysft.config import Config, SearchSpec, TrackingSection, flat_paths
from raysft.environ import environ
from raysft.errors import chain, one_line
from raysft.paths import writable_dir_problem
from raysft.train.metrics import METRICS, REPLAYED, objective_mode

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
STATUS_TAG = "raysft.status"  # a TrialStatus value
# MLflow 3 opens an experiment without this tag on its GenAI overview (traces); this value
# marks it as model training, so the UI opens on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (markdown)
PROMOTION_TAG = "raysft.promotion"  # the parent run's promotion record (JSON)
# Short names in run names and plots; any other path goes by its last segment.
SHORT_NAMES = {
    "train.learning_rate": "lr",
    "lora.r": "r",
    "lora.alpha": "alpha",
    "train.neftune_alpha": "neft",
}
# (trial_id, sampled values) -> that trial's own resolved config
TrialResolver = Callable[[str, dict[str, Any]], Config]


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


# Redaction rule. A param is secret when the LAST WORD of its LAST dotted segment (words split at
# "_" and "-", case-insensitive) is one of SECRET_WORDS: hf_token, api_key, password, secret,
# aws_secret_access_key, token. Not secret: train.max_new_tokens, train.tokens (last word
# "tokens"), lora.target_modules, token_count. Any value is also scrubbed of the driver's HF_TOKEN,
# of Hugging Face tokens (hf_ + 30 or more letters/digits), of a URL's user info (user:PASS@host,
# :TOKEN@host, TOKEN@host: the whole of it, as a token may stand where a user name does) and of
# secret query values (?token=, ?sig=, ?X-Amz-Signature=).
SECRET_WORDS = frozenset(
    {"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials"}
)
REDACTED = "***"
_HF_TOKEN_TEXT = re.compile(r"hf_[A-Za-z0-9]{30,}")
# scheme:// then a user (no "/", "?", "#") and perhaps ":password" (which may hold a "/", as AWS
# secret keys do), up to the "@" before the host. The user is kept beside a password (the
# message then says whose), hidden without one (it may be a token).
# Not a port and a path ("host:5000/models/a@v2"), nor an IPv6 host ("[::1]:5000/x@y").
_URL_USERINFO = re.compile(r"(\w[\w+.-]*://)([^/?#@\s:\[\]]*)(:(?!\d+(?:/|$))[^@\s]*)?@")
_QUERY_VALUE = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#\s]*)")
_QUERY_SECRETS = ("sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token")


def is_secret(name: str) -> bool:
    """True for a param name the redaction rule (above) calls secret."""
    words = re.split(r"[_\-]", name.rsplit(".", 1)[-1].lower())
    return words[-1] in SECRET_WORDS


def redact_tree(tree: Any, prefix: str = "") -> Any:
    """A nested config with every value ``redact`` would hide hidden (for summary.json)."""
    if isinstance(tree, dict):
        return {k: redact_tree(v, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, str):
        return redact(prefix.rstrip("."), tree)
    if is_secret(prefix.rstrip(".")) and tree is not None:
        return REDACTED
    return tree


def redact(name: str, value: str) -> str:
    """``value`` as it may be logged under ``name``: REDACTED for a secret name, else scrubbed."""
    if is_secret(name):
        return REDACTED
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        token = os.environ.get(var)
        if token and len(token) >= 8:  # a short value would scrub ordinary text
            value = value.replace(token, REDACTED)
    value = _HF_TOKEN_TEXT.sub(REDACTED, value)
    value = _URL_USERINFO.sub(_userinfo, value)
    return _QUERY_VALUE.sub(_query_value, value)


def _userinfo(match: re.Match[str]) -> str:
    scheme, user, password = match.groups()
    return f"{scheme}{user}:{REDACTED}@" if password else f"{scheme}{REDACTED}@"


def _query_value(match: re.Match[str]) -> str:
    sep, key, value = match.groups()
    secret = is_secret(key) or key.lower() in _QUERY_SECRETS
    return f"{sep}{key}={REDACTED if secret and value else value}"


def scrubbed(err: BaseException) -> str:
    """An exception on one line, as it may be logged, written to summary.json or tagged: MLflow's
    and HTTP libraries' messages carry the request's whole address, credentials included."""
    return redact("error", one_line(err))


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``a.b.c: value`` params (MLflow params are strings, <= 6000 chars),
    secrets redacted (``redact``)."""
    return {
        name: redact(name, str(value))[:6000] for name, value in flat_paths(tree, prefix).items()
    }


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


# MLflow retries an HTTP request for minutes (7 times, with backoff): the store check before
# Ray starts asks once, and so does the whole process once the trials' callback has failed.
_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 0, "MLFLOW_HTTP_REQUEST_TIMEOUT": 10}
# A search's driver asks 3 more times: at once, then after about 2 and 4 s (urllib3's schedule,
# plus MLflow's jitter), and what a failed call could not write is written at the finish
# (``complete_trial_run``) or by --resume. A value set in the environment is kept. Each waits up
# to 30 s for an answer, not MLflow's 120: a server that takes connections and never answers (a
# hung process, packets dropped on the way) held the trials 8 minutes at a time. An artifact
# upload is not cut short: the wait is for the server's next bytes.
_SEARCH_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# The trials' callback asks less of a server: every trial's report waits for Tune's loop, where
# it runs. Its requests wait 10 s for an answer and are retried once: about 20 s on a server that
# takes connections and never answers, against 127 s at the figures above (Tune's log, on a
# frozen server). A lower value in the environment is kept. After its first failure the whole
# process asks once (``note_callback_failure``); what the callback could not write, the finish
# writes.
_CALLBACK_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 1, "MLFLOW_HTTP_REQUEST_TIMEOUT": 10}
# After the trials' callback finds the tracking server out of reach, it leaves MLflow alone
# for this long, then asks again; each failure again doubles the wait, up to the last figure.
QUIET_S = (30.0, 300.0)


def out_of_reach(err: BaseException) -> bool:
    """Whether an MLflow error is the tracking server not answering (refused, timed out,
    retries spent on 5xx answers), as opposed to a request it answered and refused (an
    ``HTTPError``: an artifact upload's 4xx, for one)."""
    from requests.exceptions import HTTPError, RequestException

    return any(isinstance(e, RequestException) and not isinstance(e, HTTPError) for e in chain(err))


def not_tried(found_by: str) -> str:
    """Why a finish step did not ask MLflow: ``found_by`` found the tracking server out of
    reach earlier in the same finish."""
    return f"not tried (the tracking server was out of reach at: {found_by})"


def bound_retries() -> None:
    """This process's MLflow requests retried as a search's are (``_SEARCH_RETRIES``)."""
    for name, value in _SEARCH_RETRIES.items():
        os.environ.setdefault(name, value)


def _capped(caps: dict[str, int]) -> dict[str, str]:
    """Each of MLflow's request variables in ``caps`` at most its cap: a lower value already in
    the environment is kept, an unset one gets the cap."""
    out = {}
    for name, cap in caps.items():
        try:
            out[name] = str(min(int(os.environ.get(name) or cap), cap))
        except ValueError:  # MLflow would refuse it at the request: its own message then
            continue
    return out


def _cap_environ(caps: dict[str, int]) -> None:
    """``_capped`` in the process's environment."""
    os.environ.update(_capped(caps))


def _capped_environ(caps: dict[str, int]) -> contextlib.AbstractContextManager[None]:
    """``_cap_environ`` for the block; the process's values are back after it."""
    return environ(_capped(caps))


def callback_requests() -> contextlib.AbstractContextManager[None]:
    """MLflow's requests in the block retried and timed as the trials' callback's are
    (``_CALLBACK_REQUESTS``, or the process's values where lower); the process's values are back
    after it. MLflow reads them at each request. Tune's loop, in the driver's main thread, is the
    only MLflow caller while trials run, so no other request sees them."""
    return _capped_environ(_CALLBACK_REQUESTS)


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
        with _capped_environ(_FAST):
            client(uri).search_experiments(max_results=1)
    except Exception as err:
        return f"cannot use this MLflow store ({_clipped(scrubbed(err), 300)})"
    return None


def deleted_experiment(uri: str, name: str) -> str | None:
    """Why the search cannot log to experiment ``name``, or None: one deleted in the UI stays in
    MLflow's trash under its name, and MLflow refuses every new run in it (after Ray started,
    were it not asked before)."""
    local = local_store(uri)
    if local is not None and not local.exists():  # a new store: no experiment, and none made
        return None
    try:
        with _capped_environ(_FAST):
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
        with _capped_environ(_FAST):
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


def _clipped(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: cut at a space (a word or URL cut in the
    middle reads as another), the cut marked with "…"."""
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    if " " in head[limit // 2 :]:  # else one long word: cut inside it
        head = head.rsplit(" ", 1)[0]
    return head.rstrip() + "…"


def experiment_id(mlc: Any, name: str, *, uri: str | None = None) -> str:
    """The experiment's id, created if new; marked as model training unless its kind is set,
    and described (``experiment_note``) unless it has a description. ``uri``: the tracking
    store, whose artifacts a new experiment keeps beside it (``artifact_root``)."""
    exp = mlc.get_experiment_by_name(name)
    if exp is None:
        exp_id = str(
            mlc.create_experiment(
                name,
                artifact_location=artifact_root(uri) if uri else None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        )
        mlc.set_experiment_tag(exp_id, NOTE_TAG, experiment_note(exp_id))
        return exp_id
    exp_id = str(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older raysft or by hand
        mlc.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if NOTE_TAG not in exp.tags:  # a user's own description is kept
        mlc.set_experiment_tag(exp_id, NOTE_TAG, experiment_note(exp_id))
    return exp_id


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


def experiment_note(exp_id: str) -> str:
    """The experiment's description: MLflow 3.17's UI ignores the kind tag and opens it on its
    GenAI overview (``runs_page``), so the description says how to reach the runs."""
    runs = f"#/experiments/{exp_id}/runs?workflowType=machine_learning"
    # The UI shows the first line alone until the description is unfolded: what to do first.
    return (
        f"Training runs, not traces: [open the runs]({runs}), or set the sidebar's switch to "
        "**Model training** (once per browser).\n\n"
        "Hyperparameter searches by raysft: one parent run per search, its trials nested under "
        "it, named by their sampled values."
    )


def short_name(path: str) -> str:
    return SHORT_NAMES.get(path, path.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
    """2 significant digits for floats (``3.2e-3``, ``0.05``); anything else as written."""
    if not isinstance(value, float) or value == 0 or not math.isfinite(value):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if 1e-2 <= abs(value) < 100:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def run_name(sampled: dict[str, Any], order: Sequence[str] = ()) -> str:
    """A trial's sampled values as a run name: ``lr=3.2e-3 r=8 alpha=16 neft=5``.

    ``order`` (the spec's parameter order) comes first: Tune moves products to the end.
    """
    keys = [k for k in order if k in sampled] + [k for k in sampled if k not in order]
    # A searched secret (unlikely, but a name is logged like a param) shows as REDACTED.
    return " ".join(f"{short_name(k)}={redact(k, format_value(sampled[k]))}" for k in keys)[:250]


def config_params(cfg: Config) -> dict[str, str]:
    """A trial's resolved config as MLflow params (search, tracking, promote: the parent's)."""
    return flatten(cfg.model_dump(mode="json", exclude={"search", "tracking", "promote"}))


def trial_params(resolve: TrialResolver, trial_id: str, sampled: dict[str, Any]) -> dict[str, str]:
    """A trial run's params: its own resolved config, and its sampled values again under
    ``sampled.*`` to tell the searched ones apart."""
    return {
        **config_params(resolve(trial_id, sampled)),
        **{f"sampled.{k}": str(v) for k, v in sampled.items()},
    }


def start_parent(mlc: Any, exp_id: str, *, name: str, cfg: SearchSpec, spec_path: str) -> str:
    run = mlc.create_run(exp_id, run_name=name, tags={"raysft.kind": "search"})
    rid = run.info.run_id
    params = flatten(cfg.model_dump(mode="json", exclude={"search"}))
    params.update(
        {f"search.{k}": v for k, v in flatten(cfg.search.model_dump(mode="json")).items()}
    )
    log_params(mlc, rid, params)
    mlc.log_artifact(rid, spec_path, artifact_path="spec")
    return rid


def describe_parent(mlc: Any, parent_id: str, summary: dict[str, Any]) -> str:
    """The parent run's description (the UI's "Description"): best trial, metric, promotion."""
    text = describe(summary)
    mlc.set_tag(parent_id, NOTE_TAG, text)
    return text


def describe(summary: dict[str, Any]) -> str:
    """summary.json in three markdown lines: best trial, trial counts, promotion outcome."""
    metric, best = summary["metric"], summary.get("best")
    counts = summary.get("counts") or {}
    if best is None:
        head = f"No trial reported a finite `{metric}`: nothing to promote."
    else:
        order = list((summary.get("resolved_spec") or {}).get("search", {}).get("params", {}))
        step = f" at step {best['step']} of {best['max_steps']}" if best.get("step") else ""
        better = "lower" if objective_mode(metric, summary.get("mode")) == "min" else "higher"
        head = (
            f"Best trial: **{run_name(best['sampled'], order)}** "
            f"(trial `{best['trial_id']}`, {best['status'].replace('_', ' ')}{step}): "
            f"**{metric} = {best['metric']:.4g}** ({better} is better)."
        )
    tally = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n)
    parts = [head, f"Trials: {tally or 'none'}.", _promotion_line(summary)]
    table = _trials_table(summary)
    return "\n\n".join([*parts, table] if table else parts)


_TABLE_ROWS = 20  # trials listed in the parent's description, best first
_TABLE_CHARS = 5000  # and fewer if their names are long: MLflow caps a tag at 8000 characters


def _trials_table(summary: dict[str, Any]) -> str:
    """The ranked trials as a markdown table, each name a link to its run: the runs table
    folds the trials under the parent and shows no metric until columns are picked."""
    rows = summary.get("trials") or []
    if not rows:
        return ""
    metric = summary["metric"]
    order = list((summary.get("resolved_spec") or {}).get("search", {}).get("params", {}))
    exp_id = (summary.get("mlflow") or {}).get("experiment_id")
    lines = [f"| # | trial | status | step | {metric} |", "|---|---|---|---|---|"]
    listed = 0
    for i, row in enumerate(rows[:_TABLE_ROWS], 1):
        if sum(map(len, lines)) > _TABLE_CHARS:
            break
        listed = i
        name = run_name(row["sampled"], order).replace("|", "/")
        if exp_id and row.get("mlflow_run_id"):
            name = f"[{name}](#/experiments/{exp_id}/runs/{row['mlflow_run_id']})"
        value = row.get("metric")
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
        step = f"{row['step']}/{row['max_steps']}" if row.get("step") is not None else "-"
        lines.append(f"| {i} | {name} | {row['status'].replace('_', ' ')} | {step} | {shown} |")
    if len(rows) > listed:
        lines.append(f"\n{len(rows) - listed} more in summary.json.")
    return "\n".join(lines)


def trial_note(row: dict[str, Any], *, metric: str, scheduler: str, best: bool) -> str:
    """A trial run's description (the UI's "Description"): how it ended, at which step, with
    which value; an ASHA stop said to be one, not a failure."""
    step, of = row.get("step"), row["max_steps"]
    at = f"at step {step} of {of}" if step is not None else f"before its first eval (of {of} steps)"
    value = row.get("metric")
    scored = f"{metric} {value:.4g}" if value is not None else f"no finite {metric}"
    status = row["status"]
    if status == "finished":
        text = f"Finished {at}: {scored}."
    elif status == "stopped_early":
        text = (
            f"Stopped early by the {scheduler} scheduler {at}: {scored} at its last eval. "
            "Not a failure: the scheduler gave its steps to more promising trials."
        )
    elif status == "diverged":
        text = f"Diverged {at}: a non-finite metric; stopped at once, never ranked."
    else:
        cause = (row.get("error") or "no error recorded").strip().splitlines() or [""]
        text = f"Failed {at}: {_clipped(cause[-1], 300)} (tag `raysft.error`: the whole error)."
    return f"**The search's best trial.** {text}" if best else text


def _promotion_line(summary: dict[str, Any]) -> str:
    p = summary.get("promotion") or {}
    if p.get("promoted"):
        return (
            f"Promotion: **promoted** as `{p['registered_model']}` v{p['version']} "
            f"(alias `{p['alias']}`): {p.get('reason', '')}."
        )
    return f"Promotion: **not promoted**: {p.get('reason', 'promotion did not run')}."


def log_params(mlc: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact(k, v)) for k, v in params.items()]  # flatten's, and sampled.*
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlc.log_batch(run_id, params=items[i : i + 100])


# A trials' callback pickled by a search begun before 2026-12-06 (Tune's state, unpickled by
# --resume) calls this module's functions by their names then.
_log_params = log_params


def metric_points(record: dict[str, Any]) -> list[Any]:
    """Every finite registry metric of one trial report as MLflow points, at the report's own
    step and time (``timestamp``, in seconds)."""
    from mlflow.entities import Metric

    step = int(record.get("step", 0))
    ts = int(record.get("timestamp", 0) * 1000)
    return [
        Metric(k, float(v), ts, step)
        for k, v in record.items()
        if k in METRICS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    ]


def log_metrics(mlc: Any, run_id: str, result: dict[str, Any]) -> None:
    """Every registry metric in a trial's result, at the trial's own step. (What the trials'
    callback of a search begun before 2026-12-06 calls, by name, after --resume.)"""
    log_records(mlc, run_id, [result])


def log_records(mlc: Any, run_id: str, records: Sequence[dict[str, Any]]) -> None:
    """Every registry metric of ``records`` (one per step), in as few requests as MLflow takes
    (a report carries the steps since the last one)."""
    points = [m for record in records for m in metric_points(record)]
    for i in range(0, len(points), 1000):  # MLflow caps a batch at 1000 metrics
        mlc.log_batch(run_id, metrics=points[i : i + 1000])


def report_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A trial's report as its records, in step order: the earlier ones it carries
    (``REPLAYED``: its steps since the last report, a resumed trial's replay), then its own."""
    own = {k: v for k, v in report.items() if k != REPLAYED}
    return [*(report.get(REPLAYED) or []), own]


def trial_history(lines: Sequence[str]) -> list[dict[str, Any]]:
    """A trial's reports (Tune's ``result.json``, one JSON object per line), with the earlier
    records each carries (``REPLAYED``), as ``{step, timestamp, registry metrics}`` per step in
    step order; a step reported twice (a restart from an earlier checkpoint) keeps its latest."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            report = json.loads(line)
        except ValueError:  # empty, or cut short by a kill while Tune wrote it
            continue
        ts = report.get("timestamp", 0)
        # A report's earlier records: its steps since the last one, a resumed trial's replay.
        for record in report_records(report):
            if not isinstance(record.get("step"), int):
                continue
            kept = {k: v for k, v in record.items() if k in METRICS}
            by_step[record["step"]] = {"step": record["step"], "timestamp": ts, **kept}
    return [by_step[step] for step in sorted(by_step)]


def complete_trial_run(
    mlc: Any,
    *,
    exp_id: str,
    parent_id: str,
    run_id: str | None,
    trial_id: str,
    name: str,
    params: Callable[[], dict[str, str]],
    history: Sequence[dict[str, Any]],
    status: str,
    mlflow_status: str,
) -> tuple[str, int]:
    """Make a trial's MLflow run whole after its trial ended: the run (made if the trials'
    callback could not make it), its params, every metric point of ``history`` it lacks, its
    status. The callback writes these as the trial runs; a tracking server out of reach then
    leaves gaps, filled here (or by a later ``--resume``). Returns the run id and the number of
    points and fields written; writes nothing to a run that is whole."""
    written = 0
    if run_id is None:  # none known to the driver: one may be there all the same
        same = mlc.search_runs(
            [exp_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent_id}' and tags.raysft.trial_id = '{trial_id}'"
            ),
            max_results=1,
        )
        run_id = same[0].info.run_id if same else None
    if run_id is None:
        run_id = mlc.create_run(
            exp_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": parent_id,
                "raysft.kind": "trial",
                "raysft.trial_id": trial_id,
            },
        ).info.run_id
        written += 1
    run = mlc.get_run(run_id)
    missing_params = {k: v for k, v in params().items() if k not in run.data.params}
    if missing_params:
        log_params(mlc, run_id, missing_params)
        written += len(missing_params)
    keys = sorted({k for record in history for k in record if k in METRICS})
    have = {k: {int(m.step) for m in mlc.get_metric_history(run_id, k)} for k in keys}
    points = [m for record in history for m in metric_points(record) if m.step not in have[m.key]]
    for i in range(0, len(points), 1000):  # MLflow caps a batch at 1000 metrics
        mlc.log_batch(run_id, metrics=points[i : i + 1000])
    written += len(points)
    if run.data.tags.get(STATUS_TAG) != status:
        mlc.set_tag(run_id, STATUS_TAG, status)
        written += 1
    if run.info.status != mlflow_status:
        mlc.set_terminated(run_id, mlflow_status)
        written += 1
    return run_id, written


def trial_runs(mlc: Any, exp_id: str, parent_id: str) -> dict[str, tuple[str, str | None]]:
    """trial_id -> (run id, status tag) of the child runs a search has in MLflow so far."""
    runs = mlc.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    return {
        r.data.tags["raysft.trial_id"]: (r.info.run_id, r.data.tags.get(STATUS_TAG))
        for r in runs
        if "raysft.trial_id" in r.data.tags
    }


# What the trials' callback could not write to MLflow, kept here (not on the callback): after
# --resume Tune drives the copy of the callback it pickled when the search began, which the
# driver never sees; a module-level function is pickled by reference and reaches this list.
_CALLBACK_FAILURES: list[str] = []
_CALLBACK_FAILURES_SHOWN = 5  # listed one by one; the rest counted


def note_callback_failure(line: str) -> None:
    """Note one failed MLflow write of the callback. After the first, MLflow asks once per call
    (no retries, ``_FAST``; lower figures in the environment stay): a server down for good would
    otherwise hold every report, and the trials with it (a trial's report waits for Tune's loop),
    and the finish would spend the search's retries on each of its steps."""
    _cap_environ(_FAST)
    _CALLBACK_FAILURES.append(line)


def callback_failures(*, reset: bool = False) -> list[str]:
    """The callback's failed MLflow writes since the last reset, the first few by name and the
    rest counted; ``reset`` empties the record (a search's start)."""
    lines = list(_CALLBACK_FAILURES[:_CALLBACK_FAILURES_SHOWN])
    more = len(_CALLBACK_FAILURES) - len(lines)
    if more > 0:
        lines.append(f"MLflow: {more} more of the trials' records not written (see the log)")
    if reset:
        _CALLBACK_FAILURES.clear()
    return lines


# In the experiment dir: each trial's end as the trials' callback saw it, one JSON line per end.
# MLflow's status tags say the same, but a tracking server out of reach when a trial ended would
# make a finished trial look torn down by Ctrl-C (``driver.interrupted_trials``).
ENDED_FILE = "trials_ended.jsonl"
# Beside it while some write of the trials' callback has failed and the finish has not made the
# trials' runs whole since (``finish.complete_trial_runs``): it then checks every trial's run,
# else only the runs with no end status.
GAPS_FILE = "mlflow_gaps"


def note_trial_end(path: Path, trial_id: str, status: str) -> None:
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"trial_id": trial_id, "status": status}) + "\n")
    except OSError as err:  # MLflow's tag is then the only record
        log.warning("could not note trial %s's end in %s: %s", trial_id, path, err)


def ended_trials(path: Path) -> dict[str, str]:
    """trial_id -> status of every trial end noted in ``path`` (the last one counts)."""
    if not path.is_file():
        return {}
    ended = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            ended[record["trial_id"]] = record["status"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    return ended
