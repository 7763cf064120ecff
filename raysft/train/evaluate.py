"""Held-out evaluation: the passes metrics are computed from (summed response-token loss, generated
answers, their code run against the rows' tests). Scores themselves are functions of the metric
registry (``train/metrics.py``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from raysft.data.batching import batches
from raysft.data.formats import Conversation, is_plain_text
from raysft.data.packing import causal_lm_loss
from raysft.data.references import code_tests
from raysft.data.templates import (
    answer_preamble,
    generation_prompt,
    generation_prompt_ids,
    stop_strings,
    terminator_tokens,
    token_count,
)
from raysft.data.tokens import Example
from raysft.errors import DataError
from raysft.train.metrics import EvalOutputs, Metric, computed_at
from raysft.train.sandbox import Limits, check_answers

log = logging.getLogger(__name__)


def forward_loss(
    model: Any, batch: dict[str, torch.Tensor], device: Any
) -> tuple[torch.Tensor, int]:
    """Sum of token losses and token count. Packed batches carry no attention_mask on purpose:
    transformers then builds the per-sample mask from position_ids (needs use_cache=False)."""
    inputs = {
        k: batch[k].to(device)
        for k in ("input_ids", "position_ids", "attention_mask")
        if k in batch
    }
    logits = model(**inputs, use_cache=False).logits
    return causal_lm_loss(logits, batch["labels"].to(device), batch["position_ids"].to(device))


@torch.no_grad()
def eval_loss_sum(
    model: Any,
    examples: list[Example],
    bins: list[list[int]],
    *,
    packing: bool,
    batch_size: int,
    pad_id: int,
    device: Any,
    autocast: Any,
    group_tokens: int | None = None,
) -> tuple[float, int]:
    """Summed response-token loss over the eval rows, and the number of tokens it covers
    (``group_tokens``: unpacked rows batched by length, as ``batching.batches`` does)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = batches(
        examples, bins, packing=packing, batch_size=batch_size, pad_id=pad_id,
        group_tokens=group_tokens,
    )  # fmt: skip
    for batch in rows:
        with autocast():
            loss_sum, n = forward_loss(model, batch, device)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total, count


def _answer(text: str, stops: list[str], preamble: str = "") -> str:
    """The answer in a decoded continuation: cut at the earliest stop, the template's answer
    preamble (``answer_preamble``, stripped) taken off its start, whitespace stripped."""
    for stop in stops:
        cut = text.find(stop)
        if cut != -1:
            text = text[:cut]
    text = text.strip()
    if preamble and text.startswith(preamble):
        text = text[len(preamble) :].strip()
    return text


def answer_stops(template: str, tokenizer: Any) -> tuple[list[str], list[int]]:
    """Stop strings (the template's terminator, and EOS) and those of them that are one token,
    which ``generate`` stops at; longer ones only cut the decoded text."""
    eos = getattr(tokenizer, "eos_token", None)
    stops = list(dict.fromkeys([*stop_strings(template, tokenizer), *([eos] if eos else [])]))
    ids = []
    for stop in stops:
        tid = tokenizer.convert_tokens_to_ids(stop)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return stops, ids


def _decoding(samples: int, temperature: float) -> dict[str, Any]:
    """Greedy, unless several answers are wanted or a temperature is set: then plain sampling."""
    if temperature <= 0 and samples == 1:
        return {"do_sample": False}
    # n greedy answers would be identical: sample at temperature 1 unless one is given.
    return {"do_sample": True, "temperature": temperature or 1.0, "top_k": 0, "top_p": 1.0}


