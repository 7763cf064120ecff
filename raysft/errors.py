"""One base for every user-caused error.

The CLI edge (``raysft.cli.run_cli``) catches ``RaysftError`` only: it prints
``file: dotted.path: message`` lines and exits 2. Anything else is a bug and keeps its traceback
(exit 1). This module imports nothing from the rest of the package, so every layer can raise these.
"""

from __future__ import annotations

from collections.abc import Iterator


def chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from or while handling, nearest first (a loop in
    the chain ends it)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for a log line or a record; a Ray
    task's own exception (its ``cause``) rather than Ray's wrapper and traceback."""
    cause = getattr(err, "cause", None)
    what = cause if isinstance(cause, BaseException) else err
    first = (str(what).strip().splitlines() or [""])[0]
    return f"{type(what).__name__}: {first}" if first else type(what).__name__


class RaysftError(Exception):
    """A problem the user can fix: bad config, spec, data, template, model or search state."""

    def lines(self) -> list[str]:
        """What the CLI prints, one ``error:`` line each."""
        return str(self).splitlines() or [type(self).__name__]


class ConfigError(RaysftError):
    """A configuration or search-spec problem; ``problems`` are ``path: message`` lines."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class DataError(RaysftError):
    """A data problem; the message names source, row and field."""


class DatasetLoadError(DataError):
    """``datasets.load_dataset`` failed (the Hub unreachable, a name it does not know): unlike a
    bad row or file, it may pass on another try, so a trial retries it."""


class TemplateError(RaysftError):
    """The conversation cannot be rendered with the chosen template."""


class ModelError(RaysftError):
    """A model cannot be loaded as configured (missing path, no bitsandbytes backend, ...)."""


class AssetError(RaysftError):
    """``embedded:NAME`` names no shipped asset."""


class SearchStateError(RaysftError):
    """The experiment directory's state does not allow the request (already holds a search, ...)."""


class RayStartError(RaysftError):
    """The local Ray could not be started (the machine too busy for Ray's start-up limits)."""


class TrainingDiverged(RaysftError):
    """The loss stopped being finite (too high a learning rate, most often): training stopped."""
