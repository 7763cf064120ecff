"""One promotion of a registered model at a time, on this machine: a file lock in the user's
cache directory."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raysft.search.tracking_store import local_store

log = logging.getLogger("raysft.promote")

_LOCK_WAIT_S = 600.0  # a promotion loads, checks and uploads one export: minutes at most


class LockTimeout(Exception):
    """Another promotion of the model held its lock for ``_LOCK_WAIT_S``. Its own class: an
    OSError (TimeoutError is one) from the promotion's steps means something else."""


@contextlib.contextmanager
def one_promotion_at_a_time(mlc: Any, name: str) -> Iterator[None]:
    """Promotions of one registered model, from this machine, one at a time. The gate reads the
    champion and the alias move commits: another promotion between the two could put a worse
    adapter over a better one, and tidy away the other's staged export. Searches started with
    ``ray job submit`` run their drivers on the head node, so theirs queue here too. Across
    machines MLflow's registry offers nothing to lock (no compare-and-set on an alias).
    Raises LockTimeout after ``_LOCK_WAIT_S``."""
    import fcntl

    path = _lock_path(mlc, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as err:  # no writable cache dir: promotions are not queued then
        log.warning("promotion of %s not queued behind others (%s): %s", name, path, err)
        yield
        return
    with handle:
        deadline, said = time.monotonic() + _LOCK_WAIT_S, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"another promotion of {name} held {path} for {_LOCK_WAIT_S:.0f} s"
                    ) from None
                if not said:
                    log.info("waiting for another promotion of %s to end (%s)", name, path)
                    said = True
                time.sleep(0.5)
            except OSError as err:  # a file system without flock (some NFS, FUSE): unqueued
                log.warning("promotion of %s not queued behind others (%s): %s", name, path, err)
                break
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_path(mlc: Any, name: str) -> Path:
    """The lock file of one registered model in one registry (``one_promotion_at_a_time``)."""
    # The registry's URI (MLflow's own attribute; the tracking URI where it has none).
    uri = getattr(mlc, "_registry_uri", None) or getattr(mlc, "tracking_uri", "")
    key = hashlib.sha256(f"{registry_key(str(uri))}\0{name}".encode()).hexdigest()[:16]
    # A lasting place, not the temp dir: a lock file is never deleted (a process waiting on it
    # would hold a lock on a file no other one opens), and a search leaves no file in /tmp.
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "raysft" / "locks" / f"promote-{key}.lock"


def registry_key(uri: str) -> str:
    """One registry however its URI is written: two users' credentials, a password changed, a
    host in capitals or a trailing "/" name the same server; a local store (SQLite, a file
    store) is its absolute path (a relative one read from the working directory, as MLflow
    does)."""
    local = local_store(uri.strip())
    if local is not None:
        return f"local:{local}"
    parts = urlsplit(uri.strip())
    where = parts.netloc.rpartition("@")[2].lower()  # without user info
    if parts.scheme.lower() in ("http", "https"):
        with contextlib.suppress(ValueError):  # a port that is no number: kept as written
            where = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}".lower()
    # databricks://PROFILE:PREFIX and the like: the whole address, each prefix its own registry
    return f"{parts.scheme.lower()}://{where}{parts.path.rstrip('/')}"
