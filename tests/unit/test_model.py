"""Model loading per method, adapters, exact parameter counts, saving."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from modelkit import checkpointing_on

from raysft.bench.presets import LLAMA2_7B
from raysft.config import (
    Config,
    DataSection,
    LoraSection,
    ModelSection,
    QloraSection,
    TrainSection,
)
from raysft.train.lora import build_lora_config
from raysft.train.model import (
    ModelError,
    build_bnb_config,
    build_meta_model,
    count_parameters,
    format_parameter_counts,
    load_model,
    load_tokenizer,
    resolve_compute_dtype,
)
from raysft.train.saving import save_model

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _cfg(path, *, method="lora", gc=False, **lora) -> Config:
    return Config(
        model=ModelSection(name_or_path=str(path), attn_implementation="sdpa"),
        method=method,
        lora=LoraSection(**lora),
        train=TrainSection(gradient_checkpointing=gc),
    )


def _train(model, *, steps: int = 3) -> list[float]:
    """A few AdamW steps (lr 1e-2, no decay) on random tokens; returns the losses."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (2, 16), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model) -> dict[str, bool]:
    return {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- tokenizer and configs


def test_load_tokenizer_pads_with_unk_then_eos(tiny_llama_dir, tmp_path, word_tokenizer_saver):
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny_llama_dir)))
    assert tok.pad_token == "<unk>" and tok.padding_side == "right"
    word_tokenizer_saver(tmp_path, with_unk=False)
    tok = load_tokenizer(ModelSection(name_or_path=str(tmp_path)))
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id


def test_build_lora_config():
    cfg = build_lora_config(LoraSection(r=8, alpha=16, dropout=0.1, use_rslora=True, use_dora=True))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert set(cfg.target_modules) == set(QKVO)
    assert cfg.use_rslora and cfg.use_dora and cfg.bias == "none"
    assert cfg.task_type == "CAUSAL_LM"
    assert (
        build_lora_config(LoraSection(target_modules="all-linear")).target_modules == "all-linear"
    )


def test_build_bnb_config():
    bnb = build_bnb_config(
        QloraSection(quant_type="fp4", double_quant=False, compute_dtype="float16"),
        torch.device("cpu"),
    )
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "fp4"
    assert not bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_compute_dtype == torch.float16