def eval_generation_config(
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
) -> Any:
    """The whole decoding setup of eval generation, from raysft's settings alone (``eval.samples``,
    ``eval.temperature``, ``train.max_new_tokens``); ``generate`` runs it with the model's own
    defaults blanked (``_without_model_defaults``)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        **_decoding(samples, temperature),
        max_new_tokens=max_new_tokens,
        num_return_sequences=samples,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,  # one row per prompt here, no packing: the cache is safe
    )


@contextlib.contextmanager
def _without_model_defaults(model: Any) -> Iterator[None]:
    """Blank the model's saved ``generation_config`` while eval generates.

    transformers (5.x ``_prepare_generation_config``) fills every field a passed config leaves
    None from the model's own, so a checkpoint's repetition_penalty, no_repeat_ngram_size, min_p
    or suppress_tokens would change eval answers. Blanked in place: wrappers (PEFT, FSDP) resolve
    ``model.generation_config`` to this same object, and PeftModel.generate copies its own onto
    the base model, so swapping the attribute would not reach it or would not be undone.
    """
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    if not isinstance(own, GenerationConfig):
        yield
        return
    saved = dict(own.__dict__)
    own.__dict__.clear()
    own.__dict__.update(GenerationConfig().__dict__)
    try:
        yield
    finally:
        own.__dict__.clear()
        own.__dict__.update(saved)


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: list[Conversation],
    *,
    template: str,
    max_new_tokens: int,
    batch_size: int,
    device: Any,
    autocast: Any,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    synced: bool = False,
    share: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """``samples`` answers to each eval conversation's last user turn, in batches, cut at the
    template's stops, beside the reference: ``{"prompt", "expected", "generated" (the first),
    "answers", "capped" (per answer: cut by max_new_tokens, not ended by a stop), "tests"?}``.
    Prompts are tokenized as in training (``generation_prompt_ids``).
    Decoding is ``eval_generation_config``'s alone: the model's saved generation_config is unused.
    Sampling draws from its own seeded RNG, so the trainer's RNG stream is left as it was.
    ``synced``: a sharded model, whose every forward is a collective; all ranks generate until
    the last one is done. ``share`` (rank, ranks): this rank answers batches rank, rank + ranks,
    ... of ``batch_size`` conversations. Each batch is seeded by its index, so the answers do not
    depend on how many ranks share the batches, nor on which."""
    was_training = model.training
    model.eval()
    stops, stop_ids = answer_stops(template, tokenizer)
    preamble = answer_preamble(template, tokenizer).strip()
    own_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    decoding = eval_generation_config(
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids or own_eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A stop of several tokens (a template marker the tokenizer has no token for) ends
    # generation too, not only the decoded text: else every answer runs to max_new_tokens.
    split = [s for s in stops if token_count(s, tokenizer) > 1]
    decoding.stop_strings = split or None
    by_text = {"tokenizer": tokenizer} if split else {}
    out_samples: list[dict[str, Any]] = []
    cuda = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), _without_model_defaults(model):
        rank, ranks = share
        for b in range(rank, -(-len(conversations) // batch_size), ranks):
            torch.manual_seed(seed + b)
            convs = conversations[b * batch_size : (b + 1) * batch_size]
            enc = [generation_prompt_ids(c, template=template, tokenizer=tokenizer) for c in convs]
            width = max(len(e) for e in enc)
            # Left padding so every prompt ends where generation starts.
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            with autocast():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=decoding,
                    synced_gpus=synced,
                    **by_text,
                )
            rows = out[:, width:].tolist()  # samples consecutive rows per prompt
            for j, conv in enumerate(convs):
                decoded = [
                    tokenizer.decode(r, skip_special_tokens=False)
                    for r in rows[j * samples : (j + 1) * samples]
                ]
                texts = [_answer(t, stops, preamble) for t in decoded]
                sample = _sample(conv, texts, template=template, tokenizer=tokenizer)
                # No stop in it: generation ran to max_new_tokens, the answer may go on.
                sample["capped"] = [not any(stop in t for stop in stops) for t in decoded]
                out_samples.append(sample)
    model.train(was_training)
    return out_samples


def in_row_order(shares: list[list[Any]], *, rows: int, batch_size: int) -> list[Any]:
    """The answers of every rank's share (``generate_answers(share=(rank, len(shares)))``) put
    back in the order of the ``rows`` conversations they answer (any items dealt out over
    ranks by batches: rank r took batches r, r + W, ...)."""
    out: list[Any] = []
    for b in range(-(-rows // batch_size)):
        first = (b // len(shares)) * batch_size  # where batch b starts in its rank's share
        out += shares[b % len(shares)][first : first + batch_size]
    return out


def prompts_that_fit(
    conversations: list[Conversation],
    tokenizer: Any,
    *,
    template: str,
    max_seq_len: int,
    warn: bool = True,
) -> list[Conversation]:
    """The conversations whose generation prompt is shorter than ``max_seq_len`` tokens; the
    others are left out of generation, said in one warning (``warn``). Training cut such a
    row's sample before the answer generation scores (a long multi-turn history), so that
    answer was never trained, and its prompt could run past the model's context (and memory)."""
    kept, over = [], []
    for conv in conversations:
        n = len(generation_prompt_ids(conv, template=template, tokenizer=tokenizer))
        if n < max_seq_len:
            kept.append(conv)
        else:
            over.append(n)
    if over and warn:
        log.warning(
            "%d of the %d eval rows have a generation prompt of data.max_seq_len=%d tokens or "
            "more (the longest %d): left out of generation (exact match, ROUGE-L, BLEU, "
            "pass@k score the other %d), since training cut their samples before the answer "
            "these score",
            len(over), len(conversations), max_seq_len, max(over), len(kept),
        )  # fmt: skip
    return kept


