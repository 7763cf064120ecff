"""Where rows come from: JSONL, JSON and Parquet files, datasets saved with ``datasets``'
``save_to_disk`` (``DIR:SPLIT`` for one split of a ``DatasetDict``) and Hub names (``hf:NAME``),
each row numbered for messages (``iter_rows``). A row JSON cannot parse, or an object with a key
given twice, is handed on marked (``Unparsable``, ``JsonObject.duplicate``) for the caller's
strict or skip handling (``raysft.data.formats``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from raysft.assets import resolve
from raysft.errors import DataError, DatasetLoadError, one_line

log = logging.getLogger(__name__)

Role = Literal["train", "eval"]  # which of data.train / data.eval a source is read for


def saved_split(source: str) -> tuple[Path, str | None]:
    """A local source's path, and the split a ``DIR:SPLIT`` names (a saved ``DatasetDict``)."""
    path = Path(resolve(source))
    head, sep, split = source.rpartition(":")
    if sep and split and not path.exists() and Path(resolve(head)).is_dir():
        return Path(resolve(head)), split
    return path, None


def _numbered(rows: Any) -> Iterator[tuple[str, Any]]:
    """Rows named by index from 0, as ``datasets`` and pandas index them."""
    for i, row in enumerate(rows):
        yield f"row {i}", row


def iter_rows(source: str, role: Role = "train") -> Iterator[tuple[str, Any]]:
    """Yield (row index, row) from a file, a saved dataset dir (``DIR[:SPLIT]``) or
    ``hf:NAME[:SPLIT]``. Without a split, ``role`` says which: train reads ``train``; eval
    needs one named unless there is only one (a held-out set read from ``train`` would be
    the training rows)."""

    if source.startswith("hf:"):
        yield from _iter_hub(source[3:], role)
        return
    path, split = saved_split(source)
    if path.is_dir():
        yield from _iter_saved_dataset(path, split, role, source)
        return
    # The field is named here too: a dry run or a preview reads the rows before any digest.
    if not path.is_file():
        here = "" if path.is_absolute() else f" (a relative path is read from {Path.cwd()})"
        raise DataError(f"data.{role}: {source}: file not found{here}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, source)
    elif suffix == ".json":
        yield from _iter_json(path, source)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, source)
    else:
        raise DataError(
            f"data.{role}: {source}: unsupported file type {suffix!r} (.json, .jsonl, .parquet"
            f"{'; decompress it first' if suffix in _COMPRESSED else ''})"
        )


def _iter_jsonl(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded line by line: a line that is not UTF-8 is a bad row, not a crash. A row is
    # named by its line (from 1, blank lines counted), as an editor shows it.
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1:
                raw = raw.removeprefix(_BOM)  # Windows tools write one; it is not the row's
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield f"line {line_no}", Unparsable(_not_utf8(raw, err))
                continue
            if not line.strip():
                continue
            try:
                # Without its newline: an error at the line's end is then at its last column.
                row = json.loads(line.rstrip("\r\n"), object_pairs_hook=JsonObject.of)
            except json.JSONDecodeError as err:
                # err.msg alone may end in "at" ("Invalid control character at"): its
                # position is the column (the line is the row's).
                where = err.msg.removesuffix(" at")
                row = Unparsable(f"not valid JSON: {where} at column {err.colno}")
            yield f"line {line_no}", row


class JsonObject(dict):  # type: ignore[type-arg]
    """A parsed JSON object that remembers a key given twice in it or in an object inside it
    (``json`` keeps the last value without a word): such a row is malformed."""

    duplicate: str | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> JsonObject:
        obj = cls()
        for key, value in pairs:
            if obj.duplicate is None:
                obj.duplicate = key if key in obj else _duplicate_in(value)
            obj[key] = value
        return obj


def _duplicate_in(value: Any) -> str | None:
    if isinstance(value, JsonObject):
        return value.duplicate
    if isinstance(value, list):
        return next((d for d in map(_duplicate_in, value) if d is not None), None)
    return None


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"


_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark


class Unparsable:
    def __init__(self, why: str):
        self.why = why


def _iter_json(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes().removeprefix(_BOM)
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=JsonObject.of)
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: {_not_utf8(raw, err)}") from None
    except json.JSONDecodeError as err:
        # A .json file holding JSON lines is common; read it that way before giving up.
        if err.msg == "Extra data":
            yield from _iter_jsonl(path, source)
            return
        raise DataError(f"{source}: not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        # The rows under "data" (a JSON file `datasets` reads with field="data").
        others = sorted(k for k in data if k != "data")
        if others:
            log.warning("%s: top-level keys not read (rows are under 'data'): %s", source,
                        ", ".join(others))  # fmt: skip
        data = data["data"]
    elif isinstance(data, dict) and len(raw.strip().splitlines()) == 1:
        yield from _iter_jsonl(path, source)  # one row on one line: a JSON-lines file of one
        return
    if not isinstance(data, list):
        raise DataError(
            f"{source}: expected a JSON list of rows, an object whose 'data' holds them, or "
            f"JSON lines (one row per line), got a JSON {_json_kind(data)}"
        )
    yield from _numbered(data)


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object over several lines"
    return {str: "string", bool: "true/false", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _iter_parquet(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{source}: cannot read Parquet: {err}") from None
    yield from _numbered(table.to_pylist())


def default_split(splits: list[str], role: Role) -> str | None:
    """The split of a saved ``DatasetDict`` read without one named: training reads ``train``,
    a held-out set its only split; None when there is no such split (the read says so)."""
    if role == "train":
        return "train" if "train" in splits else None
    return splits[0] if len(splits) == 1 else None


def _iter_saved_dataset(
    path: Path, split: str | None, role: Role, source: str
) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(
            f"data.{role}: {source}: a directory, but not one `datasets` saved (a directory is "
            f"read as a saved dataset; give a .jsonl, .json or .parquet file, or a list of "
            f"them for shards): {one_line(err)}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        names = ", ".join(ds)
        split = split or default_split(list(ds), role)
        if split is None:
            raise DataError(
                f"data.{role}: {source}: a DatasetDict of splits {names}: name the "
                f"{'held-out' if role == 'eval' else 'training'} one, as {source}:SPLIT"
            )
        if split not in ds:
            raise DataError(f"data.{role}: {source}: no split {split!r} (has {names})")
        ds = ds[split]
    elif split is not None:
        raise DataError(f"data.{role}: {source}: {path} is one Dataset, not splits to pick from")
    yield from _numbered(ds)


def _iter_hub(spec: str, role: Role) -> Iterator[tuple[str, Any]]:
    import datasets

    name, _, split = spec.partition(":")
    if not split and role == "eval":
        raise DataError(
            f"data.eval: hf:{spec}: name the held-out split (hf:{name}:test, "
            f"hf:{name}:validation); without one it would be the training split"
        )
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        raise DatasetLoadError(f"hf:{spec}: cannot load dataset: {err}") from None
    yield from _numbered(ds)
