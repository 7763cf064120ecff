"""The memory planner: a trial's peak accelerator (or host) memory, estimated before Ray starts.

``estimate`` holds the whole formula, in bytes. The model's shape comes from its config.json,
built on the meta device. A spec is planned at the largest trial its space can sample
(``spec.trial_memory``); ``resources.plan_memory`` compares that with the GPUs.

What it models (the recipe's code paths: ``train/model.py``, ``train/recipe.py``):
- Weights. full: fp32 master weights plus the bf16 copy autocast keeps of every matmul weight
  until backward. lora: the frozen base in its load dtype (bf16 on a GPU, fp32 on the CPU), fp32
  adapters. qlora: NF4 (0.5 B/param) plus quantization constants; embeddings, LM head and norms
  in the load dtype.
- Gradients fp32 per trainable parameter; AdamW two fp32 states, plus at ``optimizer.step`` a
  temporary the size of one state (torch's foreach implementation); ``train.optimizer``
  8-bit: two uint8 states and an fp32 scale per 256 values, updated in place (bitsandbytes
  keeps fp32 states for tensors under 4096 values: negligible in a model worth planning).
- Activations saved for backward: per decoder layer, or per layer input plus one recomputed
  layer with gradient checkpointing. Logits: the loss picks the trained tokens of the [B, T, V]
  logits, upcasts them to fp32 and keeps a log-softmax; every token is assumed trained.
- Generation (exact match): a KV cache of 2 * layers * kv_heads * head_dim * (prompt + new)
  tokens for ``GEN_BATCH`` prompts (or fewer: ``data.max_eval_samples``, ``eval.max_prompts``)
  times ``eval.samples``, prompts <= ``data.max_seq_len``.
- Overhead: the CUDA context (outside torch's allocator) or the Python process, plus the
  caching allocator's fragmentation.
- FSDP's load (``train/fsdp.py``): rank 0 reads the whole model into host memory, 4 B a
  parameter, and broadcasts it; said in the assumptions, since the plan checks GPUs.
Not modelled: DoRA's per-layer weight temporaries, and architectures unlike Llama's (RMSNorm,
rotary attention, gated MLP) beyond their linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from raysft.config import Config
from raysft.search.shape import ModelShape, adapted_modules, lora_params, model_shape

__all__ = ["Estimate", "ModelShape", "adapted_modules", "estimate", "lora_params", "model_shape"]

GIB = 1024**3
Device = Literal["gpu", "cpu"]

CUDA_CONTEXT = 0.6 * GIB  # per process: CUDA context, kernels, library handles (not allocator)
HOST_BASELINE = 1.0 * GIB  # per process: Python with torch and transformers imported
FRAGMENTATION = 0.10  # caching allocator: reserved exceeds allocated by ~10% in training
SHARE_HEADROOM = 0.9  # trials sharing a GPU plan on 90% of it
GEN_BATCH = 32  # prompts per generate() call (recipe.setup: generate_answers batch_size)
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes: weights per absmax, absmaxes per 2nd-level const
# Config paths that change the estimate: a searched one is planned at its worst value.
MEMORY_PATHS = (
    "model.name_or_path", "method", "lora.r", "lora.target_modules", "lora.dropout",
    "lora.use_dora", "qlora.double_quant", "data.max_seq_len", "data.max_eval_samples",
    "train.batch_size", "train.grad_accum", "train.gradient_checkpointing", "train.precision",
    "train.exact_match", "train.max_new_tokens", "model.attn_implementation", "eval.samples",
    "eval.max_prompts", "model.dtype", "train.optimizer",
)  # fmt: skip
# Llama-style projection names -> the tensor they read; linears reading one tensor can share
# the copy saved for backward.
_INPUT_OF = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid",
}  # fmt: skip
_NORM_FED = ("attn_in", "mlp_in")
PHASE_KEYS = ("weights", "grads", "optimizer", "activations", "logits", "kv cache", "overhead")


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one trial: components (bytes) per phase; the peak is the largest phase."""

    device: Device
    phases: dict[str, dict[str, float]]  # "training" / "optimizer step" / "generation"
    assumptions: str
    levers: str = ""  # config changes that would lower it, for messages

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def peak(self) -> float:
        return sum(self.phases[self.peak_phase].values())

    @property
    def breakdown(self) -> dict[str, float]:
        """The peak phase's components, every key of ``PHASE_KEYS`` present."""
        return {k: self.phases[self.peak_phase].get(k, 0.0) for k in PHASE_KEYS}

    @property
    def tensors(self) -> float:
        """The peak without overhead: what torch.cuda.max_memory_allocated should measure."""
        return self.peak - self.breakdown["overhead"]

    def with_note(self, note: str) -> Estimate:
        """This estimate with ``note`` before its assumptions."""
        return replace(self, assumptions=f"{note}; {self.assumptions}") if note else self


