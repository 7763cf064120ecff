"""run_trial end to end on tiny random Llama / Qwen2 / Mistral-style local models."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from evalkit import LONG_HISTORY
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from raysft.assets.tokenizer import build_tokenizer
from raysft.config import load_config
from raysft.errors import DataError
from raysft.train.metrics import REPLAYED
from raysft.train.recipe import run_trial
from raysft.train.resume_checks import check_resumable

ROWS = [{"instruction": "Upper case", "input": f"w{i}", "output": f"W{i}"} for i in range(12)] + [
    {
        "conversations": [
            {"from": "human", "value": "今天天气真好"},
            {"from": "gpt", "value": "Nice."},
        ]
    }
]

ARCHS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
}


def _model_dir(tmp_path: Path, arch: str) -> Path:
    tok = build_tokenizer()
    cfg = ARCHS[arch](
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _config(tmp_path: Path, model_dir: Path, method: str, **extra: object):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS), encoding="utf-8")
    overrides = {
        "model.name_or_path": str(model_dir),
        "method": method,
        "data.train": str(data),
        "data.eval": None,
        "data.eval_fraction": 0.25,
        "data.max_seq_len": 96,
        "train.max_steps": 4,
        "train.eval_every": 2,
        "train.batch_size": 2,
        "train.grad_accum": 2,
        "train.learning_rate": 1e-2,
        "train.max_new_tokens": 4,
        "train.neftune_alpha": 5,
        "lora.target_modules": "all-linear",
        "output_dir": str(tmp_path / f"out-{method}"),
        **extra,
    }
    return load_config(None, overrides)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_trial_on_each_architecture(tmp_path: Path, arch: str) -> None:
    cfg = _config(tmp_path, _model_dir(tmp_path, arch), "lora")
    result = run_trial(cfg)
    out = Path(result.output_dir)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "config.yaml").is_file()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert [h["step"] for h in metrics["history"] if "eval_loss" in h] == [2, 4]
    assert metrics["final"]["eval_loss"] == metrics["history"][-1]["eval_loss"]
    assert 0 <= metrics["final"]["exact_match"] <= 1 and "base_exact_match" in metrics["final"]
    assert metrics["data"]["rows_read"] == len(ROWS) and metrics["data"]["rows_skipped"] == 0
    assert metrics["working_dir"] == os.getcwd()  # where config.yaml's relative paths are
    assert 0 < metrics["data"]["packing_efficiency"] <= 1
    # Warmup then cosine decay: the last step's learning rate is below the peak.
    assert metrics["history"][-1]["lr"] < cfg.train.learning_rate


def test_full_and_qlora_trials_report_and_save(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    full = run_trial(_config(tmp_path, model_dir, "full", **{"train.exact_match": False}))
    assert (Path(full.output_dir) / "model.safetensors").is_file()
    assert full.final["trainable_params"] == full.final["total_params"]
    # Without generation the base is still scored, on the eval loss: the rows' loss before any
    # step, higher than the trained model's, and on the last step's record beside it.
    assert full.final["base_eval_loss"] > full.final["eval_loss"]
    assert full.history[-1]["base_eval_loss"] == full.final["base_eval_loss"]
    assert "base_exact_match" not in full.final
    qlora = run_trial(_config(tmp_path, model_dir, "qlora", **{"train.exact_match": False}))
    assert (Path(qlora.output_dir) / "adapter_model.safetensors").is_file()
    assert qlora.final["trainable_params"] < qlora.final["total_params"]
    assert all(h["train_loss"] == h["train_loss"] for h in qlora.history)  # no NaN


def test_reporter_gets_every_eval_with_a_checkpoint(tmp_path: Path) -> None:
    seen: list[tuple[dict, list[str]]] = []

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        seen.append((metrics, sorted(p.name for p in Path(checkpoint_dir).iterdir())))
        origin = json.loads((Path(checkpoint_dir) / "origin.json").read_text(encoding="utf-8"))
        assert origin == {"working_dir": os.getcwd()}  # raysft.evaluate reads relative paths there

    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.eval_base": False})
    run_trial(cfg, report=report)
    assert [m["step"] for m, _ in seen] == [2, 4]
    assert all("adapter_model.safetensors" in files for _, files in seen)
    assert all("training_state.pt" in files for _, files in seen)
    # train.eval_base: false is honoured
    assert "base_exact_match" not in seen[-1][0] and "base_eval_loss" not in seen[-1][0]
    assert "exact_match" in seen[-1][0] and "exact_match" not in seen[0][0]


def test_a_runs_saved_configs_hold_no_tracking_password(tmp_path: Path) -> None:
    # Checkpoints are uploaded as the best adapter and read by anyone who reads the experiment.
    uri = "https://alice:s3cretpw@mlflow.example.com"
    prompt = "Clone ssh://git@github.com/x/y?key=setup first."  # no secret: kept as it is
    cfg = _config(
        tmp_path, _model_dir(tmp_path, "llama"), "lora",
        **{"tracking.uri": uri, "train.max_steps": 2, "train.eval_base": False,
           "data.system_prompt": prompt},
    )  # fmt: skip
    saved: list[str] = []

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        saved.append((Path(checkpoint_dir) / "config.yaml").read_text(encoding="utf-8"))
        check_resumable(checkpoint_dir, cfg)  # tracking. may change: the run resumes

    out = Path(run_trial(cfg, report=report).output_dir)
    saved.append((out / "config.yaml").read_text(encoding="utf-8"))
    assert len(saved) == 2
    for text in saved:
        assert "s3cretpw" not in text and "alice:***@mlflow.example.com" in text
        assert prompt in text  # resume compares it, raysft.evaluate scores with it


def test_compiled_training_steps_equal_eager_ones(tmp_path: Path) -> None:
    """train.compile: the same losses step by step (full fine-tuning has no dropout or noise to
    draw differently), evals and checkpoints in between, and the saved weights keep their
    names (torch.compile's wrapper would prefix them with ``_orig_mod.``)."""
    from safetensors.torch import load_file

    model_dir = _model_dir(tmp_path, "llama")
    # Batches of one row: no epoch ends on a partial batch, which compiled training skips.
    common = {"train.exact_match": False, "train.neftune_alpha": None, "train.eval_base": False,
              "train.batch_size": 1}  # fmt: skip
    eager = run_trial(_config(tmp_path, model_dir, "full", **common))
    checkpoints: list[list[str]] = []

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        checkpoints.append(sorted(load_file(f"{checkpoint_dir}/model.safetensors")))

    options = {**common, "train.compile": True, "output_dir": str(tmp_path / "out-compiled")}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run_trial(_config(tmp_path, model_dir, "full", **options), report=report)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    pairs = list(zip(eager.history, compiled.history, strict=True))
    assert [c["step"] for _, c in pairs] == [1, 2, 3, 4]
    for e, c in pairs:
        assert c["train_loss"] == pytest.approx(e["train_loss"], abs=1e-4)
        assert c.get("eval_loss", 0.0) == pytest.approx(e.get("eval_loss", 0.0), abs=1e-4)
    saved = sorted(load_file(Path(compiled.output_dir) / "model.safetensors"))
    assert checkpoints == [saved, saved]
    assert saved == sorted(load_file(Path(eager.output_dir) / "model.safetensors"))


def test_compiled_trials_in_one_process_each_trace_their_own_model(tmp_path: Path) -> None:
    """A compiled model without NEFTune, then one with it, in the same process: the second
    must not run the first one's graph (dynamo guards neither hooks nor the instance). The
    embedded base is pretrained: unlike a random model's, its loss moves with noisy embeddings."""
    from raysft.train.evaluate import forward_loss
    from raysft.train.recipe import Dist, setup

    losses = {}
    for alpha in (None, 200.0):
        options = {"train.compile": True, "train.neftune_alpha": alpha, "train.eval_base": False}
        cfg = _config(tmp_path, Path("unused"), "full", **options)
        cfg.model.name_or_path = "embedded:tiny-base"
        torch.manual_seed(0)
        run = setup(cfg, dist=Dist())
        assert isinstance(run.train_model, torch._dynamo.eval_frame.OptimizedModule)
        run.model.train()
        batch = next(run.stream)
        if run.neftune is not None:
            run.neftune.set_lengths(batch["seg_lens"])
        with torch.no_grad():
            losses[alpha] = float(forward_loss(run.train_model, batch, run.device)[0])
    # The same model, batch and seed: only the noise can move the loss.
    assert abs(losses[200.0] - losses[None]) > 0.05 * losses[None], losses


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_of(tmp_path, monkeypatch, caplog, native):
    """train.precision: bf16 where the CPU has no native bf16 trains ~10x slower: the trial's
    log says so, naming the setting and what to use instead; a native CPU gets no warning."""
    import logging

    from raysft.train.recipe import Dist, setup

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    options = {"train.precision": "bf16", "train.eval_base": False, "train.device": "cpu"}
    with caplog.at_level(logging.WARNING, logger="raysft.train.precision"):
        setup(_config(tmp_path, _model_dir(tmp_path, "llama"), "full", **options), dist=Dist())
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    if native:
        assert warned == []
    else:
        assert len(warned) == 1
        assert "train.precision: bf16" in warned[0] and "neither AVX512-BF16 nor AMX" in warned[0]
        assert "`auto` (or fp32 / float32) avoids it" in warned[0]


def test_every_explicit_bf16_setting_is_named_and_auto_is_not():
    from raysft.config import load_config
    from raysft.train.precision import asks_for_bf16

    base = {"model.name_or_path": "embedded:tiny-base"}
    assert asks_for_bf16(load_config(None, {**base, "method": "qlora"})) == []
    asked = {
        "train.precision": "bf16",
        "model.dtype": "bfloat16",
        "qlora.compute_dtype": "bfloat16",
    }
    cfg = load_config(None, {**base, "method": "qlora", **asked})
    assert asks_for_bf16(cfg) == [
        "train.precision: bf16",
        "model.dtype: bfloat16",
        "qlora.compute_dtype: bfloat16",
    ]
    lora = load_config(None, {**base, "method": "lora", "qlora.compute_dtype": "bfloat16"})
    assert asks_for_bf16(lora) == []  # the qlora section does nothing for lora


def test_eval_loss_is_the_same_packed_padded_or_grouped_by_length(tmp_path: Path) -> None:
    """The held-out loss is a sum over response tokens: the batch layout must not move it."""
    from raysft.train.recipe import Dist, setup

    model_dir = _model_dir(tmp_path, "llama")
    sums = {}
    layouts = {
        "packed": {},
        "padded": {"data.packing": False},
        "grouped": {"data.packing": False, "data.group_by_length": True},
    }
    for name, layout in layouts.items():
        options = {"train.eval_base": False, "train.batch_size": 2, **layout}
        run = setup(_config(tmp_path, model_dir, "full", **options), dist=Dist())
        scores, _ = run.evaluate(final=False)
        sums[name] = scores["eval_loss"]
    assert sums["grouped"] == pytest.approx(sums["packed"], rel=1e-5)
    assert sums["padded"] == pytest.approx(sums["packed"], rel=1e-5)


def test_grouped_bf16_trial_with_fp32_attention_trains_and_saves(tmp_path: Path) -> None:
    """data.group_by_length with model.attn_implementation: sdpa_fp32 under bf16 autocast (the
    CPU benchmark's fastest layout): the loss falls, and the saved model loads with plain sdpa
    (the attention choice is not written into its config)."""
    model_dir = _model_dir(tmp_path, "llama")
    options = {
        "data.packing": False,
        "data.group_by_length": True,
        "model.attn_implementation": "sdpa_fp32",
        "train.precision": "bf16",
        "train.exact_match": False,
        "train.max_steps": 8,
        "train.eval_every": 8,
        "train.neftune_alpha": None,
    }
    result = run_trial(_config(tmp_path, model_dir, "full", **options))
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 8 and losses[-1] < losses[0]
    saved = json.loads((Path(result.output_dir) / "config.json").read_text(encoding="utf-8"))
    assert "sdpa_fp32" not in json.dumps(saved)
    # Exported in bf16, and config.json says so (transformers 5 writes the live fp32's).
    assert saved["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def _diverging(tmp_path: Path, eval_every: int):
    """learning_rate 1e20, no warmup: the first update takes the weights past what float32
    multiplies, and every loss after it is NaN."""
    return _config(
        tmp_path,
        _model_dir(tmp_path, "llama"),
        "full",
        **{
            "train.learning_rate": 1e20,
            "train.warmup_ratio": 0.0,
            "train.eval_every": eval_every,
            "train.max_steps": 6,
        },
    )


def test_every_step_records_its_gradient_norm_before_clipping_and_its_epoch(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    norms = {}
    for clip in (None, 1e-6):  # a bound every step's norm is over: each is clipped
        cfg = _config(
            tmp_path, model_dir, "lora", **{"train.max_grad_norm": clip, "train.max_steps": 2}
        )
        result = run_trial(cfg.model_copy(update={"output_dir": str(tmp_path / f"out-{clip}")}))
        norms[clip] = [h["grad_norm"] for h in result.history]
        # Each step also says how many epochs of the (packed) rows it has run.
        per_epoch = math.ceil(result.data["packed_rows"] / cfg.train.batch_size)
        assert [h["epoch"] for h in result.history] == [
            round(step * cfg.train.grad_accum / per_epoch, 4) for step in (1, 2)
        ]
    unclipped, clipped = norms[None], norms[1e-6]
    # Read before the clipping: far above the bound the clipped steps were cut to.
    assert all(n > 1e-3 for n in unclipped + clipped), norms
    # Step 1 starts from the same weights and data either way: the same norm.
    assert clipped[0] == pytest.approx(unclipped[0], rel=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_the_optimizer_and_its_settings_are_the_configs(name: str) -> None:
    from raysft.train.recipe import _build_optimizer

    cfg = load_config(
        None,
        {
            "train.optimizer": name,
            "train.adam_beta1": 0.8,
            "train.adam_beta2": 0.95,
            "train.adam_epsilon": 1e-6,
            "train.weight_decay": 0.1,
            "train.warmup_ratio": 0.0,  # else the first step runs at rate 0
        },
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)  # 8192 weights: bitsandbytes quantizes from 4096 values
    optimizer, _ = _build_optimizer(model, cfg)
    groups = optimizer.param_groups
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in groups] == [
        ((0.8, 0.95), 1e-6, 0.1),  # the weight matrix
        ((0.8, 0.95), 1e-6, 0.0),  # the bias: no decay
    ]
    model(torch.randn(4, 128)).pow(2).mean().backward()
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.weight, before)
    state = optimizer.state[model.weight]
    if name == "adamw":
        assert type(optimizer) is torch.optim.AdamW and state["exp_avg"].dtype == torch.float32
    else:  # two 8-bit states, a quarter of AdamW's fp32 ones
        assert type(optimizer).__module__.startswith("bitsandbytes.")
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8


def test_a_diverging_run_stops_at_its_first_non_finite_loss(tmp_path: Path) -> None:
    """Step 2's loss is NaN, between evals: the run stops there, reports that step without a
    checkpoint and with every eval metric NaN, unevaluated (a search needs its objective in
    the report), and writes no NaN model."""
    seen: list[tuple[dict, bool]] = []

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        seen.append((metrics, checkpoint_dir is not None))

    result = run_trial(_diverging(tmp_path, eval_every=3), report=report)
    assert [(m["step"], ckpt) for m, ckpt in seen] == [(2, False)]
    last = seen[-1][0]
    # The steps since the last report come with it: MLflow and Tune get the curve up to it.
    assert [r["step"] for r in last[REPLAYED]] == [1]
    for name in ("train_loss", "eval_loss", "perplexity", "exact_match"):
        assert last[name] != last[name], name  # NaN
    assert result.final["diverged_at"] == 2
    assert [h["step"] for h in result.history] == [1, 2]
    out = Path(result.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json"]
    # Strict JSON: NaN is written as null (json.loads would otherwise accept the NaN token).
    text = (out / "metrics.json").read_text(encoding="utf-8")
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert metrics["history"][-1]["train_loss"] is None


def test_a_finite_step_whose_eval_is_not_finite_stops_the_run(tmp_path: Path) -> None:
    """Step 1's own loss is finite, its update is not: the eval right after it says so, and
    the run stops there."""
    seen: list[tuple[dict, bool]] = []
    result = run_trial(
        _diverging(tmp_path, eval_every=1),
        report=lambda m, ckpt: seen.append((m, ckpt is not None)),
    )
    assert [(m["step"], ckpt) for m, ckpt in seen] == [(1, False)]
    first = seen[0][0]
    assert first["train_loss"] == first["train_loss"] and first["eval_loss"] != first["eval_loss"]
    assert result.final["diverged_at"] == 1
    assert not (Path(result.output_dir) / "model.safetensors").exists()


def test_a_float16_base_trains_with_a_loss_scaler(tmp_path: Path) -> None:
    # fp16 (`auto` on a GPU below compute capability 8.0): the loss of a step, divided by its
    # tokens, backpropagates through fp16 activations; unscaled, small gradients are lost.
    from raysft.train.recipe import Dist, finish, setup, train

    model_dir = _model_dir(tmp_path, "llama")
    extra = {"train.exact_match": False, "train.neftune_alpha": None}
    half = setup(_config(tmp_path, model_dir, "lora", **{"model.dtype": "float16", **extra}),
                 dist=Dist())  # fmt: skip
    assert isinstance(half.scaler, torch.amp.GradScaler)
    train(half, None)
    assert all(r["train_loss"] == r["train_loss"] for r in half.progress.history)  # no NaN
    assert half.scaler.get_scale() > 1.0
    finish(half)
    fp32 = setup(_config(tmp_path, model_dir, "lora", **{"model.dtype": "float32", **extra}),
                 dist=Dist())  # fmt: skip
    assert fp32.scaler is None


def test_a_float16_step_the_scaler_skips_does_not_move_the_schedule(tmp_path: Path) -> None:
    """A gradient that overflowed fp16 skips the optimizer's step; the learning rate schedule
    waits too (it used up the warmup on steps never taken)."""
    from raysft.train.recipe import Dist, finish, setup, train

    model_dir = _model_dir(tmp_path, "llama")
    extra = {"train.exact_match": False, "train.neftune_alpha": None, "train.max_steps": 2}
    half = setup(_config(tmp_path, model_dir, "lora", **{"model.dtype": "float16", **extra}),
                 dist=Dist())  # fmt: skip
    half.scaler._init_scale = 2.0**60  # every gradient overflows: both steps are skipped
    before = {n: p.detach().clone() for n, p in half.model.named_parameters() if p.requires_grad}
    train(half, None)
    after = dict(half.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # no step was taken
    assert half.scheduler.last_epoch == 0
    assert [r["lr"] for r in half.progress.history] == [0.0, 0.0]  # warmup's first rate
    finish(half)


def test_flex_attention_on_the_cpu_is_refused_before_anything_loads(tmp_path: Path) -> None:
    from raysft.errors import ModelError

    cfg = load_config(
        None,
        {"model.attn_implementation": "flex_attention", "train.device": "cpu",
         "output_dir": str(tmp_path / "out")},
    )  # fmt: skip
    with pytest.raises(ModelError) as err:
        run_trial(cfg)
    assert str(err.value) == (
        "model.attn_implementation: flex_attention needs a CUDA GPU (torch has no flex_attention "
        "backward on cpu), and this run trains on cpu: use sdpa"
    )
    assert not (tmp_path / "out").exists()


def test_eval_rows_whose_prompt_fills_max_seq_len_are_not_generated_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A held-out conversation whose history before the scored answer is data.max_seq_len
    tokens or more: its training sample was cut before that answer, so generation leaves it out
    (said with the counts) instead of prompting past the context; all of them is an error
    before training."""
    from raysft.train.recipe import Dist, setup

    short = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]
    evals = tmp_path / "eval.jsonl"
    evals.write_text(
        "\n".join(json.dumps({"messages": m}) for m in (LONG_HISTORY, short)), encoding="utf-8"
    )
    model_dir = _model_dir(tmp_path, "llama")
    options = {"data.eval": str(evals), "train.exact_match": True}
    run = setup(_config(tmp_path, model_dir, "lora", **options), dist=Dist())
    assert [len(c) for c in run.data.eval_conversations] == [4, 2]  # both kept for the loss
    _, samples = run.evaluate(final=True)
    assert [s["expected"] for s in samples] == ["yes"]
    said = [m for m in caplog.messages if "left out of generation" in m]
    assert len(said) == 1 and said[0].startswith(
        "1 of the 2 eval rows have a generation prompt of data.max_seq_len=96 tokens or more"
    )
    evals.write_text(json.dumps({"messages": LONG_HISTORY}), encoding="utf-8")
    with pytest.raises(DataError, match="every one of the 1 eval rows has a generation prompt"):
        setup(_config(tmp_path, model_dir, "lora", **options), dist=Dist())


def test_eval_max_prompts_caps_the_generated_answers_not_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Generation takes the first eval.max_prompts eval rows whose prompts fit; eval loss
    scores all of them."""
    from raysft.train.recipe import Dist, setup

    rows = [
        [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]
        for w in ("yes", "no", "maybe", "sure")
    ]
    evals = tmp_path / "eval.jsonl"
    lines = [json.dumps({"messages": m}) for m in (LONG_HISTORY, *rows)]
    evals.write_text("\n".join(lines), encoding="utf-8")
    model_dir = _model_dir(tmp_path, "llama")
    options = {"data.eval": str(evals), "train.exact_match": True}
    with caplog.at_level(logging.INFO, logger="raysft"):
        capped = setup(
            _config(tmp_path, model_dir, "lora", **options, **{"eval.max_prompts": 2}),
            dist=Dist(),
        )
    every = setup(_config(tmp_path, model_dir, "lora", **options), dist=Dist())
    scores, samples = capped.evaluate(final=True)
    assert [s["expected"] for s in samples] == ["yes", "no"]  # the long one does not fit
    said = [m for m in caplog.messages if m.startswith("eval.max_prompts=2: ")]
    assert said == [
        "eval.max_prompts=2: the generated-answer metrics answer the first 2 of the 4 eval rows "
        "whose prompts fit; eval loss scores all of them"
    ]
    all_scores, all_samples = every.evaluate(final=True)
    assert [s["expected"] for s in all_samples] == ["yes", "no", "maybe", "sure"]
    assert len(capped.data.eval) == len(every.data.eval) == 5
    assert scores["eval_loss"] == pytest.approx(all_scores["eval_loss"])


@pytest.mark.parametrize(
    ("warmup", "peak_at"),
    [({"train.warmup_steps": 5}, 5), ({"train.warmup_ratio": 0.1}, 2), ({}, 1)],
)
def test_the_warmup_is_its_steps_or_its_share_of_the_run(
    warmup: dict[str, float], peak_at: int
) -> None:
    from raysft.train.recipe import _build_optimizer

    cfg = load_config(
        None, {"train.max_steps": 20, "train.lr_scheduler": "constant", **warmup}
    )  # the default warmup_ratio 0.03 of 20 steps: 1
    optimizer, scheduler = _build_optimizer(torch.nn.Linear(2, 2), cfg)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = cfg.train.learning_rate
    assert rates[0] == 0.0 and rates[peak_at - 1] < peak
    assert rates[peak_at:] == [peak] * (8 - peak_at)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            {"train.warmup_steps": 20, "train.max_steps": 20},
            "train.warmup_steps: 20 of train.max_steps 20: the learning rate would still be "
            "rising at the last step, never reaching train.learning_rate; set fewer than 20",
        ),
        (  # as a ratio: 10 steps rounded up
            {"train.warmup_ratio": 0.95, "train.max_steps": 10},
            "train.warmup_ratio: 0.95 of train.max_steps 10 is 10 warmup steps (rounded up): the "
            "learning rate would still be rising at the last step, never reaching "
            "train.learning_rate; set at most 0.9",
        ),
        (
            {"train.warmup_steps": 1, "train.max_steps": 1},
            "train.warmup_steps: 1 of train.max_steps 1 is one warmup step, taken at learning "
            "rate 0 (the warmup's first): the run would train nothing; set train.warmup_steps: 0",
        ),
    ],
)
def test_warmup_steps_that_cannot_be_are_refused(settings: dict[str, float], problem: str) -> None:
    from raysft.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, settings)
    assert [p.removeprefix("--set ") for p in err.value.problems] == [problem]
    load_config(None, {"train.warmup_steps": 0, "train.max_steps": 1})  # no warmup: one step
    # The largest ratio said: its steps stay below max_steps.
    for steps in (2, 3, 7, 10, 1000):
        most = float(
            str(load_problem({"train.warmup_ratio": 0.9999, "train.max_steps": steps}))
            .rsplit("set at most ", 1)[1]
        )  # fmt: skip
        assert load_config(None, {"train.warmup_ratio": most, "train.max_steps": steps})


