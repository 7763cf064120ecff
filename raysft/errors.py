"""The exception types that mean "bad input" rather than "bug", collected lazily."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from raysft.data.formats import DataError
    from raysft.data.templates import TemplateError

    types: list[type[BaseException]] = [DataError, TemplateError, FileNotFoundError]
    try:
        from raysft.train.model import ModelError

        types.append(ModelError)
    except ImportError:  # torch missing: nothing from the model layer can be raised anyway
        pass
    return tuple(types)