def generation_rows(
    conversations: list[Conversation],
    tokenizer: Any,
    cfg: Any,
    *,
    warn: bool = True,
    hint: str = "raise data.max_seq_len, or shorten the held-out prompts",
) -> list[Conversation]:
    """``prompts_that_fit`` of ``cfg``'s template and max_seq_len, where generation metrics are
    due, the first ``eval.max_prompts`` of them; none of several is an error (``DataError``,
    ending in ``hint``), before anything loads. Plain-text rows, which have no answer, are left
    out (said); held-out rows that are all plain text are an error."""
    texts = sum(is_plain_text(c) for c in conversations)
    if texts and texts == len(conversations):
        raise DataError(
            f"data.eval: its {texts} rows are plain text, with no answer to generate: exact "
            "match, ROUGE-L, BLEU and pass@k cannot be scored on them; set train.exact_match: "
            "false (eval loss scores them), or hold out rows with answers"
        )
    if texts:
        conversations = [c for c in conversations if not is_plain_text(c)]
        if warn:
            log.info(
                "%d of the held-out rows are plain text, with no answer: the generated-answer "
                "metrics score the other %d; eval loss scores all of them",
                texts, len(conversations),
            )  # fmt: skip
    kept = prompts_that_fit(
        conversations, tokenizer, template=cfg.data.template, max_seq_len=cfg.data.max_seq_len,
        warn=warn,
    )  # fmt: skip
    if conversations and not kept:
        raise DataError(
            f"data.eval: every one of the {len(conversations)} eval rows has a generation prompt "
            f"of data.max_seq_len={cfg.data.max_seq_len} tokens or more: nothing to generate "
            f"for ({hint})"
        )
    cap = cfg.eval.max_prompts
    if cap is not None and len(kept) > cap and warn:
        log.info(
            "eval.max_prompts=%d: the generated-answer metrics answer the first %d of the %d "
            "eval rows whose prompts fit; eval loss scores all of them",
            cap, cap, len(kept),
        )  # fmt: skip
    return kept[:cap]


