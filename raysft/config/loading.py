"""YAML -> validated config: reading, ``--set`` overrides, dotted paths, and every problem of a
file reported at once as ``file: dotted.path: message``. Imports neither torch nor ray.
"""

from __future__ import annotations

import ast
import copy
import difflib
import logging
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from raysft.config.rules import RULE_SEPARATOR, broken_rules
from raysft.config.sections import Config, Method, SearchParam, SearchSpec
from raysft.errors import ConfigError

log = logging.getLogger(__name__)

# A YAML 1.2 number such as 1e-4 or 5E3, which YAML 1.1 (PyYAML) reads as a string.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


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


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (``1e-4`` -> float, ``[a, b]`` -> list), but
    where YAML would read part of a plain string as markup, keep the text as it is: ``#`` opening
    a comment (``Be brief # really`` would lose its end, ``#1`` would be null) and a ``key:
    value`` not in braces (``Answer: briefly`` would be a mapping)."""
    try:
        value = yaml_load(text)
    except yaml.YAMLError:
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


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``, creating sections as needed.

    Under ``search.params`` the parameter name is itself a dotted path and stays one key:
    ``search.params.lora.r.values`` sets ``values`` of the parameter ``lora.r``.
    """
    keys = _split_path(dotted)
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise KeyError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


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
    keys = list(keys)
    out = []
    for line in problems:
        path = line.split(": ", 1)[0]
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
            msg = f"should be a mapping of its settings (key: value), not {_kind(e['input'])}"
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
        return f"should be {wanted}, not {_kind(failed[0][3])}"
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
) -> Config:
    """``tree`` validated as ``model``; every problem at once, cross-field rules included: a
    field error hides none of the rules whose fields validated (``validate_rest``).
    ``dropped``: paths already left out of ``tree`` (``Rest.dropped``): a rule reading one is
    not applied (its input is a default, not what the file meant). ``rest=False``: the field
    errors alone (a probe of one searched value, whose rules the spec's check already ran)."""
    try:
        return model.model_validate(tree, context={"dropped": set(dropped)} if dropped else None)
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


# The method sections and the training methods that read them: LoRA settings apply to LoRA and
# QLoRA, the 4-bit settings to QLoRA alone.
_READ_BY = {"lora": ("lora", "qlora"), "qlora": ("qlora",)}
_DEFAULT_METHOD = Config.model_fields["method"].default


def methods_of(cfg: Config, *, trials: bool = False) -> list[str]:
    """The training methods a config runs: its own, and those its search (if any) samples;
    ``trials``: the search's trials alone (a searched method replaces the config's in each)."""
    searched = cfg.search.params.get("method") if cfg.search else None
    # Values that are no method are reported where they are searched, not here.
    sampled = [m for m in (searched.values or [] if searched else []) if m in get_args(Method)]
    return sampled if trials and sampled else [cfg.method, *sampled]


def drop_sections_of_replaced_method(
    tree: dict[str, Any], overrides: dict[str, Any], file_method: Any, *, source: str
) -> None:
    """``--set method=X`` on a file written for another method (``file_method``, as the file
    wrote it, or None): remove (and log) the method sections of ``tree``, the config with the
    overrides applied, that X never reads, so the run goes ahead without them.

    The file's ``lora:`` was written for its own method; the command line asks for another one,
    so those settings are knowingly left out, not forgotten (``unread_sections`` refuses the
    forgotten kind). A section the command line sets too (``--set lora.r=8``) stays, and is
    refused if X does not read it. A spec that searches ``method`` keeps every section: its
    trials choose their methods.
    """
    method = overrides.get("method")
    if method not in get_args(Method) or method == (file_method or _DEFAULT_METHOD):
        return  # no change of method (an invalid one is reported by validation)
    search = tree.get("search")
    params = search.get("params") if isinstance(search, dict) else None
    if isinstance(params, dict) and "method" in params:
        return
    set_here = {key.split(".", 1)[0] for key in overrides}
    dropped = [
        section
        for section, readers in _READ_BY.items()
        if section in tree and section not in set_here and method not in readers
    ]
    for section in dropped:
        tree.pop(section)
        # A warning: it is printed before the CLIs set up logging (Python's last-resort
        # handler), which they do only once the config is valid, so that a refused config
        # prints its error lines and nothing else.
        log.warning(
            "--set method=%s: the %s: section of %s is for method %s only; running without it",
            method,
            section,
            source,
            " and ".join(_READ_BY[section]),
        )


