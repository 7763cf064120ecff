"""One searched parameter: whether its path may be searched, the shape of its entry, and the
values of it that must all validate (bounds, every choice, every product).

Pure: read against the config schema and the spec's own values.
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

from raysft.config import Config, SearchParam, get_path
from raysft.config.loading import field_annotation

_UNSEARCHABLE = ("search", "tracking", "promote", "output_dir")
# Single paths that cannot be searched, and why.
_UNSEARCHABLE_PATHS = {
    "train.eval_base": "a trial never scores the base model (the search does, once, after "
    "the trials): every trial would run the same",
}
# Paths whose value changes how long a trial runs or what its metric measures. ASHA's horizon, a
# trial's status and the eval fingerprint that gates promotion all come from the spec, so trials
# that differ in one of these would be ranked against each other on unequal terms: refused.
# A prefix ending in "." covers a whole section.
_NOT_COMPARABLE = {
    "train.max_steps": "sets how long a trial runs (ASHA's horizon and the finished status "
    "are the spec's)",
    "train.epochs": "sets how long a trial runs (ASHA's horizon and the finished status "
    "are the spec's)",
    "train.eval_every": "sets when a trial is scored (ASHA counts its rungs in evals)",
    "data.": "selects or renders the rows the metric is computed on",
    "model.name_or_path": "sets the tokenizer that renders the eval rows",
    "model.revision": "sets the tokenizer that renders the eval rows",
    "train.max_new_tokens": "changes what the generated-answer metrics measure",
    "eval.": "changes what the generated-answer metrics measure",
    "train.exact_match": "decides whether the generated-answer metrics are measured",
}
# How training rows are batched or which of their tokens are trained, not which rows are scored
# or how they render (the held-out loss is on the answers either way).
_COMPARABLE = {"data.packing", "data.group_by_length", "data.train_on_prompt"}
# What sets how many micro-batches, so optimizer steps, an epoch of the rows is: with
# ``train.epochs``, trials differing in one would run different numbers of steps.
_EPOCH_STEPS = {
    "train.batch_size", "train.grad_accum", "train.compile", "data.packing",
    "data.group_by_length", "data.train_on_prompt",  # the last: which rows truncation keeps
}  # fmt: skip


def _is_int_field(ann: Any) -> bool:
    args = get_args(ann) if get_origin(ann) is not None else (ann,)
    return int in args and float not in args


def _takes_a_float(ann: Any) -> bool:
    """Whether any float of a range is a valid value (not for bool, int, str or Literal)."""
    args = get_args(ann) if get_origin(ann) is not None else (ann,)
    return float in args


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def probe_values(p: SearchParam, params: dict[str, SearchParam], cfg: Config) -> list[Any]:
    """Values that must all validate: the bounds, every choice, every product."""
    if p.type in ("loguniform", "uniform"):
        return [p.low, p.high]
    if p.type == "int":
        return [int(p.low or 0), int(p.high or 0)]
    if p.type == "choice":
        return list(p.values or [])
    return [b * f for b in _bases(p, params, cfg) for f in (p.values or [])]


def _bases(p: SearchParam, params: dict[str, SearchParam], cfg: Config) -> list[Any]:
    """The values a multiple_of multiplies: its searched ``of``'s probes, or the fixed value."""
    of = params.get(p.of or "")
    return probe_values(of, params, cfg) if of else [get_path(cfg, p.of or "")]


def check_param(
    name: str, p: SearchParam, params: dict[str, SearchParam], cfg: Config
) -> str | None:
    """The first shape problem of one parameter (before its values are probed), or None."""
    where = f"search.params.{name}"
    if name.split(".")[0] in _UNSEARCHABLE:
        return f"{where}: {name.split('.')[0]} cannot be searched"
    if name in _UNSEARCHABLE_PATHS:
        return f"{where}: {name} cannot be searched: {_UNSEARCHABLE_PATHS[name]}"
    try:
        ann = field_annotation(name)
    except KeyError as err:
        return f"{where}: {err.args[0]}"
    twice = _listed_twice(p.values or [], ann if p.type == "choice" else None)
    if twice is not None and same_value(twice[0]) != same_value(twice[1]):
        return (
            f"{where}: values: {twice[0]!r} and {twice[1]!r} are one value of {name}; each "
            "value is drawn as often as it is listed: list it once"
        )
    if twice is not None:
        # Here, on the spec file a search starts from, not in SearchParam's validator: a
        # saved spec (summary.json's resolved_spec, a trial's, --resume's) of a search that
        # ran with one must still load.
        return (
            f"{where}: values: {twice[0]!r} is listed more than once; each value is drawn as "
            "often as it is listed: list it once"
        )
    if p.type in ("loguniform", "uniform") and _is_int_field(ann):
        return f"{where}: {name} is an integer; use type int or choice, not {p.type}"
    if p.type in ("loguniform", "uniform") and not _takes_a_float(ann):
        # Only the bounds are probed: 0 and 1 pass a bool field, 0.37 would fail every trial.
        return f"{where}: {name} is not a real number; use type choice, not {p.type}"
    if p.type == "int" and not all(float(b).is_integer() for b in (p.low or 0, p.high or 0)):
        # Optuna's suggest_int needs whole bounds; rounding them silently could leave the range
        # that was checked here.
        return f"{where}: type int needs whole-number low and high (got {p.low:g}, {p.high:g})"
    why = _not_comparable(name, cfg)
    if why:
        return (
            f"{where}: {name} cannot be searched: it {why}, so trials would not be compared "
            "on equal terms; set one value in the spec (one search per value)"
        )
    if p.type != "multiple_of":
        return None
    bad = [f for f in p.values or [] if not is_number(f)]
    if bad:
        return f"{where}.values: multiple_of factors must be numbers, got {bad[0]!r}"
    of = params.get(p.of or "")
    if of is not None and of.type == "multiple_of":
        # The products are computed after every other value is sampled, in one pass.
        return (
            f"{where}.of: {p.of} is itself a multiple_of; "
            "multiple_of must refer to a sampled parameter or a fixed config value"
        )
    if of is None:
        try:
            field_annotation(p.of or "")
        except KeyError as err:
            return f"{where}.of: {err.args[0]}"
    bases = _bases(p, params, cfg)
    if not all(is_number(b) for b in bases):
        got = next(b for b in bases if not is_number(b))
        return f"{where}.of: {p.of} is not a number ({got!r}); multiple_of needs a number"
    if of is not None and _is_int_field(ann):
        # Only the bounds of a range are probed: products between them must be whole too.
        if of.type in ("loguniform", "uniform"):
            return (
                f"{where}.of: {name} is an integer, but {p.of} is searched as a real-valued "
                f"range ({of.type}): its multiples are not whole numbers; search {p.of} with "
                "type int or choice"
            )
        halves = [f for f in p.values or [] if not float(f).is_integer()]
        if of.type == "int" and halves:
            return (
                f"{where}.values: {name} is an integer, and {p.of} an int range: a factor of "
                f"{halves[0]:g} gives a fraction for some of its values; use whole factors, or "
                f"search {p.of} as a choice of values whose products are whole"
            )
    return None


