"""The benchmark: its data, presets, dry run, measurements and report (raysft/bench)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from raysft.bench import data as bdata
from raysft.bench import measure, report
from raysft.bench.__main__ import main
from raysft.bench.presets import CPU, GPU, PRESETS

TINY_BASE = "embedded:tiny-base"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from raysft.assets import resolve

    return AutoTokenizer.from_pretrained(resolve(TINY_BASE))


# ---------------------------------------------------------------- data


def test_rows_are_deterministic_alpaca_rows_with_lognormal_answers():
    rows = bdata.make_rows(600, seed=0)
    assert rows == bdata.make_rows(600, seed=0)
    assert rows != bdata.make_rows(600, seed=1)
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in rows)
    lengths = sorted(len(r["output"]) for r in rows)
    assert 100 <= statistics.median(lengths) <= 140  # median ~120 (byte-level: chars = tokens)
    assert lengths[-1] > 3 * statistics.median(lengths)  # the long tail is there
    assert 0.2 < sum(bool(r["input"]) for r in rows) / len(rows) < 0.6


def test_eval_rows_are_disjoint_from_training_rows():
    train, held = bdata.train_eval_rows(200, 50, seed=0)
    assert len(train) == 200 and len(held) == 50
    assert not {r["output"] for r in train} & {r["output"] for r in held}


def test_seed_prompt_format_is_the_worked_example():
    row = {"instruction": "Do it.", "input": "", "output": "Done."}
    assert bdata.seed_text(row) == "### Instruction:\nDo it.\n\n### Response:\nDone."
    row["input"] = "x"
    assert bdata.prompt_text(row) == "### Instruction:\nDo it.\n\n### Input:\nx\n\n### Response:\n"


def test_eval_examples_train_the_answer_and_eos_only(tok):
    row = {"instruction": "Say hi.", "input": "", "output": "hi there"}
    (ex,) = bdata.eval_examples([row], tok, max_len=512)
    prompt = tok(bdata.prompt_text(row), add_special_tokens=False)["input_ids"]
    answer = tok("hi there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt + answer
    assert ex.labels == [-100] * len(prompt) + answer
    (cut,) = bdata.eval_examples([row], tok, max_len=len(prompt) + 2)
    assert cut.truncated and len(cut.input_ids) == len(prompt) + 2


def test_raysft_pipeline_trains_on_exactly_the_benchmark_tokens(tmp_path, tok):
    """raysft's contender reads messages rows through its `tokenizer` template; the tokens and
    labels must be those every other contender and the held-out loss use."""
    from raysft.assets import resolve
    from raysft.config import DataSection
    from raysft.data.pipeline import prepare_data

    train, held = bdata.train_eval_rows(30, 10, seed=3)
    model_dir = bdata.copy_model_dir(Path(resolve(TINY_BASE)), tmp_path / "model")
    from transformers import AutoTokenizer

    model_tok = AutoTokenizer.from_pretrained(model_dir)
    section = DataSection(
        train=str(bdata.write_messages(train, tmp_path / "train.jsonl")),
        eval=str(bdata.write_messages(held, tmp_path / "eval.jsonl")),
        format="messages",
        template="tokenizer",
        max_seq_len=512,
        max_eval_samples=None,
    )
    prepared = prepare_data(section, model_tok, seed=0)
    for mine, theirs in ((prepared.train, train), (prepared.eval, held)):
        expected = bdata.eval_examples(theirs, tok, max_len=512)
        assert [e.input_ids for e in mine] == [e.input_ids for e in expected]
        assert [e.labels for e in mine] == [e.labels for e in expected]
    # The seed's own text is the same ids minus the EOS its recipe never adds.
    first = tok(bdata.seed_text(train[0]), add_special_tokens=False)["input_ids"]
    assert first == prepared.train[0].input_ids[:-1]


# ---------------------------------------------------------------- presets and dry run


def test_presets_share_one_shape_and_start_with_the_seed():
    assert (CPU.rows, CPU.batch_size, CPU.max_len, CPU.steps, CPU.threads) == (600, 8, 512, 20, 2)
    assert CPU.contenders[0].name == "seed" and GPU.contenders[0].name == "seed-lora"
    for preset in PRESETS.values():
        names = [c.name for c in preset.all_contenders()]
        assert len(names) == len(set(names))
        families = {c.family for c in preset.contenders}
        assert families == {"seed", "trl", "raysft"}
    cpu_shapes = {(c.options.get("batch_size"), c.options.get("max_len")) for c in CPU.contenders}
    assert cpu_shapes == {(None, None)}  # nobody overrides the shared shape
    seven = {c.name: c for c in GPU.contenders}["raysft-qlora-7b"].options
    assert seven["lora"]["r"] == 16 and seven["lora"]["target_modules"] == "all-linear"
    assert (seven["max_len"], seven["batch_size"], seven["gradient_checkpointing"]) == (
        1024,
        4,
        True,
    )


def test_select_names_experiments_and_rejects_unknown_names():
    assert [c.name for c in CPU.select(["raysft-full-compile", "seed"])] == [
        "raysft-full-compile",
        "seed",
    ]
    with pytest.raises(ValueError, match="nope"):
        CPU.select(["nope"])


def test_gpu_dry_run_builds_every_model_on_meta(capsys):
    assert main(["--preset", "gpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    built = [line for line in out.splitlines() if "built on meta:" in line]
    assert len(built) == len(GPU.contenders)
    line = {ln.split()[3]: ln for ln in built}
    assert "22 layers, d=2048, vocab 32000: 1,100,048,384 params" in line["raysft-full"]
    # Llama-2-7B + r=16 on every linear layer: peft's count, 39,976,960 trainable.
    assert "6,778,392,576 params, 39,976,960 trainable" in line["raysft-qlora-7b"]
    # The seed's adapter (r16 on q, v) over 22 layers: 22 * 16 * (2048+2048 + 2048+256).
    assert "2,252,800 trainable" in line["seed-lora"]
    assert "20 steps" in out and "micro-batch 8, max length 512" in out


def test_cpu_dry_run_uses_the_embedded_base(capsys):
    assert main(["--preset", "cpu", "--dry-run", "--contenders", "seed,raysft-lora"]) == 0
    out = capsys.readouterr().out
    assert "4 layers, d=128, vocab 262: 886,656 params, 886,656 trainable" in out
    assert "raysft-lora" in out and "trl-fp32" not in out


# ---------------------------------------------------------------- measurements


@pytest.mark.parametrize(
    ("name", "flops"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(name, flops):
    assert measure.peak_flops(name) == flops


def test_mfu_is_six_n_tokens_over_peak():
    assert measure.mfu(1_000_000_000, 10_000, "NVIDIA H200") == pytest.approx(6e13 / 989e12)
    assert measure.mfu(1, 1, "unknown") is None


def test_matmul_params_leave_out_an_untied_input_embedding(tiny_config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        untied = AutoModelForCausalLM.from_config(tiny_config(tie_word_embeddings=False))
        tied = AutoModelForCausalLM.from_config(tiny_config(tie_word_embeddings=True))
    emb = untied.get_input_embeddings().weight.numel()
    assert measure.matmul_params(untied) == sum(p.numel() for p in untied.parameters()) - emb
    assert measure.matmul_params(tied) == sum(p.numel() for p in tied.parameters())


def test_memory_probe_sees_a_fresh_allocation():
    import torch

    probe = measure.MemoryProbe("cpu")
    probe.start()
    before = probe.peak_mib()
    big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB of fp32, touched
    peak = probe.peak_mib()
    del big
    assert before is not None and peak is not None
    assert peak - before > 200


def test_step_clock_times_the_steps_after_warmup_and_averages_the_last_losses():
    clock = measure.StepClock()
    clock.t0, clock.cpu0 = 0.0, 0.0
    clock.times, clock.cpu = [10.0, 14.0, 15.0, 17.0], [1.0, 5.0, 6.0, 8.0]
    clock.tokens, clock.losses = [100, 200, 400, 800], [3.0, 2.0, 1.0, 2.0]
    s = clock.summary(warmup=2)
    assert s["warmup_s"] == 14.0 and s["first_step_s"] == 10.0
    assert s["tokens_per_s"] == 200.0 and s["step_s"] == 1.5  # steps 3-4: 600 tokens in 3 s
    assert s["tokens_per_cpu_s"] == 200.0 and s["step_times"] == [10.0, 4.0, 1.0, 2.0]
    assert s["tokens_per_s_median"] == 200.0  # median of 200 and 200 tok/s
    assert s["final_train_loss"] == 2.0 and s["real_tokens"] == 800
    assert clock.summary(warmup=9)["warmup_steps"] == 3  # at least one timed step


def test_real_tokens_come_from_the_mask_or_every_id_when_padding_free():
    import torch

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert measure.count_real_tokens({"attention_mask": mask, "input_ids": mask}) == 3
    assert measure.count_real_tokens({"input_ids": torch.zeros(1, 7)}) == 7


# ---------------------------------------------------------------- report


def _rows():
    return [
        {"name": "seed", "tokens_per_s": 100.0, "tokens_per_cpu_s": 50.0, "eval_loss": 2.0},
        {"name": "trl-fp32", "tokens_per_s": 150.0, "eval_loss": 1.9},
        {"name": "trl-defaults", "tokens_per_s": 20.0, "eval_loss": 2.1},
        {"name": "raysft-full", "tokens_per_s": 400.0, "tokens_per_cpu_s": 200.0, "eval_loss": 1.5},
        {"name": "raysft-qlora", "error": "ModelError: no backend"},
    ]


def test_goals_compare_raysft_with_the_seed_and_trls_best():
    rows = _rows()
    report.add_ratios(rows)
    assert rows[3]["ratio"] == 4.0 and rows[3]["cpu_ratio"] == 4.0 and rows[4]["ratio"] is None
    goals = report.goals("cpu", rows)
    assert goals["raysft_vs_seed"]["met"] and goals["raysft_vs_seed"]["ratio"] == 4.0
    trl = goals["raysft_vs_trl_best"]
    assert trl["vs"] == "trl-fp32" and trl["ratio"] == 2.67 and trl["met"]
    rows[3]["eval_loss"] = 2.5  # faster but worse held-out loss: not met
    assert not report.goals("cpu", rows)["raysft_vs_seed"]["met"]


def test_cpu_goals_take_each_sides_fastest_configuration():
    rows = _rows() + [
        {"name": "seed-bf16", "tokens_per_s": 200.0, "eval_loss": 2.0},
        {"name": "raysft-full-compile", "tokens_per_s": 500.0, "eval_loss": 1.5},
        {"name": "raysft-full-sellogits", "tokens_per_s": 900.0, "eval_loss": 1.5},  # no option
    ]
    vs_seed = report.goals("cpu", rows)["raysft_vs_seed"]
    assert (vs_seed["of"], vs_seed["vs"], vs_seed["ratio"]) == ("raysft-full-compile", "seed-bf16",
                                                                2.5)  # fmt: skip


def test_a_goal_is_judged_on_the_fastest_contender_that_meets_the_loss_condition():
    """The fastest raysft contender has a higher held-out loss than TRL's; a slower one is 3x
    TRL at a lower loss: that one meets the 2.5x goal (the fastest was taken, and failed it)."""
    rows = [
        {"name": "trl-bf16", "tokens_per_s": 2000.0, "eval_loss": 1.80},
        {"name": "raysft-full", "tokens_per_s": 6000.0, "eval_loss": 1.75},
        {"name": "raysft-full-grouped-compile-bf16", "tokens_per_s": 7000.0, "eval_loss": 1.82},
    ]
    vs_trl = report.goals("cpu", rows)["raysft_vs_trl_best"]
    assert (vs_trl["of"], vs_trl["ratio"], vs_trl["met"]) == ("raysft-full", 3.0, True)
    # None at that loss: the fastest is reported, not met.
    rows[1]["eval_loss"] = 1.81
    vs_trl = report.goals("cpu", rows)["raysft_vs_trl_best"]
    assert vs_trl["of"] == "raysft-full-grouped-compile-bf16" and not vs_trl["met"]
    assert vs_trl["held_out_loss_equal_or_lower"] is False


def test_a_goal_over_several_rounds_pairs_them_by_training_seed():
    """Rounds run on different seeds (data orders): a median taken from one seed over a median
    from another mixes data with speed. The goal is the median of per-seed ratios (seen on the
    AMX host: 2.86x as a ratio of medians, 2.76x paired)."""
    rows = _rows()
    # seed's median run is seed 1, raysft's seed 0: their ratio 4.0; paired, 3.0.
    rows[0].update(train_seeds=[0, 1, 2], runs_tokens_per_s=[120.0, 100.0, 80.0])
    rows[3].update(train_seeds=[2, 0, 1], runs_tokens_per_s=[240.0, 400.0, 300.0])
    vs_seed = report.goals("cpu", rows)["raysft_vs_seed"]
    assert vs_seed["per_seed_ratios"] == [3.0, 3.33, 3.0] and vs_seed["ratio"] == 3.0
    assert not vs_seed["met"]  # 3.0 < 3.5, where the ratio of medians (4.0) would meet it


def test_gpu_goals_memory_and_mfu():
    rows = [
        {"name": "seed-lora", "tokens_per_s": 100.0, "eval_loss": 3.0},
        {"name": "raysft-lora", "tokens_per_s": 350.0, "eval_loss": 3.0, "peak_mib": 10000},
        {"name": "raysft-full", "tokens_per_s": 300.0, "mfu": 0.31, "eval_loss": 3.0},
        {"name": "raysft-qlora", "tokens_per_s": 200.0, "peak_mib": 5000, "eval_loss": 3.0},
        {"name": "raysft-qlora-7b", "tokens_per_s": 10.0, "peak_mib": 20 * 1024},
    ]
    goals = report.goals("gpu", rows)
    assert goals["lora_vs_seed"]["met"] and goals["lora_vs_trl_best"] is None
    assert goals["full_mfu"] == {"of": "raysft-full", "mfu": 0.31, "goal": 0.4, "met": False}
    assert goals["qlora_memory_vs_lora"]["met"] and goals["qlora_7b_fits_24gib"]["met"]
    # An experiment is no raysft option, and a 24 GiB card must hold what the allocator reserves.
    rows.append({"name": "raysft-full-sellogits", "tokens_per_s": 330.0, "mfu": 0.45})
    rows[-2]["peak_reserved_mib"] = 25 * 1024
    goals = report.goals("gpu", rows)
    assert goals["full_mfu"]["of"] == "raysft-full" and not goals["full_mfu"]["met"]
    assert (
        goals["qlora_7b_fits_24gib"]["peak_gib"] == 25 and not goals["qlora_7b_fits_24gib"]["met"]
    )


def test_machine_names_the_cpus_capability_and_whether_bf16_is_native():
    import torch

    from raysft.train.device import bf16_emulation

    info = measure.machine()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    native = bf16_emulation(torch.device("cpu")) is None
    assert info["cpu_bf16"] == ("native" if native else "emulated")


def test_results_md_gets_a_dated_section_per_run(tmp_path):
    rows = _rows()
    report.add_ratios(rows)
    result = {
        "date": "2030-01-02 03:04",
        "preset": "cpu",
        "command": "python -m raysft.bench --preset cpu",
        "note": "measured under load",
        "machine": {
            "cpu_model": "Test CPU",
            "cpus": 2,
            "cpu_capability": "AVX2",
            "cpu_bf16": "emulated",
        },  # fmt: skip
        "versions": {"torch": "2.x", "trl": None},
        "settings": {"steps": 20},
        "data": {"rows": 600},
        "rows": rows,
        "goals": report.goals("cpu", rows),
    }
    path = tmp_path / "RESULTS.md"
    report.append_results(path, result)
    report.append_results(path, result)
    text = path.read_text()
    assert text.count("## 2030-01-02 03:04: preset `cpu`") == 2
    assert "Test CPU, 2 CPUs (AVX2, bf16 emulated)" in text and "not installed: trl" in text
    assert "| raysft-full | 400 | 4.00 | - | - | 200 |" in text
    assert "ModelError: no backend" in text and "raysft_vs_seed: MET" in text


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_contenders_end_to_end(tmp_path):
    """A short real run: seed and raysft in their own subprocesses, JSON and RESULTS.md out."""
    out, md = tmp_path / "r.json", tmp_path / "RESULTS.md"
    argv = ["--preset", "cpu", "--steps", "2", "--rows", "24", "--eval-rows", "8"]
    argv += ["--contenders", "seed,raysft-full"]
    argv += ["--workdir", str(tmp_path / "w"), "--out", str(out), "--results-md", str(md)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    seed, ray = result["rows"]
    for row in (seed, ray):
        assert row["steps"] == 2 and row["tokens_per_s"] > 0 and row["peak_mib"] > 0
        assert 0 < row["eval_loss"] < 10 and row["eval_tokens"] > 100
    assert seed["ratio"] == 1.0
    # Packed rows are nearly all real tokens; the seed's 512-wide rows are mostly padding.
    assert ray["real_tokens"] > 1.5 * seed["real_tokens"]
    assert result["versions"]["torch"] and "## " in md.read_text()


@pytest.mark.slow
def test_repeat_runs_each_round_on_its_own_training_seed(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--preset", "cpu", "--steps", "2", "--rows", "24", "--eval-rows", "8", "--repeat", "2"]
    argv += ["--contenders", "raysft-full", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    argv += ["--no-record"]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["train_seeds"] == [0, 1] and len(row["runs_tokens_per_s"]) == 2
    first, second = row["runs_eval_loss"]
    assert first != second  # another seed, another data order: another model
    assert row["eval_loss"] == pytest.approx((first + second) / 2)


def test_random_model_dirs_load_with_the_benchmark_template(tmp_path):
    """The GPU preset writes its random-init models this way (here a tiny shape, on the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysft.bench.child import write_random_model

    shape = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 300}  # fmt: skip
    write_random_model(shape, tmp_path / "m", device="cpu", seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == 2 and model.dtype.is_floating_point
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    msgs = [{"role": "user", "content": "P\n"}, {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "P\nA</s>"


def test_selective_logits_experiment_gives_the_recipes_loss(tiny_llama_dir):
    """The `sellogits` experiment (LM head only where the loss scores) must compute the same loss
    and gradients as `forward_loss`, or its timing compares unlike things."""
    import torch
    from transformers import AutoModelForCausalLM

    import raysft.train.evaluate as ev
    import raysft.train.recipe as recipe
    from raysft.bench.contenders import use_selective_logits
    from raysft.data.packing import collate_packed

    gen = torch.Generator().manual_seed(0)
    samples = []
    for n, prompt in ((7, 3), (12, 5), (5, 1)):
        ids = torch.randint(3, 100, (n,), generator=gen).tolist()
        samples.append((ids, [-100] * prompt + ids[prompt:]))
    batch = collate_packed([samples[:2], samples[2:]], pad_id=0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    selective = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reference = ev.forward_loss
    assert recipe.forward_loss is reference
    heads: list[tuple[int, ...]] = []  # the LM head's input, as its pre-hooks left it
    for model in (plain, selective):
        model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _out: heads.append(tuple(args[0].shape))
        )
    try:
        use_selective_logits(selective)
        ref_loss, ref_n = ev.forward_loss(plain, batch, "cpu")  # dispatches to the original
        # The name the training step calls (train_step), not only the eval module's.
        loss, n = recipe.forward_loss(selective, batch, "cpu")
    finally:
        ev.forward_loss = recipe.forward_loss = reference
    assert n == ref_n == (7 - 3) + (12 - 5) + (5 - 1)
    hidden = plain.config.hidden_size
    # The head ran at every position of the plain model, at the scored ones alone of the other.
    assert heads == [(*batch["input_ids"].shape, hidden), (n, hidden)]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref_loss.backward()
    for (name, a), b in zip(selective.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_median_run_keeps_the_middle_run_and_averages_the_losses() -> None:
    from raysft.bench.__main__ import median_run

    def run(tok_s: float, loss: float, seed: int) -> dict:
        return {"name": "a", "tokens_per_s": tok_s, "eval_loss": loss, "train_seed": seed,
                "final_train_loss": 2 * loss, "note": "n"}  # fmt: skip

    runs = [run(300.0, 1.0, 0), {"name": "a", "error": "timed out after 900 s"},
            run(100.0, 1.2, 2), run(200.0, 1.5, 3)]  # fmt: skip
    row = median_run(runs)
    assert row["tokens_per_s"] == 200.0
    assert row["runs_tokens_per_s"] == [300.0, None, 100.0, 200.0]
    assert row["train_seeds"] == [0, None, 2, 3]
    assert row["train_seed"] == 3  # the median run's
    assert row["runs_eval_loss"] == [1.0, 1.2, 1.5]  # in round order
    assert row["eval_loss"] == pytest.approx(3.7 / 3)
    assert row["final_train_loss"] == pytest.approx(7.4 / 3)
    assert row["note"] == (
        "n (median of 3 runs: 100, 200, 300 tok/s; held-out loss the mean of 1.0000, 1.2000, "
        "1.5000; 1 failed)"
    )
    assert median_run(runs[:1]) == runs[0]  # one run: as it came
    assert median_run(runs[1:2])["error"].startswith("timed out")
    assert median_run(runs[2:])["tokens_per_s"] == 100.0  # even count: the lower middle
