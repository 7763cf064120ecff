"""A search's experiment dir: checked before anything starts, held by one search at a time, and
its state file (``raysft_state.json``): the parent run, the spec, MLflow store and data a
``--resume`` must match, and the search's starts so far."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, TypeAdapter

from raysft.config import SearchSpec
from raysft.data.digest import (
    TOKENS_CHANGED,
    Digests,
    changed_sources,
    changed_tokens,
    data_digests,
)
from raysft.errors import ConfigError, SearchStateError, one_line
from raysft.paths import InUse, dir_holder, hold_dir, replace_text, writable_dir_problem
from raysft.search import redact, tracking_store
from raysft.search import results as res
from raysft.search.compare import COMPARISON_JSON, COMPARISON_MD
from raysft.search.export import export_dir_problem, export_target
from raysft.search.plots import PLOTS_DIR
from raysft.search.ray_start import base_in_job_copy_notice, inside_job_copy
from raysft.search.tracking import ENDED_FILE, GAPS_FILE

log = logging.getLogger(__name__)

STATE_FILE = "raysft_state.json"  # first written with the parent run (driver._parent_run)

# What a search writes at the top of its experiment dir, but for tune/ (Tune's storage: where
# it is, a search is), its state file and hidden files (its lock, the storage check's
# markers): Train's storage, the trials' folders, the plots, the default export, the summary,
# the base-vs-tuned report and the tracking ledgers. A new search refuses a directory that
# holds any of them without a search (``foreign_outputs``): it would write over them. Other
# files (the spec, its data) may stay.
SEARCH_OUTPUTS = (
    "train", "trials", PLOTS_DIR, "champion", res.SUMMARY_FILE, COMPARISON_MD, COMPARISON_JSON,
    ENDED_FILE, GAPS_FILE,
)  # fmt: skip


def open_experiment(
    spec_path: str, cfg: SearchSpec, *, resume: bool, digests: Digests | None = None
) -> Path:
    """The experiment dir, checked against ``--resume`` before anything starts."""
    exp_dir = check_experiment_dir(spec_path, cfg, resume=resume, digests=digests)
    exp_dir.mkdir(parents=True, exist_ok=True)
    return exp_dir


def check_experiment_dir(
    spec_path: str,
    cfg: SearchSpec,
    *,
    resume: bool,
    held_ok: bool = False,
    digests: Digests | None = None,
) -> Path:
    """Where the search goes (resolved), refused if it cannot go there: a file, a search that
    is there without ``--resume`` (unless ``held_ok``: a dry run of an edited spec) or missing
    with it, files of a search's output names where no search is (``foreign_outputs``; a dry
    run notes them instead), another spec's search to resume, or any of its outputs inside a
    Ray job's copy of ``--working-dir``. A base model inside that copy is said here too (the
    export will carry it: ``export.stage_export``)."""
    exp_dir = Path(cfg.search.experiment_dir).resolve()
    lost = inside_job_copy(_outputs(cfg, exp_dir), os.environ, Path.cwd())
    if lost:
        raise ConfigError(spec_path, lost)
    if cfg.promote.enabled and cfg.method != "full":  # a full model's export holds its weights
        gone = base_in_job_copy_notice(cfg.model.name_or_path, os.environ, Path.cwd())
        if gone:
            log.warning("%s: %s", spec_path, gone)
    unusable = writable_dir_problem(exp_dir)
    if unusable:
        raise SearchStateError(f"{spec_path}: search.experiment_dir: {unusable}")
    tune_dir = exp_dir / "tune"
    holder = None if held_ok else experiment_dir_holder(exp_dir)
    if holder:  # said first: "--resume" would be refused while it runs too
        raise _in_use(spec_path, exp_dir, holder)
    if tune_dir.exists() and not resume and not held_ok:
        raise SearchStateError(
            f"{spec_path}: search.experiment_dir: {exp_dir} already holds a search; "
            "pass --resume to continue it or choose another directory"
        )
    if resume and not tune_dir.exists():
        raise SearchStateError(f"{spec_path}: --resume: no search to resume in {exp_dir}")
    foreign = [] if resume or held_ok else foreign_outputs(exp_dir)
    if foreign:
        notice = foreign_notice(exp_dir, foreign)
        raise SearchStateError(f"{spec_path}: search.experiment_dir: {notice}")
    if resume:
        _check_same_spec(spec_path, cfg, exp_dir, digests)
    unsafe = export_dir_problem(cfg.promote, exp_dir) if cfg.promote.enabled else None
    if unsafe:  # found now, not after the search
        raise SearchStateError(f"{spec_path}: promote.export_dir: {unsafe}")
    return exp_dir


def foreign_outputs(exp_dir: Path) -> list[str]:
    """The names of ``SEARCH_OUTPUTS`` that ``exp_dir`` holds though it holds no search (no
    ``tune/``), sorted: a new search would write over them. Empty where it holds a search (that
    is "pass --resume"'s to say) or none of them."""
    if not exp_dir.is_dir() or (exp_dir / "tune").exists():
        return []
    return sorted(name for name in SEARCH_OUTPUTS if (exp_dir / name).exists())


def foreign_notice(exp_dir: Path, names: list[str]) -> str:
    """What ``foreign_outputs`` found, as the refusal (and a dry run's note) says it."""
    return (
        f"{exp_dir} holds {', '.join(names)} but no search (no tune/): a search writes its own "
        "of these names there, over them; choose a new or empty directory, or move them away"
    )


def _outputs(cfg: SearchSpec, exp_dir: Path) -> dict[str, Path | None]:
    """Where a search writes, by setting: its experiment dir, the champion's export and a local
    MLflow store (sqlite or file); None for a store on a server."""
    uri = tracking_store.tracking_uri(cfg.tracking)
    store = tracking_store.local_store(uri)
    return {
        "search.experiment_dir": exp_dir,
        # Its default is inside the experiment dir: named only when set.
        "promote.export_dir": (
            export_target(cfg.promote, exp_dir).resolve()
            if cfg.promote.enabled and cfg.promote.export_dir
            else None
        ),
        "tracking.uri": store,
    }


# May change on --resume, as none changes what a trial trains or is scored on: each trial's
# resources (how many at once stays: Tune restores it), how often a failed one is retried, and
# the promotion (a promote.export_dir that failed the first finish, fixed for the next).
_RESUMABLE_CHANGES = ("search.resources", "search.max_retries", "promote.")


def spec_record(cfg: SearchSpec) -> dict[str, Any]:
    """The resolved spec as raysft_state.json keeps it (credentials redacted)."""
    tree: dict[str, Any] = res.json_safe(redact.redact_tree(cfg.model_dump(mode="json")))
    return tree


def _changed_paths(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted paths whose values differ between two spec records, but for _RESUMABLE_CHANGES
    and for settings added to raysft since ``old`` was recorded that hold their default now
    (``eval.max_prompts`` on a search started before it existed)."""
    a, b = redact.flatten(old), redact.flatten(new)
    return sorted(
        path
        for path in a.keys() | b.keys()
        if a.get(path) != b.get(path)
        and not path.startswith(_RESUMABLE_CHANGES)
        and not (path not in a and b[path] == _default_as_recorded(path))
    )


def _default_as_recorded(path: str) -> str | None:
    """The schema's default of a dotted SearchSpec field as ``spec_record`` and ``flatten``
    write it; None for a path that is no field, or one without a default. A field that a
    section's validator fills in from others (``search.mode`` from the metric) is not its
    default: such a new field would still be refused on resume."""
    model: Any = SearchSpec
    *sections, name = path.split(".")
    for part in sections:
        field = model.model_fields.get(part)
        kinds = (field.annotation, *get_args(field.annotation)) if field is not None else ()
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if model is None:
            return None
    field = model.model_fields.get(name)
    if field is None or field.is_required():
        return None
    # Validated and dumped as model_dump(mode="json") writes it: a float field's 2 as 2.0.
    kind = TypeAdapter(field.annotation)
    default = kind.dump_python(
        kind.validate_python(field.get_default(call_default_factory=True)), mode="json"
    )
    return redact.flatten({name: res.json_safe(default)})[name]


def _check_same_spec(
    spec_path: str, cfg: SearchSpec, exp_dir: Path, digests: Digests | None
) -> None:
    """``--resume`` continues the search it finds with the spec it started with: Tune restores
    its sampler and trials, but every trial's config comes from the spec given now.
    ``digests``: the data's, where the caller has them (``SharedData``), else read here."""
    state = read_state(spec_path, exp_dir)
    if not state:  # tune/ without it: lost, or copied without it
        raise SearchStateError(
            f"{spec_path}: --resume: {exp_dir / STATE_FILE} is missing, so neither the spec "
            "nor the data and MLflow store the search started with can be checked, and its "
            "parent run is not known: put the file back, or start the search anew in another "
            "search.experiment_dir"
        )
    if state.get("spec") is None:  # an experiment dir from before raysft kept its spec
        return
    changed = _changed_paths(state["spec"], spec_record(cfg))
    if changed:
        shown = ", ".join(changed[:8]) + (
            f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        )
        raise SearchStateError(
            f"{spec_path}: --resume: the spec differs from the one {exp_dir} was started with, "
            f"at {shown}; resume with that spec, or start a new search in another "
            "search.experiment_dir"
        )
    # Its parent and trial runs are in the MLflow store it started with (the spec may leave the
    # store to $MLFLOW_TRACKING_URI, or to ./mlflow.db of another directory).
    then = state.get("tracking_uri")
    uri = redact.redact("tracking_uri", tracking_store.tracking_uri(cfg.tracking))
    if isinstance(then, str) and redact.redact("tracking_uri", then) != uri:
        raise SearchStateError(
            f"{spec_path}: --resume: the search in {exp_dir} is tracked in the MLflow store "
            f"{redact.redact('tracking_uri', then)}, not {uri}; resume with that store "
            "(tracking.uri or $MLFLOW_TRACKING_URI), from the directory the search ran in if "
            "the spec names a relative one"
        )
    # Same paths, other bytes: the trials so far trained and were scored on the old ones.
    now = data_digests(cfg.data) if digests is None else digests
    then_data = state.get("data", {})
    moved = changed_sources(then_data, now)
    # Else the same bytes as far as they are hashed, maybe other token ids.
    retokenized = [] if moved else changed_tokens(then_data, now)
    if moved or retokenized:
        why = (
            f"the data differs from what the trials in {exp_dir} trained and were scored on; "
            "restore it"
            if moved
            else f"the data tokenizes to other ids than the trials in {exp_dir} trained and were "
            f"scored on ({TOKENS_CHANGED}); resume with what started the search"
        )
        raise SearchStateError(
            f"{spec_path}: --resume: {why}, or start a new search in another "
            f"search.experiment_dir: {'; '.join(moved or retokenized)}"
        )


def read_state(spec_path: str, exp_dir: Path) -> dict[str, Any]:
    """The experiment dir's raysft_state.json ({} where there is none yet). A damaged one (cut
    short by a kill or a full disk before raysft wrote it atomically, or edited by hand) is a
    ``SearchStateError`` naming it: without its parent run, spec and data record the search
    cannot be continued as the one it was."""
    path = exp_dir / STATE_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) else f"not JSON: {one_line(err)}"
        state = why
    if not isinstance(state, dict) or not isinstance(state.get("parent_run_id"), str):
        why = state if isinstance(state, str) else "not a record with the search's parent run"
        raise SearchStateError(
            f"{spec_path}: {path} is damaged ({why}): this search cannot be continued; "
            "start it anew in another search.experiment_dir (the trials' own results stay "
            f"under {exp_dir / 'tune'})"
        )
    return state


def recorded_digests(exp_dir: Path) -> Digests | None:
    """The data's digests as the search recorded them at its start (what its trials were
    scored on), or None where it has none to give (promotion then reads the files)."""
    try:
        return read_state(str(exp_dir), exp_dir).get("data")
    except SearchStateError:  # written whole: only a hand edit since damages it
        return None


def write_state(exp_dir: Path, state: dict[str, Any]) -> None:
    """raysft_state.json replaced whole (``replace_text``)."""
    replace_text(exp_dir / STATE_FILE, json.dumps(state, indent=2))


def count_start(exp_dir: Path, seconds: float) -> None:
    """Add this start of the search (ended however it ended, but for a kill it cannot catch) to
    raysft_state.json's ``earlier_starts``: a ``--resume``'s summary counts the whole search."""
    path = exp_dir / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        count, before = _earlier_starts(state)
        state["earlier_starts"] = {"count": count + 1, "seconds": round(before + seconds, 1)}
        write_state(exp_dir, state)
    except (OSError, ValueError, TypeError, KeyError) as err:  # no state yet (refused early)
        log.debug("search start not counted in %s: %s", path, err)


def hold_experiment_dir(spec_path: str, exp_dir: Path) -> Any:
    """An exclusive lock on the experiment dir for this search's lifetime (``hold_dir``). A
    second search started into the same directory before the first wrote anything there would
    otherwise pass every check and the two would write over each other's trials, runs and
    summary."""
    try:
        return hold_dir(exp_dir, what="search")
    except FileNotFoundError:  # removed meanwhile by another search refused as it started
        raise SearchStateError(
            f"{spec_path}: search.experiment_dir: {exp_dir} was removed as this search started "
            "(another search into it was refused at the same moment); run it again"
        ) from None
    except InUse as err:
        raise _in_use(spec_path, exp_dir, err.holder) from None


def _in_use(spec_path: str, exp_dir: Path, holder: str) -> SearchStateError:
    return SearchStateError(
        f"{spec_path}: search.experiment_dir: {exp_dir} is in use by another search "
        f"({holder}); wait for it to end, or choose another directory"
    )


def experiment_dir_holder(exp_dir: Path) -> str | None:
    """Who holds ``exp_dir``'s lock (``hold_experiment_dir``): the running search's pid and host
    as it wrote them, or None when no search runs there."""
    return dir_holder(exp_dir)


def _earlier_starts(state: dict[str, Any]) -> tuple[int, float]:
    """(count, seconds) of a search's earlier starts, from its raysft_state.json (``count_start``;
    none in a state written before raysft counted them)."""
    done = state.get("earlier_starts") or {"count": 0, "seconds": 0.0}
    return int(done["count"]), float(done["seconds"])


def read_earlier_starts(exp_dir: Path) -> tuple[int, float]:
    """``_earlier_starts`` of the experiment dir's state; (0, 0.0) where there is none."""
    try:
        return _earlier_starts(json.loads((exp_dir / STATE_FILE).read_text("utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        return 0, 0.0
