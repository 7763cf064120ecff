"""Metric functions and registry entries against values computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raysft.config import load_config
from raysft.train import scoring
from raysft.train.metrics import METRICS, EvalOutputs, computed_at, reported

# ---------------------------------------------------------------- exact match


def test_exact_match_strips_surrounding_whitespace_only() -> None:
    preds = ["Paris", " Paris\n", "paris", "4.", "New  York"]
    refs = ["Paris", "Paris", "Paris", "4", "New York"]
    # Hits: 1 and 2 (whitespace around); case, punctuation and inner spacing count.
    assert scoring.exact_match(preds, refs) == pytest.approx(2 / 5)


def test_metrics_of_no_pairs_are_nan_and_mismatched_lengths_raise() -> None:
    for fn in (scoring.exact_match, scoring.rouge_l, scoring.bleu):
        assert math.isnan(fn([], []))
        with pytest.raises(ValueError, match="2 predictions but 1 references"):
            fn(["a", "b"], ["a"])


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_is_the_lcs_f1_by_hand() -> None:
    # "the cat sat on the mat" vs "the cat on mat": LCS = the cat on mat (4 words);
    # P = 4/6, R = 4/4, F1 = 2PR/(P+R) = 0.8.
    assert scoring.rouge_l(["the cat sat on the mat"], ["the cat on mat"]) == pytest.approx(0.8)
    # Lowercased, punctuation dropped: identical words -> 1.0; disjoint -> 0.0; mean of pairs.
    assert scoring.rouge_l(["The Cat!", "dog"], ["the cat", "bird"]) == pytest.approx(0.5)


def test_rouge_l_counts_each_cjk_character_as_a_word() -> None:
    # 6 characters vs 5, LCS = 5: P = 5/6, R = 1, F1 = (2 * 5/6) / (11/6) = 10/11.
    assert scoring.rouge_l(["今天天气真好"], ["今天天气好"]) == pytest.approx(10 / 11)


def test_rouge_tokenizer_equals_rouge_scores_own_on_ascii() -> None:
    from rouge_score.tokenizers import DefaultTokenizer

    text = "Hello, World! it's 42 o'clock_now -- snake_case and CamelCase."
    assert scoring._RougeTokenizer().tokenize(text) == DefaultTokenizer().tokenize(text)


# ---------------------------------------------------------------- BLEU


def test_bleu_by_hand() -> None:
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat" (6 tokens each, BP = 1):
    # 1-grams 5/6 (one "the" only), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    got = scoring.bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert got == pytest.approx(expected)
    assert scoring.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        100
    )


def test_bleu_brevity_penalty_by_hand() -> None:
    # hyp 4 tokens, ref 5; all n-grams of the hyp match: precisions 1, BP = exp(1 - 5/4).
    got = scoring.bleu(["a b c d"], ["a b c d e"])
    assert got == pytest.approx(100 * math.exp(1 - 5 / 4))


def test_bleu_splits_chinese_per_character() -> None:
    # Same n-gram counts as the English case: 5/6, 3/5, 2/4, 1/3 over characters.
    assert scoring.bleu_tokenizer(["今天天气好"]) == "zh"
    assert scoring.bleu_tokenizer(["The weather is nice."]) == "13a"
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert scoring.bleu(["今天天气真好"], ["今天天气好"]) == pytest.approx(expected)


# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # pass@1 = c/n
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (5, 3, 3, 1.0),  # n - c < k: every 3-subset holds a pass
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_by_hand(n: int, c: int, k: int, expected: float) -> None:
    assert scoring.pass_at_k(n, c, k) == pytest.approx(expected)
    # The Codex paper's numerically stable form: 1 - prod(1 - k / i), i = n-c+1 .. n.
    stable = 1.0 if n - c < k else 1 - math.prod(1 - k / i for i in range(n - c + 1, n + 1))
    assert scoring.pass_at_k(n, c, k) == pytest.approx(stable)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="1 <= k <= n"):
        scoring.pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        scoring.pass_at_k(2, 3, 1)


def test_mean_pass_at_k_averages_problems() -> None:
    # Problem 1: 2 of 4 pass, pass@2 = 1 - C(2,2)/C(4,2) = 5/6; problem 2: 0 of 4 -> 0.
    results = [[True, False, True, False], [False] * 4]
    assert scoring.mean_pass_at_k(results, 2) == pytest.approx((5 / 6 + 0) / 2)
    assert math.isnan(scoring.mean_pass_at_k([], 1))


# ---------------------------------------------------------------- registry entries


def _outputs() -> EvalOutputs:
    samples = [
        {"expected": "Paris", "generated": "Paris", "answers": ["Paris", "paris"]},
        {"expected": "x = 1", "generated": "x = 1", "answers": ["x = 1", "x = 2"], "tests": "t"},
    ]
    samples[1]["passed"] = [True, False]
    return EvalOutputs(loss_sum=6.0, tokens=4, samples=samples, pass_k=1)


def test_registry_entries_compute_by_hand() -> None:
    out = _outputs()
    assert METRICS["eval_loss"].compute(out) == pytest.approx(1.5)  # type: ignore[misc]
    assert METRICS["perplexity"].compute(out) == pytest.approx(math.exp(1.5))  # type: ignore[misc]
    # Every answer against its row's reference: Paris, paris, x = 1, x = 2 -> 2 of 4 exact.
    assert METRICS["exact_match"].compute(out) == pytest.approx(0.5)  # type: ignore[misc]
    # ROUGE-L per answer: 1 (case folded), 1, 1, and "x 2" vs "x 1": LCS 1 of 2 -> 0.5.
    assert METRICS["rouge_l"].compute(out) == pytest.approx(3.5 / 4)  # type: ignore[misc]
    # pass@1 over the rows with tests only: 1 of 2.
    assert METRICS["pass_at_k"].compute(out) == pytest.approx(0.5)  # type: ignore[misc]
    assert METRICS["bleu"].compute(out) == pytest.approx(  # type: ignore[misc]
        scoring.bleu(["Paris", "paris", "x = 1", "x = 2"], ["Paris", "Paris", "x = 1", "x = 1"])
    )


@pytest.mark.parametrize(
    ("loss_sum", "tokens", "expected"),
    [
        (0.0, 0, math.nan),  # no tokens scored: no loss, so no perplexity either
        (math.nan, 4, math.nan),  # a NaN loss stays NaN, not inf
        (705.0 * 2, 2, math.exp(705.0)),  # finite up to ln(float max) ~ 709.78
        (710.0 * 2, 2, math.inf),  # exp overflows a float
        (math.inf, 4, math.inf),
    ],
)
def test_perplexity_edges(loss_sum: float, tokens: int, expected: float) -> None:
    got = METRICS["perplexity"].compute(EvalOutputs(loss_sum=loss_sum, tokens=tokens))  # type: ignore[misc]
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


def test_generation_metrics_are_final_and_maximised() -> None:
    for name in ("exact_match", "rouge_l", "bleu", "pass_at_k"):
        m = METRICS[name]
        assert (m.cadence, m.mode, m.generates, m.searchable) == ("final", "max", True, True)
    assert METRICS["pass_at_k"].executes and not METRICS["bleu"].executes
    for name in ("eval_loss", "perplexity"):
        assert METRICS[name].cadence == "eval" and not METRICS[name].generates


def _rows(path: Path, with_tests: bool) -> str:
    row = {"instruction": "Write f returning 1.", "output": "def f():\n    return 1"}
    if with_tests:
        row["tests"] = "assert f() == 1"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return str(path)


def test_pass_at_k_is_reported_only_when_the_eval_data_has_tests(tmp_path: Path) -> None:
    plain = load_config(None, {"data.eval": _rows(tmp_path / "plain.jsonl", False)})
    coded = load_config(None, {"data.eval": _rows(tmp_path / "coded.jsonl", True)})
    names = [m.name for m in reported(plain)]
    assert {"exact_match", "rouge_l", "bleu"} <= set(names) and "pass_at_k" not in names
    assert "pass_at_k" in [m.name for m in reported(coded)]
    # Generation off: none of the generation metrics.
    off = load_config(
        None, {"data.eval": str(tmp_path / "coded.jsonl"), "train.exact_match": False}
    )
    assert not any(m.generates for m in reported(off))
    # Cheap ones every eval, generation ones at the final eval only.
    assert [m.name for m in computed_at(coded, final=False)] == ["eval_loss", "perplexity"]
    final = [m.name for m in computed_at(coded, final=True)]
    assert final == ["eval_loss", "perplexity", "exact_match", "rouge_l", "bleu", "pass_at_k"]


def test_pass_at_k_as_search_metric_needs_eval_rows_with_tests(tmp_path: Path) -> None:
    from raysft.config import validate_spec
    from raysft.search.spec import validate_search

    def problems(eval_path: str, metric: str) -> list[str]:
        tree = {
            "data": {"eval": eval_path},
            "train": {"max_steps": 20, "eval_every": 5},
            "search": {
                "params": {"lora.r": {"type": "choice", "values": [4, 8]}},
                "metric": metric,
                "scheduler": {"type": "none"},
            },
        }
        return validate_search(tree, validate_spec(tree, source="s.yaml"), source="s.yaml")

    coded = _rows(tmp_path / "coded.jsonl", True)
    plain = _rows(tmp_path / "plain.jsonl", False)
    assert problems(coded, "pass_at_k") == []
    assert problems(plain, "rouge_l") == [] and problems(plain, "bleu") == []
    assert problems(plain, "pass_at_k") == [
        "search.metric: the trainer never reports 'pass_at_k' "
        "(it reports train_loss, eval_loss, perplexity, exact_match, rouge_l, bleu)"
    ]


def test_pass_at_k_is_left_out_when_no_scored_row_has_tests(tmp_path: Path) -> None:
    # The source has tests, but the rows scored (a split, max_eval_samples) have none: a NaN
    # pass@k would mark a healthy trial diverged (results.is_diverged) and keep it from the ranking.
    from raysft.search.results import trial_row
    from raysft.train.evaluate import score

    cfg = load_config(None, {"data.eval": _rows(tmp_path / "coded.jsonl", True)})
    plain = [{"expected": "Paris", "generated": "Paris", "answers": ["Paris"], "tests": None}]
    scores, _ = score(cfg, final=True, loss=lambda: (6.0, 4), answers=lambda **_: plain)
    assert "pass_at_k" not in scores and scores["exact_match"] == 1.0
    row = trial_row(
        trial_id="t", metrics={**scores, "step": 20, "train_loss": 0.2, "checkpoint_path": "/c"},
        sampled={}, max_steps=20, objective="eval_loss", error=None, mlflow_run_id=None,
    )  # fmt: skip
    assert row["status"] == "finished"
    # A scored row with tests: pass@k is there (the sandbox runs the answer, then the tests).
    coded = [{**plain[0], "tests": "assert x == 1", "answers": ["x = 1"]}]
    scores, _ = score(cfg, final=True, loss=lambda: (6.0, 4), answers=lambda **_: coded)
    assert scores["pass_at_k"] == 1.0


def test_bleu_says_nothing_when_no_reference_has_a_4_gram() -> None:
    short = ["BASKET", "3", "stutdim stutdim."]  # "stutdim stutdim ." is 3 tokens
    assert scoring.bleu_says_nothing(short)
    assert scoring.bleu(short, short) == 0.0  # even for perfect answers
    # ...but not whatever the answers: longer ones have 4-grams, and their smoothed (unmatched)
    # 4-gram precision is above 0 (raysft.evaluate's note must say so).
    longer = ["BASKET is the word here", "3 is the number here", "stutdim stutdim. and more"]
    assert scoring.bleu(longer, short) > 0
    assert not scoring.bleu_says_nothing([*short, "The word means a house."])
    assert not scoring.bleu_says_nothing([])


def test_exact_match_counts_no_answer_cut_before_it_ended() -> None:
    preds, refs = ["Paris", "Paris", "Rome"], ["Paris", "Paris", "Rome"]
    assert scoring.exact_match(preds, refs, capped=[False, True, False]) == pytest.approx(2 / 3)
    assert scoring.exact_match(preds, refs) == 1.0
    with pytest.raises(ValueError, match="2 capped flags for 3 predictions"):
        scoring.exact_match(preds, refs, capped=[False, True])
