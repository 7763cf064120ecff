"""What a data source holds, as a digest: a run that continues (a checkpoint's ``--resume-from``,
a search's ``--resume``, a trial Ray restarts) checks that it reads the bytes it started with,
and promotion that a champion was scored on the same eval rows.

Pure: hashlib and the file system, no torch (the search driver checks before anything loads).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raysft.data.sources import saved_split
from raysft.errors import DataError

DATA_FILE = "data.json"  # a checkpoint's record of its sources' digests
# Digests' key for what the sources tokenized to: {"train": sha256, "eval": sha256}.
TOKENS = "tokens"
_CHUNK = 1 << 20
_WHOLE = 256 << 20  # files up to this size are hashed whole
_SAMPLES = 17  # 1 MiB samples of a larger file, its first and last included


def source_digest(spec: str, field: str = "data") -> str:
    """sha256 of a data source's bytes (a file, or every file of a saved ``datasets`` directory
    with its relative path; a file over 256 MiB by its size and 17 samples of 1 MiB). A hub
    dataset (``hf:NAME``) is known by its name alone. ``field``: the setting that names it, for
    the message when it is not there."""
    if spec.startswith("hf:"):
        return spec
    path, _ = saved_split(spec)  # DIR:SPLIT: the whole saved directory
    h = hashlib.sha256()
    if path.is_file():
        _update(h, path)
        return h.hexdigest()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode())
            _update(h, f)
        return h.hexdigest()
    # Not its name: a digest of a path that is not there would match no run's.
    raise DataError(
        f"{field}: {spec}: file not found (a relative path is read from the current directory, "
        f"{Path.cwd()})"
    )


def _update(h: Any, path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= _WHOLE:
            while chunk := f.read(_CHUNK):  # in chunks: a file may be larger than memory
                h.update(chunk)
            return
        # Larger: its size and evenly spaced samples, so that every trial (which checks its
        # data on every start) does not read tens of GB first. A same-size edit between the
        # samples goes unnoticed; an append, a truncation or a rewrite does not.
        h.update(f"size {size}".encode())
        for i in range(_SAMPLES):
            f.seek((size - _CHUNK) * i // (_SAMPLES - 1))
            h.update(f.read(_CHUNK))


def sources(value: str | list[str] | None) -> list[str]:
    """A ``data.train`` / ``data.eval`` value as a list of sources."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# data_digests: "train"/"eval" -> source -> sha256; once tokenized, TOKENS -> "train"/"eval" ->
# sha256 of their samples (token_digests).
Digests = dict[str, dict[str, str]]


def data_digests(data: Any) -> Digests:
    """Digest of every source of a ``DataSection``: ``{"train": {spec: sha}, "eval": {...}}``."""
    return {
        part: {s: source_digest(s, f"data.{part}") for s in sources(getattr(data, part))}
        for part in ("train", "eval")
    }


def changed_sources(then: dict[str, dict[str, str]], now: dict[str, dict[str, str]]) -> list[str]:
    """One line per source whose bytes differ between two ``data_digests`` (a source added or
    dropped is a config change, reported by the config check, not here)."""
    return [
        f"data.{part}: {spec} changed since (sha256 {old[:12]} then, {now[part][spec][:12]} now)"
        for part, digests in sorted(then.items())
        if part != TOKENS
        for spec, old in sorted(digests.items())
        if spec in now.get(part, {}) and now[part][spec] != old
    ]


def token_digests(data: Any) -> dict[str, str]:
    """sha256 of each split's samples as training reads them (``data``: a ``PreparedData``):
    every sample's ``input_ids`` and ``labels``, in order. The same bytes give other ids when
    the chat template, the tokenizer's files or its library's behaviour change (a raysft,
    transformers or model-directory update): a run that continues must see that too."""
    return {"train": _samples_digest(data.train), "eval": _samples_digest(data.eval)}


def _samples_digest(examples: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.n_tokens.to_bytes(4, "little"))  # where one sample ends
        h.update(array("q", ex.input_ids).tobytes())
        h.update(array("q", ex.labels).tobytes())
    return h.hexdigest()


# What can give the same sources other token ids, for messages.
TOKENS_CHANGED = (
    "the chat template, the tokenizer's files or the raysft / transformers version changed "
    "since, or the data itself where it is not hashed whole (an hf: dataset is known by its "
    "name, a file over 256 MiB by 17 samples)"
)


def changed_tokens(then: Digests, now: Digests) -> list[str]:
    """One line per split whose samples tokenize to other ids now than ``then``, where both
    record them (a record written before raysft kept them says nothing)."""
    old, new = then.get(TOKENS), now.get(TOKENS)
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    return [
        f"data.{part}: the same rows tokenize to other ids now (sha256 {old[part][:12]} then, "
        f"{new[part][:12]} now)"
        for part in ("train", "eval")
        if part in old and part in new and old[part] != new[part]
    ]
