"""The benchmark presets: one model, one set of rows, one micro-batch, max length and step count
shared by every contender; plus the contenders themselves and their options.

``cpu``: the embedded tiny-base (Llama, 4 layers, d=128), full fine-tuning, 2 threads.
``gpu``: a TinyLlama-1.1B-shaped Llama with random weights (LoRA, full, QLoRA), then a 7B QLoRA
memory check (Llama-2-7B shape, r=16 on all linear layers, seq 1024, micro-batch 4, gradient
checkpointing). Shapes are written locally: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The seed's adapter (SEED.md section 6), also used by every LoRA contender of a preset so
# that LoRA throughput compares like with like.
SEED_LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}

TINYLLAMA_1B = {  # TinyLlama-1.1B's config.json, weights random
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
LLAMA2_7B = {  # Llama-2-7b-hf's config.json, weights random
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


@dataclass(frozen=True)
class Contender:
    """One way to train: ``family`` picks the code (seed, trl, raysft), ``options`` its knobs.

    Keys of ``options`` (all optional): method (full/lora/qlora), lr, lora (dict), bf16 (seed,
    trl), weights_bf16 (seed: load in bf16 as the seed does), gradient_checkpointing, packing,
    padding_free (trl), attn, row_len (raysft: packed row width), compile (raysft), model (a
    preset model key), batch_size, max_len, steps (a memory check's own shape),
    selective_logits (raysft: LM head only where the loss scores).
    """

    name: str
    family: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    models: dict[str, Any]  # key -> "embedded:NAME" or a config.json dict (random init)
    contenders: tuple[Contender, ...]
    experiments: tuple[Contender, ...] = ()  # run only when named with --contenders
    rows: int = 600
    eval_rows: int = 96
    batch_size: int = 8
    max_len: int = 512
    steps: int = 20
    threads: int | None = None
    seed: int = 0

    def all_contenders(self) -> tuple[Contender, ...]:
        return self.contenders + self.experiments

    def select(self, names: list[str] | None) -> list[Contender]:
        """The default contenders, or the named ones (default or experiment) in the given order."""
        if not names:
            return list(self.contenders)
        known = {c.name: c for c in self.all_contenders()}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"unknown contender(s) {missing}; known: {sorted(known)}")
        return [known[n] for n in names]

    def with_overrides(self, **kw: Any) -> Preset:
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


def _c(name: str, family: str, note: str = "", **options: Any) -> Contender:
    return Contender(name, family, options, note)


_FULL_LR, _LORA_LR = 1e-3, 5e-3  # search_spaces/full.yaml and lora.yaml on the tiny base
_CPU_TRL_FP32 = {"bf16": False, "gradient_checkpointing": False}

CPU = Preset(
    name="cpu",
    device="cpu",
    models={"base": "embedded:tiny-base"},
    threads=2,
    contenders=(
        _c("seed", "seed", "HF Trainer, pad to 512, labels = input_ids, fp32", lr=_FULL_LR),
        _c(
            "trl-defaults",
            "trl",
            "SFTConfig defaults: bf16 autocast, gradient checkpointing",
            lr=_FULL_LR,
        ),
        _c(
            "trl-fp32", "trl", "fp32, no checkpointing, packing=False", lr=_FULL_LR, **_CPU_TRL_FP32
        ),
        _c(
            "trl-fp32-packing",
            "trl",
            "fp32, packing=True (bfd: padding-free rows)",
            lr=_FULL_LR,
            packing=True,
            **_CPU_TRL_FP32,
        ),
        _c(
            "trl-fp32-padding-free",
            "trl",
            "fp32, padding_free=True, no packing (TRL then "
            "requires max_length=None: rows over 512 stay whole)",
            lr=_FULL_LR,
            padding_free=True,
            max_length=None,
            **_CPU_TRL_FP32,
        ),
        _c("raysft-full", "raysft", "packing, sdpa, fp32", method="full", lr=_FULL_LR),
        _c(
            "raysft-lora",
            "raysft",
            "the seed's adapter (r16 q,v), packing",
            method="lora",
            lr=_LORA_LR,
            lora=SEED_LORA,
        ),
        _c(
            "raysft-qlora",
            "raysft",
            "NF4 base (bitsandbytes CPU backend), seed's adapter",
            method="qlora",
            lr=_LORA_LR,
            lora=SEED_LORA,
        ),
    ),
    experiments=(
        _c(
            "trl-bf16",
            "trl",
            "bf16 autocast, no checkpointing, packing=False",
            lr=_FULL_LR,
            bf16=True,
            gradient_checkpointing=False,
        ),
        _c(
            "trl-bf16-grouped",
            "trl",
            "bf16 autocast, batches grouped by length (train_sampling_strategy), no checkpointing",
            lr=_FULL_LR,
            bf16=True,
            gradient_checkpointing=False,
            train_sampling_strategy="group_by_length",
        ),
        _c(
            "trl-bf16-grouped-compile",
            "trl",
            "trl-bf16-grouped with torch_compile=True",
            lr=_FULL_LR,
            bf16=True,
            gradient_checkpointing=False,
            train_sampling_strategy="group_by_length",
            torch_compile=True,
        ),
        _c(
            "seed-bf16",
            "seed",
            "the seed's bf16=True (CPU autocast)",
            lr=_FULL_LR,
            bf16=True,
        ),
        _c(
            "raysft-full-padded",
            "raysft",
            "dynamic padding, no packing",
            method="full",
            lr=_FULL_LR,
            packing=False,
        ),
        _c(
            "raysft-full-eager",
            "raysft",
            "eager attention",
            method="full",
            lr=_FULL_LR,
            attn="eager",
        ),
        _c(
            "raysft-full-bf16",
            "raysft",
            "bf16 autocast on the CPU",
            method="full",
            lr=_FULL_LR,
            precision="bf16",
        ),
        _c(
            "raysft-full-compile",
            "raysft",
            "train.compile (inductor)",
            method="full",
            lr=_FULL_LR,
            compile=True,
        ),
        _c(
            "raysft-full-compile-bf16",
            "raysft",
            "train.compile and bf16 autocast on the CPU",
            method="full",
            lr=_FULL_LR,
            compile=True,
            precision="bf16",
        ),
        _c(
            "raysft-full-grouped",
            "raysft",
            "one sample per row, batches grouped by length (data.group_by_length), fp32",
            method="full",
            lr=_FULL_LR,
            group_by_length=True,
        ),
        _c(
            "raysft-full-grouped-bf16",
            "raysft",
            "grouped by length, bf16 autocast, attention in fp32 (sdpa_fp32)",
            method="full",
            lr=_FULL_LR,
            group_by_length=True,
            precision="bf16",
            attn="sdpa_fp32",
        ),
        _c(
            "raysft-full-grouped-compile",
            "raysft",
            "grouped by length, train.compile (dynamic shapes), fp32: for CPUs that emulate bf16",
            method="full",
            lr=_FULL_LR,
            group_by_length=True,
            compile=True,
        ),
        _c(
            "raysft-full-grouped-compile-bf16",
            "raysft",
            "grouped by length, bf16 autocast, sdpa_fp32, train.compile (dynamic shapes)",
            method="full",
            lr=_FULL_LR,
            group_by_length=True,
            precision="bf16",
            attn="sdpa_fp32",
            compile=True,
        ),
        _c(
            "raysft-lora-compile",
            "raysft",
            "the seed's adapter, train.compile",
            method="lora",
            lr=_LORA_LR,
            lora=SEED_LORA,
            compile=True,
        ),
        _c(
            "raysft-full-row1024",
            "raysft",
            "packed rows of 1024",
            method="full",
            lr=_FULL_LR,
            row_len=1024,
        ),
        _c(
            "raysft-full-sellogits",
            "raysft",
            "LM head only at trained positions",
            method="full",
            lr=_FULL_LR,
            selective_logits=True,
        ),
    ),
)

_GPU_LR = 2e-4  # LoRA / full on a random-init 1B: throughput is the point, not the loss
_TRL_BEST = {"gradient_checkpointing": False}

GPU = Preset(
    name="gpu",
    device="cuda",
    models={"base": TINYLLAMA_1B, "7b": LLAMA2_7B},
    contenders=(
        _c(
            "seed-lora",
            "seed",
            "the seed's recipe as written: bf16 weights, bf16, LoRA q,v",
            method="lora",
            lr=_GPU_LR,
            bf16=True,
            weights_bf16=True,
            lora=SEED_LORA,
        ),
        _c(
            "trl-defaults",
            "trl",
            "SFTConfig defaults (bf16, checkpointing), LoRA q,v",
            method="lora",
            lr=_GPU_LR,
            lora=SEED_LORA,
        ),
        _c(
            "trl-no-gc",
            "trl",
            "bf16, no checkpointing, LoRA q,v",
            method="lora",
            lr=_GPU_LR,
            lora=SEED_LORA,
            **_TRL_BEST,
        ),
        _c(
            "trl-packing",
            "trl",
            "bf16, packing=True (bfd, padding-free), LoRA q,v",
            method="lora",
            lr=_GPU_LR,
            lora=SEED_LORA,
            packing=True,
            **_TRL_BEST,
        ),
        _c(
            "raysft-lora",
            "raysft",
            "packing, sdpa, bf16 autocast",
            method="lora",
            lr=_GPU_LR,
            lora=SEED_LORA,
        ),
        _c(
            "raysft-lora-flex",
            "raysft",
            "packing, flex_attention",
            method="lora",
            lr=_GPU_LR,
            lora=SEED_LORA,
            attn="flex_attention",
        ),
        _c(
            "raysft-full",
            "raysft",
            "packing, sdpa, bf16 autocast, fp32 master weights",
            method="full",
            lr=_GPU_LR,
        ),
        _c(
            "raysft-full-flex",
            "raysft",
            "packing, flex_attention",
            method="full",
            lr=_GPU_LR,
            attn="flex_attention",
        ),
        _c(
            "raysft-qlora",
            "raysft",
            "NF4 base, bf16 compute, seed's adapter",
            method="qlora",
            lr=_GPU_LR,
            lora=SEED_LORA,
        ),
        _c(
            "raysft-qlora-7b",
            "raysft",
            "7B memory check: r16 all-linear, seq 1024, mb 4, GC",
            method="qlora",
            lr=_GPU_LR,
            model="7b",
            batch_size=4,
            max_len=1024,
            steps=5,
            gradient_checkpointing=True,
            lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        ),
    ),
    experiments=(
        _c(
            "seed-full",
            "seed",
            "the seed's recipe, full fine-tuning (bf16 weights)",
            method="full",
            lr=_GPU_LR,
            bf16=True,
            weights_bf16=True,
        ),
        _c(
            "raysft-full-compile",
            "raysft",
            "torch.compile (inductor)",
            method="full",
            lr=_GPU_LR,
            compile=True,
        ),
        _c(
            "raysft-full-sellogits",
            "raysft",
            "LM head only at trained positions (vocab 32000: memory and compute)",
            method="full",
            lr=_GPU_LR,
            selective_logits=True,
        ),
        _c(
            "raysft-lora-padded",
            "raysft",
            "dynamic padding, no packing",
            method="lora",
            lr=_GPU_LR,
            lora=SEED_LORA,
            packing=False,
        ),
        _c(
            "raysft-lora-grouped",
            "raysft",
            "grouped by length (no mask: sdpa's flash kernel with is_causal), LoRA q,v",
            method="lora",
            lr=_GPU_LR,
            lora=SEED_LORA,
            group_by_length=True,
        ),
        _c(
            "raysft-full-grouped",
            "raysft",
            "grouped by length (no mask: sdpa's flash kernel with is_causal)",
            method="full",
            lr=_GPU_LR,
            group_by_length=True,
        ),
    ),
)

PRESETS = {"cpu": CPU, "gpu": GPU}
MEMORY_BUDGET_GIB = 24  # the 7B QLoRA goal: a trial fits a 24 GiB card
