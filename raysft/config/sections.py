"""The configuration schema: one pydantic model per YAML section, ``extra="forbid"``. The only
place defaults live; every option is documented once, on its field (README reference and
``--help`` come from here). This module holds a training run's sections and the two top-level
models (``Config``, ``SearchSpec``); ``search_sections`` the sections a search adds, ``fields``
what they all share.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raysft.config.fields import (
    MAX_SEED,
    DataFormat,
    Method,
    Section,
    Template,
    expand_home,
    local_path,
    unknown_asset,
)
from raysft.config.rules import CONFIG_RULES, SPEC_RULES, apply_rules
from raysft.config.search_sections import PromoteSection, SearchSection, TrackingSection


class ModelSection(Section):
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
        description="Attention kernel. All keep packed samples independent (`data.packing`; "
        "flex_attention needs CUDA). `sdpa_fp32`: sdpa on float32 q, k, v under bf16 "
        "autocast, for CPUs whose bf16 attention kernel is slower than their fp32 one "
        "(benchmarks/RESULTS.md); the same as sdpa without autocast. flex_attention is not "
        "recommended for searches: "
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
        unknown_asset([value])
        return expand_home(value)  # type: ignore[no-any-return]  # a local directory as ~/models/x


class LoraSection(Section):
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


class QloraSection(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (NF4 per QLoRA).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of the de-quantized matmuls. `auto`: bfloat16 where bf16 is native "
        "(a CUDA GPU of compute capability >= 8.0, a CPU with AVX512-BF16 or AMX), float16 on "
        "older CUDA GPUs, float32 on other CPUs: there bf16 is emulated, and QLoRA on the "
        "embedded base trained 8x slower with bfloat16 (benchmarks/RESULTS.md).",
    )


class DataSection(Section):
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
        0.1,
        gt=0,
        lt=1,
        description=(
            "Share of `train` held out when `eval` is null (copies of a row are held out or "
            "trained on together)."
        ),
    )
    format: DataFormat = Field("auto", description="Row format; `auto` detects it per row.")
    template: Template = Field(
        "chatml",
        description="Chat template. `tokenizer` uses the tokenizer's own chat_template.",
    )
    system_prompt: str | None = Field(
        None,
        description="System message added to conversations that have none. Blank: none (as "
        "a row's blank system message is).",
    )
    max_seq_len: int = Field(512, gt=8, description="Tokens per sample (and per packed row).")
    packing: bool = Field(
        True,
        description="Pack samples into rows of max_seq_len, each attending only to itself. "
        "Needs a model that builds its attention mask from position ids (Llama, Mistral, Qwen, "
        "Gemma, Phi, GPT-2 do; OPT, Bloom and MPT do not): each run checks the loaded model "
        "with one forward and refuses packing on one whose packed samples would see each other.",
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
    train_on_prompt: bool = Field(
        False,
        description="Train on every token of a training row (system and user turns, the "
        "template's markup, assistant messages of weight 0), not on the answers alone: "
        "Axolotl's `train_on_inputs`, LLaMA-Factory's `train_on_prompt`, TRL's default for "
        "conversational rows without `assistant_only_loss`. The held-out loss stays on the "
        "answers, so runs with and without it compare (train_loss then counts the prompts too).",
    )
    on_error: Literal["strict", "skip"] = Field(
        "strict",
        description="Malformed rows: `strict` stops naming file/row/field; `skip` drops and "
        "counts them.",
    )
    max_eval_samples: int | None = Field(
        200,
        gt=0,
        description="Cap on eval conversations (eval loss, and the generated-answer metrics "
        "unless `eval.max_prompts` caps them lower): a sample drawn with `data.seed` (else "
        "`train.seed`), so runs of other seeds score other rows of a larger eval set (to "
        "compare seeds, set `data.seed`, or this to null or to at least the eval rows). Null: "
        "all.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seeds the data alone: the split of `train` (`eval: null`), the sample of "
        "`max_eval_samples` and the order of the training batches (transformers' `data_seed`). "
        "Null: `train.seed`. Set, runs of other `train.seed`s (a search of it too) train and "
        "are scored on the same rows.",
    )

    @field_validator("system_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        # Else an empty "<<SYS>>" block, or a blank line in place of vicuna's own system line.
        return value if value is None or value.strip() else None

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
        unknown_asset([value] if isinstance(value, str) else value or [])
        return expand_home(value)  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _grouping_is_unpacked(self) -> DataSection:
        if self.group_by_length and self.packing:
            raise ValueError(
                "group_by_length: groups unpacked samples by length, but packing is true; set "
                "data.packing: false"
            )
        return self


class TrainSection(Section):
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
    warmup_ratio: float = Field(
        0.03,
        ge=0,
        lt=1,
        description=(
            "Share of steps of linear warmup (rounded up to whole steps). The first warmup "
            "step runs at rate 0, as in transformers' schedules: a run of max_steps 1 needs "
            "warmup_ratio 0."
        ),
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Warmup in optimizer steps instead of a share of them (transformers' "
        "`warmup_steps` as a count): set, `warmup_ratio` is not read (a warning says so where "
        "it is set). Fewer than `max_steps`.",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW weight decay, on weight matrices only (not on norm gains or biases).",
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="`adamw`: torch's AdamW. `adamw_8bit`: bitsandbytes' 8-bit AdamW, its two "
        "states quantized blockwise to 8 bits (2 bytes per trained parameter instead of 8; "
        "TRL's `optim: adamw_8bit`). `paged_adamw_8bit`: the same, its states in memory the "
        "GPU pages out to the CPU under pressure (the QLoRA paper's choice; on a CPU, plain "
        "8-bit). Not with FSDP yet.",
    )
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="The optimizer's beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="The optimizer's beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="The optimizer's epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping. Null: none.")
    batch_size: int = Field(
        4,
        gt=0,
        description="Rows (packed or padded) per micro-batch. With `data.group_by_length`: a "
        "micro-batch holds up to batch_size x `data.max_seq_len` tokens, as many rows as fit.",
    )
    grad_accum: int = Field(4, gt=0, description="Micro-batches per optimizer step.")
    max_steps: int = Field(
        200,
        gt=0,
        description="Optimizer steps (epochs repeat the data). Or set `train.epochs` instead.",
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="The run's length in passes over the training rows (TRL's "
        "`num_train_epochs`), instead of `train.max_steps`: once the data is read it becomes "
        "max_steps = ceil(epochs x optimizer steps per epoch), said in the log and kept in the "
        "run's config.yaml (an epoch: micro-batches per worker / `grad_accum`; grouped by "
        "length: the first epoch's). Not with `train.max_steps` set; in a search, not with a "
        "searched `train.batch_size`, `grad_accum`, `compile`, `data.packing`, "
        "`data.group_by_length` or `data.train_on_prompt` (each changes the steps of an "
        "epoch).",
    )
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
        description="Also score the untrained base model on the same held-out rows: a run, "
        "before its first step, on eval loss (and exact match with `train.exact_match`); a "
        "search once, after the trials, on every metric (base_vs_tuned.md), not in each trial.",
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
        description="Seeds the init of adapters, dropout and NEFTune noise, and (without "
        "`data.seed`) the data: the split, the eval sample and the batches' order.",
    )
    num_threads: int | None = Field(
        None,
        gt=0,
        description="torch CPU threads per worker. Null: torch's default (in a search Ray sets "
        "it to search.resources.cpus_per_worker); in a search at most cpus_per_worker.",
    )

    def warmup(self) -> int:
        """Optimizer steps of linear warmup: ``warmup_steps``, else ``warmup_ratio`` of the run's
        steps, rounded up."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.max_steps)