def varies_nothing(params: dict[str, Any]) -> str | None:
    """Why a search whose every parameter takes one value only (a choice of one, a range whose
    bounds are equal, one factor of such a value or of a fixed one) would train every trial
    alike, as an empty ``search.params`` would, or None. One parameter that varies is enough:
    a spec may hold fixed ones beside it."""
    if not params:
        return None

    def one(name: str) -> bool:
        p = params[name]
        if p.type == "multiple_of":
            return len(p.values or []) == 1 and (p.of not in params or one(p.of))
        if p.type == "choice":
            return len(p.values or []) == 1
        return bool(p.low == p.high)

    if all(one(name) for name in params):
        return (
            "every parameter takes one value, so every trial trains alike (their results "
            "differ by seed noise at most); search at least one over more than one value"
        )
    return None


def distinct_configs(params: dict[str, Any]) -> int | None:
    """How many distinct configurations the space holds, or None where a range of floats makes
    them countless. A ``multiple_of`` has as many as its factors, times nothing more: its base
    is counted on its own (or fixed)."""
    count = 1
    for p in params.values():
        if p.type in ("choice", "multiple_of"):
            count *= len(p.values or [])
        elif p.type == "int":
            count *= int(p.high) - int(p.low) + 1
        elif p.low != p.high:  # uniform, loguniform
            return None
    return count


def repeats_configs(params: dict[str, Any], num_samples: int) -> str | None:
    """Why ``num_samples`` trials over a space of fewer distinct configurations train some of
    them again (the samplers draw with replacement), or None."""
    count = distinct_configs(params)
    if count is None or count <= 1 or num_samples <= count:  # one: varies_nothing says it
        return None
    return (
        f"{num_samples} trials over {count} distinct configurations: the sampler draws with "
        f"replacement, so at least {num_samples - count} trials repeat one (with the same "
        f"train.seed, a repeat trains the same run again); set search.num_samples to at most "
        f"{count}, or search a parameter over a range of floats"
    )


def _listed_twice(values: list[Any], ann: Any = None) -> tuple[Any, Any] | None:
    """The first value listed a second time (4 and 4.0 are one value; so are 4 and "4", or
    true and 1, where the field ``ann`` reads them as one), or None: it would be drawn twice
    as often, the search leaning on it unasked. Returns (that value, the one listed before)."""
    seen: dict[Any, Any] = {}
    for v in values:
        key = same_value(_as_the_field_reads(v, ann))
        if key in seen:
            return v, seen[key]
        seen[key] = v
    return None


def _as_the_field_reads(value: Any, ann: Any) -> Any:
    """``value`` as a field of type ``ann`` takes it; as it is where that fails (the field's
    own check reports it) or no type is given."""
    if ann is None:
        return value
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(ann).validate_python(value)
    except (ValidationError, TypeError):
        return value


def same_value(v: Any) -> Any:
    """What tells two listed values apart: 4 and 4.0 are one value."""
    return float(v) if is_number(v) else repr(v)


def _not_comparable(name: str, cfg: Config) -> str | None:
    """Why trials differing in ``name`` could not be ranked against each other, or None.

    ``train.seed`` picks the eval rows when they are split off ``data.train``; when it samples
    ``max_eval_samples`` of a larger eval file is known only by reading it (preflight).
    """
    if cfg.train.epochs is not None and name in _EPOCH_STEPS:
        return (
            f"sets how many optimizer steps train.epochs {cfg.train.epochs:g} is (give "
            "train.max_steps instead of train.epochs to search it)"
        )
    if name in _COMPARABLE:
        return None
    if name == "train.seed" and cfg.data.eval is None and cfg.data.seed is None:
        return (
            "picks the eval rows (data.eval is null: the seed splits them off data.train; "
            "data.seed keeps them fixed)"
        )
    for prefix, why in _NOT_COMPARABLE.items():
        if name == prefix or (prefix.endswith(".") and name.startswith(prefix)):
            return why
    return None
