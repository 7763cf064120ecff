"""Searched values validated together: every combination of the parameters' probe values, or
in a bigger space pairs of them (those a rule or a section reads together first), each probe a
copy of the spec's tree with the values set.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Collection, Iterator
from typing import Any

from raysft.config import Config, SearchParam, SearchSpec, get_path, validate_tree
from raysft.config.rules import RULE_INPUTS, overlaps
from raysft.errors import ConfigError
from raysft.search.searchable import probe_values, same_value

log = logging.getLogger(__name__)

# Cap on the value combinations validated together (each is one pydantic validation), whole
# combinations or, in a bigger space, pairs of values (~0.3 ms each: about a second).
MAX_JOINT_PROBES = 4096


def joint_probes(params: dict[str, SearchParam], cfg: Config) -> list[dict[str, Any]] | None:
    """Every combination of the parameters' probe values (products follow their ``of``).

    A cross-field rule (``method: full`` with ``lora.use_dora``) can reject a combination whose
    values each pass alone. None when there are too many to check.
    """
    free = {k: probe_values(p, params, cfg) for k, p in params.items() if p.type != "multiple_of"}
    products = {k: p for k, p in params.items() if p.type == "multiple_of"}
    count = math.prod(len(set(map(repr, v))) for v in free.values())
    count *= math.prod(len(p.values or []) for p in products.values())
    if count > MAX_JOINT_PROBES:
        return None
    combos: list[dict[str, Any]] = [{}]
    for k, values in free.items():
        unique = list({repr(v): v for v in values}.values())
        combos = [{**c, k: v} for c in combos for v in unique]
    for k, p in products.items():
        combos = [
            {**c, k: c.get(p.of or "", get_path(cfg, p.of or "")) * f}
            for c in combos
            for f in p.values or []
        ]
    return combos


def reads_any(dropped: Collection[str], *paths: str) -> bool:
    """Whether any of ``paths`` is, holds or lies under a dropped path."""
    return any(overlaps(p, d) for p in paths for d in dropped)


def check_combinations(
    tree: dict[str, Any],
    params: dict[str, SearchParam],
    cfg: Config,
    *,
    source: str,
    dropped: Collection[str] = (),
    known: Collection[str] = (),
) -> list[str]:
    """The first combination of (individually valid) values that fails validation, if any;
    a failure on the spec's ``known`` problems alone says nothing of the combination.

    Beyond ``MAX_JOINT_PROBES`` combinations, pairs of values of two parameters
    (``_pair_probes``), at most ``MAX_JOINT_PROBES`` of them: a rule joining two parameters
    (method and lora.use_dora) is caught, one joining three or more searched values (fsdp:
    method, workers and train.compile all searched) may not be.
    """
    combos = joint_probes(params, cfg)
    unchecked = 0
    if combos is None:
        pairs = _pair_probes(params, cfg)
        combos = list(itertools.islice(pairs, MAX_JOINT_PROBES))
        unchecked = _pair_total(params, cfg) - len(combos)
    for combo in combos:
        own = probe_problems(tree, combo, source=source, dropped=dropped, known=known)
        if own:
            values = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            return [f"search.params: combination {values}: {e}" for e in own]
    if unchecked:
        # A warning: a dry run, which sets up no logging, says it too (Python's last-resort
        # handler).
        log.warning(
            "%s: search.params: %d pairs of searched values checked together, %d not (too "
            "many; those of parameters a rule or a section reads together were checked first)",
            source,
            len(combos),
            unchecked,
        )
    return []


def _pair_probes(params: dict[str, SearchParam], cfg: Config) -> Iterator[dict[str, Any]]:
    """Each pair of probe values of each two parameters, the others at the spec's own values
    (a multiple_of follows its ``of`` when that is one of the two, else at its first factor).
    Values that each pass alone and not together are the common failure of a big space.
    Pairs of parameters read together come first (``_related``): a cap keeps those."""
    free = {k: _unique(probe_values(p, params, cfg)) for k, p in params.items()}
    names = list(params)
    couples = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    couples.sort(key=lambda ab: not _related(ab[0], ab[1], params))  # stable: else spec order
    for a, b in couples:
        x, y = (b, a) if params[a].type == "multiple_of" and params[a].of == b else (a, b)
        pairs = (  # a multiple_of and its base: the products the space draws
            [(vx, vx * f) for vx in free[x] for f in params[y].values or []]
            if params[y].type == "multiple_of" and params[y].of == x
            else [(vx, vy) for vx in free[x] for vy in free[y]]
        )
        for vx, vy in pairs:
            combo = {x: vx, y: vy}
            for k, p in params.items():  # the products of the pair's values
                if p.type == "multiple_of" and p.of in combo and k not in combo:
                    combo[k] = combo[p.of] * (p.values or [1])[0]
            yield combo


def _pair_total(params: dict[str, SearchParam], cfg: Config) -> int:
    """How many combinations ``_pair_probes`` yields, counted, not made."""
    n = {k: len(_unique(probe_values(p, params, cfg))) for k, p in params.items()}
    names = list(params)
    total = 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = (b, a) if params[a].type == "multiple_of" and params[a].of == b else (a, b)
            of_x = params[y].type == "multiple_of" and params[y].of == x
            total += n[x] * (len(params[y].values or []) if of_x else n[y])
    return total


def _related(a: str, b: str, params: dict[str, SearchParam]) -> bool:
    """Whether parameters ``a`` and ``b`` are read together: by one section's validator (the
    same section), by one cross-field rule, or one is the other's multiple."""
    if params[a].of == b or params[b].of == a:
        return True
    if "." in a and a.split(".")[0] == b.split(".")[0]:
        return True
    return any(reads_any(inputs, a) and reads_any(inputs, b) for inputs in RULE_INPUTS)


def probe_problems(
    tree: dict[str, Any],
    values: dict[str, Any],
    *,
    source: str,
    dropped: Collection[str],
    known: Collection[str],
) -> list[str]:
    """The problems of the spec with searched ``values`` set that are not ``known`` (the
    spec's own). Validated as a SearchSpec: its rules that join a trial's values to
    search.resources (fsdp and train.compile, train.device cpu and GPUs) hold for them."""
    try:
        validate_tree(
            probe_tree(tree, values), source=source, model=SearchSpec, dropped=dropped,
            rest=False, probe="method" in values,
        )  # fmt: skip
    except ConfigError as err:
        return [e for e in err.problems if e not in known]
    return []


def probe_tree(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``values`` set at their (config field) paths, copying only the sections on
    those paths: a deep copy per probe would copy the search's value lists each time (most
    of a big space's validation time). Validation never changes its input."""
    probe = dict(tree)
    for name, value in values.items():
        *sections, leaf = name.split(".")
        node = probe
        for key in sections:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return probe


def _unique(values: list[Any]) -> list[Any]:
    return list({same_value(v): v for v in values}.values())