def unread_sections(
    cfg: Config, tree: dict[str, Any], searched: list[str] | None = None
) -> list[str]:
    """Method sections (and searched parameters in them) that no run of the config reads.

    ``tree``: the config as written (a section counts when it is there and sets anything but
    the defaults: a saved config holds every section); ``searched``: a spec's searched parameter
    names (None for a training config). Such settings would be dropped without a word
    (``method: full`` with a ``lora:`` section), and searching them would run trials that
    differ in nothing.
    """
    used = list(dict.fromkeys(methods_of(cfg, trials=searched is not None)))
    if searched is not None and "method" in searched:
        why = f"the searched methods are {', '.join(used)}"
    elif len(used) > 1:
        why = f"the methods are {', '.join(used)}"
    else:
        why = f"method is {used[0]}" + (" (not searched)" if searched is not None else "")
    problems = []
    for section, readers in _READ_BY.items():
        if set(used) & set(readers):
            continue
        for_whom = " and ".join(readers)
        values = getattr(cfg, section)
        if section in tree and values != type(values)():
            problems.append(
                f"{section}: settings for method {for_whom} only, but {why}: they would be "
                f"ignored; remove the section or set method: {' or '.join(readers)}"
            )
        for name in searched or []:
            if name.split(".", 1)[0] == section:
                problems.append(
                    f"search.params.{name}: a setting for method {for_whom} only, but {why}: "
                    "every trial would ignore it; search another parameter"
                )
    return problems


def validate_spec(tree: dict[str, Any], *, source: str = "<spec>") -> SearchSpec:
    """A search spec: like ``validate_tree``, with the ``search`` section required."""
    if "search" not in tree:
        raise ConfigError(source, ["search: missing (a search spec needs a search section)"])
    # One that is there but no mapping (``search: 5``, ``search: null``) is reported by
    # validation, as any other section would be, with the spec's other problems.
    spec = validate_tree(tree, source=source, model=SearchSpec)
    assert isinstance(spec, SearchSpec)  # for mypy: model_validate of SearchSpec returns one
    return spec


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
        tree = yaml_load(p.read_text(encoding="utf-8"))
    except OSError as err:  # unreadable: permissions, an I/O error (/proc/self/mem)
        raise ConfigError(str(path), [f"cannot read: {err.strerror or err}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [_yaml_problem(err)]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            str(path), [f"not UTF-8 text (byte {err.start}: 0x{err.object[err.start]:02x})"]
        ) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(
            str(path),
            [f"top level must be a mapping of sections (model:, data:, ...), got {_kind(tree)}"],
        )
    # A section whose keys are all commented out reads as null: its defaults are meant.
    return {k: {} if v is None and k in _SECTIONS else v for k, v in tree.items()}


_SECTIONS = {
    name
    for name, field in Config.model_fields.items()  # not search: null there means no search
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}


def _kind(value: Any) -> str:
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


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    authored: bool = False,
) -> Config:
    """Read YAML (or start from defaults), apply ``--set`` overrides, validate all at once.

    ``overrides``: parsed (``parse_overrides``), or the ``KEY=VALUE`` pairs as given, whose
    malformed ones are then reported with the file's problems, not alone before them.
    ``authored``: a config a person wrote (``raysft.train``'s): a method section that its
    methods never read is refused too. A run's saved ``config.yaml`` (``saved_tree``) holds
    none such.
    """
    source = str(path) if path is not None else "<defaults>"
    problems: list[str] = []
    if isinstance(overrides, list):
        overrides, bad = split_overrides(overrides)
        problems += [f"--set {p}" for p in bad]
    overrides = overrides or {}
    try:
        tree = read_yaml(path) if path is not None else {}
    except ConfigError as err:
        raise ConfigError(source, err.problems + problems) from None
    in_file = copy.deepcopy(tree)
    tree = copy.deepcopy(tree)
    file_method = tree.get("method")
    for key, value in overrides.items():
        try:
            set_path(tree, key, value)
        except KeyError as err:
            problems.append(f"--set {err.args[0]}")
    drop_sections_of_replaced_method(tree, overrides, file_method, source=source)
    try:
        cfg = validate_tree(tree, source=source)
    except ConfigError as err:
        blamed = blame_overrides(err.problems, overrides, in_file)
        raise ConfigError(source, problems + blamed) from None
    if authored:
        problems += blame_overrides(unread_sections(cfg, tree), overrides, in_file)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def saved_tree(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a run saves it: without the method sections its method never reads (a full
    trial of a search over methods would otherwise save the spec's ``lora:``, which
    ``raysft.train`` refuses)."""
    tree = cfg.model_dump(mode="json")
    for section, readers in _READ_BY.items():
        if cfg.method not in readers:
            tree.pop(section, None)
    return tree


def flat_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {
        k: v for key, val in tree.items() for k, v in flat_paths(val, f"{prefix}{key}.").items()
    }


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(saved_tree(cfg), sort_keys=False, allow_unicode=True)
