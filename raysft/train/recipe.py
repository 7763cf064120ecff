"""One SFT trial, top to bottom: setup -> train loop -> finish.

``setup`` builds everything from the config (tokenizer, data, model + adapter, NEFTune, optimizer)
and, given a checkpoint, restores the training state; ``train`` runs optimizer steps, evaluating
and checkpointing every ``eval_every`` steps; ``finish`` writes the outputs. ``run_trial`` chains
them: ``python -m raysft.train`` calls it in-process, the search inside each Ray Train worker;
the only differences are the ``report`` callback and the distributed context.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysft.config import Config, get_path, parse_value
from raysft.data.batching import BatchStream, group_by_length_tokens, make_bins, training_stream
from raysft.data.digest import DATA_FILE, TOKENS, data_digests, token_digests
from raysft.data.packing import loss_mask, packing_efficiency
from raysft.data.pipeline import prepare_data
from raysft.data.shared import SharedData
from raysft.errors import ConfigError, DataError
from raysft.paths import ORIGIN_FILE, give_plain_modes, replace_text
from raysft.search.redact import saved_config_text
from raysft.search.results import json_safe
from raysft.train import fsdp
from raysft.train.device import granted_gpus, training_device
from raysft.train.epochs import resolve_epochs
from raysft.train.evaluate import (
    answer_stops,
    eval_loss_sum,
    forward_loss,
    generate_answers,
    generation_rows,
    score,
    warn_of_capped_references,
)
from raysft.train.metrics import METRICS, REPLAYED, computed_at
from raysft.train.model import (
    check_vocab,
    count_parameters,
    load_model,
    training_tokenizer,
)
from raysft.train.neftune import attach_neftune
from raysft.train.packing_check import check_packing
from raysft.train.precision import (
    NUMERICS,
    autocast_for,
    computes_in_bf16,
    loss_scaler,
    numerics,
    warn_of_emulated_bf16,
    warn_of_other_numerics,
)
from raysft.train.ranks import (
    Dist,
    answers_of_all_ranks,
    checks_of_all_ranks,
    gather_over_ranks,
    loss_of_all_ranks,
    sum_over_ranks,
)
from raysft.train.resume_checks import check_same_data, check_same_tokens
from raysft.train.saving import save_model
from raysft.train.state import (
    CONFIG_FILE,
    STAGING_PREFIX,
    Progress,
    load_state,
    rng_states,
    save_state,
)

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir) -> None; checkpoint_dir holds the adapter (or model) and the
# training state at that step, and is deleted once report returns, unless the reporter has
# ``takes_checkpoint_dir = True``: then it is the reporter's (Ray uploads it in the background
# and deletes it, and training goes on meanwhile).
Reporter = Callable[[dict[str, Any], str | None], None]

# Key of a run's final metrics: the step at which its loss stopped being finite, and training.
DIVERGED_AT = "diverged_at"


@dataclass
class TrialResult:
    output_dir: str
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Everything ``setup`` builds and the loop and ``finish`` use."""

    cfg: Config
    dist: Dist
    device: torch.device
    autocast: Callable[[], Any]
    tokenizer: Any
    data: Any  # PreparedData
    model: Any  # the model whose weights train and are saved (sharded in place by FSDP)
    train_model: Any  # what the forward pass calls (DDP-wrapped with several workers)
    neftune: Any
    optimizer: Any
    scheduler: Any
    stream: BatchStream
    evaluate: Callable[..., tuple[dict[str, float], list[dict[str, str]]]]
    progress: Progress
    t0: float
    data_digests: dict[str, dict[str, str]] = field(default_factory=dict)  # data.json
    train_seconds: float = 0.0
    # Where the run's time went, seconds (a resumed run's from its start): setup_s, step_s, ...
    # (_PHASES).
    times: dict[str, float] = field(default_factory=dict)
    scaler: Any = None  # torch.amp.GradScaler where the base computes in fp16, else None


def _export_dtype(run: Run) -> torch.dtype | None:
    """Full fine-tuning's export: bf16 on bf16 runs (half an fp32 export), else as trained."""
    return torch.bfloat16 if computes_in_bf16(run.cfg, run.device) else None


