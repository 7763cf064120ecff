"""``--set`` overrides and dotted paths: ``KEY=VALUE`` pairs parsed the way YAML would read the
value, set at their dotted paths (a search parameter's name stays one key), and problems about
an overridden key marked ``--set``. Imports neither torch nor ray.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from raysft.config.search_sections import SearchParam
from raysft.config.yaml_reader import yaml_load
from raysft.errors import ConfigError

# A YAML 1.2 number such as 1e-4 or 5E3, which YAML 1.1 (PyYAML) reads as a string.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (``1e-4`` -> float, ``[a, b]`` -> list), but
    where YAML would read part of a plain string as markup, keep the text as it is: ``#`` opening
    a comment (``Be brief # really`` would lose its end, ``#1`` would be null) and a ``key:
    value`` not in braces (``Answer: briefly`` would be a mapping)."""
    try:
        value = yaml_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: over 4300 digits
        return text
    if _hides_a_comment(text, value) or (
        isinstance(value, dict) and not text.lstrip().startswith("{")
    ):
        return text
    # Only number-shaped strings become floats: float() would also turn "inf", "nan" or "1_0"
    # into numbers, which YAML does not.
    if isinstance(value, str) and _NUMBER.fullmatch(text.strip()):  # unquoted ("2024" stays)
        return float(value)
    return value


_MARK = "\ue000"  # a private-use character standing in for "#"


def _hides_a_comment(text: str, value: Any) -> bool:
    """Whether YAML read a ``#`` of ``text`` as the start of a comment."""
    if "#" not in text:
        return False
    try:
        marked = yaml_load(text.replace("#", _MARK))
    except yaml.YAMLError:
        return True
    return bool(_unmark(marked) != value)