# ---------------------------------------------------------------- the formula


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of each kind of tensor in a trial."""

    compute: int  # activations, logits, KV cache: 2 under bf16 autocast, else 4
    base: int  # frozen base weights (lora, qlora's unquantized modules)
    residual: int  # the residual stream between layers: the embedding table's dtype
    mask: int  # a dropout mask: bool on CUDA, the dropped tensor's dtype on the CPU
    autocast: bool


def _bytes(cfg: Config, device: Device) -> _Bytes:
    # The recipe's autocast rule (precision.autocast_for), assuming a GPU with native bf16.
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device == "gpu")
    compute = 2 if bf16 else 4
    # Frozen bases load in bf16 on a GPU that computes in bf16, fp32 otherwise (issue 10 point 2);
    # a model.dtype field, where the config has one, says so explicitly.
    explicit = {"bfloat16": 2, "float16": 2, "float32": 4}.get(str(getattr(cfg.model, "dtype", "")))
    base = explicit or (2 if device == "gpu" and bf16 else 4)
    residual = 4 if cfg.method == "full" else base  # full fine-tuning keeps fp32 master weights
    # The adapter's dropout sees the input cast to the adapter's fp32, except in a 4-bit layer
    # under autocast (peft's bnb layers skip the cast).
    mask = 1 if device == "gpu" else (compute if cfg.method == "qlora" and bf16 else 4)
    return _Bytes(compute, base, residual, mask, autocast=bf16)


def nf4_bytes_per_param(double_quant: bool) -> float:
    """4-bit weight plus its absmax: fp32 per 64 weights, or 8-bit per 64 plus fp32 per 64*256."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_BLOCK2)
    return 0.5 + 4 / NF4_BLOCK


def _weights(cfg: Config, shape: ModelShape, b: _Bytes, adapters: int) -> tuple[float, float]:
    """(stored weights, bf16 copies autocast keeps until backward), bytes."""
    matmul = shape.linear_params + shape.vocab * shape.hidden  # what F.linear reads, LM head too
    if cfg.method == "full":
        return 4.0 * shape.params, (2.0 * matmul if b.autocast else 0.0)
    copies = 2.0 * adapters if b.autocast else 0.0
    if cfg.method == "qlora":
        # Dequantized one layer at a time: a transient of one weight, not counted.
        rest = shape.params - shape.linear_params
        stored = shape.linear_params * nf4_bytes_per_param(cfg.qlora.double_quant)
        return stored + rest * b.base + 4.0 * adapters, copies
    if b.autocast and b.base == 4:
        copies += 2.0 * matmul  # an fp32 base is cast per forward and the casts are saved
    return shape.params * b.base + 4.0 * adapters, copies


