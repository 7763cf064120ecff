"""Embedded default assets: a tiny pretrained base model and instruction datasets, offline.

``embedded:NAME`` in a config (``model.name_or_path``, ``data.train``, ``data.eval``) names a
file or directory shipped here; it resolves to a local path and loads like any other.
Shipped: ``tiny-base`` (model + tokenizer dir), ``tasks-alpaca.jsonl``, ``tasks-sharegpt.jsonl``,
``tasks-eval.jsonl``, and the free-text and code tasks ``tasks-text[-eval].jsonl`` and
``tasks-code[-eval].jsonl``; ``python -m raysft.assets.build`` regenerates them.
"""

from __future__ import annotations

from pathlib import Path

from raysft.errors import AssetError

EMBEDDED_PREFIX = "embedded:"
ASSETS_DIR = Path(__file__).resolve().parent
# Source files of this package live next to the assets but are not assets.
_NOT_ASSETS = {
    "__init__.py",
    "__pycache__",
    "build.py",
    "corpus.py",
    "text_code.py",
    "tokenizer.py",
}


def available() -> list[str]:
    """Names of the shipped assets."""
    return sorted(
        p.name
        for p in ASSETS_DIR.iterdir()
        if p.name not in _NOT_ASSETS and not p.name.startswith(".")
    )


def asset_path(name: str) -> Path:
    """Path of the shipped asset ``name``; ``AssetError`` listing the names otherwise."""
    if name not in available():
        raise AssetError(
            f"{EMBEDDED_PREFIX}{name}: no such embedded asset (have: {', '.join(available())})"
        )
    return ASSETS_DIR / name


def resolve(spec: str) -> str:
    """``embedded:NAME`` -> absolute local path; anything else is returned unchanged."""
    if spec.startswith(EMBEDDED_PREFIX):
        return str(asset_path(spec[len(EMBEDDED_PREFIX) :]))
    return spec


def absolute_if_local(name_or_path: str) -> str:
    """A local directory by its absolute path (``~`` expanded); anything else (a hub id,
    ``embedded:NAME``) as given. A model keeps the name it was loaded by, and an adapter saved on
    it (a trial's checkpoint, a champion export) records that as its base: a relative one would
    be read from whatever directory loads the adapter later. A hub id that is also a directory
    here is that directory: transformers would load it."""
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else name_or_path


# A champion export whose base would be lost (it lay in a Ray job's copy of --working-dir, which
# Ray removes after the job) carries a copy of the base in this subdirectory, and its
# adapter_config.json names the base by this relative name.
BUNDLED_BASE = "base-model"


def adapter_base_path(adapter_dir: Path, base: str) -> str:
    """An adapter's ``base_model_name_or_path`` as a loader takes it: the adapter directory's
    own copy of its base (``BUNDLED_BASE``) when it carries one, else ``base`` as given."""
    own = adapter_dir / base
    return str(own.resolve()) if base == BUNDLED_BASE and own.is_dir() else base