def _build_optimizer(model: Any, cfg: Config) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    decay = cfg.train.weight_decay
    # Weight decay on matrices only: norm gains and biases (1-D) pulled toward 0 would fight
    # what they are for (a gain's neutral value is 1). One group without decay, as before.
    groups: Any = params
    if decay:
        groups = [
            g
            for g in (
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            )
            if g["params"]
        ]
    t = cfg.train
    kwargs: dict[str, Any] = {
        "lr": t.learning_rate,
        "weight_decay": decay,
        "betas": (t.adam_beta1, t.adam_beta2),
        "eps": t.adam_epsilon,
    }
    optimizer: torch.optim.Optimizer
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, **kwargs)
    else:  # the states in 8 bits, blockwise (bitsandbytes)
        from bitsandbytes.optim import AdamW8bit, PagedAdamW8bit

        cls = PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else AdamW8bit
        optimizer = cls(groups, **kwargs)
    name = {"constant": "constant_with_warmup"}.get(cfg.train.lr_scheduler, cfg.train.lr_scheduler)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=cfg.train.warmup(),
        num_training_steps=cfg.train.max_steps,
    )
    return optimizer, scheduler


def _prepare(
    cfg: Config, tokenizer: Any, shared: SharedData | None = None
) -> tuple[Any, list[list[int]], list[list[int]]]:
    """Tokenized data (read here, or the driver's ``shared``, which fits ``cfg``) and its rows
    (packed bins, or one sample per row), built once."""

    if shared is None:
        data = prepare_data(cfg.data, tokenizer, seed=cfg.data_seed())
    else:
        data = shared.prepared()
        # The search's driver read it (or the train CLI, to count train.epochs in steps).
        log.info("data: as read and tokenized before the run (no second read)")
    train_bins = make_bins(data.train, packing=cfg.data.packing, max_len=cfg.data.max_seq_len)
    eval_bins = make_bins(data.eval, packing=cfg.data.packing, max_len=cfg.data.max_seq_len)
    if cfg.data.packing:
        lengths = [e.n_tokens for e in data.train]
        data.report.packed_rows = len(train_bins)
        data.report.packing_efficiency = round(
            packing_efficiency(lengths, train_bins, max_len=cfg.data.max_seq_len), 4
        )
    log.info("data: %s", json.dumps(data.report.as_dict(), ensure_ascii=False))
    for reason in data.report.skipped[:5]:
        log.warning("skipped %s", reason)
    for reason in data.report.dropped[:5]:
        log.warning("dropped %s", reason)
    return data, train_bins, eval_bins