class EvalSection(Section):
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
    max_prompts: int | None = Field(
        None,
        gt=0,
        description="Held-out prompts the generated-answer metrics answer: the first N eval rows "
        "whose prompts fit `data.max_seq_len`, where generating for all of them would take too "
        "long. Eval loss still scores every eval row (`data.max_eval_samples`). Null: all.",
    )
    pass_k: int = Field(1, gt=0, description="The k of pass@k (at most `samples`).")
    code_timeout_s: float = Field(
        5.0,
        gt=0,
        le=86400,
        description="pass@k: wall-clock limit of one answer's program and its tests (at most a "
        "day).",
    )
    code_memory_mb: int = Field(
        1024,
        gt=0,
        le=2**20,
        description="pass@k: address-space limit of one answer's program (MiB, at most 1 TiB).",
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalSection:
        if self.pass_k > self.samples:
            raise ValueError(
                f"pass_k ({self.pass_k}) > samples ({self.samples}): pass@k needs at least k "
                "answers per prompt"
            )
        return self


class Config(Section):
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

    _output_home = field_validator("output_dir")(local_path)

    def data_seed(self) -> int:
        """What seeds the data (split, eval sample, batch order): ``data.seed``, else
        ``train.seed``."""
        return self.data.seed if self.data.seed is not None else self.train.seed

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