def load_problem(settings: dict[str, float]) -> str:
    from raysft.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, settings)
    (problem,) = err.value.problems
    return problem


def test_warmup_steps_win_over_a_ratio_said_unread_and_a_saved_config_loads_again(
    tmp_path: Path,
) -> None:
    import yaml

    from raysft.config import saved_tree
    from raysft.config.loading import unused_settings

    cfg = load_config(None, {"train.warmup_steps": 2, "train.warmup_ratio": 0.1})
    assert cfg.train.warmup() == 2
    assert unused_settings(cfg) == [
        "train.warmup_ratio: has no effect, since train.warmup_steps sets the warmup"
    ]
    assert unused_settings(load_config(None, {"train.warmup_steps": 2})) == []
    # A run saves every setting, the default ratio beside the steps: it loads as it ran.
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(saved_tree(load_config(None, {"train.warmup_steps": 2}))))
    again = load_config(saved)
    assert (again.train.warmup_steps, again.train.warmup()) == (2, 2)


def test_warmup_steps_beside_epochs_are_checked_against_the_epochs_steps() -> None:
    from raysft.data.tokens import Example
    from raysft.errors import ConfigError
    from raysft.train.epochs import resolve_epochs

    given = {"train.epochs": 50, "train.warmup_steps": 300, "train.batch_size": 1,
             "train.grad_accum": 1}  # fmt: skip
    rows = [Example([1, 2, 3], [1, 2, 3], False) for _ in range(10)]
    padded = load_config(None, {**given, "data.packing": False})  # 10 steps an epoch: 500
    assert resolve_epochs(padded, rows, world_size=1, source="c").train.max_steps == 500
    packed = load_config(None, given)  # one packed row: 1 step an epoch, 50 in all
    with pytest.raises(ConfigError, match="warmup_steps: 300 of train.max_steps 50"):
        resolve_epochs(packed, rows, world_size=1, source="c")
