"""Tree -> validated config, every problem of a file at once as ``dotted.path: message``: field
errors in words (a union's alternatives on one line), and the cross-field rules whose fields
validated checked again without the values that failed (``validate_rest``). Imports neither
torch nor ray.
"""

from __future__ import annotations

import ast
import copy
import difflib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from raysft.config.rules import RULE_SEPARATOR, broken_rules
from raysft.config.sections import Config, SearchSpec
from raysft.config.yaml_reader import kind_of
from raysft.errors import ConfigError


def _clean_loc(loc: tuple[Any, ...], tree: Any, *, missing: bool) -> tuple[str, str | None]:
    """Dotted path of an error, and the union member pydantic tagged it with (if any).

    Pydantic puts union member tags (``str``, ``list[str]``) and validator names into ``loc``;
    only the parts that are keys or indices of the input belong in the path the user sees.
    """
    parts: list[str] = []
    tag: list[str] = []
    node: Any = tree
    for i, p in enumerate(loc):
        last = i == len(loc) - 1
        in_dict = isinstance(node, dict) and p in node
        in_list = isinstance(node, list) and isinstance(p, int) and -len(node) <= p < len(node)
        if in_dict or in_list:
            node = node[p]
        elif not (missing and last):  # a tag: not part of the input
            if not tag:
                tag = [".".join(parts), str(p)]
            continue
        parts.append(str(p))
    if tag:
        return ".".join(parts), f"{tag[0]}\0{tag[1]}"
    return ".".join(parts), None


# A value of the wrong type for a union's alternative: the union says what it takes instead.
_TYPE_ERRORS = {
    *("string_type", "list_type", "dict_type", "int_type", "int_parsing", "float_type"),
    *("float_parsing", "bool_type", "bool_parsing", "literal_error", "none_required"),
}
_MEMBERS = {
    **{"str": "a string", "int": "a whole number", "float": "a number", "bool": "true/false"},
    **{"list[str]": "a list of strings", "none": "null"},
}


def _member(tag: str) -> str:
    """A union alternative as pydantic tags it (``list[str]``, ``literal['all-linear']``), in
    words."""
    if tag.startswith("literal[") and tag.endswith("]"):
        inner = tag[len("literal[") : -1]
        try:  # the values' reprs: a comma inside a quoted value is not a separator
            values = [repr(v) for v in ast.literal_eval(f"({inner},)")]
        except (SyntaxError, ValueError):
            values = [v.strip() for v in inner.split(",")]
        return " or ".join(values)
    return _MEMBERS.get(tag, "a list" if tag.startswith("list[") else tag)


def _format_errors(err: ValidationError, tree: Any = None) -> list[str]:
    """One ``path: message`` line per problem; a union's failed alternatives share one line:
    "should be a string or a list of strings, not a number" where each failed on its type,
    else each alternative's own problem."""
    problems: list[str] = []
    unions: dict[str, list[tuple[str, str, str, Any]]] = {}
    for e in err.errors():
        path, union = _clean_loc(tuple(e["loc"]), tree, missing=e["type"] == "missing")
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "extra_forbidden":
            msg += _nested_form(tuple(e["loc"]))
        msg = msg.removeprefix("Value error, ")
        if e["type"] == "model_type":  # a section given a scalar or a list: no class names
            msg = f"should be a mapping of its settings (key: value), not {kind_of(e['input'])}"
        if e["type"] == "too_short":
            n, got = e["ctx"]["min_length"], e["ctx"]["actual_length"]
            msg = f"should hold at least {n} item{'s' * (n != 1)}, not {got}"
        if union is None:
            # Cross-field rules broken together come as one error, a line each.
            problems += [f"{path}: {m}" if path else m for m in msg.split(RULE_SEPARATOR)]
            continue
        root, member = union.split("\0")
        rest = path[len(root) :].lstrip(".")
        if root not in unions:
            unions[root] = []
            problems.append(root)  # placeholder, filled below in first-seen order
        unions[root].append((member, rest, msg, e["input"] if e["type"] in _TYPE_ERRORS else ...))
    return [
        f"{p}: {_union_problem(unions[p])}" if p in unions else p
        for p in dict.fromkeys(problems)  # keeps order, drops exact duplicates
    ]


