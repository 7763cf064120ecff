"""One SFT trial, top to bottom: config -> tokenizer -> data -> model -> train -> eval -> report.

``run_trial`` is called in-process by ``python -m raysft.train`` and inside each Ray Train worker
by the search; the only difference is the ``report`` callback and the distributed context.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysft.config import Config, dump_config

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir) -> None; checkpoint_dir holds the adapter (or model) at that step.
Reporter = Callable[[dict[str, Any], str | None], None]


@dataclass
class TrialResult:
    output_dir: str
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a data-parallel group (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _autocast(cfg: Config, device: torch.device) -> Callable[[], Any]:
    use_bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _epoch_order(n: int, *, seed: int, epoch: int, dist: Dist) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[dist.rank :: dist.world_size]


def _micro_batches(cfg: Config, examples: list, bins: list[list[int]], pad_id: int, dist: Dist):
    """Endless stream of training micro-batches, reshuffled every epoch."""
    from raysft.train.evaluate import batches

    epoch = 0
    while True:
        order = _epoch_order(len(bins), seed=cfg.train.seed, epoch=epoch, dist=dist)
        yield from batches(
            examples,
            bins,
            packing=cfg.data.packing,
            batch_size=cfg.train.batch_size,
            pad_id=pad_id,
            order=order,
        )
        epoch += 1


def _build_optimizer(model: Any, cfg: Config) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
    )
    name = {"constant": "constant_with_warmup"}.get(cfg.train.lr_scheduler, cfg.train.lr_scheduler)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(cfg.train.warmup_ratio * cfg.train.max_steps),
        num_training_steps=cfg.train.max_steps,
    )
    return optimizer, scheduler


def run_trial(
    cfg: Config,
    *,
    report: Reporter | None = None,
    dist: Dist | None = None,
    prepare_model: Callable[[Any], Any] | None = None,
    eval_base: bool = True,
) -> TrialResult:
    """Train one config; returns final metrics. ``prepare_model`` wraps the model for DDP."""
    from raysft.data.packing import packing_efficiency
    from raysft.data.pipeline import prepare_data
    from raysft.train.evaluate import eval_loss, exact_match, forward_loss, make_bins
    from raysft.train.model import count_parameters, load_model, load_tokenizer
    from raysft.train.neftune import attach_neftune

    dist = dist or Dist()
    t0 = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    _seed_everything(cfg.train.seed)
    device = pick_device()
    autocast = _autocast(cfg, device)
    out_dir = Path(cfg.output_dir)

    # --- tokenizer and data
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    train_bins = make_bins(data.train, packing=cfg.data.packing, max_len=cfg.data.max_seq_len)
    eval_bins = make_bins(data.eval, packing=cfg.data.packing, max_len=cfg.data.max_seq_len)
    if cfg.data.packing:
        lengths = [len(e.input_ids) for e in data.train]
        data.report.packed_rows = len(train_bins)
        data.report.packing_efficiency = round(
            packing_efficiency(lengths, train_bins, max_len=cfg.data.max_seq_len), 4
        )
    log.info("data: %s", json.dumps(data.report.as_dict(), ensure_ascii=False))
    for reason in data.report.skipped[:5]:
        log.warning("skipped %s", reason)

    # --- model (+ adapter), NEFTune, optimizer
    model = load_model(cfg, device=device)
    trainable, total = count_parameters(model)
    neftune = attach_neftune(model, alpha=cfg.train.neftune_alpha)
    train_model = prepare_model(model) if prepare_model else model
    optimizer, scheduler = _build_optimizer(model, cfg)
    pad_id = tokenizer.pad_token_id
    # Held-out loss on response tokens, and greedy exact match, bound to this config.
    held_out_loss = functools.partial(
        eval_loss,
        model,
        data.eval,
        eval_bins,
        packing=cfg.data.packing,
        batch_size=cfg.train.batch_size,
        pad_id=pad_id,
        device=device,
        autocast=autocast,
    )
    held_out_em = functools.partial(
        exact_match,
        model,
        tokenizer,
        data.eval_conversations,
        template=cfg.data.template,
        max_new_tokens=cfg.train.max_new_tokens,
        batch_size=32,
        device=device,
        autocast=autocast,
    )

    final: dict[str, Any] = {"trainable_params": trainable, "total_params": total}
    # LoRA starts with B = 0 and full FT with the base weights: the model *is* the base here.
    if eval_base and cfg.train.exact_match and data.eval_conversations:
        final["base_exact_match"], _ = held_out_em()
        log.info("base model exact match: %.3f", final["base_exact_match"])

    # --- train
    history: list[dict[str, Any]] = []
    stream = _micro_batches(cfg, data.train, train_bins, pad_id, dist)
    model.train()
    t_train = time.perf_counter()
    for step in range(1, cfg.train.max_steps + 1):
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]
        # Mean over every trained token of the step, not a mean of micro-batch means.
        n_tokens = max(sum(int((b["labels"] != -100).sum()) for b in micro), 1)
        step_loss = 0.0
        for batch in micro:
            if neftune is not None:
                neftune.set_lengths(batch["seg_lens"].to(device))
            with autocast():
                loss_sum, _ = forward_loss(train_model, batch, device)
            (loss_sum / n_tokens).backward()
            step_loss += float(loss_sum.detach()) / n_tokens
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.train.max_grad_norm
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step,
            "train_loss": round(step_loss, 6),
            "lr": scheduler.get_last_lr()[0],
            "tokens": sum(int((b["seg_lens"] > 0).sum()) for b in micro),  # real, not padding
        }
        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            record["eval_loss"] = held_out_loss() if data.eval else float("nan")
            record["elapsed_s"] = round(time.perf_counter() - t0, 2)
            log.info("step %d train_loss %.4f eval_loss %.4f", step, step_loss, record["eval_loss"])
            if step == cfg.train.max_steps and cfg.train.exact_match and data.eval_conversations:
                record["exact_match"], samples = held_out_em()
                if "base_exact_match" in final:  # so the search can compare with the base
                    record["base_exact_match"] = final["base_exact_match"]
                final["eval_samples"] = samples[:10]
            _report(report, record, model, tokenizer, cfg, dist)
        history.append(record)
    train_s = time.perf_counter() - t_train
    if neftune is not None:
        neftune.remove()

    # --- outputs
    last = history[-1]
    final.update(
        {k: last[k] for k in ("step", "train_loss", "eval_loss", "exact_match") if k in last}
    )
    if "base_exact_match" in final and "exact_match" in final:
        final["exact_match_gain"] = round(final["exact_match"] - final["base_exact_match"], 4)
    final.update(
        {"train_seconds": round(train_s, 2), "wall_seconds": round(time.perf_counter() - t0, 2)}
    )
    result = TrialResult(str(out_dir), final, history, data.report.as_dict())
    if dist.rank == 0:
        _write_outputs(out_dir, model, tokenizer, cfg, result)
    return result


def _report(
    report: Reporter | None,
    record: dict[str, Any],
    model: Any,
    tokenizer: Any,
    cfg: Config,
    dist: Dist,
) -> None:
    if report is None:
        return
    from raysft.train.model import save_model

    if dist.rank != 0:
        report(record, None)
        return
    with tempfile.TemporaryDirectory(prefix="raysft-ckpt-") as tmp:
        save_model(model, tokenizer, tmp, method=cfg.method)
        report(record, tmp)


def _write_outputs(
    out_dir: Path, model: Any, tokenizer: Any, cfg: Config, result: TrialResult
) -> None:
    from raysft.train.model import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, str(out_dir), method=cfg.method)
    (out_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    metrics = {"final": result.final, "history": result.history, "data": result.data}
    (out_dir / "metrics.json").write_text(
        json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8"
    )
