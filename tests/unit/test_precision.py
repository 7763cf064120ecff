"""Precision per method: the dtype of every parameter group, of the hidden states and of the
optimizer state; fp32 on the CPU by default, bf16 base weights when asked (and on GPUs)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from modelkit import checkpointing_on

from raysft.config import Config, ConfigError, LoraSection, ModelSection, TrainSection, load_config
from raysft.train.model import load_model, resolve_dtype
from raysft.train.precision import autocast_for
from raysft.train.recipe import _build_optimizer

F32, BF16 = torch.float32, torch.bfloat16


def _cfg(path, *, method: str, dtype: str = "auto", precision: str = "auto", gc=True) -> Config:
    return Config(
        model=ModelSection(name_or_path=str(path), attn_implementation="sdpa", dtype=dtype),
        method=method,
        lora=LoraSection(r=4, alpha=8),
        train=TrainSection(gradient_checkpointing=gc, precision=precision),
    )


def _group(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if "norm" in name:
        return "norm"
    if "embed_tokens" in name:
        return "embed"
    return "lm_head" if "lm_head" in name else "base"


def _groups(model) -> dict[str, set[tuple[str, bool]]]:
    """Parameter group -> {(dtype, requires_grad)} over its parameters."""
    out: dict[str, set[tuple[str, bool]]] = {}
    for name, p in model.named_parameters():
        out.setdefault(_group(name), set()).add(
            (str(p.dtype).removeprefix("torch."), p.requires_grad)
        )
    return out


def _step(model, cfg: Config) -> tuple[list[torch.dtype], torch.dtype, set[torch.dtype]]:
    """One training step as the recipe runs it (its autocast and AdamW): hidden-state dtypes,
    logits dtype, and the dtypes of the optimizer state."""
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer, _ = _build_optimizer(model, cfg)
    model.train()
    with autocast_for(cfg, torch.device("cpu"))():
        out = model(input_ids=x, labels=x, output_hidden_states=True, use_cache=False)
    out.loss.backward()
    optimizer.step()
    state = {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim() > 0}
    return [h.dtype for h in out.hidden_states], out.logits.dtype, state


def test_lora_bf16_base_keeps_adapters_and_optimizer_in_fp32(tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir, method="lora", dtype="bfloat16")
    model = load_model(cfg)
    assert _groups(model) == {
        "base": {("bfloat16", False)},
        "lora": {("float32", True)},
        "norm": {("bfloat16", False)},
        "embed": {("bfloat16", False)},
        "lm_head": {("bfloat16", False)},
    }
    hidden, logits, state = _step(model, cfg)
    assert set(hidden) == {BF16} and logits == BF16
    assert state == {F32}
    assert all(p.grad is None or p.grad.dtype == F32 for p in model.parameters())


def test_qlora_bf16_keeps_the_residual_stream_in_bf16(tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir, method="qlora", dtype="bfloat16")
    model = load_model(cfg)
    assert _groups(model) == {
        "base": {("uint8", False)},  # 4-bit NF4, two values per byte
        "lora": {("float32", True)},
        # Not upcast to fp32 (as peft's prepare_model_for_kbit_training would):
        "norm": {("bfloat16", False)},
        "embed": {("bfloat16", False)},
        "lm_head": {("bfloat16", False)},
    }
    assert checkpointing_on(model)
    # Checkpointed blocks need a graph from frozen embeddings: their output requires grad.
    embed_out = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embed_out.requires_grad and embed_out.dtype == BF16
    hidden, logits, state = _step(model, cfg)
    assert set(hidden) == {BF16} and logits == BF16
    assert state == {F32}


def test_full_keeps_fp32_master_weights_with_bf16_compute(tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir, method="full", precision="bf16")
    model = load_model(cfg)
    assert _groups(model) == {g: {("float32", True)} for g in ("base", "norm", "embed", "lm_head")}
    hidden, logits, state = _step(model, cfg)
    # Autocast: matmuls (hence logits) in bf16; the residual stream stays fp32 as in any AMP.
    assert logits == BF16 and set(hidden) == {F32}
    assert state == {F32}
    assert all(p.dtype == F32 for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_cpu_default_stays_fp32(tiny_llama_dir, method):
    cfg = _cfg(tiny_llama_dir, method=method, gc=False)
    assert resolve_dtype(cfg, torch.device("cpu")) == F32
    model = load_model(cfg)
    dtypes = {p.dtype for p in model.parameters()} - {torch.uint8}
    assert dtypes == {F32}
    hidden, logits, _ = _step(model, cfg)
    assert set(hidden) == {F32} and logits == F32


def test_full_refuses_a_half_base_dtype(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: full\nmodel: {dtype: bfloat16}\n")
    with pytest.raises(ConfigError, match="model.dtype: bfloat16 but method is full"):
        load_config(path)
    assert load_config(path, {"model.dtype": "float32"}).model.dtype == "float32"


def test_autocast_follows_precision_on_the_cpu():
    cpu = torch.device("cpu")
    assert isinstance(autocast_for(Config(), cpu)(), contextlib.nullcontext)
    with autocast_for(Config(train=TrainSection(precision="bf16")), cpu)():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == BF16


# ---------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def tinyllama_1b_dir(tmp_path_factory, tiny_config):
    """TinyLlama-1.1B's shape (22 layers, d=2048, GQA 32/4), random init, saved in bf16."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("tinyllama-1b")
    config = tiny_config(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(BF16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def _peak_gib(cfg: Config, *, steps: int = 2, batch: int = 4, seq: int = 512) -> float:
    """Peak allocated CUDA memory (GiB) of loading ``cfg``'s model and ``steps`` training steps."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dev = torch.device("cuda", torch.cuda.current_device())
    model = load_model(cfg, device=dev)
    optimizer, _ = _build_optimizer(model, cfg)
    x = torch.randint(0, 32000, (batch, seq), device=dev)
    model.train()
    for _ in range(steps):
        with autocast_for(cfg, dev)():
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer, loss
    gc.collect()
    torch.cuda.empty_cache()
    return peak


@pytest.mark.cuda
def test_cuda_auto_loads_the_base_in_native_half_precision(tiny_llama_dir):
    from raysft.train.device import native_bf16

    dev = torch.device("cuda", torch.cuda.current_device())
    half = "bfloat16" if native_bf16(dev) else "float16"
    for method in ("lora", "qlora"):
        cfg = _cfg(tiny_llama_dir, method=method)
        assert resolve_dtype(cfg, dev) == getattr(torch, half)
        groups = _groups(load_model(cfg, device=dev))
        assert groups["lora"] == {("float32", True)}
        assert groups["norm"] == groups["embed"] == groups["lm_head"] == {(half, False)}
    full = _cfg(tiny_llama_dir, method="full")
    assert {p.dtype for p in load_model(full, device=dev).parameters()} == {F32}


@pytest.mark.cuda
def test_cuda_qlora_peak_memory_is_at_most_0_6_of_loras(tinyllama_1b_dir):
    lora = _peak_gib(_cfg(tinyllama_1b_dir, method="lora"))
    qlora = _peak_gib(_cfg(tinyllama_1b_dir, method="qlora"))
    assert qlora <= 0.6 * lora, f"QLoRA peak {qlora:.2f} GiB vs LoRA {lora:.2f} GiB"


def test_weight_decay_leaves_norm_gains_and_biases_alone(tiny_llama_dir) -> None:
    """AdamW's decay pulls a weight toward 0: right for matrices, wrong for an RMSNorm gain
    (neutral at 1). With zero gradients, 50 steps leave the gains at 1 and shrink the
    matrices."""
    cfg = _cfg(tiny_llama_dir, method="full", dtype="float32", precision="fp32", gc=False)
    cfg.train.weight_decay = 0.1
    model = load_model(cfg)
    optimizer, _ = _build_optimizer(model, cfg)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    norms = {n: p for n, p in model.named_parameters() if p.ndim == 1}
    assert norms and all(decays[id(p)] == 0.0 for p in norms.values())
    matrix = model.get_decoder().layers[0].self_attn.q_proj.weight
    assert decays[id(matrix)] == 0.1
    norm_before, matrix_before = {n: p.detach().clone() for n, p in norms.items()}, matrix.norm()
    for group in optimizer.param_groups:  # past the warmup's first rate (0)
        group["lr"] = 1e-2
    for _ in range(50):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    assert all(torch.equal(norms[n], norm_before[n]) for n in norms)
    assert matrix.norm() < 0.999 * matrix_before
