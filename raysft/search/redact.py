"""Secrets kept out of what raysft logs: params hidden by name, values scrubbed of tokens,
URL credentials and signed query values (MLflow params and tags, summary.json, the export)."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from raysft.config import Config, flat_paths, saved_tree
from raysft.errors import one_line

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


def saved_config_text(cfg: Config) -> str:
    """``cfg`` as a run saves it (its ``config.yaml`` in checkpoints and the output dir),
    secrets hidden: the ``tracking`` section scrubbed (a tracking URI's password would ride
    along into every checkpoint and the artifacts made of them) and any setting with a secret
    name. The rest is kept as it is: a resume compares it (``tracking.`` may change there) and
    ``raysft.evaluate`` scores with it, so a system prompt that holds a URL stays whole."""
    return yaml.safe_dump(_hide_secrets(saved_tree(cfg)), sort_keys=False, allow_unicode=True)


def _hide_secrets(tree: Any, prefix: str = "") -> Any:
    if isinstance(tree, dict):
        return {k: _hide_secrets(v, f"{prefix}{k}.") for k, v in tree.items()}
    name = prefix.rstrip(".")
    if name.startswith("tracking."):
        return redact_tree(tree, prefix)
    return REDACTED if is_secret(name) and tree is not None else tree


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
