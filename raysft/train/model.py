"""Tokenizer and model loading for the three methods (full, lora, qlora), counting and saving.

Training always runs with ``model.config.use_cache = False``: with a cache, transformers ignores
the position-id resets of packed rows and lets packed samples attend to each other.

Precision: full fine-tuning holds float32 master weights (bf16 compute comes from autocast);
lora and qlora load the frozen base in ``model.dtype`` (bf16 on GPUs with native bf16) and keep
the adapters, hence the optimizer state, in float32.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysft.config import Config, ModelSection, QloraSection
from raysft.data.templates import export_chat_template
from raysft.data.tokens import adds_bos_token, space_merges_into_word
from raysft.errors import ModelError
from raysft.thirdparty import peft_quietly
from raysft.train import attention
from raysft.train.device import bf16_emulation, native_bf16
from raysft.train.hub import from_pretrained
from raysft.train.lora import build_lora_config, check_model_targets

if TYPE_CHECKING:
    import torch
    import transformers

log = logging.getLogger(__name__)

# Non-reentrant checkpointing: works with frozen inputs (LoRA) and keyword arguments.
_GC_KWARGS = {"use_reentrant": False}


def save_tokenizer(tok: Any, out: str | Path) -> None:
    """``tok`` saved as its model has it: without the pad token ``load_tokenizer`` lent it."""
    if not getattr(tok, "raysft_pad_added", False):
        tok.save_pretrained(str(out))
        return
    pad = tok.pad_token
    tok.pad_token = None
    try:
        tok.save_pretrained(str(out))
    finally:
        tok.pad_token = pad


def load_tokenizer(model_cfg: ModelSection) -> Any:
    """The model's tokenizer, right padding, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, model_cfg)
    if tok.pad_token is None:
        # Safe to reuse unk/eos: labels and attention are masked by position (collate_* set -100
        # and seg_lens on padding), never by comparing token ids with pad_token_id. Saved
        # without it (``save_tokenizer``): a collator that masks pad ids would mask EOS too.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        tok.raysft_pad_added = True
    tok.padding_side = "right"
    # raysft holds every sample to data.max_seq_len itself, naming the row; transformers' own
    # "Token indices sequence length is longer than ..." warning, about the model's
    # model_max_length, read like a crash just before that message.
    warned = getattr(tok, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def check_vocab(vocab_size: Any, tokenizer: Any, *, name: str) -> None:
    """The tokenizer's ids all have an embedding row: a larger tokenizer (another model's)
    would stop every trial at its first forward, with an IndexError (a device-side assert on
    CUDA)."""
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ModelError(
            f"model.name_or_path: {name}: its tokenizer has {len(tokenizer)} tokens but the model "
            f"embeds {vocab_size} (vocab_size): ids from {vocab_size} on have no embedding (a "
            "tokenizer of another model?)"
        )


def training_tokenizer(cfg: Config) -> Any:
    """The tokenizer a run renders and tokenizes its data with, and saves with every export:
    the model's, with the chat template of ``data.template`` (plain transformers then prompts
    as training did: the base's own chat_template may be another format, and knows nothing of
    ``data.system_prompt``). Rendering is unchanged by it: built-in templates never read it,
    and every conversation already opens with the system prompt where the wrapper adds it."""
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.chat_template = export_chat_template(
        cfg.data.template,
        system_prompt=cfg.data.system_prompt,
        tokenizer_template=getattr(tokenizer, "chat_template", None),
        space_with_answer=(
            getattr(tokenizer, "is_fast", False) and space_merges_into_word(tokenizer)
        ),
        bos=adds_bos_token(tokenizer),
    )
    return tokenizer


def resolve_compute_dtype(q: QloraSection, device: torch.device) -> torch.dtype:
    """``qlora.compute_dtype`` on ``device``: `auto` is bf16 only where bf16 is native."""
    import torch

    if q.compute_dtype != "auto":
        return getattr(torch, q.compute_dtype)
    if device.type == "cuda":
        return _cuda_half(device)
    return torch.float32 if bf16_emulation(device) else torch.bfloat16


def _cuda_half(device: torch.device) -> torch.dtype:
    """The half dtype a CUDA GPU computes natively: bf16 from compute capability 8.0, else fp16."""
    import torch

    return torch.bfloat16 if native_bf16(device) else torch.float16


def build_bnb_config(q: QloraSection, device: torch.device) -> transformers.BitsAndBytesConfig:
    """4-bit bitsandbytes quantization of the base model's linear layers (QLoRA)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(q, device),
    )


def torch_device(device: str | torch.device) -> torch.device:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype the base model loads in (``model.dtype``; full: float32 master weights)."""
    import torch

    if cfg.method == "full":
        return torch.float32  # validation refuses a half model.dtype with method full
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    if device.type == "cuda":
        return _cuda_half(device)
    return torch.float32


def check_bnb(dev: torch.device, quant_type: str) -> None:
    """Raise ModelError unless bitsandbytes can 4-bit quantize on ``dev`` (probe: one block)."""
    why = "method: qlora needs bitsandbytes with a CUDA device or its CPU backend: "
    try:
        import bitsandbytes.functional as bnbf
    except Exception as err:  # ImportError, or a broken native library raising at import
        raise ModelError(f"{why}cannot import bitsandbytes ({err})") from err
    import torch

    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{why}device {dev} requested but CUDA is not available")
    try:
        packed, state = bnbf.quantize_4bit(torch.ones(64, device=dev), quant_type=quant_type)
        bnbf.dequantize_4bit(packed, state)
    except Exception as err:
        raise ModelError(f"{why}no usable backend for {dev.type} ({err})") from err


def load_model(cfg: Config, *, device: str | torch.device = "cpu") -> Any:
    """The model to train: full (fp32, all trainable), lora or qlora (frozen base in
    ``model.dtype`` + fp32 adapter).

    Returned as ``from_pretrained`` leaves it (eval mode); the trainer calls ``.train()``.
    """
    from transformers import AutoModelForCausalLM

    dev = torch_device(device)
    kwargs: dict[str, Any] = {
        "attn_implementation": cfg.model.attn_implementation,
        "dtype": resolve_dtype(cfg, dev),
        "device_map": {"": dev},
    }
    gc = cfg.train.gradient_checkpointing
    if cfg.method == "qlora":
        check_bnb(dev, cfg.qlora.quant_type)
        kwargs["quantization_config"] = bnb = build_bnb_config(cfg.qlora, dev)
        log.info(
            "qlora: %s base, compute dtype %s (qlora.compute_dtype: %s)",
            cfg.qlora.quant_type,
            str(bnb.bnb_4bit_compute_dtype).removeprefix("torch."),
            cfg.qlora.compute_dtype,
        )
    model = from_pretrained(AutoModelForCausalLM, cfg.model, **kwargs)
    model.config.use_cache = False  # a cache disables the per-sample mask of packed rows
    if cfg.method == "qlora":
        keep_4bit_weights_trainable(model)
    if cfg.method == "full":
        return _all_trainable(model, gc=gc)
    return _attach_adapter(model, cfg, gc=gc)


def _all_trainable(model: Any, *, gc: bool) -> Any:
    """Method full's model as training takes it: every weight trainable, activation
    checkpointing where ``train.gradient_checkpointing`` asks for it."""
    if gc:
        _enable_checkpointing(model)
    model.requires_grad_(True)
    return model


def weightless_full_model(cfg: Config) -> Any:
    """The model ``load_model`` gives for method full, its parameters on the meta device (no
    weights, no memory) and its buffers computed as at construction (rotary frequencies: they
    are not in the weights files), with the generation config of its files. Each FSDP worker
    shards it and takes its shard of the weights (``fsdp.load_sharded``)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = from_pretrained(AutoConfig, cfg.model)
    if cfg.model.attn_implementation == attention.SDPA_FP32:
        attention.register()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=resolve_dtype(cfg, torch.device("meta")),  # full: fp32 master weights
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    model.tie_weights()  # init_empty_weights swaps each parameter for a meta one, ties and all
    # As from_pretrained: the files' generation_config.json, else the one from config.json.
    with contextlib.suppress(ModelError):
        loaded = from_pretrained(GenerationConfig, cfg.model)
        vars(loaded).pop("trust_remote_code", None)  # the loader's argument, kept as a field
        model.generation_config = loaded
    model.config.use_cache = False  # as load_model
    model.eval()  # as from_pretrained leaves it
    return _all_trainable(model, gc=cfg.train.gradient_checkpointing)


# The weight files of a saved peft adapter, in the order peft looks for them.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def keep_4bit_weights_trainable(model: Any) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit``'s NF4 weights into
    an inference layout the first time the layer runs in eval mode without gradients (every
    eval does). In that layout the matmul has no autograd kernel: after the first eval, no
    gradient flows back through the base layers, so the adapters of earlier layers stop
    learning. Saving a checkpoint unpacks the weights, but not bit-exactly, so a resumed run
    would part from an uninterrupted one too. Training keeps the plain layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing, under its 5.x name where it exists."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(_GC_KWARGS))
    else:  # older transformers 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_GC_KWARGS))


def _attach_adapter(model: Any, cfg: Config, *, gc: bool) -> Any:
    from peft import get_peft_model

    # The base is frozen in its load dtype. Not peft's prepare_model_for_kbit_training: it casts
    # every unquantized half weight (embeddings, norms, lm_head) to fp32, and bitsandbytes returns
    # its input's dtype, so the residual stream, activations and KV cache would all be fp32
    # (about 2x a bf16 model's activation memory). Norms need no fp32 weights: the RMSNorm of
    # Llama/Qwen2/Mistral computes its statistics in fp32 and casts back.
    model.requires_grad_(False)
    if gc:
        _enable_checkpointing(model)
        # Frozen embeddings give outputs without grad; checkpointed blocks still need a graph.
        model.enable_input_require_grads()
    # autocast_adapter_dtype: peft creates the adapter in the base's dtype, then casts it to fp32
    # (AdamW on bf16 weights would lose updates below 2^-8 of a weight).
    check_model_targets(model, cfg)
    with peft_quietly():
        peft_model = get_peft_model(
            model,
            build_lora_config(cfg.lora),
            autocast_adapter_dtype=True,
            revision=cfg.model.revision,  # in adapter_config.json: plain peft loads that base
        )
    log.info("%s: %s", cfg.method, format_parameter_counts(*count_parameters(peft_model)))
    return peft_model


def warn_past_context(cfg: Config, config: Any) -> bool:
    """Warn when ``data.max_seq_len`` is longer than the model's context: positions past it
    were never trained. A warning, not an error: RoPE bases are sometimes stretched on purpose.
    Returns whether it warned."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or cfg.data.max_seq_len <= limit:
        return False
    log.warning(
        "data.max_seq_len=%d is longer than the model's context (max_position_embeddings=%d "
        "in %s's config.json): positions past %d were never trained; lower data.max_seq_len "
        "to %d unless training past the context is meant",
        cfg.data.max_seq_len,
        limit,
        cfg.model.name_or_path,
        limit,
        limit,
    )
    return True


def build_meta_model(cfg: Config) -> Any:
    """The configured model on the meta device (config.json only, no weights), adapter attached.

    No quantization on meta: counts are logical parameter counts, as peft reports for 4-bit.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = from_pretrained(AutoConfig, cfg.model)
    warn_past_context(cfg, config)
    with torch.device("meta"):
        # eager: shapes do not depend on the kernel, and eager needs no availability check.
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code, attn_implementation="eager"
        )
        if cfg.method != "full":
            check_model_targets(model, cfg)
            with peft_quietly():
                model = get_peft_model(model, build_lora_config(cfg.lora))
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) with peft's semantics: a 4-bit Params4bit counts numel * 2 * itemsize."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            # Two 4-bit values per byte of quant storage (uint8 -> 2 weights per element).
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def format_parameter_counts(trainable: int, total: int) -> str:
    """Exactly peft's ``print_trainable_parameters`` line."""
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