def _union_problem(failed: list[tuple[str, str, str, Any]]) -> str:
    """What a union's alternatives (member, path inside it, message, the value when its type
    was wrong) say together."""
    if all(not rest and value is not ... for _, rest, _, value in failed):
        wanted = " or ".join(dict.fromkeys(_member(m) for m, _, _, _ in failed))
        return f"should be {wanted}, not {kind_of(failed[0][3])}"
    return "; ".join(
        f"as {_member(m)}: {rest + ': ' if rest else ''}{msg}" for m, rest, msg, _ in failed
    )


def validate_tree(
    tree: dict[str, Any],
    *,
    source: str = "<config>",
    model: type[Config] = Config,
    dropped: Collection[str] = (),
    rest: bool = True,
    probe: bool = False,
) -> Config:
    """``tree`` validated as ``model``; every problem at once, cross-field rules included: a
    field error hides none of the rules whose fields validated (``validate_rest``).
    ``dropped``: paths already left out of ``tree`` (``Rest.dropped``): a rule reading one is
    not applied (its input is a default, not what the file meant). ``rest=False``: the field
    errors alone (a probe of one searched value, whose rules the spec's check already ran).
    ``probe``: ``tree`` holds a trial's searched ``method`` (rules on the method then apply
    to it; otherwise, in a spec that searches the method, they wait for that probe)."""
    context = {"dropped": set(dropped), "probe": probe} if dropped or probe else None
    try:
        return model.model_validate(tree, context=context)
    except ValidationError as err:
        problems = _format_errors(err, tree)
        if rest and any(e["loc"] for e in err.errors()):  # field errors: the rules did not run
            problems += validate_rest(tree, model=model, dropped=dropped).rules
        raise ConfigError(source, list(dict.fromkeys(problems))) from None


@dataclass
class Rest:
    """What of a tree validates: ``tree`` without the values that failed (their defaults
    hold instead), ``cfg`` validated from it with no cross-field rule (None where even that
    fails), the ``dropped`` dotted paths (those left out, and for an unknown key the section
    it was meant for: ``_meant``), the messages of the ``rules`` it breaks whose inputs are
    none of the dropped ones, and the paths those broken rules ``read``."""

    tree: dict[str, Any]
    cfg: Config | None
    dropped: set[str]
    rules: list[str]
    read: set[str] = field(default_factory=set)


# Each pass drops the values a validation refused; one inside a section can leave the section
# refusing as a whole (a search parameter without its low), so a few passes.
_MAX_PASSES = 8


def validate_rest(
    tree: dict[str, Any], *, model: type[Config] = Config, dropped: Collection[str] = ()
) -> Rest:
    """``tree`` less each value that fails validation, validated again (``Rest``), so that the
    checks that do not read a failed value still run and report in the same run.
    ``dropped``: paths already counted as left out (``validate_tree``'s)."""
    rest, removed, counted = copy.deepcopy(tree), set[str](), set(dropped)
    rules: list[str] = []
    for _ in range(_MAX_PASSES):
        try:
            model.model_validate(rest, context={"dropped": counted})
            break
        except ValidationError as err:
            errors = err.errors()
            if all(not e["loc"] for e in errors):  # every field valid: these are the rules
                rules = [m for e in errors for m in _message(e).split(RULE_SEPARATOR)]
                break
            # Before the values go: where an unknown key sits is read from the tree.
            meant = [m for e in errors if e["type"] == "extra_forbidden" for m in _meant(rest, e)]
            paths = [_drop(rest, e) for e in errors if e["loc"]]
            if None in paths or set(paths) <= removed:  # cannot be left out: nothing to check
                return Rest(rest, None, counted, [])
            removed.update(p for p in paths if p is not None)
            counted.update([*removed, *meant])
    else:
        return Rest(rest, None, counted, [])
    try:
        cfg = model.model_validate(rest, context={"dropped": counted, "no_rules": True})
    except ValidationError:
        return Rest(rest, None, counted, rules)
    read = {i for inputs, _ in broken_rules(cfg, dropped=counted) for i in inputs}
    return Rest(rest, cfg, counted, rules, read)


