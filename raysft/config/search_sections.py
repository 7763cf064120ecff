"""The sections only a search spec (``python -m raysft.tune``) reads: ``search`` (its space,
scheduler, sampler and resources), ``tracking`` (MLflow) and ``promote`` (the Model Registry).
"""

from __future__ import annotations

import math
import posixpath
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raysft.config.fields import MAX_SEED, Section, expand_home, local_path

# MLflow's own rules (mlflow/utils/validation.py), checked at load rather than after the trials.
_ALIAS = re.compile(r"^[\w\-]{1,255}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


class SearchParam(Section):
    """One searched hyperparameter: a distribution over the value at a dotted config path."""

    # Non-finite bounds and values get _check_shape's own message, which names them.
    model_config = ConfigDict(allow_inf_nan=True)

    type: Literal["loguniform", "uniform", "int", "choice", "multiple_of"] = Field(
        description="loguniform/uniform/int need low, high; choice needs values; "
        "multiple_of needs of (a dotted path) and values (the factors)."
    )
    low: float | None = Field(None, description="Lower bound (inclusive).")
    high: float | None = Field(None, description="Upper bound (inclusive).")
    values: list[Any] | None = Field(None, description="Choices, or factors for multiple_of.")
    of: str | None = Field(None, description="multiple_of: the path this value multiplies.")

    @model_validator(mode="after")
    def _check_shape(self) -> SearchParam:
        # NaN passes every comparison below (and every ``gt=0`` of a probed field): refuse it here.
        bounds = [("low", self.low), ("high", self.high)]
        for name, value in bounds + [("values", v) for v in self.values or []]:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name}: {value} is not a finite number")
        if self.type in ("loguniform", "uniform", "int"):
            if self.low is None or self.high is None:
                raise ValueError(f"type {self.type} needs low and high")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) > high ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("loguniform needs low > 0")
        elif not self.values:
            raise ValueError(f"type {self.type} needs a non-empty values list")
        # A value listed twice is refused by the spec file's checks (raysft.search.searchable), not
        # here: a saved spec of a search that ran with one must load.
        if self.type == "multiple_of" and not self.of:
            raise ValueError("type multiple_of needs of: <dotted path>")
        takes = _PARAM_FIELDS[self.type]
        unread = [k for k in ("low", "high", "values", "of") if k not in takes]
        unread = [k for k in unread if getattr(self, k) is not None]
        if unread:
            raise ValueError(
                f"type {self.type} reads {' and '.join(takes)} only: {', '.join(unread)} "
                "would be ignored"
            )
        return self


_PARAM_FIELDS = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "int": ("low", "high"),
    "choice": ("values",),
    "multiple_of": ("of", "values"),
}


