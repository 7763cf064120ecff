"""The checks before a resume trains anything: the checkpoint's config is the run's (but for
what may change, ``RESUMABLE_CHANGES``), and its data holds the bytes and token ids the run
trained on (``check_same_data``, ``check_same_tokens``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from raysft.data.digest import (
    DATA_FILE,
    TOKENS,
    TOKENS_CHANGED,
    changed_sources,
    changed_tokens,
)
from raysft.errors import ConfigError, DataError
from raysft.paths import origin_working_dir
from raysft.train.state import (
    CONFIG_FILE,
    STATE_FILE,
    _check_archive,
    _unreadable,
    check_is_checkpoint,
)

log = logging.getLogger(__name__)

# What may differ between a checkpoint's run and the run resuming it: where outputs go and how
# the same computation is placed or tracked. Anything else changes what the remaining steps do.
# Also what only evaluates (the training steps' numbers stay the same: tests/unit/test_state.py)
# and activation checkpointing, the usual fix for a run out of memory (torch keeps dropout's RNG
# across the recomputation).
RESUMABLE_CHANGES = ("output_dir", "train.num_threads", "train.device", "search.", "tracking.",
                     "promote.", "train.gradient_checkpointing", "train.eval_every",
                     "train.exact_match", "train.max_new_tokens", "train.eval_base",
                     "eval.")  # fmt: skip


def check_resumable(directory: str | Path, cfg: Any) -> None:
    """Before anything loads: ``directory`` is an intact checkpoint, and ``cfg`` is the config
    its run trained with (but for ``RESUMABLE_CHANGES``), so the resumed run continues it
    exactly and its config.yaml describes what ran."""
    from raysft.config import flat_paths, load_config

    check_is_checkpoint(directory)
    path = Path(directory) / STATE_FILE
    _check_archive(path)
    saved = Path(directory) / CONFIG_FILE
    if not saved.is_file():
        # Without it nothing says the run continues the checkpoint's: the optimizer and the
        # learning-rate schedule come back from the checkpoint whatever the config says now.
        raise ConfigError(
            "--resume-from",
            [f"{directory}: no {CONFIG_FILE} (every raysft checkpoint has one): cannot check "
             "that this run continues the checkpoint's; resume from an intact checkpoint or "
             "start over"],
        )  # fmt: skip
    old = flat_paths(load_config(saved).model_dump(mode="json"))
    new = flat_paths(cfg.model_dump(mode="json"))
    # Data paths as read: relative ones from where each run started ('train.jsonl' then is
    # './train.jsonl' now, or the same file by its absolute path); the bytes are checked apart.
    then = origin_dir(directory)
    for key in _DATA_PATHS:
        old[key], new[key] = _as_read(old.get(key), then), _as_read(new.get(key), os.getcwd())
    changed = [
        f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
        and not any(k == p.rstrip(".") or k.startswith(p) for p in RESUMABLE_CHANGES)
    ]
    if changed:
        raise ConfigError(
            "--resume-from",
            [f"{directory}: was trained with another config; resuming continues that run "
             f"exactly, so it must be the same (set it back, or start a new run): {c}"
             for c in changed],
        )  # fmt: skip


_DATA_PATHS = ("data.train", "data.eval")


def origin_dir(checkpoint: str | Path) -> str:
    """The directory the checkpoint's run read its relative paths from (its origin.json), else
    this one (a checkpoint written before it kept one)."""
    return origin_working_dir(checkpoint) or os.getcwd()


def _as_read(value: Any, base: str) -> Any:
    """A data source (or list of them) as the path a run started in ``base`` reads; names that
    are no local path (``embedded:``, ``hf:``) as given."""
    if isinstance(value, list):
        return [_as_read(v, base) for v in value]
    if not isinstance(value, str) or value.startswith(("embedded:", "hf:")):
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def check_same_data(directory: str | Path, digests: dict[str, dict[str, str]]) -> None:
    """The data sources hold the bytes the checkpoint's run trained on (``data_digests``): the
    data stream resumes at a position counted in the old rows. A checkpoint written before
    raysft kept its digests is not checked."""
    then = _data_record(directory)
    if then is None:
        log.warning(
            "%s: no %s (raysft writes one into every checkpoint): the data cannot be checked "
            "to hold the bytes the run trained on",
            directory, DATA_FILE,
        )  # fmt: skip
        return
    changed = changed_sources(then, digests)
    if changed:
        raise DataError(
            f"--resume-from {directory}: the data differs from what its run trained on; the "
            f"remaining steps would read other rows at the old rows' positions (restore the "
            f"data, or start a new run): {'; '.join(changed)}"
        )


def check_same_tokens(directory: str | Path, digests: dict[str, dict[str, str]]) -> None:
    """The same bytes tokenize to the ids the checkpoint's run trained on (``digests``' TOKENS):
    a changed chat template, tokenizer file or tokenizer library would otherwise train the
    remaining steps on other ids, packed into other rows, at the old stream position. A
    checkpoint written before raysft kept them is not checked (said once)."""
    then = _data_record(directory)
    if then is None:
        return  # check_same_data said so
    if TOKENS not in then:
        log.warning(
            "%s: written before raysft recorded the token ids its run trained on: cannot check "
            "that the data tokenizes as it did (a chat template, tokenizer or transformers "
            "change since would go unnoticed)",
            directory,
        )
        return
    changed = changed_tokens(then, digests)
    if changed:
        raise DataError(
            f"--resume-from {directory}: the data tokenizes to other ids than its run trained "
            f"on ({TOKENS_CHANGED}); the remaining steps would train on other ids at the old "
            f"rows' positions (resume with what wrote the checkpoint, or start a new run): "
            f"{'; '.join(changed)}"
        )


def _data_record(directory: str | Path) -> dict[str, dict[str, str]] | None:
    """A checkpoint's data.json (None where it has none)."""
    path = Path(directory) / DATA_FILE
    if not path.is_file():
        return None
    try:
        then = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _unreadable(path, f"cannot be read ({err})") from None
    if not (isinstance(then, dict) and all(isinstance(v, dict) for v in then.values())):
        raise _unreadable(path, "holds no data digests")
    return then
