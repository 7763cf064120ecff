"""Pure metric functions on answers and references: exact match, ROUGE-L, BLEU, pass@k.

ROUGE-L and BLEU come from ``rouge-score`` and ``sacrebleu`` (imported lazily), not re-implemented:
this module only pairs answers with references and picks the tokenization. No torch import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# A CJK ideograph (or kana / hangul syllable) is a word of its own: these scripts put no spaces
# between words, and rouge-score's default tokenizer (ASCII [a-z0-9] only) drops them entirely.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_HAS_CJK = re.compile(rf"[{_CJK}]")


def normalize_answer(text: str) -> str:
    """Exact-match normalization: surrounding whitespace stripped, nothing else (case, inner
    spacing and punctuation count: "Paris" != "paris", "4" != "4.")."""
    return text.strip()


def exact_match(
    predictions: Sequence[str], references: Sequence[str], *, capped: Sequence[bool] = ()
) -> float:
    """Share of predictions equal to their reference after ``normalize_answer``; NaN if none.
    ``capped`` (one per prediction, or empty: none): a prediction cut off before it ended is
    no match."""
    _check_pairs(predictions, references)
    if capped and len(capped) != len(predictions):
        raise ValueError(f"{len(capped)} capped flags for {len(predictions)} predictions")
    if not predictions:
        return math.nan
    cut = capped or [False] * len(predictions)
    hits = sum(
        not c and normalize_answer(p) == normalize_answer(r)
        for p, r, c in zip(predictions, references, cut, strict=True)
    )
    return hits / len(predictions)


class _RougeTokenizer:
    """rouge-score's tokenizer interface: lowercase, words of letters/digits (``_`` splits, as in
    rouge-score's own), each CJK character a word. On ASCII text it equals rouge-score's default."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence of words) of each prediction against its
    reference, by ``rouge_score``; 0..1, NaN if there are no pairs."""
    _check_pairs(predictions, references)
    if not predictions:
        return math.nan
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure  # score(target, prediction)
        for p, r in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


def bleu_tokenizer(references: Sequence[str]) -> str:
    """sacreBLEU's standard ``13a`` tokenization, ``zh`` (one token per Chinese character, 13a on
    the rest) when any reference holds CJK text."""
    return "zh" if any(_HAS_CJK.search(r) for r in references) else "13a"


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of the predictions against one reference each, by ``sacrebleu``: 0..100 as
    sacreBLEU reports it with its defaults (4-gram, brevity penalty, ``exp`` smoothing of an order
    with no match); NaN if there are no pairs. Answers shorter than 4 tokens have no 4-grams,
    so a set of one-word answers scores 0 whatever they say: read exact match there."""
    _check_pairs(predictions, references)
    if not predictions:
        return math.nan
    import sacrebleu

    refs = list(references)
    return float(
        sacrebleu.corpus_bleu(list(predictions), [refs], tokenize=bleu_tokenizer(refs)).score
    )


def bleu_says_nothing(references: Sequence[str]) -> bool:
    """Whether BLEU says nothing of the answers here: no reference has 4 tokens (after BLEU's own
    tokenization), so no answer can match a 4-gram (the embedded default's one-word answers).
    Not always 0: answers of 4 tokens or more score above 0 by the smoothing of the missing
    4-gram matches, a score of their length."""
    if not references:
        return False
    import sacrebleu

    tokenize = sacrebleu.metrics.BLEU(tokenize=bleu_tokenizer(references)).tokenizer
    return all(len(tokenize(r).split()) < 4 for r in references)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` pass (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code"): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, no overflow


def mean_pass_at_k(results: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; each problem is its samples' pass/fail list. NaN if none."""
    if not results:
        return math.nan
    return sum(pass_at_k(len(r), sum(map(bool, r)), k) for r in results) / len(results)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
