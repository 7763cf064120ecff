"""Generation, scoring and ``python -m raysft.evaluate`` on real tiny models whose answers and
losses are known by hand (``evalkit.chain_model_dir``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from evalkit import FAMILIES, chain_logit, chain_model_dir, chat_tokenizer_dir

from raysft.assets.tokenizer import build_tokenizer
from raysft.config import load_config
from raysft.data.templates import generation_prompt_ids
from raysft.errors import ConfigError, DataError, ModelError, SearchStateError
from raysft.evaluate import run
from raysft.search.eval_target import resolve_target
from raysft.train import scoring
from raysft.train.evaluate import _answer, answer_stops, generate_answers
from raysft.train.score_saved import adapter_base, score_model

ROWS = [
    {"instruction": "Set x.", "output": "x=1", "tests": "assert x == 1"},
    {"instruction": "Set x to two.", "output": "x=2", "tests": "assert x == 2"},
]
# After the ChatML prompt's final "\n" the model writes x=1<|im_end|>, then Z forever.
CHAIN = {"\n": "x", "x": "=", "=": "1", "1": "<|im_end|>"}


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chain_model_dir(tmp_path_factory.mktemp("chain"), build_tokenizer(), CHAIN, default="Z")


@pytest.fixture(scope="module")
def adapter_dir(chain_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh LoRA adapter (B = 0: it changes nothing) on the chain model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chain_dir), lora)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(chain_dir).save_pretrained(out)
    return out


def _rows(tmp_path: Path, rows: list[dict[str, str]] = ROWS) -> str:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def _cfg(tmp_path: Path, model: Path, **extra: Any) -> Any:
    overrides = {"model.name_or_path": str(model), "data.eval": _rows(tmp_path), **extra}
    return load_config(None, {"train.max_new_tokens": 8, **overrides})


# ---------------------------------------------------------------- every metric, by hand


def test_score_model_by_hand(tmp_path: Path, chain_dir: Path) -> None:
    tok = build_tokenizer()
    got = score_model(str(chain_dir), _cfg(tmp_path, chain_dir))
    assert got.rows == 2
    assert [s["generated"] for s in got.samples] == ["x=1", "x=1"]
    # Response tokens x = 1|2 <|im_end|>: row 1 all 4 predicted, row 2 the last two missed.
    # Logits are s for the predicted token and 0 for the V - 1 others.
    s, v = chain_logit(tok), len(tok)
    hit, miss = math.log(math.exp(s) + v - 1) - s, math.log(math.exp(s) + v - 1)
    loss = (6 * hit + 2 * miss) / 8
    scores = got.scores
    assert scores["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert scores["exact_match"] == 0.5
    assert scores["rouge_l"] == pytest.approx((1 + 0.5) / 2)  # "x 1" vs "x 2": LCS 1 of 2
    assert scores["bleu"] == scoring.bleu(["x=1", "x=1"], ["x=1", "x=2"])
    assert scores["pass_at_k"] == 0.5  # x=1 passes `assert x == 1`, not `assert x == 2`
    assert [s["passed"] for s in got.samples] == [[True], [False]]


def test_references_longer_than_max_new_tokens_are_warned_of(
    tmp_path: Path, chain_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # "x=1" and "x=2" are 3 tokens, 4 with <|im_end|>: a cap of 3 cuts both of them.
    cfg = _cfg(tmp_path, chain_dir, **{"train.max_new_tokens": 3})
    with caplog.at_level("WARNING", logger="raysft.train.evaluate"):
        score_model(str(chain_dir), cfg, metrics=["exact_match"])
    said = [r.getMessage() for r in caplog.records if "max_new_tokens" in r.getMessage()]
    assert said == [
        "train.max_new_tokens=3 is shorter than 2 of the 2 eval reference answers (the longest "
        "is 4 tokens with its terminator): their answers are cut there, so exact match, ROUGE-L "
        "and BLEU are capped by it; raise train.max_new_tokens to 4"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="raysft.train.evaluate"):
        score_model(str(chain_dir), _cfg(tmp_path, chain_dir), metrics=["exact_match"])
    assert not [r for r in caplog.records if "max_new_tokens" in r.getMessage()]


def test_rows_whose_prompt_fills_max_seq_len_are_scored_for_loss_only(
    tmp_path: Path, chain_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A long multi-turn history before the scored answer: left out of generation, said; if
    every row is like that, generation metrics are refused."""
    history = [
        {"role": "user", "content": "Set x."},
        {"role": "assistant", "content": "x=1"},
        {"role": "user", "content": "Again, " + "please " * 20},
        {"role": "assistant", "content": "x=2"},
    ]
    short = [{"role": "user", "content": "Set x."}, {"role": "assistant", "content": "x=1"}]
    cfg = _cfg(tmp_path, chain_dir, **{"data.max_seq_len": 64})
    got = score_model(str(chain_dir), cfg, conversations=[history, short])
    assert got.rows == 2 and [s["expected"] for s in got.samples] == ["x=1"]
    assert [s["row"] for s in got.samples] == [2]  # the eval row it answers, not its position
    assert any("1 of the 2 eval rows have a generation prompt" in m for m in caplog.messages)
    with pytest.raises(DataError, match="every one of the 1 eval rows has a generation prompt"):
        score_model(str(chain_dir), cfg, conversations=[history], metrics=["exact_match"])
    assert "eval_loss" in score_model(str(chain_dir), cfg, conversations=[history],
                                      metrics=["eval_loss"]).scores  # fmt: skip


