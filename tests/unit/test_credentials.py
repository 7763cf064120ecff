"""Credentials: HF_TOKEN reaches the workers' runtime_env, never MLflow params; gated models say
that they need a token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysft.config import Config, validate_spec
from raysft.errors import ModelError
from raysft.search import tracking
from raysft.search.redact import REDACTED, flatten, is_secret, redact, scrubbed
from raysft.search.tracking import config_params
from raysft.train.hub import HUB_TOKEN_VAR, _has_hub_token, load_error, worker_env

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"

# transformers 5.x texts (utils/hub.py) and the hub's 401, as from_pretrained raises them.
GATED = (
    "You are trying to access a gated repo.\nMake sure to have access to it at "
    "https://huggingface.co/meta-llama/Llama-2-7b-hf.\n401 Client Error. (Request ID: x)"
)
GATED_HEAD = (
    "meta-llama/Llama-2-7b-hf is a gated repository. Make sure to request access at "
    "https://huggingface.co/meta-llama/Llama-2-7b-hf and pass a token having permission"
)
PRIVATE = (
    "acme/secret-model is not a local folder and is not a valid model identifier listed on "
    "'https://huggingface.co/models'\nIf this is a private repository, make sure to pass a token "
    "having permission to this repo either by logging in with `hf auth login` or by passing "
    "`token=<your_token>`"
)


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "name",
    [
        "hf_token",
        "tracking.token",
        "search.api_key",
        "db.password",
        "secret",
        "aws.secret_access_key",
        "x.HF-TOKEN",
        "apiKey",
    ],
)
def test_secret_names(name):
    assert is_secret(name)
    assert redact(name, "anything") == REDACTED


@pytest.mark.parametrize(
    "name",
    [
        "train.max_new_tokens",
        "train.tokens",
        "lora.target_modules",
        "token_count",
        "model.name_or_path",
        "sampled.lora.r/factor",
        "keyboard",
    ],
)
def test_ordinary_names_are_not_secret(name):
    assert not is_secret(name)
    assert redact(name, "32") == "32"


def test_values_are_scrubbed_of_tokens_and_url_passwords(monkeypatch):
    monkeypatch.setenv(HUB_TOKEN_VAR, "sekrit-value-123")
    assert redact("output_dir", "/runs/sekrit-value-123/x") == f"/runs/{REDACTED}/x"
    assert redact("note", f"used {TOKEN} here") == f"used {REDACTED} here"
    assert (
        redact("tracking.uri", "https://bob:pa55@mlflow.example:5000/")
        == f"https://bob:{REDACTED}@mlflow.example:5000/"
    )
    assert redact("tracking.uri", "http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("https://:tok3n@host/x", "https://:***@host/x"),  # no user name
        ("redis://:secretpw@h:6379", "redis://:***@h:6379"),
        ("s3://AKIA:wJalr/XUtnFEMI@bucket/k", "s3://AKIA:***@bucket/k"),  # "/" in the secret
        ("https://ghp_t0ken@github.com/x", "https://***@github.com/x"),  # a token as the user
        (
            "https://h/d.jsonl?sig=S1G&token=abc&max_tokens=5&X-Amz-Signature=f00",
            "https://h/d.jsonl?sig=***&token=***&max_tokens=5&X-Amz-Signature=***",
        ),
        ("https://h/path?e=a@b", "https://h/path?e=a@b"),  # an "@" after the host: kept
        ("http://host:5000/models/a@v2", "http://host:5000/models/a@v2"),  # a port, no password
        ("git+https://git.local:8443/o/r.git@v1.2", "git+https://git.local:8443/o/r.git@v1.2"),
        ("http://[::1]:5000/x@y", "http://[::1]:5000/x@y"),
        ("https://h/x?b=c;password=hunter2", "https://h/x?b=c;password=***"),
        ("/data/x@y.jsonl", "/data/x@y.jsonl"),
    ],
)
def test_every_shape_of_url_credential_is_scrubbed(value: str, logged: str) -> None:
    assert redact("data.train", value) == logged


def test_an_mlflow_error_is_scrubbed_wherever_it_is_written(tmp_path: Path) -> None:
    """MLflow's messages carry the request's address, password and all: the finish's failed
    steps (summary.json, logged to the parent run) and the log get it scrubbed."""
    from raysft.search.finish_steps import FinishSteps

    class Refused(Exception):
        pass

    def request() -> None:
        raise Refused("API request to http://alice:s3cretpw@127.0.0.1:9/api/2.0/x failed")

    steps = FinishSteps()
    steps.mlflow("MLflow: the best metric", request)
    assert steps.failures == [
        "MLflow: the best metric: Refused: API request to http://alice:***@127.0.0.1:9/api/2.0/x "
        "failed"
    ]
    assert "s3cretpw" not in scrubbed(Refused("see https://h/x?token=s3cretpw"))


def test_flatten_redacts_secret_leaves_only():
    params = flatten(
        {
            "hub": {"hf_token": TOKEN, "endpoint": "https://hf.co"},
            "train": {"max_new_tokens": 32},
            "lora": {"target_modules": ["q_proj"]},
        }
    )
    assert params == {
        "hub.hf_token": REDACTED,
        "hub.endpoint": "https://hf.co",
        "train.max_new_tokens": "32",
        "lora.target_modules": "['q_proj']",
    }


def test_logged_params_never_hold_the_token(monkeypatch, tmp_path):
    """Parent and trial params of a spec whose strings contain the token (a careless path)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(HUB_TOKEN_VAR, TOKEN)
    spec = validate_spec(
        {
            "output_dir": f"runs/{TOKEN}",
            "search": {
                "params": {"train.learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}
            },
        }
    )
    assert TOKEN not in json.dumps(config_params(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlc = MlflowClient(tracking_uri=uri)
    exp = mlc.create_experiment("t", artifact_location=str(tmp_path / "art"))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("search: {}\n")
    rid = tracking.start_parent(mlc, exp, name="p", cfg=spec, spec_path=str(spec_file))
    run = mlc.get_run(rid)
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert TOKEN not in logged
    assert run.data.params["output_dir"] == f"runs/{REDACTED}"


# ---------------------------------------------------------------- the token to the workers


def test_worker_env_passes_the_token_only_when_set():
    assert worker_env({HUB_TOKEN_VAR: TOKEN, "HOME": "/h"}) == {HUB_TOKEN_VAR: TOKEN}
    assert worker_env({"HUGGING_FACE_HUB_TOKEN": TOKEN}) == {"HUGGING_FACE_HUB_TOKEN": TOKEN}
    assert worker_env({"HOME": "/h"}) == {}
    assert worker_env({HUB_TOKEN_VAR: ""}) == {}


def test_worker_env_leaves_a_jobs_own_token_to_the_job():
    job = {"runtime_env": {"env_vars": {HUB_TOKEN_VAR: TOKEN}}}
    environ = {HUB_TOKEN_VAR: TOKEN, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    assert worker_env(environ) == {}  # ray.init would refuse the repeated key
    other = {"runtime_env": {"working_dir": "gcs://x.zip"}}
    environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(other)
    assert worker_env(environ) == {HUB_TOKEN_VAR: TOKEN}


@pytest.mark.parametrize("token", [TOKEN, None])
def test_init_ray_puts_the_token_in_the_runtime_env(monkeypatch, token):
    """ray.init is replaced here only to read its arguments: starting Ray is not a unit test."""
    import ray

    from raysft.search import ray_start

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_start, "attaching_to_cluster", lambda: False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        monkeypatch.setenv(HUB_TOKEN_VAR, token)
    else:
        monkeypatch.delenv(HUB_TOKEN_VAR, raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.delenv("RAY_CHDIR_TO_TRIAL_DIR", raising=False)
    monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/cache")  # the user's: kept, not passed
    ray_start.init_ray(2)
    (kwargs,) = calls
    env_vars = kwargs["runtime_env"].get("env_vars")
    local = {
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # a local Ray: nobody drains its node
        "RAY_CHDIR_TO_TRIAL_DIR": "0",  # trials read relative paths where the driver does
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",  # a trial granted no GPU sees none
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # Train's controller takes reports sooner
    }
    assert env_vars == ({HUB_TOKEN_VAR: token, **local} if token else local)
    assert "worker_process_setup_hook" in kwargs["runtime_env"]


# ---------------------------------------------------------------- gated models


@pytest.mark.parametrize("text", [GATED, GATED_HEAD, "401 Client Error: Unauthorized for url"])
def test_gated_model_without_token_says_it_needs_one(text):
    err = load_error(OSError(text), name="meta-llama/Llama-2-7b-hf", token_set=False)
    assert isinstance(err, ModelError)
    msg = str(err)
    assert msg.startswith("model.name_or_path: cannot load 'meta-llama/Llama-2-7b-hf': ")
    assert "needs a Hugging Face token: set HF_TOKEN" in msg


def test_gated_model_with_a_token_says_to_request_access():
    msg = str(load_error(OSError(GATED), name="meta-llama/Llama-2-7b-hf", token_set=True))
    assert "has no access to it: request access at https://huggingface.co/meta-llama" in msg
    assert "set HF_TOKEN" not in msg


def test_gated_cause_is_found_through_the_chain():
    try:
        try:
            raise RuntimeError("GatedRepoError: 401 Client Error")
        except RuntimeError as inner:
            raise OSError("could not load the model") from inner
    except OSError as err:
        msg = str(load_error(err, name="org/m", token_set=False))
    assert "needs a Hugging Face token" in msg and "(could not load the model)" in msg


def test_private_or_missing_repo_mentions_the_token_only_without_one():
    msg = str(load_error(OSError(PRIVATE), name="acme/secret-model", token_set=False))
    assert "not found on the Hugging Face Hub; if it is a private repo" in msg
    assert "set HF_TOKEN" in msg
    msg = str(load_error(OSError(PRIVATE), name="acme/secret-model", token_set=True))
    assert "HF_TOKEN" not in msg and "is not a local folder" in msg


def test_a_missing_repo_asked_without_a_token_is_not_called_gated():
    """The Hub answers a missing repo with 401 when asked without a token; transformers raises
    its OSError from huggingface_hub's RepositoryNotFoundError. A typo, not a gated model.
    (Stand-ins by name: huggingface_hub's need an HTTP response to be made.)"""

    class RepositoryNotFoundError(OSError):
        pass

    class GatedRepoError(RepositoryNotFoundError):  # as in huggingface_hub
        pass

    def chained(cause: Exception) -> OSError:
        try:
            try:
                raise cause
            except Exception as inner:
                raise OSError(PRIVATE) from inner
        except OSError as err:
            return err

    missing = chained(RepositoryNotFoundError("401 Client Error. Repository Not Found for url"))
    msg = str(load_error(missing, name="acme/typo-model", token_set=False))
    assert "not found on the Hugging Face Hub: check the id" in msg and "gated" not in msg
    msg = str(load_error(missing, name="acme/typo-model", token_set=True))
    assert "not found on the Hugging Face Hub, or the token (HF_TOKEN) has no access" in msg
    gated = chained(GatedRepoError("401 Client Error. Cannot access gated repo for url"))
    assert "gated or private" in str(load_error(gated, name="meta/llama", token_set=False))


def test_other_errors_keep_their_first_line():
    msg = str(load_error(OSError("no file named config.json\nmore"), name="d", token_set=False))
    assert msg == "model.name_or_path: cannot load 'd': no file named config.json"
    # ... unless the first line only opens a list, as a tokenizer dir without its files gives.
    listed = "Couldn't instantiate the tokenizer from one of: \n(1) a file, \n(2) a slow one."
    msg = str(load_error(ValueError(listed), name="d", token_set=False))
    assert msg == (
        "model.name_or_path: cannot load 'd': Couldn't instantiate the tokenizer from one of: "
        "(1) a file, (2) a slow one."
    )


def test_has_hub_token_reads_hf_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no login file
    for var in (HUB_TOKEN_VAR, "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    assert not _has_hub_token()
    monkeypatch.setenv(HUB_TOKEN_VAR, TOKEN)
    assert _has_hub_token()


def test_a_config_never_holds_the_token(monkeypatch):
    monkeypatch.setenv(HUB_TOKEN_VAR, TOKEN)
    assert TOKEN not in json.dumps(Config().model_dump(mode="json"))


def test_a_trials_error_and_attempts_are_scrubbed_before_summary_and_mlflow(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from raysft.search import tune_results
    from raysft.search.space import trial_output_dir
    from raysft.search.trial import ATTEMPTS_FILE

    leak = f"OSError: 401 for https://bob:s3cret@hub.example/m with token {TOKEN}"
    record = tmp_path / trial_output_dir(str(tmp_path), "t1") / ATTEMPTS_FILE
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps([{"attempt": 1, "error": leak, "retried": True}]))
    result = SimpleNamespace(
        metrics={"trial_id": "t1"}, path=str(tmp_path / "run_trial_on_ray_t1_1_x"),
        error=RuntimeError(leak), config={},
    )  # fmt: skip
    row = tune_results.result_of(result, tmp_path)
    for text in (row["error"], row["attempts"][0]["error"]):
        assert "s3cret" not in text and TOKEN not in text and REDACTED in text, text


def test_log_lines_and_their_tracebacks_are_scrubbed() -> None:
    """MLflow's errors hold the request's whole address: a warning logged with its traceback
    (undoing a registry version, -v's debug lines) would print a tracking URI's password."""
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from raysft.cli import setup_logging\n"
        "setup_logging()\n"
        "try:\n"
        "    raise RuntimeError('API request to http://alice:s3cretpw@h:5000/api failed')\n"
        "except RuntimeError:\n"
        "    logging.getLogger('raysft.x').warning('at https://bob:pw2@h/x', exc_info=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "s3cretpw" not in proc.stderr and "pw2" not in proc.stderr, proc.stderr
    assert "WARNING raysft.x: at https://bob:***@h/x" in proc.stderr
    assert "RuntimeError: API request to http://alice:***@h:5000/api failed" in proc.stderr