def setup(
    cfg: Config,
    *,
    dist: Dist,
    prepare_model: Callable[[Any], Any] | None = None,
    resume_from: str | None = None,
    shared: SharedData | None = None,
) -> Run:
    """Tokenizer, data (``shared``: the search driver's, when it fits), model (+ adapter),
    NEFTune, optimizer; the training state if resuming."""

    t0 = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    # Fails now, naming node, CUDA build and driver, if this worker should have a GPU and has none.
    device = training_device(cfg, granted=granted_gpus())
    autocast = autocast_for(cfg, device)
    warn_of_emulated_bf16(cfg, device)
    tokenizer = training_tokenizer(cfg)
    # The search's driver read and tokenized the data already: taken from it when this trial
    # reads the same (raysft.data.shared), else read here.
    taken = shared if shared is not None and shared.fits(cfg) else None
    # Rank 0 writes the checkpoints, so it alone reads the data through for their data.json.
    if dist.rank != 0:
        digests = {}
    else:
        digests = taken.digests if taken is not None else data_digests(cfg.data)
    if resume_from is not None and dist.rank == 0:
        check_same_data(resume_from, digests)  # before the old stream position meets new rows
    data, train_bins, eval_bins = _prepare(cfg, tokenizer, taken)
    if dist.rank == 0:
        if TOKENS not in digests:  # the driver's has them
            digests = {**digests, TOKENS: token_digests(data)}
        if resume_from is not None:
            check_same_tokens(resume_from, digests)  # the same bytes, the same ids
    if len(train_bins) < dist.world_size:
        raise DataError(
            f"data.train: {len(train_bins)} training row(s) (packed) for {dist.world_size} "
            "workers: every worker needs at least one; lower search.resources.workers or add data"
        )
    # Resolved by the train CLI and the search's driver already (their checks count steps);
    # here for a config that reaches a run unresolved (run_trial called directly).
    cfg = resolve_epochs(cfg, data.train, train_bins, world_size=dist.world_size)
    generates = any(m.generates for m in computed_at(cfg, final=True))
    convs = data.eval_conversations
    if generates:  # before the model loads: none of them left is an error
        convs = generation_rows(convs, tokenizer, cfg, warn=dist.rank == 0)

    if dist.sharded:
        if cfg.method != "full":
            raise ConfigError(
                "search.resources.strategy",
                [f"fsdp shards full fine-tuning; method {cfg.method} trains with ddp"],
            )
        untested = {  # setting -> (what is set, what the trial could run with instead)
            "train.compile": ("", "false") if cfg.train.compile else None,
            "train.optimizer": (f"{cfg.train.optimizer} ", "adamw")
            if cfg.train.optimizer != "adamw" else None,
        }  # fmt: skip
        for path, (what, instead) in ((p, u) for p, u in untested.items() if u):
            raise ConfigError(
                path,
                [f"{what}not with FSDP yet (untested here), which shards this trial; set "
                 f"search.resources.strategy: ddp or {path}: {instead}"],
            )  # fmt: skip
        bf16 = computes_in_bf16(cfg, device)
        model = fsdp.load_sharded(
            cfg, device=device, bf16=bf16, rank=dist.rank, weights=resume_from is None
        )
        log.info("FSDP: every decoder layer sharded over %d workers", dist.world_size)
    else:
        model = load_model(cfg, device=device)
    vocab = model.get_input_embeddings().num_embeddings
    check_vocab(vocab, tokenizer, name=cfg.model.name_or_path)
    neftune = attach_neftune(model, alpha=cfg.train.neftune_alpha)
    train_model = model if dist.sharded or prepare_model is None else prepare_model(model)
    if cfg.train.compile:
        # Evals and generation call the eager ``model`` (same weights): their shapes change at
        # every batch and token. Packed batches have one shape (``BatchStream.fixed_width``);
        # unpacked ones change width, so they compile once with dynamic shapes. Dynamo neither
        # guards on module hooks nor on which instance runs: a graph compiled for an earlier
        # trial's model in this process (without NEFTune's hook, say) would be reused as is.
        torch._dynamo.reset()
        train_model = torch.compile(train_model, dynamic=None if cfg.data.packing else True)
    optimizer, scheduler = _build_optimizer(model, cfg)
    # Before anything trains on packed rows; on every rank (FSDP's forward is collective), and
    # after the optimizer is built: an FSDP model's first forward initializes its sharded
    # parameters, and an optimizer built after that could not be gathered for a checkpoint.
    # FSDP shards resumed are empty until the checkpoint loads: the first start checked them.
    if cfg.data.packing and not (dist.sharded and resume_from is not None):
        check_packing(model, name=cfg.model.name_or_path, vocab_size=vocab, device=device)
    scaler = loss_scaler(model, cfg, device)
    pad_id = tokenizer.pad_token_id
    group_tokens = group_by_length_tokens(cfg)
    # Data parallel (DDP): each rank scores its share of the eval rows and the sums are added
    # up. FSDP keeps every rank on every row: each of its forwards is a collective, so the
    # ranks' batch counts would have to match.
    share = not dist.sharded and dist.world_size > 1
    loss = functools.partial(
        eval_loss_sum,
        model,
        data.eval,
        eval_bins[dist.rank :: dist.world_size] if share else eval_bins,
        packing=cfg.data.packing,
        batch_size=cfg.train.batch_size,
        pad_id=pad_id,
        device=device,
        autocast=autocast,
        group_tokens=group_tokens,
    )
    if dist.rank == 0 and generates:
        warn_of_capped_references(
            convs,
            tokenizer,
            max_new_tokens=cfg.train.max_new_tokens,
            template=cfg.data.template,
        )
    if share:
        loss = functools.partial(loss_of_all_ranks, loss, dist=dist, device=device)
    answers = functools.partial(
        generate_answers,
        model,
        tokenizer,
        convs,
        template=cfg.data.template,
        max_new_tokens=cfg.train.max_new_tokens,
        batch_size=_GEN_BATCH,
        device=device,
        autocast=autocast,
        synced=dist.sharded,
        share=(dist.rank, dist.world_size) if share else (0, 1),
    )
    if share:
        answers = functools.partial(
            answers_of_all_ranks, answers, dist=dist, rows=len(convs), batch_size=_GEN_BATCH
        )
    # Every worker holds every answer (gathered, or under FSDP generated alike): each runs the
    # code tests of its share of the problems (all of them alone).
    check = functools.partial(checks_of_all_ranks, dist=dist)
    evaluate = functools.partial(score, cfg, loss=loss, answers=answers, check=check)
    stream = training_stream(
        cfg, data.train, train_bins, pad_id=pad_id, shard=(dist.rank, dist.world_size)
    )
    steps = stream.batches_per_epoch / cfg.train.grad_accum
    log.info(
        "one epoch: %d micro-batches per worker, %.1f optimizer steps; train.max_steps=%d is "
        "%.2f epochs",
        stream.batches_per_epoch, steps, cfg.train.max_steps, cfg.train.max_steps / steps,
    )  # fmt: skip
    if dist.rank:
        # Each rank its own draws of dropout masks and NEFTune noise (the weights are rank
        # 0's, broadcast by DDP and FSDP): seeded alike, every rank drew rank 0's noise for as
        # long as their batches had one shape (for good under compile's fixed width).
        random.seed(cfg.train.seed + dist.rank)
        torch.manual_seed(cfg.train.seed + dist.rank)
    own = numerics(cfg, device, model)
    if resume_from is not None:
        progress = load_state(
            resume_from, model=model, optimizer=optimizer, scheduler=scheduler, rank=dist.rank,
            world_size=dist.world_size, scaler=scaler,
        )  # fmt: skip
        stream.seek(progress.epoch, progress.position)
        log.info("resumed from %s at step %d", resume_from, progress.step)
        warn_of_other_numerics(progress.final.get(NUMERICS), own, resume_from)
        progress.final[NUMERICS] = own
    else:
        trainable, total = count_parameters(model)
        progress = Progress(
            final={"trainable_params": trainable, "total_params": total, NUMERICS: own}
        )
        # LoRA starts with B = 0 and full FT with the base weights: the model *is* the base.
        if cfg.train.eval_base and data.eval:
            generates = cfg.train.exact_match and convs
            names = ("eval_loss", "exact_match") if generates else ("eval_loss",)
            base, _ = evaluate(final=True, only=names)
            for name, value in base.items():
                progress.final[f"base_{name}"] = value
            log.info("base model: %s", "  ".join(f"{k} {v:.4f}" for k, v in base.items()))
            if fsdp.is_sharded(model):
                # FSDP keeps the root's parameters (embeddings, head) gathered after a forward
                # that no backward follows: back to this worker's shard before training.
                model.reshard()
    return Run(
        cfg, dist, device, autocast, tokenizer, data, model, train_model, neftune, optimizer,
        scheduler, stream, evaluate, progress, t0, data_digests=digests, scaler=scaler,
    )  # fmt: skip