def test_pass_at_k_from_n_samples(tmp_path: Path, chain_dir: Path) -> None:
    # Greedy-identical samples at a low temperature: n = 3 answers per prompt, all x=1;
    # pass@2 of row 1 is 1 (3 of 3 pass), of row 2 is 0.
    cfg = _cfg(
        tmp_path, chain_dir, **{"eval.samples": 3, "eval.pass_k": 2, "eval.temperature": 1e-3}
    )
    got = score_model(str(chain_dir), cfg, metrics=["pass_at_k", "exact_match"])
    assert [len(s["answers"]) for s in got.samples] == [3, 3]
    assert got.scores == {"pass_at_k": 0.5, "exact_match": 0.5}


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(chain_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(chain_dir)
    conv = [{"role": "user", "content": "Set x."}, {"role": "assistant", "content": "x=1"}]
    common = {"template": "chatml", "max_new_tokens": 6, "batch_size": 4, "device": "cpu"}

    def answers(**kw: Any) -> list[str]:
        out = generate_answers(model, tok, [conv], autocast=contextlib.nullcontext, **common, **kw)
        return list(out[0]["answers"])

    assert answers() == ["x=1"]  # greedy
    torch.manual_seed(123)
    before = torch.get_rng_state()
    hot = answers(samples=4, temperature=50.0, seed=7)  # logits s/50 vs 0: near uniform
    assert torch.equal(torch.get_rng_state(), before)
    assert len(hot) == 4 and len(set(hot)) > 1
    assert answers(samples=4, temperature=50.0, seed=7) == hot


# ---------------------------------------------------------------- answers end at the template's end


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_template_terminators_stop_and_score(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir(tmp_path, family))
    term = FAMILIES[family][4]
    chain = {"\n": "P", "P": "a", "a": "r", "r": "i", "i": "s", "s": term}
    model = AutoModelForCausalLM.from_pretrained(chain_model_dir(tmp_path, tok, chain, default="Z"))
    conv = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris"}]
    got = generate_answers(
        model, tok, [conv], template="tokenizer", max_new_tokens=12, batch_size=2,
        device="cpu", autocast=contextlib.nullcontext,
    )  # fmt: skip
    assert got[0]["generated"] == "Paris"
    assert scoring.exact_match([got[0]["generated"]], ["Paris"]) == 1.0
    # Generation stops at the terminator token: 6 new tokens, the last one the terminator.
    stops, stop_ids = answer_stops("tokenizer", tok)
    assert stops == [term, tok.eos_token]
    ids = torch.tensor([generation_prompt_ids(conv, template="tokenizer", tokenizer=tok)])
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=stop_ids)
    assert tok.decode(out[0, ids.shape[1] :]) == "Paris" + term
    # Control: with EOS as the only stop (before this change) the answer runs on and misses.
    raw = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    text = tok.decode(raw[0, ids.shape[1] :], skip_special_tokens=False)
    assert _answer(text, [tok.eos_token]) != "Paris" and _answer(text, stops) == "Paris"


@pytest.mark.parametrize(("cap", "capped", "matched"), [(5, True, 0.0), (6, False, 1.0)])
def test_an_answer_cut_by_max_new_tokens_is_no_exact_match(
    tmp_path: Path, cap: int, capped: bool, matched: float
) -> None:
    """ "Paris" is 5 tokens and its terminator a sixth: under a cap of 5 the text so far equals
    the reference, but the model had not ended its answer (it may go on: "Paris, Texas")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysft.train.metrics import METRICS, EvalOutputs

    family = sorted(FAMILIES)[0]
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir(tmp_path, family))
    chain = {"\n": "P", "P": "a", "a": "r", "r": "i", "i": "s", "s": FAMILIES[family][4]}
    model = AutoModelForCausalLM.from_pretrained(chain_model_dir(tmp_path, tok, chain, default="Z"))
    conv = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris"}]
    got = generate_answers(
        model, tok, [conv], template="tokenizer", max_new_tokens=cap, batch_size=2,
        device="cpu", autocast=contextlib.nullcontext,
    )  # fmt: skip
    assert got[0]["generated"] == "Paris" and got[0]["capped"] == [capped]
    assert METRICS["exact_match"].compute(EvalOutputs(0.0, 0, samples=got)) == matched
    # ROUGE-L still credits the words generated so far.
    assert METRICS["rouge_l"].compute(EvalOutputs(0.0, 0, samples=got)) == 1.0


def _tokenizer_without_eos_marker(root: Path) -> Any:
    """The embedded byte tokenizer with its "</s>" token renamed "<|endoftext|>" (EOS still):
    Vicuna's "</s>" is then 4 ordinary tokens, as ChatML's marker is on a Llama tokenizer."""
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(root / "src")
    spec = json.loads((root / "src" / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        if token["content"] == "</s>":
            token["content"] = "<|endoftext|>"
    (root / "src" / "tokenizer.json").write_text(json.dumps(spec))
    conf = json.loads((root / "src" / "tokenizer_config.json").read_text())
    conf["eos_token"] = "<|endoftext|>"
    (root / "src" / "tokenizer_config.json").write_text(json.dumps(conf))
    return AutoTokenizer.from_pretrained(root / "src")


def test_a_template_marker_the_tokenizer_splits_is_said_and_still_ends_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Vicuna's "</s>" on a tokenizer without it: said once (the model learns to end answers
    with 4 ordinary tokens, never EOS); the capped-answer warning counts those 4; and eval
    generation stops at the text, not at max_new_tokens."""
    from transformers import AutoModelForCausalLM

    from raysft.config import DataSection
    from raysft.data.pipeline import check_template
    from raysft.data.templates import terminator_tokens
    from raysft.train.evaluate import warn_of_capped_references

    tok = _tokenizer_without_eos_marker(tmp_path)
    assert terminator_tokens("vicuna", tok) == 4 and terminator_tokens("chatml", tok) == 1
    for _ in range(2):
        check_template(DataSection(template="vicuna"), tok)
    said = [m for m in caplog.messages if "data.template: vicuna ends each answer with '</s>'" in m]
    assert len(said) == 1, caplog.messages
    conv = [{"role": "user", "content": "Set x."}, {"role": "assistant", "content": "x=1"}]
    # 3 tokens of answer and 4 of its end: a cap of 6 cuts it (counting 1 for the end, it did not).
    assert warn_of_capped_references([conv], tok, max_new_tokens=6, template="vicuna") == 1
    assert warn_of_capped_references([conv], tok, max_new_tokens=7, template="vicuna") == 0
    # After the prompt's last token the model writes x=1</s>, then Z forever.
    last = tok.decode(generation_prompt_ids(conv, template="vicuna", tokenizer=tok)[-1:])
    chain = {last: "x", "x": "=", "=": "1", "1": "<", "<": "/", "/": "s", "s": ">"}
    model = AutoModelForCausalLM.from_pretrained(chain_model_dir(tmp_path, tok, chain, default="Z"))
    steps: list[int] = []
    model.register_forward_hook(lambda *_: steps.append(1))
    got = generate_answers(
        model, tok, [conv], template="vicuna", max_new_tokens=30, batch_size=1,
        device="cpu", autocast=contextlib.nullcontext,
    )  # fmt: skip
    assert got[0]["generated"] == "x=1"
    assert len(steps) == len("x=1</s>")  # stopped at the marker: 7 forwards, not 30