def _saved_linear_inputs(cfg: Config, shape: ModelShape, b: _Bytes, adapted: set[str]) -> float:
    """Bytes per token, one layer: the linear inputs kept for weight gradients."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, i, _ in shape.layer_linears():
        groups.setdefault(_INPUT_OF.get(name, name), []).append((name, i))
    s, total = b.compute, 0.0
    for group, mods in groups.items():
        if cfg.method == "full":
            # Autocast casts the fp32 norm output once per linear: a private copy each.
            private = b.autocast and group in _NORM_FED and b.residual != s
            total += sum(s * i for _, i in mods) if private else s * mods[0][1]
            continue
        mine = [(n, i) for n, i in mods if n in adapted]
        if not mine:
            continue  # a frozen linear keeps its weight, not its input
        if cfg.lora.dropout > 0:  # one dropout output (as lora_A reads it) + mask per adapter
            total += sum((s + b.mask) * i for _, i in mine)
        elif b.autocast and cfg.method == "lora":
            # peft casts the input to the adapter's fp32, autocast casts it back: one copy each.
            total += sum(s * i for _, i in mine)
        else:
            total += s * mine[0][1]  # the shared input itself
    return total + sum(s * cfg.lora.r for _ in adapted)  # lora_B's input, r wide


def _layer_bytes(cfg: Config, shape: ModelShape, b: _Bytes, adapted: set[str]) -> float:
    """Bytes per token one decoder layer saves for backward (no checkpointing)."""
    h, q, s, r = shape.hidden, shape.heads * shape.head_dim, b.compute, b.residual
    t = cfg.data.max_seq_len
    # RMSNorm keeps its input in fp32 (full: also the normed input, for its weight's gradient).
    norms = 2 * (4 * h + (r * h if cfg.method == "full" else 0))
    # sdpa with a mask (packed rows have one) gets k and v repeated to every head: q, k, v and
    # the output saved at q's width, and the mask as one float bias row per token.
    attention = 4 * s * q + s * t
    if cfg.model.attn_implementation == "eager":
        attention += shape.heads * t * (4 + s)  # softmax probabilities (fp32) and their cast
    mlp = 3 * s * shape.intermediate  # gate output (SiLU's input), SiLU output, up output
    return norms + attention + mlp + _saved_linear_inputs(cfg, shape, b, adapted)


def _activations(cfg: Config, shape: ModelShape, b: _Bytes, adapted: set[str]) -> float:
    """Bytes saved for backward at the end of the forward pass, plus backward's working set."""
    h, s, r = shape.hidden, b.compute, b.residual
    layer = _layer_bytes(cfg, shape, b, adapted)
    if cfg.train.gradient_checkpointing:
        saved = shape.layers * r * h + layer  # each layer's input; one layer recomputed
    else:
        saved = shape.layers * layer
    full = cfg.method == "full"
    outside = r * h + 4 * h + (s * h if full else 0)  # embeddings out, final norm, LM head input
    working = 2 * s * shape.intermediate + 2 * r * h  # backward of a block: MLP grads, residual
    return cfg.train.batch_size * cfg.data.max_seq_len * (saved + outside + working)


def layer_activation_bytes(cfg: Config, shape: ModelShape, *, device: Device) -> float:
    """Bytes one decoder layer saves for backward over one micro-batch (no checkpointing)."""
    b = _bytes(cfg, device)
    adapted = _layer_adapted(shape, cfg) if cfg.method != "full" else set()
    return cfg.train.batch_size * cfg.data.max_seq_len * _layer_bytes(cfg, shape, b, adapted)


def _layer_adapted(shape: ModelShape, cfg: Config) -> set[str]:
    """Last name components of the first layer's adapted linears (``q_proj``, ...)."""
    names = (n for n, _, _ in adapted_modules(shape, cfg.lora))
    return {n.rsplit(".", 1)[-1] for n in names if ".0." in f".{n}."}


def _generation(cfg: Config, shape: ModelShape, b: _Bytes) -> tuple[float, float]:
    """(KV cache, prefill working set) of one generate() call, bytes; zeros without one."""
    if not cfg.train.exact_match:
        return 0.0, 0.0
    # generate() expands each prompt into eval.samples sequences before the prefill.
    prompts = (cfg.data.max_eval_samples, cfg.eval.max_prompts)
    batch = min(GEN_BATCH, *(n or GEN_BATCH for n in prompts)) * cfg.eval.samples
    prompt, s = cfg.data.max_seq_len, b.compute  # prompts bounded by the sample length
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * (prompt + cfg.train.max_new_tokens)
    h, q = shape.hidden, shape.heads * shape.head_dim
    # No grad: one layer's tensors at a time (residual, fp32 norm, q/k/v/out, MLP), the mask.
    per_token = 2 * b.residual * h + 4 * h + 4 * s * q + 3 * s * shape.intermediate
    prefill = batch * prompt * (per_token + prompt * (1 + s))
    return kv * batch * s, float(prefill)