# Fault injection for tests of the search's failure handling: ``path=value`` (e.g.
# ``lora.r=8``) makes the first optimizer step of every trial whose config has that value raise
# the out-of-memory error a real one would.
INJECT_OOM_ENV = "RAYSFT_INJECT_OOM"


def _injected_oom(cfg: Config) -> None:

    rule = os.environ.get(INJECT_OOM_ENV, "")
    path, _, value = rule.partition("=")
    if path and get_path(cfg, path) == parse_value(value):
        raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={rule}")


def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; returns its step metrics."""

    cfg = run.cfg
    _injected_oom(cfg)
    micro = [next(run.stream) for _ in range(cfg.train.grad_accum)]
    # Mean over every token the loss scores in the step, on every rank: not a mean of
    # micro-batch means, nor of per-rank means.
    local_tokens = sum(int(loss_mask(b["labels"], b["position_ids"]).sum()) for b in micro)
    n_tokens = max(sum_over_ranks(run.dist, run.device, float(local_tokens))[0], 1.0)
    # DDP averages gradients over ranks; scaling each rank's loss by world_size turns that
    # average back into the sum over all ranks' tokens.
    scale = run.dist.world_size / n_tokens
    step_loss = 0.0
    for i, batch in enumerate(micro):
        if run.neftune is not None:
            run.neftune.set_lengths(batch["seg_lens"].to(run.device))
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        with fsdp.gradient_sync(run.train_model, i == len(micro) - 1):
            with run.autocast():
                loss_sum, _ = forward_loss(run.train_model, batch, run.device)
            scaled = loss_sum * scale
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        step_loss += float(loss_sum.detach())
    real = sum(int((b["seg_lens"] > 0).sum()) for b in micro)  # not padding
    step_loss, real_tokens = sum_over_ranks(run.dist, run.device, step_loss, float(real))
    step_loss /= n_tokens
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients
    # The norm before clipping, as TRL and the HF Trainer log it (clip_grad_norm_ in two parts).
    params = [p for p in run.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if cfg.train.max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.train.max_grad_norm, norm)
    if hasattr(norm, "full_tensor"):  # FSDP's sharded parameters: a DTensor
        norm = norm.full_tensor()
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses, before the scheduler moves
    stepped = True
    if run.scaler is not None:
        scale = run.scaler.get_scale()
        run.scaler.step(run.optimizer)  # skipped when a gradient overflowed fp16
        run.scaler.update()
        # A skipped step lowers the scale; the schedule waits for a step that was taken (as
        # accelerate does), or overflows at the start would use up the warmup.
        stepped = run.scaler.get_scale() >= scale
    else:
        run.optimizer.step()
    if stepped:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {
        "train_loss": round(step_loss, 6),
        "lr": lr,
        "tokens": int(real_tokens),  # of every rank: the step's
        "grad_norm": round(float(norm), 6),  # inf or NaN on a step an fp16 overflow skips
    }


_GEN_BATCH = 32  # prompts per generate() call (search/memory.py plans for it: GEN_BATCH)
_PHASES = ("setup_s", "step_s", "eval_s", "checkpoint_s")  # Run.times' keys


def train(run: Run, report: Reporter | None) -> None:
    """Optimizer steps from the run's progress to ``max_steps``; eval + checkpoint every
    ``eval_every`` steps and at the last one."""
    cfg, progress = run.cfg, run.progress
    if progress.history and report is not None:
        # Resumed: say the checkpoint's record again, carrying the records before it. A search
        # driver that died may never have heard the last few (the trial would miss those evals
        # in MLflow, or, resumed at max_steps, end as stopped early). One report, not one per
        # record: Ray Train takes a report per controller poll (2 s). The MLflow callback logs
        # the steps it has not logged yet and drops the rest. The checkpoint's record is the
        # last (a checkpoint is written at an eval, after its record).
        *earlier, restored = progress.history
        report({**restored, REPLAYED: earlier} if earlier else restored, None)
    run.model.train()
    t_train = time.perf_counter()
    times = run.times
    # A resumed run's time up to its checkpoint counts too (what ran after it is done again).
    before = progress.seconds
    times.update({k: v for k, v in before.items() if k in _PHASES})
    # The steps' records since the last report, carried by the next one (``REPLAYED``): Tune
    # hears a trial at its evals, MLflow gets every step's records (train_loss, lr, ...).
    between: list[dict[str, Any]] = []
    times["setup_s"] = times.get("setup_s", 0.0) + t_train - run.t0
    run.t0 -= before.get("elapsed_s", 0.0)
    t_train -= before.get("train_s", 0.0)
    while progress.step < cfg.train.max_steps:
        step = progress.step + 1
        t = time.perf_counter()
        record: dict[str, Any] = {"step": step, **train_step(run)}
        record["epoch"] = round(run.stream.epochs, 4)
        times["step_s"] = times.get("step_s", 0.0) + time.perf_counter() - t
        last = step == cfg.train.max_steps
        progress.step, progress.epoch, progress.position = (
            step,
            run.stream.epoch,
            run.stream.position,
        )
        if not math.isfinite(record["train_loss"]):
            # A non-finite loss has non-finite gradients, and the update just made from them
            # left every weight it touched NaN: nothing is left to evaluate or checkpoint. Every
            # metric an eval would give is reported NaN (a search needs its objective in the
            # report, and stops the trial on it).
            record.update({m.name: math.nan for m in computed_at(cfg, final=True)})
            _stop_diverged(run, record, report, between)
            break
        if _evaluates_at(step, cfg):
            t = time.perf_counter()
            scores, samples = run.evaluate(final=last)
            times["eval_s"] = times.get("eval_s", 0.0) + time.perf_counter() - t
            record.update(scores)
            if not math.isfinite(record.get("eval_loss", 0.0)):  # this step's update did it
                _stop_diverged(run, record, report, between)
                break
            if last:  # for comparison with the base
                for name in ("base_eval_loss", "base_exact_match"):
                    if name in progress.final:
                        record[name] = progress.final[name]
            if samples:
                progress.final["eval_samples"] = samples[:10]
            record["elapsed_s"] = round(time.perf_counter() - run.t0, 2)
            log.info(
                "step %d train_loss %.4f eval_loss %.4f",
                step,
                record["train_loss"],
                record.get("eval_loss", math.nan),
            )
            if last:  # where the time went, up to this (last) checkpoint
                record.update({k: round(v, 3) for k, v in times.items()})
            progress.history.append(record)
            t = time.perf_counter()
            progress.seconds = {
                **{k: round(v, 3) for k, v in times.items()},
                "train_s": round(t - t_train, 3),
                "elapsed_s": record["elapsed_s"],
            }
            _checkpoint(run, {**record, REPLAYED: between} if between else record, report)
            between = []
            times["checkpoint_s"] = times.get("checkpoint_s", 0.0) + time.perf_counter() - t
        else:
            progress.history.append(record)
            between.append(record)
    run.train_seconds = time.perf_counter() - t_train


def _stop_diverged(
    run: Run, record: dict[str, Any], report: Reporter | None, between: list[dict[str, Any]]
) -> None:
    """End training at ``record``'s step, whose loss is not finite: reported without a
    checkpoint (the last finite one stays the latest), with the steps since the last report
    (``between``: the curve up to the divergence), and marked for ``finish``."""
    step = record["step"]
    run.progress.final[DIVERGED_AT] = step
    run.progress.history.append(record)
    log.warning(
        "step %d train_loss %s eval_loss %s: training diverged, stopped (%s)",
        step,
        record["train_loss"],
        record.get("eval_loss", "-"),
        divergence_hint(run.cfg),
    )
    if report is not None:
        report({**record, REPLAYED: between} if between else record, None)


def divergence_hint(cfg: Config) -> str:
    t = cfg.train
    clip = "" if t.max_grad_norm else ", or clip gradients (train.max_grad_norm)"
    which = "warmup_steps" if t.warmup_steps is not None else "warmup_ratio"
    return (
        f"lower train.learning_rate (now {t.learning_rate:g}) or raise train.{which} "
        f"(now {getattr(t, which):g}){clip}"
    )


def _evaluates_at(step: int, cfg: Config) -> bool:
    """Whether ``train`` evaluates, checkpoints and reports at ``step``."""
    return step % cfg.train.eval_every == 0 or step == cfg.train.max_steps


def _checkpoint(run: Run, record: dict[str, Any], report: Reporter | None) -> None:
    """Report ``record`` with a checkpoint (export + training state) written by rank 0."""
    if report is None:
        return
    # A sharded model's full state is gathered to rank 0: a collective, every rank joins.
    full = fsdp.gather(run.model, run.optimizer) if run.dist.sharded else None
    rng = gather_over_ranks(run.dist, rng_states())  # a collective too
    if run.dist.rank != 0:
        report(record, None)
        return
    # Beside where the reporter keeps checkpoints where it says (a run's own folder: no copy
    # through the system's temp folder, which may be small), else in the temp folder (Ray
    # uploads it to the search's storage).
    staging = getattr(report, "staging_dir", None)
    if staging is not None:
        Path(staging).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging)
    give_plain_modes(Path(tmp), [])  # mkdtemp's 0700 would keep a colleague out
    handed_over = False
    try:
        save_model(
            run.model,
            run.tokenizer,
            tmp,
            method=run.cfg.method,
            weights=full[0] if full else None,
            dtype=_export_dtype(run),
            stop_ids=answer_stops(run.cfg.data.template, run.tokenizer)[1],
        )
        # The run's settings travel with its weights: `raysft.evaluate CHECKPOINT` scores with
        # them (template, eval rows) and `--resume-from` checks the config against them.
        (Path(tmp) / CONFIG_FILE).write_text(saved_config_text(run.cfg), encoding="utf-8")
        (Path(tmp) / DATA_FILE).write_text(json.dumps(run.data_digests), encoding="utf-8")
        origin = json.dumps({"working_dir": os.getcwd()})
        (Path(tmp) / ORIGIN_FILE).write_text(origin, encoding="utf-8")
        save_state(
            tmp,
            progress=run.progress,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            full=full,
            rng=rng,
            scaler=run.scaler,
        )
        report(record, tmp)
        handed_over = getattr(report, "takes_checkpoint_dir", False)
    finally:
        if not handed_over:
            shutil.rmtree(tmp, ignore_errors=True)


def finish(run: Run) -> TrialResult:
    """Final metrics; rank 0 writes the adapter (or model), config.yaml and metrics.json."""
    if run.neftune is not None:
        run.neftune.remove()
    final = dict(run.progress.final)
    last = run.progress.history[-1] if run.progress.history else {}
    # Every registry metric the last step reported (final-only ones included), and its step.
    final.update({k: v for k, v in last.items() if k in METRICS or k == "step"})
    if "base_exact_match" in final and "exact_match" in final:
        final["exact_match_gain"] = round(final["exact_match"] - final["base_exact_match"], 4)
    final.update({k: round(v, 3) for k, v in run.times.items()})  # every start's
    if "checkpoint_s" in last:  # as the last eval reported it: all but its own checkpoint,
        final["checkpoint_s"] = last["checkpoint_s"]  # the metric's meaning, summary's, MLflow's
    final["train_seconds"] = round(run.train_seconds, 2)
    final["wall_seconds"] = round(time.perf_counter() - run.t0, 2)
    out_dir = Path(run.cfg.output_dir)
    result = TrialResult(str(out_dir), final, run.progress.history, run.data.report.as_dict())
    diverged = DIVERGED_AT in final
    weights = fsdp.gather(run.model)[0] if run.dist.sharded and not diverged else None
    if run.dist.rank == 0:
        _write_outputs(out_dir, run, result, weights, model=not diverged)
    return result


def _write_outputs(
    out_dir: Path,
    run: Run,
    result: TrialResult,
    weights: dict[str, Any] | None,
    *,
    model: bool = True,
) -> None:
    """The run's outputs; ``model=False`` (a diverged run): config and metrics only, no NaN
    weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if model:
        save_model(
            run.model,
            run.tokenizer,
            str(out_dir),
            method=run.cfg.method,
            weights=weights,
            dtype=_export_dtype(run),
            stop_ids=answer_stops(run.cfg.data.template, run.tokenizer)[1],
        )
    (out_dir / "config.yaml").write_text(saved_config_text(run.cfg), encoding="utf-8")
    metrics = {
        "final": result.final,
        "history": result.history,
        "data": result.data,
        # Where config.yaml's relative paths were read from: raysft.evaluate reads them there.
        "working_dir": os.getcwd(),
    }
    # Strict JSON: a diverged run's NaN/inf metrics are written as null, which every parser reads.
    text = json.dumps(json_safe(metrics), indent=2, ensure_ascii=False, allow_nan=False)
    replace_text(out_dir / "metrics.json", text)  # whole or not at all: it marks a run ended


def run_trial(
    cfg: Config,
    *,
    report: Reporter | None = None,
    dist: Dist | None = None,
    prepare_model: Callable[[Any], Any] | None = None,
    resume_from: str | None = None,
    shared: SharedData | None = None,
) -> TrialResult:
    """Train one config (from ``resume_from``'s step when given); returns its final metrics.
    ``prepare_model`` wraps the model for DDP; ``shared`` is the search's data, read once."""
    run = setup(
        cfg,
        dist=dist or Dist(),
        prepare_model=prepare_model,
        resume_from=resume_from,
        shared=shared,
    )
    train(run, report)
    return finish(run)