def _unmark(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(_MARK, "#")
    if isinstance(value, list):
        return [_unmark(v) for v in value]
    if isinstance(value, dict):
        return {_unmark(k): _unmark(v) for k, v in value.items()}
    return value


def set_path(tree: dict[str, Any], dotted: str, value: Any, *, merge: bool = False) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``, creating sections as needed.

    Under ``search.params`` the parameter name is itself a dotted path and stays one key:
    ``search.params.lora.r.values`` sets ``values`` of the parameter ``lora.r``.

    ``merge`` (a ``--set``): a mapping given for a section that is there sets its keys and keeps
    the others (``--set 'train={max_steps: 4}'`` dropped the file's learning rate and batch
    size for the defaults, without a word). Not under ``search.params``: a parameter given
    whole (``{type: choice, values: [...]}``) replaces the one in the file, whose other keys
    would belong to another type.
    """
    keys = _split_path(dotted)
    if merge and isinstance(value, dict) and keys[:2] != ["search", "params"]:
        here = _get(tree, keys)
        if isinstance(here, dict):
            for key, inner in value.items():
                set_path(tree, f"{dotted}.{key}", inner, merge=True)
            return
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise KeyError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def unset_path(tree: dict[str, Any], dotted: str) -> None:
    """Remove ``a.b.c`` from ``tree``, if it is there."""
    *parents, leaf = _split_path(dotted)
    node = _get(tree, parents)
    if isinstance(node, dict):
        node.pop(leaf, None)


def _get(tree: dict[str, Any], keys: list[str]) -> Any:
    node: Any = tree
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def blame_overrides(
    problems: list[str], keys: Any, file_tree: dict[str, Any] | None = None
) -> list[str]:
    """``problems`` (``path: message`` lines) with those about a ``--set`` key marked
    ``--set``: the value came from the command line, not from the file the message names.

    A line is the key's when its path is the key, lies under it, is the search parameter whose
    field the key sets, or is a section above the key that the file itself (``file_tree``,
    read before the overrides) does not have, or an unknown one.
    """
    values = keys if isinstance(keys, dict) else {}
    # A mapping merges into its section (``--set 'train={seed: 7}'``): only the keys it sets
    # are the command line's; the section's other settings are still the file's.
    keys = [leaf for k in keys for leaf in _leaf_keys(k, values.get(k))]
    fields_of_new = _fields_of_new_params(keys, file_tree)
    out = []
    for line in problems:
        path = line.split(": ", 1)[0]
        new = next((k for n, k in fields_of_new.items() if f"{path}.".startswith(f"{n}.")), None)
        if new is not None:
            # Its other fields are missing: the parameter is not in the file to be changed.
            name = _split_path(new)[2]
            said = (
                f"--set {new}: the spec has no search parameter {name} to set a field of; give "
                f"it whole, e.g. --set 'search.params.{name}={{type: choice, values: [...]}}'"
            )
            if said not in out:
                out.append(said)
            continue
        ours = any(
            path in _set_targets(k)
            or path.startswith(k + ".")
            or (
                k.startswith(path + ".")
                and (
                    line.endswith(": unknown key")
                    or (file_tree is not None and not _has_path(file_tree, path))
                )
            )
            for k in keys
        )
        if ours and not line.startswith("--set "):
            line = f"--set {line}"
            if line.endswith("Input should be a valid string"):  # 2024, yes, 1.0 are not
                line += f" (YAML reads the value as another type: quote it, '{path}=\"...\"')"
            elif "Input should be '" in line and type(values.get(path, "")) in (bool, type(None)):
                # A choice given a YAML 1.1 word: =yes, =no, =off, =null, =~ arrive as true/null.
                read = yaml.safe_dump(values[path]).removesuffix("\n...\n")
                line += f" (YAML reads the value as {read}; quote it for the word)"
        out.append(line)
    return out


def _fields_of_new_params(keys: list[str], file_tree: dict[str, Any] | None) -> dict[str, str]:
    """``search.params.NAME`` -> the ``--set`` key that sets one of its fields
    (``search.params.NAME.values``), for each NAME the file (``file_tree``) has no parameter
    of."""
    if file_tree is None:
        return {}
    search = file_tree.get("search")
    params = search.get("params") if isinstance(search, dict) else None
    have = params if isinstance(params, dict) else {}
    out: dict[str, str] = {}
    for k in keys:
        parts = _split_path(k)
        if parts[:2] == ["search", "params"] and len(parts) == 4 and parts[2] not in have:
            out.setdefault(f"search.params.{parts[2]}", k)
    return out


def _leaf_keys(key: str, value: Any) -> list[str]:
    """The dotted paths ``--set key=value`` sets: a mapping's leaves, a search parameter (set
    whole) and a list as one."""
    if not isinstance(value, dict) or key.startswith("search.params."):
        return [key]
    if key == "search.params":
        return [f"{key}.{name}" for name in value]
    return [leaf for sub, inner in value.items() for leaf in _leaf_keys(f"{key}.{sub}", inner)]


def _set_targets(key: str) -> set[str]:
    """The paths a problem of ``--set key`` is reported at: the key, and for a search
    parameter's field (``search.params.lora.r.values``) the parameter."""
    parts = _split_path(key)
    if parts[:2] == ["search", "params"] and len(parts) == 4:
        return {key, f"search.params.{parts[2]}"}
    return {key}


def _has_path(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _split_path(dotted: str) -> list[str]:
    keys = dotted.split(".")
    if keys[:2] != ["search", "params"] or len(keys) < 3:
        return keys
    rest = keys[2:]
    if len(rest) > 1 and rest[-1] in SearchParam.model_fields:
        return ["search", "params", ".".join(rest[:-1]), rest[-1]]
    return ["search", "params", ".".join(rest)]


def get_path(tree: Any, dotted: str) -> Any:
    node = tree
    for key in dotted.split("."):
        node = node[key] if isinstance(node, dict) else getattr(node, key)
    return node


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{"a.b": 1}``; every malformed pair is reported at once."""
    out, problems = split_overrides(pairs)
    if problems:
        raise ConfigError("--set", problems)
    return out


def split_overrides(pairs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``["a.b=1", ...]`` -> (``{"a.b": 1}``, a problem line for each malformed pair), for a
    caller that reports those with the file's own problems rather than alone."""
    out: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"{pair!r}: expected KEY=VALUE (e.g. train.max_steps=50)")
        elif not all(part.strip() for part in key.split(".")):
            problems.append(f"{pair!r}: {key!r} is not a dotted path (e.g. train.max_steps)")
        else:
            out[key] = parse_value(raw)
    return out, problems


def flat_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {
        k: v for key, val in tree.items() for k, v in flat_paths(val, f"{prefix}{key}.").items()
    }