def warn_of_capped_references(
    conversations: list[Conversation], tokenizer: Any, *, max_new_tokens: int, template: str
) -> int:
    """Warn (once per eval setup) when some reference answers are longer than the generation
    cap: their generated answers are cut short, so exact match, ROUGE-L and BLEU measure the
    cap, not the model. Returns how many references are longer."""
    # The answer's terminator is generated too, inside the same cap: one token, or the several
    # a tokenizer without the template's marker splits it into.
    end = terminator_tokens(template, tokenizer)
    lengths = [token_count(c[-1]["content"], tokenizer) + end for c in conversations]
    over = [n for n in lengths if n > max_new_tokens]
    if over:
        log.warning(
            "train.max_new_tokens=%d is shorter than %d of the %d eval reference answers (the "
            "longest is %d tokens with its terminator): their answers are cut there, so exact "
            "match, ROUGE-L and BLEU are capped by it; raise train.max_new_tokens to %d",
            max_new_tokens,
            len(over),
            len(lengths),
            max(over),
            max(over),
        )
    return len(over)


def _sample(conv: Conversation, answers: list[str], *, template: str, tokenizer: Any) -> dict:
    sample: dict[str, Any] = {
        "prompt": generation_prompt(conv, template=template, tokenizer=tokenizer),
        "expected": conv[-1]["content"],
        "generated": answers[0],
        "answers": answers,
    }
    if code_tests(conv) is not None:
        sample["tests"] = code_tests(conv)
    return sample


Checker = Callable[..., list[list[bool]]]  # check_answers(problems, *, limits)


def run_code_tests(
    samples: list[dict[str, Any]], *, limits: Limits, check: Checker = check_answers
) -> None:
    """Run every answer of each sample that has tests in the sandbox; sets ``passed``.
    ``check``: ``check_answers``, or what shares it over data-parallel workers."""
    coded = [s for s in samples if s.get("tests") is not None]
    results = check([(s["answers"], s["tests"]) for s in coded], limits=limits)
    for sample, passed in zip(coded, results, strict=True):
        sample["passed"] = passed
    log.info(
        "pass@k: %d of %d programs passed (%d problems)",
        sum(map(sum, results)),
        sum(map(len, results)),
        len(coded),
    )


def score(
    cfg: Any,
    *,
    final: bool,
    loss: Callable[[], tuple[float, int]],
    answers: Callable[..., list[dict[str, Any]]],
    only: tuple[str, ...] | None = None,
    check: Checker = check_answers,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The registry metrics due at this eval (``final``: the last one; ``only``: just these),
    each pass (loss, generation, code execution) run at most once.

    Returns the scores and the generated samples (empty when nothing generates).
    """
    due = [m for m in computed_at(cfg, final=final) if only is None or m.name in only]
    return compute(due, cfg, loss=loss, answers=answers, check=check)


def compute(
    due: list[Metric],
    cfg: Any,
    *,
    loss: Callable[[], tuple[float, int]],
    answers: Callable[..., list[dict[str, Any]]],
    check: Checker = check_answers,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Scores of the metrics ``due``, with ``cfg.eval``'s generation and sandbox settings
    (``check``: runs the answers' code, ``run_code_tests``)."""
    loss_sum, tokens = loss() if any(not m.generates for m in due) else (0.0, 0)
    samples: list[dict[str, Any]] = []
    if any(m.generates for m in due):
        samples = answers(
            samples=cfg.eval.samples, temperature=cfg.eval.temperature, seed=cfg.train.seed
        )
    if any(m.executes for m in due):
        limits = Limits(timeout_s=cfg.eval.code_timeout_s, memory_mb=cfg.eval.code_memory_mb)
        run_code_tests(samples, limits=limits, check=check)
    out = EvalOutputs(loss_sum=loss_sum, tokens=tokens, samples=samples, pass_k=cfg.eval.pass_k)
    scores = {m.name: m.compute(out) for m in due if m.compute is not None}
    if any(m.executes for m in due) and not any(s.get("tests") is not None for s in samples):
        # The eval source has rows with tests, but none of the rows scored here has (a seeded
        # split of data.train, max_eval_samples, truncation): no pass@k to report. A NaN one
        # would read as a diverged trial (results.is_diverged).
        for m in due:
            if m.executes and scores.pop(m.name, None) is not None:
                log.warning("%s: none of the %d eval rows scored has tests", m.name, len(samples))
    return scores, samples
