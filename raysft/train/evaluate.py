"""Held-out evaluation: the passes metrics are computed from (summed response-token loss, greedy
answers). Scores themselves are functions of the metric registry (``train/metrics.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from raysft.data.formats import Conversation
from raysft.data.packing import causal_lm_loss, collate_packed, collate_padded, pack
from raysft.data.templates import Example, generation_prompt, stop_strings
from raysft.train.metrics import EvalOutputs, computed_at


def make_bins(examples: list[Example], *, packing: bool, max_len: int) -> list[list[int]]:
    """Example indices of each row: packed (best-fit decreasing) or one per row. Built once."""
    if not packing:
        return [[i] for i in range(len(examples))]
    return pack([len(e.input_ids) for e in examples], max_len=max_len)


def batches(
    examples: list[Example],
    bins: list[list[int]],
    *,
    packing: bool,
    batch_size: int,
    pad_id: int,
    order: list[int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of the rows ``bins`` in ``order`` (default: as given)."""
    order = order if order is not None else list(range(len(bins)))
    for s in range(0, len(order), batch_size):
        rows = [
            [(examples[i].input_ids, examples[i].labels) for i in bins[j]]
            for j in order[s : s + batch_size]
        ]
        if packing:
            yield collate_packed(rows, pad_id=pad_id)
        else:
            yield collate_padded([r[0] for r in rows], pad_id=pad_id)


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
) -> tuple[float, int]:
    """Summed response-token loss over the eval rows, and the number of tokens it covers."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(examples, bins, packing=packing, batch_size=batch_size, pad_id=pad_id):
        with autocast():
            loss_sum, n = forward_loss(model, batch, device)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total, count


def _answer(text: str, stops: list[str]) -> str:
    for stop in stops:
        cut = text.find(stop)
        if cut != -1:
            text = text[:cut]
    return text.strip()


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
) -> list[dict[str, str]]:
    """Greedy answers to each eval conversation's last user turn, cut at the template's stops,
    beside the reference answer: ``{"prompt", "expected", "generated"}``."""
    was_training = model.training
    model.eval()
    stops = stop_strings(template, tokenizer)
    stop_ids = [tokenizer.convert_tokens_to_ids(s) for s in stops]
    stop_ids = [i for i in stop_ids if isinstance(i, int) and i != tokenizer.unk_token_id]
    prompts = [generation_prompt(c, template=template, tokenizer=tokenizer) for c in conversations]
    samples = []
    for s in range(0, len(prompts), batch_size):
        enc = [
            tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[s : s + batch_size]
        ]
        width = max(len(e) for e in enc)
        # Left padding so every prompt ends where generation starts.
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        with autocast():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids or None,
                pad_token_id=tokenizer.pad_token_id,
            )
        for j, row in enumerate(out[:, width:].tolist()):
            got = _answer(tokenizer.decode(row, skip_special_tokens=False), stops)
            want = conversations[s + j][-1]["content"]
            samples.append({"prompt": prompts[s + j], "expected": want, "generated": got})
    model.train(was_training)
    return samples


def score(
    cfg: Any,
    *,
    final: bool,
    loss: Callable[[], tuple[float, int]],
    answers: Callable[[], list[dict[str, str]]],
    only: tuple[str, ...] | None = None,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """The registry metrics due at this eval (``final``: the last one; ``only``: just these),
    each pass (loss, generation) run at most once.

    Returns the scores and the generated samples (empty when nothing generates).
    """
    due = [m for m in computed_at(cfg, final=final) if only is None or m.name in only]
    loss_sum, tokens = loss() if any(not m.generates for m in due) else (0.0, 0)
    samples = answers() if any(m.generates for m in due) else []
    out = EvalOutputs(loss_sum=loss_sum, tokens=tokens, samples=samples)
    return {m.name: m.compute(out) for m in due if m.compute is not None}, samples
