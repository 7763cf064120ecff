"""``train.epochs``: a run's length in passes over its training rows, resolved into
``train.max_steps`` once the data is read.

Everything else counts optimizer steps (the schedule, evals, checkpoints, resume, ASHA's
horizon, a trial's finished status), so the epochs are turned into steps once, where the data is
first read: the train CLI before its checks, the search's driver after its preflight, and a
trial's setup for a config that reaches it unresolved. The resolved config (``epochs`` null,
``max_steps`` the steps) is the one the run saves, so a resume, ``raysft.evaluate`` and the
trials read a plain step count. An epoch is as many micro-batches as one worker's stream deals
in its first epoch (``raysft.data.batching``: packed or padded rows, or batches grouped by
length, whose count can differ a little from epoch to epoch), over ``train.grad_accum``.
Pure Python, no torch.
"""

from __future__ import annotations

import logging
import math
from typing import TypeVar

from raysft.config import Config
from raysft.config.fields import MAX_INT
from raysft.config.rules import broken_rules
from raysft.data.batching import make_bins, training_stream
from raysft.data.tokens import Example
from raysft.errors import ConfigError

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Config)  # a run's Config, or a search's SearchSpec


def micro_batches_per_epoch(
    cfg: Config, examples: list[Example], bins: list[list[int]] | None = None, *, world_size: int
) -> int:
    """Micro-batches one of ``world_size`` workers takes in the first epoch of ``cfg``'s
    training rows (``bins``: the rows, built here when not given)."""
    if bins is None:
        bins = make_bins(examples, packing=cfg.data.packing, max_len=cfg.data.max_seq_len)
    return training_stream(cfg, examples, bins, pad_id=0, shard=(0, world_size)).batches_per_epoch


def resolve_epochs(
    cfg: C,
    examples: list[Example],
    bins: list[list[int]] | None = None,
    *,
    world_size: int,
    source: str = "config",
) -> C:
    """``cfg`` with ``train.epochs`` turned into ``train.max_steps`` (unchanged without it).

    Raises ``ConfigError`` (naming ``source``) where the steps break a rule of ``max_steps``
    (one step with warmup)."""
    epochs = cfg.train.epochs
    if epochs is None:
        return cfg
    micro = micro_batches_per_epoch(cfg, examples, bins, world_size=world_size)
    per_epoch = micro / cfg.train.grad_accum
    # 1e-9: 3 epochs of 10/3 steps each is 10 steps, not 11 by a rounding error.
    steps = max(1, math.ceil(epochs * per_epoch - 1e-9))
    if steps > MAX_INT:  # model_copy validates nothing: as train.max_steps itself would be
        raise ConfigError(
            source,
            [f"train.epochs: {epochs:g} is {steps:,} optimizer steps of this data, more than "
             f"train.max_steps takes ({MAX_INT:,})"],
        )  # fmt: skip
    train = cfg.train.model_copy(update={"epochs": None, "max_steps": steps})
    resolved = cfg.model_copy(update={"train": train})
    said = (
        f"train.epochs {epochs:g} is {steps:,} optimizer step(s) of this data (one epoch: "
        f"{micro:,} micro-batches per worker, {per_epoch:.4g} optimizer steps with "
        f"train.grad_accum {cfg.train.grad_accum})"
    )
    broken = broken_rules(resolved)
    problems = [f"{said}: {msg}" for reads, msg in broken if "train.max_steps" in reads]
    if problems:
        raise ConfigError(source, problems)
    log.info("%s", said)
    return resolved
