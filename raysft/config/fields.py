"""What every configuration section shares: the base model (``Section``: unknown keys refused,
no NaN or infinity, no true/false for a number), the path validators, and the choices several
sections name.
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

Method = Literal["full", "lora", "qlora"]
DataFormat = Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text", "auto"]
Template = Literal["llama2", "chatml", "vicuna", "tokenizer"]
MAX_SEED = 2**32 - 1  # what every seeded library takes (Optuna and numpy refuse more)
MAX_INT = MAX_SEED  # the most any integer setting takes (Section)


def expand_home(value: Any) -> Any:
    """A path setting's leading ``~`` (or ``~user``) as a shell expands it, in a string or in
    each string of a list: YAML passes it on as written, and a file named ``~/d.jsonl`` is
    never what was meant. ``sqlite:///~/m.db`` too. Other values are left as they are."""
    if isinstance(value, list):
        return [expand_home(v) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith("sqlite:///~"):
        return "sqlite:///" + os.path.expanduser(value.removeprefix("sqlite:///"))
    return os.path.expanduser(value) if value.startswith("~") else value


def local_path(value: Any) -> Any:
    """An output directory setting (``expand_home`` expanded), refusing a URI: raysft writes there
    with plain file I/O, so ``s3://bucket/x`` became the relative directory ``s3:/bucket/x``
    under the working directory of each node, and a cluster's trials need one directory that
    every node sees."""
    value = expand_home(value)
    if isinstance(value, str) and not value.strip():
        # Path("") is the working directory: its files would be written over or among.
        # Refused in the validator, so on saved specs too (summary.json's, a trial's): a search
        # started since this refusal cannot have saved one, but one started before it could
        # (an empty output_dir or experiment_dir was accepted then) and would not load.
        raise ValueError("empty: give a directory (empty is the working directory)")
    if isinstance(value, str) and "://" in value:
        raise ValueError(
            f"{value}: a URI; raysft needs a shared filesystem path (NFS/EFS mounted at the "
            "same path on every node), not a cloud URI"
        )
    return value


def _takes(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's type is, or is a union or Literal... holding, one of ``kinds``."""
    if annotation in kinds:
        return True
    return any(_takes(arg, kinds) for arg in get_args(annotation) if arg is not annotation)


class Section(BaseModel):
    # allow_inf_nan=False: ``.inf`` (or ``--set ...=inf``) passes every ``gt=0``; NaN none.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true/false as 1/0 for a number (YAML's yes/on are true): ``lora.r:
        true`` would train at rank 1 without a word."""
        if isinstance(value, bool) and info.field_name is not None:
            kind = cls.model_fields[info.field_name].annotation
            if _takes(kind, (int, float)) and not _takes(kind, (bool,)):
                raise ValueError(f"should be {_numbers(kind)}, not {str(value).lower()}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _not_past_what_libraries_take(cls, value: Any) -> Any:
        """No integer setting above ``MAX_INT``: none means more, and torch, Optuna and the
        memory estimate overflow past 64 bits (``lora.r: 1e29`` was a TypeError in peft)."""
        if type(value) is int and abs(value) > MAX_INT:
            raise ValueError(f"Input should be less than or equal to {MAX_INT}")
        return value


def _numbers(kind: Any) -> str:
    """What a number field takes, in words: "a number", "a number or 'auto'", "... or null"."""
    words = ["a number"]
    words += [repr(a) for a in _literals(kind)]
    words += ["null"] if _takes(kind, (type(None),)) else []
    return " or ".join(words)


def _literals(kind: Any) -> list[Any]:
    if getattr(kind, "__origin__", None) is Literal:
        return list(get_args(kind))
    return [v for arg in get_args(kind) if arg is not kind for v in _literals(arg)]


def unknown_asset(names: list[str]) -> None:
    """A ValueError naming the first ``embedded:NAME`` that names no shipped asset: said at
    validation, with the file and the field (or ``--set``), not when the run reads it."""
    from raysft.assets import resolve
    from raysft.errors import AssetError

    for i, name in enumerate(names):
        try:
            resolve(name)  # what a run does with it
        except AssetError as err:
            raise ValueError(f"item {i}: {err}" if len(names) > 1 else str(err)) from None