def estimate(
    cfg: Config, shape: ModelShape, *, device: Device, workers: int = 1, sharded: bool = False
) -> Estimate:
    """Peak memory of one trial of ``cfg`` (one worker of ``workers``) on ``device``. ``sharded``
    (FSDP): weights, gradients and optimizer state split over the workers, plus two whole layers
    (the one computing and the next, prefetched) in the compute dtype."""
    b = _bytes(cfg, device)
    lora = cfg.method != "full"
    adapted_all = adapted_modules(shape, cfg.lora) if lora else []
    adapted = _layer_adapted(shape, cfg) if lora else set()
    adapters = lora_params(shape, cfg.lora) if lora else 0
    stored, copies = _weights(cfg, shape, b, adapters)
    trainable = adapters if lora else shape.params
    split = workers if sharded else 1
    # DDP keeps a bucket copy of the gradients; FSDP reduce-scatters into its shard.
    grads = 4.0 * trainable * (2 if workers > 1 and not sharded else 1) / split
    eight_bit = cfg.train.optimizer != "adamw"
    # AdamW: exp_avg, exp_avg_sq in fp32; 8-bit: in uint8 with an fp32 scale per 256 values
    optimizer = (2.0 + 8.0 / 256 if eight_bit else 8.0) * trainable / split
    if sharded:  # layers are gathered in the compute dtype: autocast has nothing to copy
        layer = max(shape.params - 2 * shape.vocab * shape.hidden, 0) / shape.layers
        stored, copies = stored / split + 2 * layer * b.compute, 0.0
    tokens = cfg.train.batch_size * cfg.data.max_seq_len
    # logits (s) + picked (s) + fp32 upcast (4, when s is 2) + log-softmax (4) = 12 B either way
    logits = 12.0 * tokens * shape.vocab
    phases: dict[str, dict[str, float]] = {
        "training": {
            "weights": stored + copies,
            # Kept between micro-batches; with one micro-batch they appear as activations go.
            "grads": grads if cfg.train.grad_accum > 1 or workers > 1 else 0.0,
            "optimizer": optimizer,
            "activations": _activations(cfg, shape, b, adapted),
            "logits": logits,
        },
        "optimizer step": {
            "weights": stored,
            "grads": grads,
            "optimizer": (1.0 if eight_bit else 1.5) * optimizer,
        },
    }
    kv, prefill = _generation(cfg, shape, b)
    if kv:
        phases["generation"] = {
            "weights": stored,
            "optimizer": optimizer,
            "activations": prefill,
            "kv cache": kv,
        }
    base = CUDA_CONTEXT if device == "gpu" else HOST_BASELINE
    for parts in phases.values():
        parts["overhead"] = base + FRAGMENTATION * sum(parts.values())
    assumptions = _assumptions(cfg, shape, b, len(adapted_all))
    if sharded:  # fsdp.load_sharded: not on a GPU, so not in the phases; a resume reads none
        assumptions += (
            f"; rank 0 reads the whole model into host memory to load it "
            f"({gib(4.0 * shape.params)} in fp32, beside its process)"
        )
    return Estimate(device, phases, assumptions, _levers(cfg))


def _levers(cfg: Config) -> str:
    """The config changes that lower this estimate, most effective first."""
    out = {"full": ["method qlora or lora"], "lora": ["method qlora"]}.get(cfg.method, [])
    if not cfg.train.gradient_checkpointing:
        out.append("train.gradient_checkpointing: true")
    if cfg.train.batch_size > 1:
        out.append("a smaller train.batch_size (more train.grad_accum)")
    if cfg.method != "full" and cfg.lora.r > 8:
        out.append("a smaller lora.r")
    return ", ".join(out + ["a smaller data.max_seq_len"])


def _assumptions(cfg: Config, shape: ModelShape, b: _Bytes, n_adapted: int) -> str:
    parts: list[str] = [cfg.method]
    if cfg.method != "full":
        parts.append(f"lora.r {cfg.lora.r} on {n_adapted} linear layers")
        if cfg.lora.use_dora:
            parts.append("DoRA temporaries not counted")
    parts.append(f"micro-batch {cfg.train.batch_size} x {cfg.data.max_seq_len} tokens")
    if cfg.train.grad_accum > 1:
        parts.append(f"{cfg.train.grad_accum} micro-batches per step")
    parts.append(
        "gradient checkpointing" if cfg.train.gradient_checkpointing else "no checkpointing"
    )
    parts.append("bf16 compute" if b.autocast else "fp32 compute")
    if cfg.train.exact_match:
        parts.append(f"generation of {cfg.train.max_new_tokens} tokens")
    return ", ".join(parts)


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB), for messages."""
    if not n:
        return "0"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
