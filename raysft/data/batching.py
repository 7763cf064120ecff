"""Rows -> batches: which samples share a row (packed or one per row), collated batches of rows,
and the endless, resumable stream of training micro-batches (reshuffled every epoch, split
across data-parallel ranks).

Three layouts: packed rows (``packing``); one sample per row, padded to the batch's longest
(``batch_size`` rows a batch); and one sample per row grouped by length (``group_tokens``: a
batch takes samples of similar length up to that many tokens, padding included).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from raysft.data.packing import by_length, collate_packed, collate_padded, pack
from raysft.data.tokens import Example

if TYPE_CHECKING:
    import torch

    from raysft.config import Config


def make_bins(examples: list[Example], *, packing: bool, max_len: int) -> list[list[int]]:
    """Example indices of each row: packed (best-fit decreasing) or one per row. Built once."""
    if not packing:
        return [[i] for i in range(len(examples))]
    return pack([e.n_tokens for e in examples], max_len=max_len)


# A training epoch is grouped by length in windows of this many batches' worth of tokens, taken
# in shuffled order (as transformers' group_by_length sorts megabatches of 50 batches): batches
# are of similar length, yet which samples share one still changes from epoch to epoch.
_GROUP_WINDOW = 32


def _collate(
    examples: list[Example],
    bins: list[list[int]],
    chunk: list[int],
    *,
    packing: bool,
    causal: bool,
    pad_id: int,
    width: int | None,
) -> dict[str, torch.Tensor]:
    """One batch: the rows ``chunk`` (indices into ``bins``)."""
    rows = [[(examples[i].input_ids, examples[i].labels) for i in bins[j]] for j in chunk]
    if packing:
        return collate_packed(rows, pad_id=pad_id, width=width)
    return collate_padded([r[0] for r in rows], pad_id=pad_id, causal=causal)


def _row_lengths(examples: list[Example], bins: list[list[int]], rows: list[int]) -> list[int]:
    return [sum(examples[i].n_tokens for i in bins[j]) for j in rows]


def batches(
    examples: list[Example],
    bins: list[list[int]],
    *,
    packing: bool,
    batch_size: int,
    pad_id: int,
    order: list[int] | None = None,
    width: int | None = None,
    group_tokens: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of the rows ``bins`` in ``order`` (default: as given); packed rows
    padded to ``width`` when given. ``group_tokens`` (unpacked rows): batches of similar
    length, shortest first, of at most that many tokens instead of ``batch_size`` rows."""
    order = order if order is not None else list(range(len(bins)))
    if group_tokens is not None:
        lengths = _row_lengths(examples, bins, order)
        chunks = [[order[k] for k in c] for c in by_length(lengths, tokens=group_tokens)]
    else:
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for chunk in chunks:
        yield _collate(
            examples, bins, chunk, packing=packing, causal=group_tokens is not None,
            pad_id=pad_id, width=width,
        )  # fmt: skip


class BatchStream:
    """Endless training micro-batches, reshuffled every epoch; resumable at (epoch, position).

    Rank r of a ``shard`` (r, world size) takes every world-size-th row of each epoch's order,
    cut to a multiple of the world size: every rank has as many batches per epoch as the others.
    ``fixed_width`` (packing only): every batch has ``batch_size`` rows padded to that width,
    one shape for torch.compile; an epoch's last, partial batch is skipped (its rows come up
    in other epochs, shuffled), unless it is the epoch's only batch.
    ``group_tokens`` (unpacked only): each batch holds rows of similar length, up to that many
    tokens padded (``by_length`` within windows of ``_GROUP_WINDOW`` batches' worth of tokens of
    the shuffled order); the epoch's batches are then shuffled again and dealt out to the ranks.
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
        group_tokens: int | None = None,
    ):
        if fixed_width is not None and not packing:
            raise ValueError("fixed_width pads packed rows; unpacked rows keep their own width")
        if group_tokens is not None and packing:
            raise ValueError("group_tokens groups unpacked rows by length; packed rows are full")
        self._examples, self._bins, self._packing = examples, bins, packing
        self._width, self._group = fixed_width, group_tokens
        self._batch_size, self._pad, self._seed = batch_size, pad_id, seed
        self._rank, self._world = shard
        self.epoch, self.position = 0, 0
        self._chunks = self._epoch_chunks(0)

    def _epoch_chunks(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self._bins)))
        rng = random.Random(self._seed * 1_000_003 + epoch)
        rng.shuffle(order)
        if self._group is not None:
            # Grouped over all rows, then dealt out: every rank gets as many batches as the
            # others, so one (epoch, position) resumes them all. The few rows of the chunks left
            # over come up in other epochs.
            chunks = self._grouped(order, self._group, rng)
            if len(chunks) < self._world:
                chunks = [[r] for r in order]
            return chunks[: len(chunks) - len(chunks) % self._world][self._rank :: self._world]
        # Every rank the same number of rows (the few left over come up in other epochs), so
        # every rank the same number of batches: the epochs of all ranks end at the same step,
        # and rank 0's (epoch, position) in a checkpoint resumes them all.
        mine = order[: len(order) - len(order) % self._world][self._rank :: self._world]
        size = self._batch_size
        chunks = [mine[s : s + size] for s in range(0, len(mine), size)]
        if self._width is not None and len(chunks) > 1 and len(chunks[-1]) < size:
            chunks.pop()
        return chunks

    def _grouped(self, rows: list[int], tokens: int, rng: random.Random) -> list[list[int]]:
        lengths = _row_lengths(self._examples, self._bins, rows)
        chunks: list[list[int]] = []
        start, filled = 0, 0
        for k, n in enumerate(lengths):
            filled += n
            if filled >= _GROUP_WINDOW * tokens or k == len(rows) - 1:
                window = rows[start : k + 1]
                groups = by_length(lengths[start : k + 1], tokens=tokens)
                chunks += [[window[g] for g in group] for group in groups]
                start, filled = k + 1, 0
        rng.shuffle(chunks)  # else every window would run short batches first
        return chunks

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._chunks = self._epoch_chunks(epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches of this rank in the current epoch (grouped by length: it may vary)."""
        return len(self._chunks)

    @property
    def epochs(self) -> float:
        """Epochs run so far: whole ones, and the share of the current one its batches taken."""
        return self.epoch + self.position / len(self._chunks)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._chunks):
            self.seek(self.epoch + 1, 0)
        chunk = self._chunks[self.position]
        self.position += 1
        return _collate(
            self._examples, self._bins, chunk, packing=self._packing,
            causal=self._group is not None, pad_id=self._pad, width=self._width,
        )  # fmt: skip


def group_by_length_tokens(cfg: Config) -> int | None:
    """Tokens per micro-batch (padding included) of ``data.group_by_length``: those of a batch of
    packed rows, ``train.batch_size`` x ``data.max_seq_len``; None when off."""
    return cfg.train.batch_size * cfg.data.max_seq_len if cfg.data.group_by_length else None


def training_stream(
    cfg: Config,
    examples: list[Example],
    bins: list[list[int]],
    *,
    pad_id: int,
    shard: tuple[int, int] = (0, 1),
) -> BatchStream:
    """The training micro-batches of ``cfg``'s rows for rank ``shard[0]`` of ``shard[1]``."""
    return BatchStream(
        examples,
        bins,
        packing=cfg.data.packing,
        batch_size=cfg.train.batch_size,
        pad_id=pad_id,
        seed=cfg.data_seed(),
        shard=shard,
        fixed_width=cfg.data.max_seq_len if cfg.train.compile and cfg.data.packing else None,
        group_tokens=group_by_length_tokens(cfg),
    )
