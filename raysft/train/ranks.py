"""A trial's data-parallel group as the recipe sees it (``Dist``), and the evals its workers
share: each scores its share of the eval rows, answers, and code tests, and every worker gets
the whole (sums all-reduced, answers and results gathered back in the rows' order)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from raysft.train.evaluate import in_row_order
from raysft.train.sandbox import Limits, check_answers


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a data-parallel group (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    sharded: bool = False  # FSDP: parameters, gradients and optimizer state split over ranks


def sum_over_ranks(group: Dist, device: Any, *values: float) -> list[float]:
    """Each of ``values`` summed over the data-parallel group (as given when run alone)."""
    if group.world_size == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_over_ranks(group: Dist, value: Any) -> list[Any]:
    """``value`` of every rank of the data-parallel group, in rank order (``[value]`` alone)."""
    if group.world_size == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, value)
    return out


def loss_of_all_ranks(
    loss: Callable[[], tuple[float, int]], *, dist: Dist, device: Any
) -> tuple[float, int]:
    """The eval loss sum and token count of every rank's share of the eval rows, added up."""
    total, count = sum_over_ranks(dist, device, *loss())
    return total, int(count)


def answers_of_all_ranks(
    answers: Callable[..., list[dict[str, Any]]],
    *,
    dist: Dist,
    rows: int,
    batch_size: int,
    **decoding: Any,
) -> list[dict[str, Any]]:
    """Every rank's answers to its share of the ``rows`` eval conversations (rank r answers
    batches r, r + W, ... of ``batch_size``), put back in the rows' order: every rank gets them
    all."""
    shares = gather_over_ranks(dist, answers(**decoding))
    return in_row_order(shares, rows=rows, batch_size=batch_size)


def checks_of_all_ranks(
    problems: list[tuple[list[str], str]], *, limits: Limits, dist: Dist
) -> list[list[bool]]:
    """``check_answers`` of every problem, rank r running problems r, r + W, ... in its
    sandbox (a program each, up to ``eval.code_timeout_s``), gathered back in order: every
    rank gets all."""
    mine = check_answers(problems[dist.rank :: dist.world_size], limits=limits)
    return in_row_order(gather_over_ranks(dist, mine), rows=len(problems), batch_size=1)
