"""Rows -> batches: which samples share a row (packed or one per row), collated batches of rows,
and the endless, resumable stream of training micro-batches (reshuffled every epoch, split
across data-parallel ranks).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from raysft.data.packing import collate_packed, collate_padded, pack
from raysft.data.templates import Example

if TYPE_CHECKING:
    import torch


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
    width: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of the rows ``bins`` in ``order`` (default: as given); packed rows
    padded to ``width`` when given."""
    order = order if order is not None else list(range(len(bins)))
    for s in range(0, len(order), batch_size):
        rows = [
            [(examples[i].input_ids, examples[i].labels) for i in bins[j]]
            for j in order[s : s + batch_size]
        ]
        if packing:
            yield collate_packed(rows, pad_id=pad_id, width=width)
        else:
            yield collate_padded([r[0] for r in rows], pad_id=pad_id)


class BatchStream:
    """Endless training micro-batches, reshuffled every epoch; resumable at (epoch, position).

    Rank r of a ``shard`` (r, world size) takes every world-size-th row of each epoch's order.
    ``fixed_width`` (packing only): every batch has ``batch_size`` rows padded to that width,
    one shape for torch.compile; an epoch's last, partial batch is skipped (its rows come up
    in other epochs, shuffled), unless it is the epoch's only batch.
    """

    def __init__(
        self,
        examples: list[Example],
        bins: list[list[int]],
        *,
        packing: bool,
        batch_size: int,
        pad_id: int,
        seed: int,
        shard: tuple[int, int] = (0, 1),  # (rank, world size)
        fixed_width: int | None = None,
    ):
        if fixed_width is not None and not packing:
            raise ValueError("fixed_width pads packed rows; unpacked rows keep their own width")
        self._examples, self._bins, self._packing = examples, bins, packing
        self._width = fixed_width
        self._batch_size, self._pad, self._seed = batch_size, pad_id, seed
        self._rank, self._world = shard
        self.epoch, self.position = 0, 0
        self._chunks = self._epoch_chunks(0)

    def _epoch_chunks(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self._bins)))
        random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
        mine = order[self._rank :: self._world]
        size = self._batch_size
        chunks = [mine[s : s + size] for s in range(0, len(mine), size)]
        if self._width is not None and len(chunks) > 1 and len(chunks[-1]) < size:
            chunks.pop()
        return chunks

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._chunks = self._epoch_chunks(epoch)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._chunks):
            self.seek(self.epoch + 1, 0)
        chunk = self._chunks[self.position]
        self.position += 1
        rows = batches(
            self._examples,
            self._bins,
            packing=self._packing,
            batch_size=len(chunk),
            pad_id=self._pad,
            order=chunk,
            width=self._width,
        )
        return next(rows)