def test_llama2_on_a_tokenizer_whose_bos_is_not_s_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """llama2's "<s>" is Llama-2's BOS: on a Llama-3-like tokenizer the rows would open with
    that text and never with the BOS the model was pretrained after."""
    from raysft.config import DataSection
    from raysft.data.pipeline import check_template

    tok = build_tokenizer()
    tok.name_or_path = "llama3-like"  # said once a tokenizer
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    for _ in range(2):
        check_template(DataSection(template="llama2"), tok)
    said = [m for m in caplog.messages if "opens each turn with '<s>'" in m]
    assert said == [
        "data.template: llama2 opens each turn with '<s>', Llama-2's BOS, but this tokenizer's "
        "BOS is '<|begin_of_text|>': its rows open with the text '<s>' (1 token(s)), never with "
        "'<|begin_of_text|>'. Use data.template: tokenizer where the model has a chat template"
    ]
    caplog.clear()
    check_template(DataSection(template="llama2"), build_tokenizer())  # "<s>" is its BOS
    check_template(DataSection(template="chatml"), tok)  # opens with the tokenizer's own BOS
    assert not [m for m in caplog.messages if "opens each turn" in m]


# ---------------------------------------------------------------- what DIR is


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("embedded:tiny-base", "embedded:tiny-base"),
        ("/other/machine/site-packages/raysft/assets/tiny-base", "embedded:tiny-base"),
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
    ],
)
def test_adapter_base(tmp_path: Path, written: str, expected: str) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": written}))
    assert adapter_base(tmp_path) == expected


def test_adapter_on_the_embedded_base_scores(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raysft.assets import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("embedded:tiny-base"))
    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    out = tmp_path / "adapter"
    get_peft_model(base, lora).save_pretrained(out)
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = "/gone/raysft/assets/tiny-base"  # trained elsewhere
    (out / "adapter_config.json").write_text(json.dumps(meta))
    target = resolve_target(str(out), overrides={"data.eval": _rows(tmp_path)})
    assert (target.kind, target.base) == ("adapter", "embedded:tiny-base")
    got = score_model(str(out), target.cfg, metrics=["eval_loss"])  # tokenizer: the base's
    assert math.isfinite(got.scores["eval_loss"]) and got.rows == 2