@pytest.mark.parametrize(("native", "expected"), [(False, torch.float32), (True, torch.bfloat16)])
def test_qlora_compute_dtype_auto_is_bf16_only_on_a_cpu_that_has_it(monkeypatch, native, expected):
    """On a CPU without AVX512-BF16 or AMX, bf16 is emulated: `auto` computes in fp32 there.
    An explicit dtype is kept whatever the CPU."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert QloraSection().compute_dtype == "auto"
    assert resolve_compute_dtype(QloraSection(), cpu) == expected
    assert build_bnb_config(QloraSection(), cpu).bnb_4bit_compute_dtype == expected
    explicit = QloraSection(compute_dtype="bfloat16")
    assert resolve_compute_dtype(explicit, cpu) == torch.bfloat16


# ---------------------------------------------------------------- training per method


def test_full_trains_every_weight(tiny_llama_dir):
    model = load_model(_cfg(tiny_llama_dir, method="full"))
    assert model.config.use_cache is False
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    before = _snapshot(model)
    _train(model)
    assert all(_changed(before, model).values())


def test_lora_changes_only_the_adapter(tiny_llama_dir):
    model = load_model(_cfg(tiny_llama_dir, gc=True))
    assert model.config.use_cache is False and checkpointing_on(model)
    before = _snapshot(model)
    losses = _train(model)
    assert all(math.isfinite(v) for v in losses)
    changed = _changed(before, model)
    adapter = {n for n in changed if "lora_" in n}
    assert len(adapter) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    assert all(changed[n] for n in adapter)  # lora_B starts at 0: it must have moved too
    assert not any(changed[n] for n in changed if n not in adapter)


def test_qlora_on_cpu_keeps_4bit_base_and_trains_adapter(tiny_llama_dir):
    import bitsandbytes as bnb

    cfg = _cfg(tiny_llama_dir, method="qlora", gc=True)
    model = load_model(cfg)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.dtype == torch.uint8  # two NF4 values per byte
    assert model.config.use_cache is False and checkpointing_on(model)
    before = _snapshot(model)
    absmax = q_proj.base_layer.weight.quant_state.absmax.clone()
    losses = _train(model)
    assert all(math.isfinite(v) for v in losses)
    changed = _changed(before, model)
    assert all(changed[n] for n in changed if "lora_" in n)
    assert not any(changed[n] for n in changed if "lora_" not in n)
    assert torch.equal(absmax, q_proj.base_layer.weight.quant_state.absmax)
    # peft counts a Params4bit as numel * 2: the logical counts equal the unquantized model's.
    assert count_parameters(model) == count_parameters(build_meta_model(cfg))


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointed"])
def test_qlora_gradients_are_the_same_after_an_eval(gc):
    """An eval (eval mode, no grad) must not leave the 4-bit base in bitsandbytes' CPU
    inference layout (AVX512-BF16 CPUs), whose matmul has no autograd kernel: the gradients of
    one batch are the same before and after an eval (on the embedded base, where taking the
    fix out makes them differ on such a CPU; elsewhere only the layout check can fail)."""
    import bitsandbytes as bnb

    cfg = Config(
        model=ModelSection(attn_implementation="sdpa"),
        method="qlora",
        train=TrainSection(gradient_checkpointing=gc),
    )
    model = load_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():  # lora_B off zero, so every adapter weight has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))

    def grads() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        torch.manual_seed(2)  # the same LoRA dropout masks each time
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = grads()
    assert len(before) == 4 * 4 * 2  # A and B of the 4 default targets in 4 blocks
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)


def test_qlora_without_bitsandbytes_is_a_model_error(tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ModelError, match="method: qlora needs bitsandbytes"):
        load_model(_cfg(tiny_llama_dir, method="qlora"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_qlora_on_missing_cuda_is_a_model_error(tiny_llama_dir):
    with pytest.raises(ModelError, match="method: qlora .*CUDA is not available"):
        load_model(_cfg(tiny_llama_dir, method="qlora"), device="cuda")


# ---------------------------------------------------------------- counts on the meta device


@pytest.fixture(scope="module")
def llama2_7b_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-2-7b")
    (out / "config.json").write_text(json.dumps(LLAMA2_7B))
    return out


@pytest.mark.parametrize(
    ("r", "targets", "trainable", "line"),
    [
        (
            16,
            QKVO,
            16_777_216,
            "trainable params: 16,777,216 || all params: 6,755,192,832 || trainable%: 0.2484",
        ),
        (8, ["q_proj", "v_proj"], 4_194_304, None),
    ],
)
def test_llama2_7b_counts_on_meta(llama2_7b_dir, r, targets, trainable, line):
    start = time.perf_counter()
    model = build_meta_model(_cfg(llama2_7b_dir, r=r, target_modules=targets))
    counted = count_parameters(model)
    assert time.perf_counter() - start < 5.0
    assert all(p.device.type == "meta" for p in model.parameters())
    assert counted == (trainable, 6_738_415_616 + trainable)
    assert counted == model.get_nb_trainable_parameters()
    if line is not None:
        assert format_parameter_counts(*counted) == line


def test_llama2_7b_full_counts_on_meta(llama2_7b_dir):
    model = build_meta_model(_cfg(llama2_7b_dir, method="full"))
    assert count_parameters(model) == (6_738_415_616, 6_738_415_616)


def test_rslora_and_dora_reach_the_peft_model(tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir, r=4, alpha=8, use_rslora=True, use_dora=True)
    model = build_meta_model(cfg)
    assert model.peft_config["default"].use_rslora and model.peft_config["default"].use_dora
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha/sqrt(r)
    assert "default" in q_proj.lora_magnitude_vector  # DoRA's magnitude


def test_all_linear_adapts_every_linear_but_lm_head(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linear = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    model = build_meta_model(_cfg(tiny_llama_dir, target_modules="all-linear"))
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and not n.endswith(".base_layer")
    }
    assert adapted == linear - {"lm_head"}
    assert len(adapted) == 2 * 7  # q, k, v, o, gate, up, down per layer


# ---------------------------------------------------------------- saving


def test_save_adapter_only_for_lora(tiny_llama_dir, tmp_path):
    cfg = _cfg(tiny_llama_dir)
    model, tok = load_model(cfg), load_tokenizer(cfg.model)
    out = save_model(model, tok, tmp_path / "lora", method="lora")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files


@pytest.mark.parametrize("method", ["lora", "full"])
def test_an_adapter_given_as_the_model_is_refused_naming_its_base(tiny_llama_dir, tmp_path, method):
    """A run's adapter as model.name_or_path: transformers 5 loads its base with the adapter
    on; LoRA then failed on its target modules, full trained both. One message, at once."""
    from raysft.search.preflight import check_model

    cfg = _cfg(tiny_llama_dir)
    out = save_model(load_model(cfg), load_tokenizer(cfg.model), tmp_path / "a", method="lora")
    again = _cfg(out, method=method)
    want = (
        f"model.name_or_path: '{out}' is a LoRA adapter (adapter_config.json), not a model: give "
        f"its base ('{tiny_llama_dir}') here; an adapter is scored with python -m raysft.evaluate"
    )
    for load in (load_model, lambda c: check_model(c.model)):
        with pytest.raises(ModelError) as err:
            load(again)
        assert str(err.value) == want
    assert load_tokenizer(again.model) is not None  # the tokenizer it keeps still loads


def test_a_bf16_export_of_a_tied_model_writes_its_embedding_once(tmp_path):
    """The embedded base ties its LM head to its embedding. Cast to bf16 one tensor at a time,
    the two stopped sharing storage and the export carried the matrix twice."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = Config(model=ModelSection(name_or_path="embedded:tiny-base"), method="full")
    model, tok = load_model(cfg), load_tokenizer(cfg.model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    out = save_model(model, tok, tmp_path / "full", method="full", dtype=torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    head, emb = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert head.dtype == torch.bfloat16 and torch.equal(head, emb)
    want = model.get_input_embeddings().weight.detach().to(torch.bfloat16)
    assert torch.equal(emb, want)


def test_gathered_weights_of_a_tied_model_write_its_embedding_once(tmp_path):
    """An FSDP model's gathered state holds a copy per name of the tied embedding and head:
    written as given, the export carried the matrix twice."""
    from safetensors import safe_open

    cfg = Config(model=ModelSection(name_or_path="embedded:tiny-base"), method="full")
    model, tok = load_model(cfg), load_tokenizer(cfg.model)
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}  # apart
    assert "lm_head.weight" in gathered
    out = save_model(model, tok, tmp_path / "full", method="full", weights=gathered)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_save_full_model_with_cache_enabled_for_inference(tiny_llama_dir, tmp_path):
    cfg = _cfg(tiny_llama_dir, method="full")
    model, tok = load_model(cfg), load_tokenizer(cfg.model)
    out = save_model(model, tok, tmp_path / "full", method="full")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False


def test_an_adapter_on_a_base_given_by_a_relative_path_names_it_absolutely(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """``model.name_or_path: base`` (a directory beside the spec): the saved adapter names
    the base by its absolute path, so it loads from any directory (raysft.evaluate, a user)."""
    import shutil

    shutil.copytree(tiny_llama_dir, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("base")
    model, tok = load_model(cfg), load_tokenizer(cfg.model)
    out = save_model(model, tok, tmp_path / "lora", method="lora")
    named = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str((tmp_path / "base").resolve())


def test_load_model_of_a_missing_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"model.name_or_path: cannot load '.*no-such-model'"):
        load_model(_cfg(tmp_path / "no-such-model"))


def test_gpt2_conv1d_projections_are_lora_targets() -> None:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from raysft.config import LoraSection
    from raysft.errors import ModelError
    from raysft.train.lora import check_targets, targetable_modules

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2))
    targetable, linears = targetable_modules(net)
    lora = LoraSection(target_modules=["c_attn", "c_proj", "c_fc"])
    check_targets(targetable, linears, lora, model="gpt2-tiny")  # peft adapts Conv1D
    with pytest.raises(
        ModelError,
        match=r"'q_proj' matches no layer LoRA can adapt in gpt2-tiny "
        r"\(its linear layers: c_attn, c_fc, c_proj; or all-linear\)",
    ):
        check_targets(
            targetable, linears, LoraSection(target_modules=["q_proj"]), model="gpt2-tiny"
        )


