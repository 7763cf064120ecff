"""Eval generation decodes with raysft's settings only: a checkpoint's saved generation_config
(repetition penalty, n-gram blocking, min_p, suppressed tokens) must not change its answers."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from evalkit import chain_model_dir, token_id

from raysft.assets.tokenizer import build_tokenizer
from raysft.train.evaluate import generate_answers

# After the ChatML prompt's final "\n" the model loops a, b, a, b, ... (greedy).
LOOP = {"\n": "a", "a": "b", "b": "a"}
CONV = [{"role": "user", "content": "Loop."}, {"role": "assistant", "content": "abab"}]


@pytest.fixture(scope="module")
def loop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chain_model_dir(tmp_path_factory.mktemp("loop"), build_tokenizer(), LOOP, default="Z")


def _model(path: Path, **saved: Any) -> Any:
    """The loop model, its generation_config carrying ``saved`` as a checkpoint's would."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    for key, value in saved.items():
        setattr(model.generation_config, key, value)
    return model


def _answers(model: Any, **kw: Any) -> list[str]:
    out = generate_answers(
        model, build_tokenizer(), [CONV], template="chatml", max_new_tokens=8, batch_size=2,
        device="cpu", autocast=contextlib.nullcontext, **kw,
    )  # fmt: skip
    return list(out[0]["answers"])


def _checkpoint_defaults() -> dict[str, Any]:
    tok = build_tokenizer()
    return {
        "repetition_penalty": 1.3,  # Qwen2.5-Instruct ships 1.05
        "no_repeat_ngram_size": 2,  # bans the second "ab"
        "suppress_tokens": [token_id(tok, "b")],  # a field whose neutral value is None
        "min_p": 0.9,  # sampling: keeps only the successor (logit ~16/50 vs 0)
        "top_k": 1,
        "max_new_tokens": 2,
    }


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
def test_greedy_answers_ignore_the_models_generation_config(loop_dir: Path, peft: bool) -> None:
    plain = _answers(_model(loop_dir))
    assert plain == ["abababab"]
    model = _model(loop_dir, **_checkpoint_defaults())
    if peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)  # B = 0: same answers
    assert _answers(model) == plain
    # The model's own config is left as it was, for whoever generates with it next.
    assert model.generation_config.no_repeat_ngram_size == 2
    assert model.generation_config.max_new_tokens == 2


def test_sampled_answers_ignore_the_models_generation_config(loop_dir: Path) -> None:
    kw = {"samples": 4, "temperature": 50.0, "seed": 7}  # near uniform: the answers differ
    plain = _answers(_model(loop_dir), **kw)
    assert len(set(plain)) > 1
    assert _answers(_model(loop_dir, **_checkpoint_defaults()), **kw) == plain


def test_answers_shared_by_ranks_equal_one_ranks_in_the_rows_order(loop_dir: Path) -> None:
    """Data-parallel evals: rank r answers batches r, r + W, ... of the conversations, each
    batch seeded by its index; put back in order (``in_row_order``), the sampled answers are
    those one process gives, for any number of ranks."""
    from raysft.train.evaluate import in_row_order

    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
             for i in range(11)]  # fmt: skip
    model = _model(loop_dir)

    def answers(share: tuple[int, int]) -> list[dict[str, Any]]:
        return generate_answers(
            model, build_tokenizer(), convs, template="chatml", max_new_tokens=4, batch_size=3,
            device="cpu", autocast=contextlib.nullcontext, samples=2, temperature=50.0, seed=7,
            share=share,
        )  # fmt: skip

    alone = answers((0, 1))
    assert len({a for s in alone for a in s["answers"]}) > 1  # sampled: the seeds matter
    for ranks in (2, 3, 5):
        shares = [answers((r, ranks)) for r in range(ranks)]
        assert in_row_order(shares, rows=len(convs), batch_size=3) == alone, ranks


def _judged(share: list[tuple[list[str], str]]) -> list[list[bool]]:
    """Stands in for the sandbox: ``x = N`` passes when N is divisible by 3."""
    return [[int(a.split("=")[1]) % 3 == 0 for a in answers] for answers, _ in share]


def _checked_by_ranks(
    problems: list[tuple[list[str], str]], ranks: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[int, Any], dict[int, Any]]:
    """``ranks.checks_of_all_ranks`` on ``ranks`` threads standing in for ranks, meeting
    as ``all_gather_object`` does: what each rank returned, and the problems each ran."""
    import threading

    from raysft.train import ranks as group
    from raysft.train.sandbox import Limits

    ran: dict[int, Any] = {}
    got: dict[int, Any] = {}
    slots: list[Any] = [None] * ranks
    met = threading.Barrier(ranks)
    local = threading.local()

    def check(share: list[Any], *, limits: Limits) -> list[list[bool]]:
        ran[local.rank] = share
        return _judged(share)

    def gather(dist: Any, value: Any) -> list[Any]:
        slots[dist.rank] = value
        met.wait(timeout=30)
        return list(slots)

    def rank_of(r: int) -> None:
        local.rank = r
        got[r] = group.checks_of_all_ranks(problems, limits=Limits(), dist=group.Dist(r, ranks))

    monkeypatch.setattr(group, "check_answers", check)
    monkeypatch.setattr(group, "gather_over_ranks", gather)
    threads = [threading.Thread(target=rank_of, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return got, ran


def test_code_tests_are_shared_by_ranks_and_every_rank_gets_all_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Data-parallel pass@k: every rank holds every answer, and rank r runs the programs of
    problems r, r + W, ... only; gathered, every rank has every problem's results in order."""
    # 11 problems of 1-3 answers each.
    problems = [
        ([f"x = {i + j}" for j in range(i % 3 + 1)], "assert x % 3 == 0") for i in range(11)
    ]
    alone = _judged(problems)
    assert any(map(any, alone)) and not all(map(all, alone))
    for ranks in (2, 3, 5):
        got, ran = _checked_by_ranks(problems, ranks, monkeypatch)
        assert got == dict.fromkeys(range(ranks), alone), ranks
        assert ran == {r: problems[r::ranks] for r in range(ranks)}, ranks