def _changed(section: Section, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` set to other than their defaults. Set to a default, a field counts as
    unset: a saved spec (raysft_state.json, a checkpoint's config.yaml) holds every field, and
    must load again."""
    fields = type(section).model_fields
    return sorted(
        k
        for k in names
        if k in section.model_fields_set and getattr(section, k) != fields[k].default
    )


class SchedulerSection(Section):
    type: Literal["asha", "none"] = Field("asha", description="Early stopping of bad trials.")
    grace_period: int = Field(1, gt=0, description="ASHA: evals a trial always gets.")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/reduction_factor per rung.")

    @model_validator(mode="after")
    def _asha_settings_need_asha(self) -> SchedulerSection:
        ignored = _changed(self, ("grace_period", "reduction_factor"))
        if self.type == "none" and ignored:
            raise ValueError(f"{', '.join(ignored)}: ASHA settings, but type is none")
        return self


class SamplerSection(Section):
    type: Literal["tpe", "random"] = Field(
        "tpe",
        description="How trials' values are proposed. `tpe`: Optuna's TPE, random for the "
        "first startup_trials, then modelled on the finished ones. `random`: independent draws.",
    )
    startup_trials: int | Literal["auto"] = Field(
        "auto",
        description="TPE: trials drawn at random before it models the results. `auto`: a third "
        "of num_samples, at least 2 and at most 10 (Optuna's own default, 10, would leave any "
        "search of up to 10 trials random).",
    )
    multivariate: bool = Field(
        True,
        description="TPE: model the parameters jointly (learning rate and rank interact), not "
        "each on its own.",
    )

    @field_validator("startup_trials")
    @classmethod
    def _at_least_one(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 (or auto)")
        return value

    @model_validator(mode="after")
    def _tpe_settings_need_tpe(self) -> SamplerSection:
        ignored = _changed(self, ("startup_trials", "multivariate"))
        if self.type == "random" and ignored:
            raise ValueError(f"{', '.join(ignored)}: TPE settings, but type is random")
        return self


class ResourcesSection(Section):
    workers: int = Field(1, gt=0, description="Ray Train workers per trial (data parallel).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs per worker.")
    gpus_per_worker: float | Literal["auto"] = Field(
        0.0,
        description="GPUs per worker; a fraction shares a GPU between trials (with workers: 1 "
        "only: two ranks of one trial on one GPU fail in NCCL), each trial's process capped to "
        "its share of the GPU's memory. `auto`: one GPU per worker, shared by as many trials as "
        "fit by the memory estimate with 10% headroom (1/n GPU each), when the GPU size is known "
        "(this machine's GPUs, or gpu_memory_gib) and workers is 1.",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How a trial's workers share the model. `ddp`: each holds all of it. "
        "`fsdp`: parameters, gradients and optimizer state split over the workers (full "
        "fine-tuning only). `auto`: fsdp for method full with workers > 1, ddp otherwise.",
    )
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU (GiB) to plan with where none is visible: a cluster spec "
        "checked on a GPU-less machine (--dry-run) or before the driver joins the cluster. "
        "Visible GPUs take precedence. Null: unknown there, and the memory check is skipped "
        "(the plan says so).",
    )

    scale_up_timeout_s: float = Field(
        900,
        ge=0,
        description="Joining a cluster that has an autoscaler (cluster.yaml: GPU workers from "
        "zero) whose nodes up hold fewer trials than wanted (max_concurrent, else num_samples): "
        "how long the driver asks it for nodes and waits before planning on the nodes then up. "
        "It stops waiting sooner once enough are up, or once the autoscaler has launched "
        "nothing for 60 s (it has no node type that fits, or is at its max_workers). 0: no "
        "wait. Without an autoscaler the plan is made at once on the nodes up.",
    )

    @field_validator("cpus_per_worker", "gpus_per_worker")
    @classmethod
    def _in_rays_steps(cls, value: float | str) -> float | str:
        """Ray refuses a fraction finer than 1/10000 of a CPU or GPU, at the trial's start."""
        if isinstance(value, float | int) and abs(value * 10**4 - round(value * 10**4)) > 1e-6:
            raise ValueError(f"{value!r}: Ray takes resources in steps of 0.0001")
        return value

    @field_validator("gpus_per_worker")
    @classmethod
    def _non_negative(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and value < 0:
            raise ValueError("must be >= 0 (or auto)")
        return float(value) if isinstance(value, int) else value

    @property
    def gpus(self) -> float:
        """GPUs per worker as a number; ``auto`` is one whole GPU until the plan shares it."""
        return 1.0 if self.gpus_per_worker == "auto" else self.gpus_per_worker

    def shards(self, method: str) -> bool:
        """Whether a trial of ``method`` trains with FSDP (``strategy`` resolved)."""
        return self.strategy != "ddp" and method == "full" and self.workers > 1


class SearchSection(Section):
    params: dict[str, SearchParam] = Field(description="Dotted config path -> distribution.")
    metric: str = Field(
        "eval_loss",
        description="Metric to optimise: a searchable name of the metric registry "
        "(README: Metrics). ASHA needs one reported at every eval.",
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="Minimise or maximise the metric. Null: the metric's own direction."
    )
    num_samples: int = Field(4, gt=0, description="Trials to run.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds the sampler.")
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    max_concurrent: int | None = Field(
        None, gt=0, description="Trials at once. Null: as many as the resources allow."
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="Restarts of a trial whose worker fails (a killed process, a lost node), each "
        "from the trial's last checkpoint, or after a model or Hub dataset failed to load. A "
        "trial out of memory, or failed on its data, spec or template (the same inputs would "
        "fail again), is failed, never retried.",
    )
    experiment_dir: str = Field(
        "runs/search", description="Where trials, checkpoints and summary.json go."
    )
    _experiment_home = field_validator("experiment_dir")(local_path)

    @field_validator("params")
    @classmethod
    def _searches_something(
        cls, value: dict[str, SearchParam], info: ValidationInfo
    ) -> dict[str, SearchParam]:
        # Not when validating again without the failed fields (``dropped``): the parameters
        # left may be none, and the other rules still have something to say.
        if not value and not (isinstance(info.context, dict) and "dropped" in info.context):
            raise ValueError("names no parameter: every trial would train the same config")
        return value


class TrackingSection(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.",
    )
    experiment: str = Field(
        "raysft", min_length=1, max_length=500, description="MLflow experiment name."
    )
    _uri_home = field_validator("uri")(expand_home)  # sqlite:///~/mlflow.db


class PromoteSection(Section):
    enabled: bool = Field(True, description="Register the best adapter after the search.")
    registered_model: str = Field("raysft-adapter", description="Model Registry name.")
    alias: str = Field("champion", description="Alias moved to a version that wins.")
    export_dir: str | None = Field(
        None, description="Where the promoted adapter is exported. Null: EXPERIMENT_DIR/champion."
    )
    _export_home = field_validator("export_dir")(local_path)

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: the Model Registry needs a name")
        if "/" in value or ":" in value:
            raise ValueError(f"{value!r}: a Model Registry name cannot contain '/' or ':'")
        norm = posixpath.normpath(value)  # MLflow treats the name as a path, too
        if norm != value or norm == "." or norm.startswith(".."):
            raise ValueError(f"{value!r}: MLflow refuses a Model Registry name it would read as "
                             f"the path {norm!r}")  # fmt: skip
        return value

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        if not _ALIAS.match(value):
            raise ValueError(
                f"{value!r}: an MLflow alias is 1-255 letters, digits, underscores or dashes"
            )
        if _RESERVED_ALIAS.match(value):
            raise ValueError(f"{value!r}: MLflow reserves 'latest' and version names (v1, V2)")
        return value
