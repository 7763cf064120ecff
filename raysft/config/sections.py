"""The configuration schema: one pydantic model per YAML section, ``extra="forbid"``. The only
place defaults live; every option is documented once, on its field (README reference and
``--help`` come from here).
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from raysft.config.rules import CONFIG_RULES, SPEC_RULES, apply_rules

Method = Literal["full", "lora", "qlora"]
DataFormat = Literal["alpaca", "sharegpt", "messages", "auto"]
Template = Literal["llama2", "chatml", "vicuna", "tokenizer"]
MAX_SEED = 2**32 - 1  # what every seeded library takes (Optuna and numpy refuse more)
# MLflow's own rules (mlflow/utils/validation.py), checked at load rather than after the trials.
_ALIAS = re.compile(r"^[\w\-]{1,255}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


def _home(value: Any) -> Any:
    """A path setting's leading ``~`` (or ``~user``) as a shell expands it, in a string or in
    each string of a list: YAML passes it on as written, and a file named ``~/d.jsonl`` is
    never what was meant. ``sqlite:///~/m.db`` too. Other values are left as they are."""
    if isinstance(value, list):
        return [_home(v) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith("sqlite:///~"):
        return "sqlite:///" + os.path.expanduser(value.removeprefix("sqlite:///"))
    return os.path.expanduser(value) if value.startswith("~") else value


def _local_path(value: Any) -> Any:
    """An output directory setting (``_home`` expanded), refusing a URI: raysft writes there
    with plain file I/O, so ``s3://bucket/x`` became the relative directory ``s3:/bucket/x``
    under the working directory of each node, and a cluster's trials need one directory that
    every node sees."""
    value = _home(value)
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


class _Section(BaseModel):
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


class ModelSection(_Section):
    name_or_path: str = Field(
        "embedded:tiny-base",
        description="Hub id or local directory of the base model (Llama, Qwen2, Mistral style). "
        "`embedded:tiny-base` is the bundled offline base model.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repo's own Python code to run. Off unless you trust it."
    )
    attn_implementation: Literal["eager", "sdpa", "sdpa_fp32", "flex_attention"] = Field(
        "sdpa",
        description="Attention kernel. All keep packed samples independent (flex_attention "
        "needs CUDA). `sdpa_fp32`: sdpa on float32 q, k, v under bf16 autocast, for CPUs whose "
        "bf16 attention kernel is slower than their fp32 one (benchmarks/RESULTS.md); the same "
        "as sdpa without autocast. flex_attention is not recommended for searches: "
        "transformers compiles it anew at every train/eval switch (each eval) and shape changes "
        "trigger recompiles; that cost is unmeasured here (README: GPU clusters).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the frozen base weights (lora, qlora: the base; for qlora its "
        "unquantized layers: embeddings, norms, lm_head). `auto`: bfloat16 on a CUDA GPU with "
        "native bf16 (compute capability >= 8), float16 on older CUDA GPUs, float32 on the CPU. "
        "Adapters and optimizer state stay float32. Full fine-tuning keeps float32 master "
        "weights (its compute dtype is train.precision): only auto or float32 with method full.",
    )

    @field_validator("name_or_path")
    @classmethod
    def _names_a_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: give a Hub id, a local directory or embedded:tiny-base")
        return _home(value)  # type: ignore[no-any-return]  # a local directory as ~/models/x


class LoraSection(_Section):
    r: int = Field(16, gt=0, description="LoRA rank r: trainable 2*d*r per adapted d x d matrix.")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator: update = (alpha / r) * B A."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names to adapt, or `all-linear` (every linear layer but the LM head). "
        "Each name must match a layer LoRA can adapt (linear, Conv1D, embedding, ...) by its "
        "dotted name or its last components.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale alpha/sqrt(r).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _a_list_or_all_linear(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            names = [n.strip() for n in value.split(",") if n.strip()]
            raise ValueError(
                f"{value!r}: a list of module names ([{', '.join(names) or 'q_proj, v_proj'}]) "
                "or all-linear"
            )
        return value

    @staticmethod
    def matches(module: str, target: str) -> bool:
        """peft's rule for a list of target_modules: ``target`` names ``module`` when the
        module's dotted name equals it or ends with ``.target``."""
        return module == target or module.endswith(f".{target}")


class QloraSection(_Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (NF4 per QLoRA).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of the de-quantized matmuls. `auto`: bfloat16 where bf16 is native "
        "(a CUDA GPU of compute capability >= 8.0, a CPU with AVX512-BF16 or AMX), float16 on "
        "older CUDA GPUs, float32 on other CPUs: there bf16 is emulated, and QLoRA on the "
        "embedded base trained 8x slower with bfloat16 (benchmarks/RESULTS.md).",
    )


class DataSection(_Section):
    train: str | list[str] = Field(
        default_factory=lambda: ["embedded:tasks-alpaca.jsonl", "embedded:tasks-sharegpt.jsonl"],
        description="Training data: JSON / JSONL / Parquet file(s), a saved `datasets` directory "
        "(`DIR[:SPLIT]`; a DatasetDict's `train` by default), or a `datasets` hub name "
        "(`hf:NAME[:SPLIT]`). A list concatenates sources.",
    )
    eval: str | list[str] | None = Field(
        "embedded:tasks-eval.jsonl",
        description="Held-out data, same forms as `train`, but a saved DatasetDict of several "
        "splits and a hub dataset name their split (`DIR:test`, `hf:NAME:validation`): never "
        "`train` by default. Null: a seeded split of `train`.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of `train` held out when `eval` is null."
    )
    format: DataFormat = Field("auto", description="Row format; `auto` detects it per row.")
    template: Template = Field(
        "chatml",
        description="Chat template. `tokenizer` uses the tokenizer's own chat_template.",
    )
    system_prompt: str | None = Field(
        None, description="System message added to conversations that have none."
    )
    max_seq_len: int = Field(512, gt=8, description="Tokens per sample (and per packed row).")
    packing: bool = Field(
        True, description="Pack samples into rows of max_seq_len, each attending only to itself."
    )
    group_by_length: bool = Field(
        False,
        description="With `packing: false`: one sample per row, and each micro-batch takes "
        "samples of similar length, up to `train.batch_size` x `max_seq_len` tokens padding "
        "included, with causal attention and no mask. Little padding and short rows: faster "
        "than packing where the attention kernel computes a packed row's masked blocks anyway "
        "(the CPU; benchmarks/RESULTS.md). A batch of one length can be a batch of one kind "
        "of task: compare the held-out metric with packing's on your data (README).",
    )
    on_error: Literal["strict", "skip"] = Field(
        "strict",
        description="Malformed rows: `strict` stops naming file/row/field; `skip` drops and "
        "counts them.",
    )
    max_eval_samples: int | None = Field(
        200, gt=0, description="Cap on eval conversations (loss and exact match). Null: all."
    )

    @field_validator("train", "eval")
    @classmethod
    def _names_a_source(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value == [] or value == "":
            raise ValueError("names no data: give a file, directory or hf:NAME (or a list)")
        empty = [i for i, v in enumerate(value) if not v.strip()] if isinstance(value, list) else []
        if empty or (isinstance(value, str) and not value.strip()):
            # An empty path would be read as the working directory.
            where = f"item {empty[0]} " if empty else ""
            raise ValueError(f"{where}is empty: give a file, directory or hf:NAME")
        return _home(value)  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _grouping_is_unpacked(self) -> DataSection:
        if self.group_by_length and self.packing:
            raise ValueError(
                "group_by_length: groups unpacked samples by length, but packing is true; set "
                "data.packing: false"
            )
        return self


class TrainSection(_Section):
    learning_rate: float = Field(
        2e-5,
        gt=0,
        description="Peak learning rate. SFT of real models: 1e-5..2e-5 (full), 1e-4..3e-4 "
        "(LoRA). The default is full fine-tuning's: with lora or qlora, set it (every shipped "
        "spec does); the embedded ~1M-parameter base wants ~100x more.",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps of linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping. Null: none.")
    batch_size: int = Field(
        4,
        gt=0,
        description="Rows (packed or padded) per micro-batch. With `data.group_by_length`: a "
        "micro-batch holds up to batch_size x `data.max_seq_len` tokens, as many rows as fit.",
    )
    grad_accum: int = Field(4, gt=0, description="Micro-batches per optimizer step.")
    max_steps: int = Field(200, gt=0, description="Optimizer steps (epochs repeat the data).")
    eval_every: int = Field(
        50, gt=0, description="Eval loss every N optimizer steps, and always at the last step."
    )
    exact_match: bool = Field(
        True,
        description="Generate answers to the eval set at the end and report exact match, ROUGE-L, "
        "BLEU and (for rows with tests) pass@k; settings in `eval`.",
    )
    max_new_tokens: int = Field(32, gt=0, description="Generation cap per answer (tokens).")
    eval_base: bool = Field(
        True,
        description="Also score the untrained base model on the same held-out rows. In a search "
        "this happens once, after the trials (base_vs_tuned.md), not in each trial.",
    )
    neftune_alpha: float | None = Field(
        None,
        ge=0,
        description="NEFTune noise alpha (paper: 5, 10, 15); scale alpha/sqrt(L*d), L = each "
        "sample's own length. 0 or null: off.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Autocast of the forward pass. `auto`: bf16 on a CUDA GPU with native bf16 "
        "(not emulated), else none. `bf16` on a device that emulates it (a CPU without "
        "AVX512-BF16 or AMX, a GPU below compute capability 8.0) trains, with a warning in the "
        "trial's log (on an AVX2-only CPU it was 10x slower than fp32: benchmarks/RESULTS.md).",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Where a trial trains. `auto`: a CUDA GPU if torch can use one, else the CPU; "
        "but a search worker that Ray granted a GPU (search.resources.gpus_per_worker > 0) fails "
        "at once if torch cannot use it, naming the node, torch's CUDA build and the driver, "
        "and one granted none trains on the CPU. `cuda`: the same failure without a usable GPU. "
        "`cpu`: the CPU even if a GPU is there.",
    )
    compile: bool = Field(
        False,
        description="torch.compile (inductor) the training forward and backward. Evals and "
        "generation stay eager. Packed rows are then padded to `data.max_seq_len` and an epoch's "
        "last, partial micro-batch is skipped, so one shape compiles once (padded rows recompile "
        "once with a dynamic width, as do batches grouped by length). The first step pays the "
        "compile (embedded base on 2 CPU cores: 20-100 s); on the CPU it gains 5-25% per step "
        "(benchmarks/RESULTS.md). Not with FSDP yet.",
    )
    seed: int = Field(
        42,
        ge=0,
        le=MAX_SEED,
        description="Seeds data order, split, init of adapters and noise.",
    )
    num_threads: int | None = Field(
        None,
        gt=0,
        description="torch CPU threads per worker. Null: torch's default (in a search Ray sets "
        "it to search.resources.cpus_per_worker); in a search at most cpus_per_worker.",
    )


class EvalSection(_Section):
    """How the held-out answers are generated and code answers run (generation metrics: exact
    match, ROUGE-L, BLEU, pass@k; see README: Metrics). Generation is on with
    `train.exact_match`, capped by `train.max_new_tokens`."""

    samples: int = Field(
        1,
        gt=0,
        description="Answers generated per held-out prompt (the n of pass@k). Text metrics "
        "average over all of them.",
    )
    temperature: float = Field(
        0.0,
        ge=0,
        description="0: greedy decoding, or sampling at temperature 1 when samples > 1 (n greedy "
        "answers would be identical). Above 0: sampling at this temperature, no top-k/top-p cut.",
    )
    pass_k: int = Field(1, gt=0, description="The k of pass@k (at most `samples`).")
    code_timeout_s: float = Field(
        5.0, gt=0, description="pass@k: wall-clock limit of one answer's program and its tests."
    )
    code_memory_mb: int = Field(
        1024, gt=0, description="pass@k: address-space limit of one answer's program (MiB)."
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalSection:
        if self.pass_k > self.samples:
            raise ValueError(
                f"pass_k ({self.pass_k}) > samples ({self.samples}): pass@k needs at least k "
                "answers per prompt"
            )
        return self


class SearchParam(_Section):
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


class SchedulerSection(_Section):
    type: Literal["asha", "none"] = Field("asha", description="Early stopping of bad trials.")
    grace_period: int = Field(1, gt=0, description="ASHA: evals a trial always gets.")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/reduction_factor per rung.")


class SamplerSection(_Section):
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
        # Set to other than their defaults: a saved spec (raysft_state.json, a checkpoint's
        # config.yaml) holds every field, and must load again.
        fields = type(self).model_fields
        ignored = sorted(
            k
            for k in ("startup_trials", "multivariate")
            if k in self.model_fields_set and getattr(self, k) != fields[k].default
        )
        if self.type == "random" and ignored:
            raise ValueError(f"{', '.join(ignored)}: TPE settings, but type is random")
        return self


class ResourcesSection(_Section):
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


class SearchSection(_Section):
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
    _experiment_home = field_validator("experiment_dir")(_local_path)

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


class TrackingSection(_Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.",
    )
    experiment: str = Field(
        "raysft", min_length=1, max_length=500, description="MLflow experiment name."
    )
    _uri_home = field_validator("uri")(_home)  # sqlite:///~/mlflow.db


class PromoteSection(_Section):
    enabled: bool = Field(True, description="Register the best adapter after the search.")
    registered_model: str = Field("raysft-adapter", description="Model Registry name.")
    alias: str = Field("champion", description="Alias moved to a version that wins.")
    export_dir: str | None = Field(
        None, description="Where the promoted adapter is exported. Null: EXPERIMENT_DIR/champion."
    )
    _export_home = field_validator("export_dir")(_local_path)

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


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    method: Method = Field(
        "lora", description="full: every weight; lora; qlora: LoRA on 4-bit NF4."
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    qlora: QloraSection = Field(default_factory=QloraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output_dir: str = Field("runs/train", description="Adapter/model, tokenizer, metrics.json.")
    search: SearchSection | None = Field(None, description="Search spec (raysft.tune only).")
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    promote: PromoteSection = Field(default_factory=PromoteSection)

    _output_home = field_validator("output_dir")(_local_path)

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> Config:
        return apply_rules(self, CONFIG_RULES, info)  # type: ignore[no-any-return]


class SearchSpec(Config):
    """A search spec (``python -m raysft.tune``): a config whose ``search`` section is required."""

    search: SearchSection = Field(description="Search spec (raysft.tune only).")

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> SearchSpec:
        # Replaces Config's validator of the same name: one list, so one broken rule of either
        # kind does not hide the other's.
        return apply_rules(self, CONFIG_RULES + SPEC_RULES, info)  # type: ignore[no-any-return]