def test_a_text_longer_than_the_models_max_length_gets_no_transformers_warning(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """raysft names a sample over data.max_seq_len itself; transformers' warning about the
    model's model_max_length read like a crash just before that message."""
    from raysft.config import ModelSection
    from raysft.train.model import load_tokenizer

    tok = load_tokenizer(ModelSection())
    tok.model_max_length = 8
    ids = tok("word " * 50, add_special_tokens=False)["input_ids"]
    assert len(ids) > 8
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_a_max_seq_len_past_the_models_context_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The embedded base's context is 512 positions (config.json), and its tokenizer says so too.
    cfg = Config(data=DataSection(max_seq_len=4096))
    with caplog.at_level("WARNING", logger="raysft.train.model"):
        build_meta_model(cfg)
    said = [r.getMessage() for r in caplog.records if "max_seq_len" in r.getMessage()]
    assert said == [
        "data.max_seq_len=4096 is longer than the model's context (max_position_embeddings=512 "
        "in embedded:tiny-base's config.json): positions past 512 were never trained; lower "
        "data.max_seq_len to 512 unless training past the context is meant"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="raysft.train.model"):
        build_meta_model(Config(data=DataSection(max_seq_len=512)))
    assert not [r for r in caplog.records if "max_seq_len" in r.getMessage()]
    assert load_tokenizer(cfg.model).model_max_length == 512


def test_a_hub_id_on_a_machine_without_the_hub_is_one_message_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offline, huggingface_hub retried a name that is no local directory for ~25 s, printing 6
    warnings, before transformers' "couldn't connect": now the local cache alone, at once."""
    import time

    from raysft.train import hub as model_mod

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub unreachable whatever this host's network
    t0 = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_model(_cfg("raysft-test/no-such-model"))
    assert time.monotonic() - t0 < 20
    assert str(err.value) == (
        "model.name_or_path: cannot load 'raysft-test/no-such-model': not a local directory, "
        "not in the Hugging Face cache, and the Hub cannot be reached from here "
        "(HF_HUB_OFFLINE is set): give a model directory, or embedded:tiny-base"
    )
    assert model_mod.hub_unreachable() == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # it resolves the name
    assert model_mod.hub_unreachable() is None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_saved_model_stops_plain_generation_at_the_templates_end_of_answer(tmp_path, method):
    """A base whose own EOS is </s> alone, trained on ChatML: the eval stops answers at
    <|im_end|>, and so must a plain ``generate`` of the export (full: transformers reads the
    saved generation_config.json; adapter: ``load_champion`` applies it)."""
    import shutil

    from transformers import GenerationConfig

    from raysft.assets import asset_path
    from raysft.config import load_config
    from raysft.search.export import load_champion
    from raysft.train.recipe import run_trial

    base = tmp_path / "base"
    shutil.copytree(asset_path("tiny-base"), base)
    gen = GenerationConfig.from_pretrained(base)
    gen.eos_token_id = 257  # </s> only
    gen.save_pretrained(base)
    overrides = {
        "model.name_or_path": str(base),
        "method": method,
        "data.template": "chatml",
        "train.max_steps": 2,
        "train.eval_every": 2,
        "train.exact_match": False,
        "train.eval_base": False,
        "train.num_threads": 1,
        "output_dir": str(tmp_path / "out"),
    }
    out = run_trial(load_config(None, overrides)).output_dir
    saved = GenerationConfig.from_pretrained(out)
    assert saved.eos_token_id == [257, 261]  # the base's own, then <|im_end|>
    model, _ = load_champion(out)
    assert model.generation_config.eos_token_id == [257, 261]
    assert GenerationConfig.from_pretrained(base).eos_token_id == 257  # the base is untouched


def test_a_trial_on_a_model_smaller_than_its_tokenizer_is_refused(tmp_path):
    """Checked again where the model loads (a trial, whatever preflight saw): one ModelError,
    not an IndexError at the first forward."""
    from raysft.config import load_config
    from raysft.train.recipe import run_trial

    small = Path(__file__).parent / "bad_inputs" / "models" / "small_vocab"
    cfg = load_config(None, {"model.name_or_path": str(small), "output_dir": str(tmp_path / "o")})
    with pytest.raises(ModelError, match="its tokenizer has 262 tokens but the model embeds 260"):
        run_trial(cfg)


def test_a_saved_adapter_names_its_bases_revision(tiny_llama_dir, tmp_path):
    """model.revision rides in adapter_config.json: plain peft then loads the adapter on the
    revision it trained on, not on the hub's main."""
    cfg = _cfg(tiny_llama_dir)
    cfg.model.revision = "v1"  # a local directory has no revisions: loading ignores it
    model, tok = load_model(cfg), load_tokenizer(cfg.model)
    out = save_model(model, tok, tmp_path / "lora", method="lora")
    assert json.loads((out / "adapter_config.json").read_text())["revision"] == "v1"


@pytest.mark.parametrize(
    ("targets", "warned"),
    [(["q_proj", "lm_head"], ["lm_head"]), (["embed_tokens"], ["model.embed_tokens"]),
     (["q_proj", "v_proj"], [])],
)  # fmt: skip
def test_an_adapter_on_a_tied_embedding_is_warned_of(caplog, targets, warned):
    """The embedded base ties its input embedding and LM head: an adapter on either trains
    right, but merged it would change both (seen: logits 0.3-3.0 off the adapter's)."""
    from raysft.config import load_config
    from raysft.train.lora import warn_of_tied_targets

    cfg = load_config(None, {"lora.target_modules": targets})
    model = load_model(cfg)
    said = [r.getMessage() for r in caplog.records if "tied embeddings" in r.getMessage()]
    assert len(said) == (1 if warned else 0)  # once, as the adapter is attached
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert warn_of_tied_targets(model.get_base_model(), cfg.lora) == warned


def test_a_pad_token_lent_for_training_is_not_saved_with_the_tokenizer(tmp_path: Path) -> None:
    """A base tokenizer without a pad token trains with unk or EOS lent as one (padding is
    masked by position); its saved copy has none, as its model does: a collator that masks pad
    ids would mask EOS too."""
    from transformers import AutoTokenizer

    from raysft.assets.tokenizer import build_tokenizer
    from raysft.config import ModelSection
    from raysft.train.model import load_tokenizer, save_tokenizer

    without = build_tokenizer()
    without.pad_token = None
    without.save_pretrained(tmp_path / "base")
    tok = load_tokenizer(ModelSection(name_or_path=str(tmp_path / "base")))
    lent = tok.pad_token
    assert lent in (tok.unk_token, tok.eos_token) and lent is not None
    save_tokenizer(tok, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").pad_token is None
    assert tok.pad_token == lent  # still padding this run's batches
    # A tokenizer with a pad token of its own keeps it.
    own = load_tokenizer(ModelSection(name_or_path="embedded:tiny-base"))
    save_tokenizer(own, tmp_path / "own")
    assert AutoTokenizer.from_pretrained(tmp_path / "own").pad_token == own.pad_token == "<pad>"
