"""Reading YAML: a loader that reads YAML 1.2 floats (``1e-4``) and refuses a key given twice,
and a file read into a tree of sections, each way it can fail one line. Imports neither torch
nor ray.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from raysft.config.sections import Config
from raysft.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-4`` as a string.

    It also refuses a key given twice in one mapping: PyYAML keeps the last silently, so a
    second ``train:`` section would drop every setting of the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *base`` merges are meant to repeat keys
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen + 1})",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


# YAML 1.1 reads an integer with a leading 0 as octal (``seed: 0123`` is 83) and digits joined by
# ":" as base 60 (``1:30`` is 90); YAML 1.2 does neither, and neither does raysft: ``0123`` is 123
# and ``1:30`` a string. PyYAML's own patterns for those forms, so nothing else changes (``0189``
# and ``0:30`` were strings already).
_YAML11_ONLY = "tag:raysft,2026:yaml-1.1-number"
_YAML11_ONLY_NUMBER = re.compile(
    r"^(?:[-+]?0[0-7_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*)$"
)
for _first in "-+0123456789":
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, (_YAML11_ONLY, _YAML11_ONLY_NUMBER)
    )


def _as_yaml_1_2(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    """A YAML 1.1 octal or base-60 number as YAML 1.2 reads it: digits in base 10, the rest a
    string."""
    text = str(node.value)
    return int(text) if re.fullmatch(r"[-+]?[0-9]+", text) else text


_Loader.add_constructor(_YAML11_ONLY, _as_yaml_1_2)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(str(path), ["a directory, not a YAML file"])
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read: {err.strerror or err}"]) from None
    # A file, or a pipe (``<(cat spec.yaml)``): a device would be read forever (/dev/zero) or
    # wait for input (/dev/stdin on a terminal).
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise ConfigError(str(path), ["not a regular file"])
    try:
        text = p.read_text(encoding="utf-8")
        tree = yaml_load(text)
    except OSError as err:  # unreadable: permissions, an I/O error (/proc/self/mem)
        raise ConfigError(str(path), [f"cannot read: {err.strerror or err}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [_yaml_problem(err)]) from None
    except RecursionError:
        raise ConfigError(str(path), ["nested too deeply to be a config"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            str(path), [f"not UTF-8 text (byte {err.start}: 0x{err.object[err.start]:02x})"]
        ) from None
    except ValueError as err:  # Python's cap on an integer's digits; a date that is none
        why = (
            "holds a number of more than 4300 digits"
            if "digits" in str(err)
            else (f"holds a value YAML cannot read ({err}); quote it if it is text")
        )
        raise ConfigError(str(path), [why]) from None
    if tree is None and not text.strip():  # an empty file (a failed write, the wrong file)
        raise ConfigError(str(path), ["empty; write {} to use every default"])
    if tree is None:  # comments only: a template with every setting commented out
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(
            str(path),
            [f"top level must be a mapping of sections (model:, data:, ...), got {kind_of(tree)}"],
        )
    odd = _non_string_key(tree)
    if odd:
        raise ConfigError(str(path), [odd])
    # A section whose keys are all commented out reads as null: its defaults are meant.
    return {k: {} if v is None and k in _SECTIONS else v for k, v in tree.items()}


_SECTIONS = {
    name
    for name, field in Config.model_fields.items()  # not search: null there means no search
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}


def _non_string_key(tree: Any, prefix: str = "") -> str | None:
    """The first mapping key YAML read as something else than a string (``null:``, ``true:``,
    ``1.5:``), said as YAML reads it (``on:`` as true), or None: every setting is named by a
    string."""
    if isinstance(tree, list):
        return next((p for v in tree if (p := _non_string_key(v, prefix))), None)
    if not isinstance(tree, dict):
        return None
    for key, value in tree.items():
        if not isinstance(key, str):
            written = yaml.safe_dump(key).removesuffix("\n...\n").strip()
            where = f"{prefix}: " if prefix else ""
            return (
                f"{where}key {written}: YAML reads it as {'null' if key is None else kind_of(key)}"
                ", not a name; quote it, or correct it"
            )
        problem = _non_string_key(value, f"{prefix}.{key}" if prefix else key)
        if problem:
            return problem
    return None


def kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "empty"
    return "a string" if isinstance(value, str) else type(value).__name__


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where the YAML breaks and why (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or not problem:
        return "not valid YAML: " + " ".join(str(err).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context = getattr(err, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")
