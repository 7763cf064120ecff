"""Where a model comes from: a local directory, an embedded asset or the Hugging Face Hub.

``from_pretrained`` turns a missing, unreachable or gated model into one ``ModelError``, and
reads the local cache at once where the Hub cannot be reached; the Hub token travels to every
Ray worker (``worker_env``) unless the Ray job passes its own.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raysft.assets import absolute_if_local, resolve
from raysft.config import ModelSection
from raysft.errors import ModelError, chain
from raysft.train import attention

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
HUB_TOKEN_VAR = "HF_TOKEN"  # read by huggingface_hub in every process that loads from the Hub
# Also read by huggingface_hub (its older name): forwarded to the workers like HF_TOKEN.
TOKEN_VARS = (HUB_TOKEN_VAR, "HUGGING_FACE_HUB_TOKEN")
# transformers' OSError texts for a gated repo, or the hub's HTTP 401 for a missing/bad token.
_GATED = re.compile(r"gated repo|\b401 client error|\bunauthorized\b", re.IGNORECASE)


def _resolve(spec: str) -> str:
    """``resolve``, and a local directory by its absolute path (``absolute_if_local``)."""
    return absolute_if_local(resolve(spec))


def from_pretrained(loader: Any, model_cfg: ModelSection, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with a missing, unreachable or gated model turned into a
    ModelError."""
    path = _resolve(model_cfg.name_or_path)
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        # Not a hub id: transformers would say "Repo id must be in the form ...".
        raise ModelError(
            f"model.name_or_path: cannot load {model_cfg.name_or_path!r}: no such directory"
        )
    if "Tokenizer" not in getattr(loader, "__name__", ""):  # an adapter dir keeps one
        _refuse_an_adapter(path, model_cfg.name_or_path)
    if kwargs.get("attn_implementation") == attention.SDPA_FP32:
        attention.register()
    from safetensors import SafetensorError  # a truncated or corrupt weights file

    # A hub id on a machine that cannot resolve the Hub: the local cache only, at once, where
    # huggingface_hub would retry for ~25 s (6 warnings) and then look there anyway.
    offline = None if Path(path).expanduser().exists() else hub_unreachable()  # why, if so
    if offline:
        kwargs = {**kwargs, "local_files_only": True}
        if hasattr(loader, "_model_mapping"):  # AutoModelFor*: transformers 5 does not pass
            # local_files_only on to its look for an adapter_config.json (which then retries)
            kwargs["adapter_kwargs"] = {
                **kwargs.get("adapter_kwargs", {}),
                "local_files_only": True,
            }
    try:
        return loader.from_pretrained(
            path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError, SafetensorError) as err:
        if offline and any(type(e).__name__ == "LocalEntryNotFoundError" for e in chain(err)):
            raise ModelError(
                f"model.name_or_path: cannot load {model_cfg.name_or_path!r}: not a local "
                f"directory, not in the Hugging Face cache, and the Hub cannot be reached from "
                f"here ({offline}): give a model directory, or embedded:tiny-base"
            ) from None
        raise load_error(err, name=model_cfg.name_or_path, token_set=_has_hub_token()) from None


def hub_unreachable() -> str | None:
    """Why this machine cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set, or its host
    name does not resolve here and no proxy would resolve it instead), or None. A name lookup,
    no request; asked at each load, so a lookup that failed once does not hold for good."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):  # the proxy resolves the name, not this host
        return None
    host = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host} does not resolve: {err.strerror or err}"
    return None


def _refuse_an_adapter(path: str, name: str) -> None:
    """An adapter directory (a run's output, an export) given as the model: transformers 5
    would load its base with the adapter on it, and training then failed on target modules
    or trained base and old adapter together. Said at once, naming the base to give."""
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return
    from raysft.train.score_saved import adapter_base  # imports this module

    try:
        give = f"give its base ({adapter_base(folder)!r}) here"
    except (ModelError, OSError):
        give = "give its base here"
    raise ModelError(
        f"model.name_or_path: {name!r} is a LoRA adapter (adapter_config.json), not a model: "
        f"{give}; an adapter is scored with python -m raysft.evaluate"
    )


def _has_hub_token() -> bool:
    """A token from HF_TOKEN or from ``hf auth login``'s token file."""
    from huggingface_hub import get_token

    return get_token() is not None


def load_error(err: BaseException, *, name: str, token_set: bool) -> ModelError:
    """The ModelError for a failed ``from_pretrained``; says when a Hugging Face token is needed.

    Pure (no network): reads the texts of ``err`` and of the errors it was raised from.
    """
    text = "\n".join(f"{type(e).__name__}: {e}" for e in itertools.islice(chain(err), 5))
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if first.endswith(":"):  # a list follows ("Couldn't instantiate ... from one of:"): keep it
        first = " ".join(lines)[:500]
    why = f"model.name_or_path: cannot load {name!r}: "
    names = {type(e).__name__ for e in itertools.islice(chain(err), 5)}
    if ("RepositoryNotFoundError" in names or "repository not found" in text.lower()) and not (
        "GatedRepoError" in names or "gated repo" in text.lower()
    ):
        # The Hub answers 401 for a repo that does not exist when asked without a token: a
        # typo, most often, not a gated model (its 401 matched _GATED before this).
        if token_set:
            return ModelError(
                f"{why}not found on the Hugging Face Hub, or the token ({HUB_TOKEN_VAR}) has no "
                f"access to it: check the id ({first})"
            )
        return ModelError(
            f"{why}not found on the Hugging Face Hub: check the id; if it is a private repo, "
            f"it needs a Hugging Face token: set {HUB_TOKEN_VAR} ({first})"
        )
    if _GATED.search(text):
        if token_set:
            return ModelError(
                f"{why}it is gated or private and the Hugging Face token ({HUB_TOKEN_VAR}) has "
                f"no access to it: request access at https://huggingface.co/{name} ({first})"
            )
        return ModelError(
            f"{why}it is gated or private and needs a Hugging Face token: set {HUB_TOKEN_VAR} "
            f"in the environment that starts the run (README: GPU clusters) ({first})"
        )
    if "SafetensorError" in text:
        return ModelError(f"{why}a weights file is truncated or corrupt ({first})")
    if "private repository" in text.lower() and not token_set:
        return ModelError(
            f"{why}not found on the Hugging Face Hub; if it is a private repo, it needs a "
            f"Hugging Face token: set {HUB_TOKEN_VAR} ({first})"
        )
    return ModelError(f"{why}{first}")


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables every Ray worker needs from the driver: the Hub token, if set.

    A variable the Ray job already passes (``ray job submit --runtime-env-json``) is left out:
    the workers inherit the job's, and Ray refuses a ``ray.init`` runtime_env repeating its key.
    """
    job_env = job_runtime_env(environ).get("env_vars") or {}
    return {k: environ[k] for k in TOKEN_VARS if environ.get(k) and k not in job_env}


def job_runtime_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The runtime_env of the Ray job this driver runs in (``ray job submit``), or {}."""
    job = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return dict(job.get("runtime_env") or {})
