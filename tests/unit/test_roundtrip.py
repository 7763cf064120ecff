"""The same result computed two ways, on the embedded base (CPU, fp32).

- save -> load: a full model, a LoRA and a QLoRA adapter give the same logits after a round trip;
- exact match: greedy answers are the same at batch size 1 and 32 (left padding);
- gradient accumulation: one optimizer step over 4 micro-batches of 1 row equals one step over a
  batch of 4 rows: the loss is the mean over every trained token of the step, not of micro-means.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from raysft.config import Config, load_config
from raysft.train.model import (
    build_bnb_config,
    keep_4bit_weights_trainable,
    load_model,
    load_tokenizer,
)
from raysft.train.saving import save_model

PROMPTS = ["Convert this word to uppercase: stone", "Say stutdim two times."]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models, many small ops: one thread is several times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**overrides: Any) -> Config:
    return load_config(None, {"model.name_or_path": "embedded:tiny-base", **overrides})


def _logits(model: Any, tok: Any) -> torch.Tensor:
    enc = tok(PROMPTS, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**enc).logits


def _perturb(model: Any, *, only: str | None) -> None:
    """Stand-in for training: move the trainable weights (LoRA's B starts at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(torch.randn_like(p) * 0.02)


def _reload(cfg: Config, out: Path) -> Any:
    """What a user does with the saved directory, with stock transformers and peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raysft.assets import resolve

    if cfg.method == "full":
        return AutoModelForCausalLM.from_pretrained(out)
    kwargs: dict[str, Any] = {}
    if cfg.method == "qlora":  # the 4-bit base is quantized again, deterministically
        kwargs = {
            "quantization_config": build_bnb_config(cfg.qlora, torch.device("cpu")),
            "device_map": {"": "cpu"},
        }
    base = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name_or_path), **kwargs)
    if cfg.method == "qlora":
        # The same 4-bit kernel as the trained model: on an AVX512-BF16 CPU, stock
        # bitsandbytes would switch to its inference layout, whose bf16 arithmetic differs
        # (up to 0.2 in these logits), and the check is of the saved weights, not of kernels.
        keep_4bit_weights_trainable(base)
    return PeftModel.from_pretrained(base, out)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_save_then_load_gives_the_same_logits(tmp_path: Path, method: str) -> None:
    cfg = _cfg(method=method)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg)
    before = _logits(model, tok)
    _perturb(model, only=None if method == "full" else "lora_B")
    trained = _logits(model, tok)
    assert not torch.allclose(trained, before, atol=1e-4), "the weights did not move"
    save_model(model, tok, tmp_path / "out", method=method)
    if method != "full":
        assert not (tmp_path / "out" / "model.safetensors").exists()  # the adapter only
    reloaded = _logits(_reload(cfg, tmp_path / "out"), tok)
    assert torch.allclose(reloaded, trained, atol=1e-5), (reloaded - trained).abs().max()


# ---------------------------------------------------------------- exact match, batch 1 vs 32


def test_greedy_answers_do_not_depend_on_the_batch_size() -> None:
    from raysft.data.formats import load_conversations
    from raysft.train.evaluate import generate_answers
    from raysft.train.metrics import METRICS, EvalOutputs

    cfg = _cfg(method="full")
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg)
    convs = load_conversations("embedded:tasks-eval.jsonl").conversations[:32]
    lengths = {len(tok(c[-2]["content"], add_special_tokens=False)["input_ids"]) for c in convs}
    assert len(lengths) > 5, "prompts of one length would need no padding"

    def answers(batch_size: int) -> list[dict[str, Any]]:
        return generate_answers(
            model, tok, convs, template="chatml", max_new_tokens=12,
            batch_size=batch_size, device=torch.device("cpu"), autocast=contextlib.nullcontext,
        )  # fmt: skip

    one, all_at_once = answers(1), answers(32)
    assert [a["generated"] for a in one] == [a["generated"] for a in all_at_once]
    assert len({a["generated"] for a in one}) > 1  # real answers, not one repeated token
    score = METRICS["exact_match"].compute
    assert score is not None
    em_one = score(EvalOutputs(loss_sum=0.0, tokens=0, samples=one))
    assert em_one == score(EvalOutputs(loss_sum=0.0, tokens=0, samples=all_at_once))


# ---------------------------------------------------------------- gradient accumulation


# Answers of very different lengths: a mean of per-micro-batch means would weight the 1-token
# answer's tokens ~50 times more than the long answer's, and the two steps would differ.
ROWS = [
    {"instruction": "Say x.", "output": "x"},
    {"instruction": "Spell it out.", "output": " ".join(["letters"] * 12)},
    {"instruction": "Count.", "output": "one two three"},
    {"instruction": "Write a long one.", "output": "abc " * 25},
]


def _one_step(tmp_path: Path, *, batch_size: int, grad_accum: int) -> tuple[dict, dict, float]:
    """Trainable weights before and after one step of plain SGD (lr 1: the update is -grad),
    and the step's reported train_loss."""
    from raysft.train.recipe import Dist, setup, train

    tmp_path.mkdir()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    cfg = _cfg(
        method="full",
        **{
            "data.train": str(data),
            "data.eval": str(data),
            "data.packing": False,
            "train.batch_size": batch_size,
            "train.grad_accum": grad_accum,
            "train.max_steps": 1,
            "train.eval_every": 1,
            "train.max_grad_norm": None,
            "train.lr_scheduler": "constant",
            "train.warmup_ratio": 0.0,
            "train.exact_match": False,
            "train.eval_base": False,
            "output_dir": str(tmp_path / "out"),
        },
    )
    run = setup(cfg, dist=Dist())
    trained = [e.n_trained for e in run.data.train]
    assert max(trained) >= 10 * min(trained), trained
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.SGD(params, lr=1.0)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    train(run, None)
    after = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return before, after, run.progress.history[0]["train_loss"]


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    b0, b1, big_loss = _one_step(tmp_path / "big", batch_size=4, grad_accum=1)
    a0, a1, acc_loss = _one_step(tmp_path / "acc", batch_size=1, grad_accum=4)
    assert big_loss == pytest.approx(acc_loss, rel=1e-5)
    assert b0.keys() == a0.keys()
    moved = 0
    for name in b0:
        assert torch.equal(b0[name], a0[name]), name  # same start
        big, acc = b1[name] - b0[name], a1[name] - a0[name]
        # atol: 2 ulps of a weight near 1.0 (norm weights), the resolution of b1 - b0 there.
        assert torch.allclose(big, acc, rtol=1e-4, atol=2.5e-7), (name, (big - acc).abs().max())
        moved += bool(big.abs().max() > 0)
    assert moved > len(b0) // 2