def _meant(tree: dict[str, Any], error: Any) -> list[str]:
    """The paths an unknown key (``error``, extra_forbidden) was meant to set, as far as known:
    its section (``search.resources`` for ``cpus_per_workr``). The value written there is left
    out, so a rule or search check reading that section would judge a default as if the file
    had set it (num_threads 4 against the default 1 CPU per worker): that section counts as
    left out for them, while it stays in the tree for validation.

    A top-level key has no section: it counts the section a dotted one names
    (``train.max_steps: 5`` -> ``train``) or the ones its name is close to (``trian``), else
    nothing. Not everything: a stray key (``notes:``) was meant for no setting, and counting
    it against every section would leave out every rule and search check, so the file's other
    problems would come one run at a time again."""
    keys = _input_keys(tree, error["loc"])
    if len(keys) > 1:
        return [".".join(map(str, keys[:-1]))]
    if not keys or not isinstance(keys[0], str):
        return []
    key = keys[0]
    if "." in key:
        return [key.rpartition(".")[0]]
    return difflib.get_close_matches(key, list(Config.model_fields), n=3)


def _input_keys(tree: dict[str, Any], loc: tuple[Any, ...]) -> list[Any]:
    """The keys of ``loc`` that are keys of the input (not pydantic's union tags), up to the
    first list item."""
    parts: list[Any] = []
    node: Any = tree
    for p in loc:
        if isinstance(node, dict) and p in node:
            parts.append(p)
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and -len(node) <= p < len(node):
            break  # an item: the list goes
    return parts


def _message(error: Any) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


def _drop(tree: dict[str, Any], error: Any) -> str | None:
    """Remove the value ``error`` is about from ``tree`` (a list whole, a missing key's
    section); its dotted path, or None where nothing can be removed."""
    parts = _input_keys(tree, error["loc"])
    if error["type"] == "missing" and parts == ["search"] and error["loc"][-1] == "params":
        parts.append("params")
    if not parts:
        return None
    parent: Any = tree
    for key in parts[:-1]:  # by the keys: a search parameter's name has dots
        parent = parent[key]
    if parts == ["search", "params"]:  # required: none left stands for the refused ones
        parent["params"] = {}
    else:
        parent.pop(parts[-1], None)
    return ".".join(map(str, parts))


def _nested_form(loc: tuple[Any, ...]) -> str:
    """For an unknown key written dotted (``train.max_steps: 5``) that names a field: how to
    write it (YAML reads the dots as part of one key)."""
    key = loc[-1] if loc else None
    if not isinstance(key, str) or "." not in key:
        return ""
    model: Any = Config
    for part in [*loc[:-1], *key.split(".")]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return ""
        args = get_args(fields[part].annotation) or (fields[part].annotation,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    first, *rest = key.split(".")
    nested = "{" + ": {".join(rest) + ": ...}" + "}" * (len(rest) - 1)
    return f"; write it nested: {first}: {nested}"


def validate_spec(tree: dict[str, Any], *, source: str = "<spec>") -> SearchSpec:
    """A search spec: like ``validate_tree``, with the ``search`` section required."""
    if "search" not in tree:
        raise ConfigError(source, ["search: missing (a search spec needs a search section)"])
    # One that is there but no mapping (``search: 5``, ``search: null``) is reported by
    # validation, as any other section would be, with the spec's other problems.
    spec = validate_tree(tree, source=source, model=SearchSpec)
    assert isinstance(spec, SearchSpec)  # for mypy: model_validate of SearchSpec returns one
    return spec