def test_cli_adapter_against_its_base_json(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _rows(tmp_path)
    assert run([str(adapter_dir), "--data", rows, "--base", "--json", "--show", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "adapter" and out["target"] == str(adapter_dir)
    # B = 0: the adapter is its base, so both score the same on the same rows.
    assert out["base"]["model"] == str(chain_dir)  # from adapter_config.json
    assert out["base"]["metrics"] == out["tuned"]["metrics"]
    assert out["tuned"]["metrics"]["exact_match"] == 0.5 and out["tuned"]["rows"] == 2
    assert [s["generated"] for s in out["tuned"]["samples"]] == ["x=1"]
    assert [s["row"] for s in out["base"]["samples"]] == [1]  # the eval row answered


def test_answers_side_by_side_are_paired_by_eval_row() -> None:
    """Models whose templates keep different rows: each answer under its own row's prompt,
    and a row one model did not answer said so (not another row's answer, nor an IndexError)."""
    from raysft.train.score_report import side_by_side
    from raysft.train.score_saved import ModelScore

    def sample(row: int, answer: str) -> dict[str, Any]:
        return {"prompt": f"Q{row}", "expected": f"A{row}", "generated": answer, "row": row}

    capped = {**sample(3, "A3"), "capped": [True]}  # the reference so far, still going on
    scores = {
        "base": ModelScore("b", {}, [sample(1, "b1"), sample(2, "b2"), sample(3, "b3")], 3),
        "tuned": ModelScore("t", {}, [sample(2, "t2"), capped], 2),
    }
    assert side_by_side(scores, n=3).splitlines() == [
        "--- 1: Q1", "expected: 'A1'", "base: 'b1'", "tuned: (not answered: not among its rows)",
        "--- 2: Q2", "expected: 'A2'", "base: 'b2'", "tuned: 't2'",
        "--- 3: Q3", "expected: 'A3'", "base: 'b3'",
        "tuned: 'A3' (cut at train.max_new_tokens)",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def moved_adapter_dir(chain_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the chain model's head with B off zero: it changes the losses (the
    chain model's attention carries nothing, so q/v adapters would not)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chain_dir), lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("moved") / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(chain_dir).save_pretrained(out)
    return out


def test_cli_base_and_tuned_columns_score_each_model(
    tmp_path: Path, chain_dir: Path, moved_adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _rows(tmp_path)
    assert (
        run([str(moved_adapter_dir), "--data", rows, "--base", "--json", "--metrics", "eval_loss"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert (out["base"]["model"], out["tuned"]["model"]) == (str(chain_dir), str(moved_adapter_dir))
    cfg = resolve_target(str(moved_adapter_dir), overrides={"data.eval": rows}).cfg
    base = score_model(str(chain_dir), cfg, metrics=["eval_loss"]).scores["eval_loss"]
    tuned = score_model(
        str(moved_adapter_dir), cfg, metrics=["eval_loss"], base_model=str(chain_dir)
    ).scores["eval_loss"]
    assert abs(tuned - base) > 1e-3  # the adapter moved the model
    assert out["base"]["metrics"]["eval_loss"] == pytest.approx(base, rel=1e-6)
    assert out["tuned"]["metrics"]["eval_loss"] == pytest.approx(tuned, rel=1e-6)


def test_cli_prints_a_table_and_answers_side_by_side(
    tmp_path: Path, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(adapter_dir), "--data", _rows(tmp_path), "--base", "--metrics", "exact_match,bleu"]
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"adapter {adapter_dir} (2 eval rows)"
    assert lines[1].split() == ["metric", "base", "tuned"]
    assert lines[2].split() == ["exact_match", "0.5000", "0.5000"]
    assert lines[3].split()[0] == "bleu"
    # The references ("x=1", "x=2") are shorter than 4 BLEU tokens: no 4-gram can match. The
    # note must not say BLEU is 0 whatever the answers: longer answers score above 0.
    assert lines[4] == (
        "(bleu: every reference answer is shorter than 4 tokens, so no answer can match a "
        "4-gram: BLEU is 0 for answers as short, and above 0 only through sacreBLEU's smoothing "
        "of answers of 4 tokens or more, which scores their length, not their match; read "
        "exact_match and rouge_l)"
    )
    assert "expected: 'x=2'" in lines and "tuned: 'x=1'" in lines


def test_cli_without_base_labels_the_answer_generated(
    tmp_path: Path, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([str(adapter_dir), "--data", _rows(tmp_path), "--metrics", "exact_match"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "expected: 'x=2'" in lines and "generated: 'x=1'" in lines
    assert not [line for line in lines if line.startswith("score: ")]


def _experiment(tmp_path: Path, cfg: Any, *, champion: Path | None) -> Path:
    exp = tmp_path / "exp"
    (exp / "tune").mkdir(parents=True)
    summary: dict[str, Any] = {
        "resolved_spec": cfg.model_dump(mode="json"),
        "best": {"checkpoint": "/exp/tune/trial_1/checkpoint_000002"},
        "promotion": {"promoted": False, "reason": "exact_match 0.4 does not beat champion v1"},
    }
    if champion is not None:
        shutil.copytree(champion, exp / "champion")
        summary["promotion"] = {"promoted": True, "export_dir": str(exp / "champion")}
    (exp / "summary.json").write_text(json.dumps(summary))
    return exp


def test_experiment_dir_scores_its_champion(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = _experiment(tmp_path, _cfg(tmp_path, chain_dir), champion=adapter_dir)
    target = resolve_target(str(exp))
    assert (target.kind, target.path, target.base) == (
        "experiment",
        exp / "champion",
        str(chain_dir),
    )
    assert target.cfg.data.eval == _rows(tmp_path)  # the spec's own eval data
    # Moved since the search: the recorded export_dir is gone, EXP_DIR/champion is used.
    summary = json.loads((exp / "summary.json").read_text())
    summary["promotion"]["export_dir"] = "/moved/away/champion"
    (exp / "summary.json").write_text(json.dumps(summary))
    assert resolve_target(str(exp)).path == exp / "champion"
    assert resolve_target(str(exp / "champion")).cfg.data.eval == _rows(tmp_path)
    assert run([str(exp), "--json", "--metrics", "pass_at_k"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["metrics"] == {"pass_at_k": 0.5}


def test_an_experiment_is_scored_with_its_champions_sampled_values(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path
) -> None:
    """Not with the spec's base values: a searched model.dtype or method loads the champion
    (and --base) as its trial trained them."""
    spec = _cfg(tmp_path, chain_dir)
    exp = _experiment(tmp_path, spec, champion=adapter_dir)
    assert not (exp / "champion" / "metrics.json").exists()
    summary = json.loads((exp / "summary.json").read_text())
    summary["best"]["sampled"] = {"model.dtype": "bfloat16", "lora.r": 4}
    (exp / "summary.json").write_text(json.dumps(summary))
    # The export without a record of its own: the best trial's values (the search promoted it).
    got = resolve_target(str(exp)).cfg
    assert (got.model.dtype, got.lora.r) == ("bfloat16", 4)
    assert spec.model.dtype != "bfloat16" and spec.lora.r != 4
    # The export's record of what its trial sampled wins (an earlier promotion's champion).
    record = {"sampled": {"model.dtype": "bfloat16", "lora.alpha": 8}}
    (exp / "champion" / "metrics.json").write_text(json.dumps(record))
    got = resolve_target(str(exp)).cfg
    assert (got.model.dtype, got.lora.alpha, got.lora.r) == ("bfloat16", 8, spec.lora.r)
    # Neither: the spec's own values.
    (exp / "champion" / "metrics.json").unlink()
    summary["promotion"]["promoted"] = False
    (exp / "summary.json").write_text(json.dumps(summary))
    assert resolve_target(str(exp)).cfg.model.dtype == spec.model.dtype


def test_an_experiments_relative_paths_are_read_where_the_search_ran(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran_in = tmp_path / "project"
    (ran_in / "rows").mkdir(parents=True)
    Path(_rows(tmp_path)).rename(ran_in / "rows" / "eval.jsonl")
    cfg = _cfg(tmp_path, chain_dir, **{"data.eval": "rows/eval.jsonl"})
    exp = _experiment(tmp_path, cfg, champion=adapter_dir)
    summary = json.loads((exp / "summary.json").read_text())
    summary["working_dir"] = str(ran_in)
    summary["resolved_spec"]["model"]["name_or_path"] = "org/name"  # a Hub id: left alone
    (exp / "summary.json").write_text(json.dumps(summary))
    monkeypatch.chdir(tmp_path)  # elsewhere: rows/eval.jsonl is no file here
    target = resolve_target(str(exp))
    assert target.cfg.data.eval == str(ran_in / "rows" / "eval.jsonl")
    assert target.cfg.model.name_or_path == "org/name"
    # --data is the caller's, read from the caller's directory.
    got = resolve_target(str(exp), overrides={"data.eval": "mine.jsonl"})
    assert got.cfg.data.eval == "mine.jsonl"


def test_a_moved_projects_champion_is_found_where_it_moved_with_it(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path
) -> None:
    proj = tmp_path / "moved" / "proj"  # was /old/proj: exp/search1 and its export out/champion
    exp = _experiment(proj / "exp", _cfg(tmp_path, chain_dir), champion=None)
    shutil.copytree(adapter_dir, proj / "out" / "champion")
    summary = json.loads((exp / "summary.json").read_text())
    summary["experiment_dir"] = "/old/proj/exp/exp"
    summary["promotion"] = {
        "promoted": True,
        "version": "3",
        "export_dir": "/old/proj/out/champion",
    }
    (exp / "summary.json").write_text(json.dumps(summary))
    assert resolve_target(str(exp)).path == proj / "out" / "champion"
    shutil.rmtree(proj / "out")
    with pytest.raises(SearchStateError) as err:
        resolve_target(str(exp))
    assert str(err.value) == (
        f"{exp}: its champion (v3) was exported to /old/proj/out/champion, which is not there "
        "(moved or deleted?); give the export's own directory instead"
    )
    # Already the champion, its export elsewhere: no export recorded, none invented.
    summary["promotion"] = {"promoted": True, "version": "3", "reason": "already champion v3"}
    (exp / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SearchStateError) as err:
        resolve_target(str(exp))
    assert str(err.value).startswith(f"{exp}: no champion to score (already champion v3); ")


def test_a_copied_experiment_scores_its_own_champion_and_never_the_originals(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path
) -> None:
    """summary.json records the export by its absolute path: a copy of the experiment dir must
    still score its own champion/, and with that deleted, say so, not score the original's."""
    exp = _experiment(tmp_path, _cfg(tmp_path, chain_dir), champion=adapter_dir)
    summary = json.loads((exp / "summary.json").read_text())
    summary["experiment_dir"] = str(exp)
    summary["promotion"].update(version="1")
    (exp / "summary.json").write_text(json.dumps(summary))
    copy = tmp_path / "copy"
    shutil.copytree(exp, copy)
    assert resolve_target(str(copy)).path == copy / "champion"
    shutil.rmtree(copy / "champion")
    with pytest.raises(SearchStateError) as err:
        resolve_target(str(copy))
    assert str(err.value) == (
        f"{copy}: its champion (v1) was exported to {copy / 'champion'}, which is not there "
        "(moved or deleted?); give the export's own directory instead"
    )
    assert resolve_target(str(exp)).path == exp / "champion"


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ({"promotion": "yes"}, "promotion is not a JSON object"),
        ({"best": [1]}, "best is not a JSON object"),
        ({"resolved_spec": "x"}, "resolved_spec is not a JSON object"),
    ],
)
def test_a_summary_section_of_the_wrong_kind_is_one_message(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path, edit: dict[str, Any], said: str
) -> None:
    exp = _experiment(tmp_path, _cfg(tmp_path, chain_dir), champion=adapter_dir)
    summary = json.loads((exp / "summary.json").read_text())
    (exp / "summary.json").write_text(json.dumps({**summary, **edit}))
    with pytest.raises(SearchStateError) as err:
        resolve_target(str(exp))
    assert str(err.value) == f"{exp / 'summary.json'}: not a raysft summary ({said})"
    (exp / "summary.json").write_bytes(b"\xff\xfe{")  # not text
    with pytest.raises(SearchStateError, match="summary.json: not valid JSON: 'utf-8' codec"):
        resolve_target(str(exp))


def test_a_runs_unreadable_record_is_warned_of_not_passed_over(
    tmp_path: Path, adapter_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run)
    # Its settings name data by a relative path, which its metrics.json would say where to read.
    (run / "config.yaml").write_text("data: {eval: rows/eval.jsonl}\n")
    (run / "metrics.json").write_text("{bad")
    with caplog.at_level(logging.WARNING, logger="raysft.search.eval_target"):
        resolve_target(str(run))
    assert f"{run / 'metrics.json'}: not read (JSONDecodeError: " in caplog.text
    assert "its record is left out" in caplog.text


def test_tunes_record_of_a_trial_points_at_what_can_be_scored(tmp_path: Path) -> None:
    record = tmp_path / "exp" / "tune" / "run_trial_on_ray_4b8d9fe8_2_lora_r=4_2026-12-05_10-40-54"
    record.mkdir(parents=True)
    with pytest.raises(ModelError) as err:
        resolve_target(str(record))
    exp = tmp_path / "exp"
    assert str(err.value).endswith(
        f"; this is Ray Tune's record of trial 4b8d9fe8: score its output ({exp}/trials/4b8d9fe8) "
        f"or a checkpoint of it ({exp}/train/train-4b8d9fe8/checkpoint_*)"
    )


@pytest.mark.parametrize(
    ("where", "record"),
    [
        ("trials/t1", "summary"),  # a trial of the experiment
        ("train/train-t1/checkpoint_000002", "summary"),  # one of its checkpoints
        ("out", "metrics"),  # a raysft.train output, or an exported champion
        ("out/checkpoints/step-000002", "metrics"),  # its checkpoint
        ("out", "both"),  # a raysft.train output kept inside an experiment dir: its own wins
        ("out/checkpoints/step-000002", "origin"),  # a stopped run's: no metrics.json yet
    ],
)
def test_a_runs_own_relative_paths_are_read_where_it_ran(
    tmp_path: Path,
    adapter_dir: Path,
    chain_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
    record: str,
) -> None:
    ran_in = tmp_path / "project"
    (ran_in / "rows").mkdir(parents=True)
    Path(_rows(tmp_path)).rename(ran_in / "rows" / "eval.jsonl")
    exp = tmp_path / "exp"
    run_dir = exp / where
    shutil.copytree(adapter_dir, run_dir)
    saved = _cfg(tmp_path, chain_dir, **{"data.eval": "rows/eval.jsonl"}).model_dump(mode="json")
    saved["data"]["train"] = ["rows/train.jsonl"]  # not there: scoring must not need it
    (run_dir / "config.yaml").write_text(json.dumps(saved), encoding="utf-8")
    if record == "summary":
        (exp / "summary.json").write_text(json.dumps({"working_dir": str(ran_in)}))
    elif record == "origin":
        (run_dir / "origin.json").write_text(json.dumps({"working_dir": str(ran_in)}))
    else:
        (exp / "out" / "metrics.json").write_text(json.dumps({"working_dir": str(ran_in)}))
    if record == "both":
        (exp / "summary.json").write_text(json.dumps({"working_dir": str(tmp_path / "other")}))
    monkeypatch.chdir(tmp_path)  # elsewhere: rows/eval.jsonl is no file here
    assert resolve_target(str(run_dir)).cfg.data.eval == str(ran_in / "rows" / "eval.jsonl")
    assert run([str(run_dir), "--json", "--metrics", "exact_match"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["rows"] == 2


def test_data_scores_every_row_of_your_file_unless_told(
    tmp_path: Path, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "out"
    shutil.copytree(adapter_dir, run_dir)
    saved = load_config(None, {"data.max_eval_samples": 1}).model_dump(mode="json")
    (run_dir / "config.yaml").write_text(json.dumps(saved), encoding="utf-8")
    rows = _rows(tmp_path)
    assert run([str(run_dir), "--data", rows, "--json", "--metrics", "exact_match"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["rows"] == 2  # not the run's 1
    told = ["--set", "data.max_eval_samples=1"]
    assert run([str(run_dir), "--data", rows, *told, "--json", "--metrics", "exact_match"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["rows"] == 1
    # The run's eval.max_prompts does not cap your file's generated answers either; --set does.
    saved = load_config(None, {"eval.max_prompts": 1}).model_dump(mode="json")
    (run_dir / "config.yaml").write_text(json.dumps(saved), encoding="utf-8")
    assert run([str(run_dir), "--data", rows, "--json", "--metrics", "exact_match"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["answered"] == 2
    capped = ["--set", "eval.max_prompts=1", "--metrics", "exact_match,eval_loss"]
    assert run([str(run_dir), "--data", rows, *capped]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.endswith("(2 eval rows, answers generated for 1)"), head


# ---------------------------------------------------------------- bad input: one message, exit 2


def test_bad_input_is_one_clear_error(tmp_path: Path, chain_dir: Path, adapter_dir: Path) -> None:
    rows = _rows(tmp_path)
    with pytest.raises(ModelError, match="no such directory"):
        run([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a model .* nor an experiment directory"):
        run([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="cannot score 'accuracy' .scorable: eval_loss, "):
        run([str(adapter_dir), "--data", rows, "--metrics", "exact_match,accuracy"])
    for nothing in (",", ""):  # not "every metric", and no empty table with exit 0
        with pytest.raises(ConfigError, match="--metrics: names no metric .scorable: eval_loss"):
            run([str(adapter_dir), "--data", rows, "--metrics", nothing])
    plain = _rows(tmp_path / "empty", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match="pass_at_k: no eval row has a `tests` field"):
        run([str(adapter_dir), "--data", plain, "--metrics", "pass_at_k"])
    with pytest.raises(ConfigError, match="--base: no base model known"):
        run([str(chain_dir), "--data", rows, "--base"])  # a model dir without config.yaml
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(SearchStateError, match=r"summary.json: not a raysft summary"):
        run([str(foreign)])
    exp = _experiment(tmp_path, _cfg(tmp_path, chain_dir), champion=None)
    with pytest.raises(SearchStateError) as err:
        run([str(exp)])
    assert str(err.value) == (
        f"{exp}: no champion to score (exact_match 0.4 does not beat champion v1); the best "
        "trial's checkpoint was /exp/tune/trial_1/checkpoint_000002, which is not there now"
    )
    checkpoint = exp / "train" / "train-t1" / "checkpoint_000002"
    checkpoint.mkdir(parents=True)
    summary = json.loads((exp / "summary.json").read_text())
    summary["best"]["checkpoint"] = str(checkpoint)
    (exp / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SearchStateError) as err:
        run([str(exp)])
    assert str(err.value).endswith(f"; score the best trial's checkpoint directly: {checkpoint}")


def test_truncated_weights_are_one_clear_error(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path
) -> None:
    """A .safetensors file cut short (a copy that failed half-way), of an adapter or a model."""
    rows = _rows(tmp_path)
    for source, weights in (
        (adapter_dir, "adapter_model.safetensors"),
        (chain_dir, "model.safetensors"),
    ):
        cut = tmp_path / f"cut-{source.name}"
        shutil.copytree(source, cut)
        (cut / weights).write_bytes((source / weights).read_bytes()[:5])
        with pytest.raises(ModelError) as err:
            run([str(cut), "--data", rows, "--metrics", "eval_loss"])
        what = "the adapter" if source == adapter_dir else "the model"
        assert str(err.value).startswith(f"{cut}: cannot load {what}: "), err.value
        assert "truncated or corrupt (Error while deserializing header" in str(err.value)


def test_a_model_dir_without_weights_is_named_as_given_not_as_a_setting(
    tmp_path: Path, chain_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DIR came from the command line: no ``model.name_or_path`` the user never wrote."""
    rows = _rows(tmp_path)
    (tmp_path / "cfgonly").mkdir()
    shutil.copy(chain_dir / "config.json", tmp_path / "cfgonly")
    monkeypatch.chdir(tmp_path)
    for given in (str(tmp_path / "cfgonly"), "cfgonly"):
        with pytest.raises(ModelError) as err:
            run([given, "--data", rows, "--metrics", "eval_loss"])
        assert str(err.value).startswith(f"{given}: cannot load the model: Error no file named")
        assert "model.name_or_path" not in str(err.value)


def test_a_bad_set_on_an_experiment_names_set_and_the_summary(
    tmp_path: Path, chain_dir: Path, adapter_dir: Path
) -> None:
    exp = _experiment(tmp_path, _cfg(tmp_path, chain_dir), champion=adapter_dir)
    for target in (exp, exp / "champion"):  # the experiment, or its champion export
        with pytest.raises(ConfigError) as err:
            resolve_target(str(target), overrides={"nosuch.key": 1, "train.max_steps": 0})
        assert sorted(str(err.value).splitlines()) == [
            f"{exp / 'summary.json'}: --set nosuch: unknown key",
            f"{exp / 'summary.json'}: --set train.max_steps: Input should be greater than 0",
        ]


def test_an_adapter_without_weights_is_one_clear_error(
    tmp_path: Path, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Named as what it is, by relative path too (peft would have looked it up on the Hub)."""
    rows = _rows(tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(adapter_dir, bare)
    (bare / "adapter_model.safetensors").unlink()
    monkeypatch.chdir(tmp_path)
    for given in (str(bare), "bare"):
        with pytest.raises(ModelError) as err:
            run([given, "--data", rows, "--metrics", "eval_loss"])
        assert str(err.value) == (
            f"{given}: no adapter weights (adapter_model.safetensors or adapter_model.bin)"
        )


@pytest.mark.parametrize("base", [123, ["a", "b"], {"path": "x"}])
def test_an_adapter_config_whose_base_is_no_string_is_one_clear_error(
    tmp_path: Path, adapter_dir: Path, base: object
) -> None:
    odd = tmp_path / "odd"
    shutil.copytree(adapter_dir, odd)
    meta = json.loads((odd / "adapter_config.json").read_text(encoding="utf-8"))
    (odd / "adapter_config.json").write_text(
        json.dumps({**meta, "base_model_name_or_path": base}), encoding="utf-8"
    )
    with pytest.raises(ModelError) as err:
        run([str(odd), "--data", _rows(tmp_path), "--metrics", "eval_loss"])
    assert str(err.value) == (
        f"{odd}/adapter_config.json: base_model_name_or_path: not a string ({json.dumps(base)})"
    )


def test_a_base_that_cannot_load_is_named_where_it_came_from(
    tmp_path: Path, adapter_dir: Path
) -> None:
    rows = _rows(tmp_path)
    moved = tmp_path / "moved"  # an adapter whose base was on another machine
    shutil.copytree(adapter_dir, moved)
    meta = json.loads((moved / "adapter_config.json").read_text(encoding="utf-8"))
    meta["base_model_name_or_path"] = "/elsewhere/base"
    (moved / "adapter_config.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ModelError) as err:
        run([str(moved), "--data", rows, "--metrics", "eval_loss"])
    assert str(err.value) == (
        f"{moved}/adapter_config.json: base_model_name_or_path: cannot load '/elsewhere/base': "
        "no such directory"
    )
    for args in (["--base-model", "./nope"], ["--base", "--base-model", "./nope"]):
        with pytest.raises(ModelError) as err:
            run([str(adapter_dir), "--data", rows, "--metrics", "eval_loss", *args])
        assert str(err.value) == "--base-model: cannot load './nope': no such directory"


def test_a_negative_show_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        run([str(tmp_path), "--show", "-1"])
    assert err.value.code == 2


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "raysft.evaluate", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such directory"]


def test_eval_rows_skipped_under_on_error_skip_are_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from raysft.config import load_config
    from raysft.train.score_saved import eval_rows

    rows = tmp_path / "held.jsonl"
    rows.write_text('{"instruction": "q", "output": "a"}\n{"instruction": 3}\n', encoding="utf-8")
    cfg = load_config(None, {"data.eval": str(rows), "data.on_error": "skip"})
    with caplog.at_level("WARNING", logger="raysft.train.score_saved"):
        assert len(eval_rows(cfg)) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"1 row(s) skipped (data.on_error=skip), e.g. {rows}: line 2: instruction: must be a "
        "string, got int"
    ]


def test_eval_rows_the_template_refuses_are_skipped_as_in_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Gemma's template refuses a system turn: data.on_error=skip drops that row (as training
    does) and says so; strict names it in one error."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir(tmp_path, "gemma"))
    # After "<start_of_turn>model\n" the model writes a<end_of_turn>.
    chain = {"\n": "a", "a": "<end_of_turn>"}
    model = chain_model_dir(tmp_path, tok, chain, default="Z")
    rows = _rows(tmp_path, [
        {"instruction": "q", "output": "a"},
        {"system": "Be brief.", "instruction": "q2", "output": "a"},
    ])  # fmt: skip
    args = [str(model), "--data", rows, "--set", "data.template=tokenizer", "--json"]
    skip = ["--set", "data.on_error=skip", "--metrics", "exact_match"]
    with caplog.at_level("WARNING", logger="raysft.train.score_saved"):
        assert run([*args, *skip]) == 0
    score = json.loads(capsys.readouterr().out)["score"]
    assert score["rows"] == 1 and score["metrics"]["exact_match"] == 1.0
    refused = (
        "eval row 2: data.template=tokenizer: the tokenizer's chat_template failed: System role "
        "not supported"
    )
    assert [r.getMessage() for r in caplog.records] == [
        f"1 of 2 eval rows scored; 1 skipped as the template refuses them "
        f"(data.on_error=skip), e.g. {refused}"
    ]
    with pytest.raises(DataError) as err:
        run([*args, "--metrics", "eval_loss"])
    assert str(err.value) == refused


def test_a_table_of_models_scored_on_different_rows_says_so() -> None:
    """--base-model of another tokenizer may keep other rows (a template refusal skipped, a
    truncation): the table says its columns are not of the same rows."""
    from raysft.train.score_report import metrics_table
    from raysft.train.score_saved import ModelScore

    def table(base_rows: int) -> str:
        return metrics_table(
            {
                "base": ModelScore("b", {"eval_loss": 1.0}, rows=base_rows),
                "tuned": ModelScore("t", {"eval_loss": 0.5}, rows=2),
            }
        )

    assert "rows scored" not in table(2)
    assert "\n(rows scored: base 1, tuned 2: the models' tokenizers or templates keep " in table(1)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_a_trial_is_scored_on_the_base_it_trained_on(tmp_path: Path, method: str) -> None:
    """raysft.evaluate of a trial's adapter gives the trial's own last eval loss: a QLoRA
    adapter is scored on the 4-bit base it trained on (on the full-precision base its loss
    moved by ~1%, so the registry, base vs tuned and the base gate compared other models)."""
    from raysft.train.recipe import run_trial

    overrides = {
        "method": method,
        "data.eval": _rows(tmp_path, [{"instruction": f"Say {w}.", "output": w} for w in "abcd"]),
        "train.max_steps": 4,
        "train.eval_every": 4,
        "train.exact_match": False,
        "train.eval_base": False,
        "train.num_threads": 1,
        "output_dir": str(tmp_path / "out"),
    }
    if method == "qlora":
        overrides["qlora.compute_dtype"] = "float32"  # bf16 where the CPU has it: rounding
    cfg = load_config(None, overrides)
    trial = run_trial(cfg)
    scored = score_model(trial.output_dir, cfg, metrics=["eval_loss"])
    last = trial.history[-1]["eval_loss"]
    assert scored.scores["eval_loss"] == pytest.approx(last, rel=1e-5, abs=1e-5)


def test_an_experiment_dir_without_its_summary_scores_with_its_champions_settings(
    tmp_path: Path, adapter_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """EXP_DIR holding only champion/ (summary.json left behind): the export's config.yaml
    gives the settings, not the defaults; a bare adapter without one is warned of."""
    from raysft.config import dump_config

    exp = tmp_path / "exp"
    shutil.copytree(adapter_dir, exp / "champion")
    rows = _rows(tmp_path)
    own = load_config(None, {"data.eval": rows, "train.max_new_tokens": 8})
    (exp / "champion" / "config.yaml").write_text(dump_config(own), encoding="utf-8")
    target = resolve_target(str(exp))
    assert target.kind == "experiment" and target.path == exp / "champion"
    assert target.cfg.data.eval == rows and target.cfg.train.max_new_tokens == 8
    assert "scored with the defaults" not in caplog.text
    resolve_target(str(adapter_dir))
    assert f"{adapter_dir}: no config.yaml or summary.json" in caplog.text


def test_the_json_view_is_strict_json_when_a_metric_is_not_finite() -> None:
    """A perplexity past exp(709) is inf: --json prints null for it, not ``Infinity``."""
    from raysft.train.score_report import as_json
    from raysft.train.score_saved import ModelScore

    score = ModelScore("m", {"eval_loss": 800.0, "perplexity": math.inf, "bleu": math.nan})

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    text = json.dumps(as_json({"tuned": score}, n=0))
    metrics = json.loads(text, parse_constant=refuse)["tuned"]["metrics"]
    assert metrics == {"eval_loss": 800.0, "perplexity": None, "bleu": None}
