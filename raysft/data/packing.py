"""Sequence packing: bin packing of samples into rows, collation and the matching loss.

A packed row holds several samples back to back. Each sample's ``position_ids`` restart at 0, and
the model is called WITHOUT an ``attention_mask`` and with ``use_cache=False``: only then does
transformers (5.x, ``masking_utils._preprocess_mask_arguments``) derive a block-diagonal causal
mask from the position resets, for eager, sdpa and flex_attention alike. With a mask of ones or
a cache the samples silently attend to each other.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF) skips

Sample = tuple[list[int], list[int]]  # (input_ids, labels)
_PACKED_KEYS = ("input_ids", "labels", "position_ids", "seg_lens")


def pack(lengths: list[int], *, max_len: int) -> list[list[int]]:
    """Best-fit-decreasing: sample indices grouped into bins of at most ``max_len`` tokens.

    Longest first; each sample goes to the open bin with the least room that still fits it (ties:
    the oldest bin), else to a new bin. Ties between equal lengths go by index, so the result is
    deterministic. O(n log n) searches via bisect over the sorted remaining capacities.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    for i, length in enumerate(lengths):
        if not 1 <= length <= max_len:
            raise ValueError(
                f"sample {i} has length {length}; every length must be in 1..{max_len}"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (remaining capacity, bin index), kept sorted: the first entry >= (length, -1) is the best fit.
    free: list[tuple[int, int]] = []
    for i in order:
        length = lengths[i]
        pos = bisect.bisect_left(free, (length, -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = max_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - length > 0:
            bisect.insort(free, (room - length, b))
    return bins


def packing_efficiency(lengths: list[int], bins: list[list[int]], *, max_len: int) -> float:
    """Real tokens / (rows * max_len); 0.0 for no rows."""
    if not bins:
        return 0.0
    real = sum(lengths[i] for b in bins for i in b)
    return real / (len(bins) * max_len)


def _check_sample(ids: list[int], labels: list[int]) -> None:
    if len(ids) != len(labels):
        raise ValueError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
    if not ids:
        raise ValueError("empty sample")


def collate_packed(
    rows: list[list[Sample]], *, pad_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Packed rows -> ``input_ids``, ``labels``, ``position_ids``, ``seg_lens`` (all [B, T]).

    Positions restart at 0 per sample; padding (label -100, seg_len 0) gets its own positions
    from 0 so it is a separate segment. No ``attention_mask``: its presence disables the
    per-sample mask in transformers. T is the longest row, or ``width`` when given (one shape
    for every batch, for torch.compile).
    """
    import torch

    flat: list[tuple[list[int], list[int], list[int], list[int]]] = []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        for s_ids, s_labels in row:
            _check_sample(s_ids, s_labels)
            ids += s_ids
            labels += s_labels
            pos += range(len(s_ids))
            seg += [len(s_ids)] * len(s_ids)
        flat.append((ids, labels, pos, seg))
    longest = max((len(f[0]) for f in flat), default=0)
    if width is not None and longest > width:
        raise ValueError(f"a packed row of {longest} tokens is over the width {width}")
    width = width if width is not None else longest
    out: dict[str, list[list[int]]] = {k: [] for k in _PACKED_KEYS}
    for ids, labels, pos, seg in flat:
        pad = width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(labels + [IGNORE_INDEX] * pad)
        out["position_ids"].append(pos + list(range(pad)))
        out["seg_lens"].append(seg + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long).reshape(len(flat), width) for k, v in out.items()}


def collate_padded(
    samples: list[Sample], *, pad_id: int, causal: bool = False
) -> dict[str, torch.Tensor]:
    """Unpacked batch, one sample per row, right-padded; padding has label -100 and seg_len 0,
    so it is neither scored nor counted as real.

    Default: an ``attention_mask`` (0 on padding), and padding at position 0, so even without
    the mask each pad token is its own segment.

    ``causal=True``: NO ``attention_mask``, and ``position_ids`` 0..T-1 in every row, padding
    included. Each row holds one sample at its start, so under causal attention no real token
    sees the padding after it, and the mask can go: transformers then finds no packed rows
    (positions never restart) and calls sdpa with ``is_causal`` and no mask tensor. The
    padding's logits are never read.
    """
    import torch

    for s_ids, s_labels in samples:
        _check_sample(s_ids, s_labels)
    width = max((len(ids) for ids, _ in samples), default=0)
    keys = ("input_ids", "labels", "seg_lens") if causal else (*_PACKED_KEYS, "attention_mask")
    out: dict[str, list[list[int]]] = {k: [] for k in keys}
    for ids, labels in samples:
        n, pad = len(ids), width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(labels + [IGNORE_INDEX] * pad)
        out["seg_lens"].append([n] * n + [0] * pad)
        if not causal:
            out["attention_mask"].append([1] * n + [0] * pad)
            out["position_ids"].append(list(range(n)) + [0] * pad)
    n_rows = len(samples)
    batch = {k: torch.tensor(v, dtype=torch.long).reshape(n_rows, width) for k, v in out.items()}
    if causal:
        batch["position_ids"] = torch.arange(width).expand(n_rows, width).contiguous()
    return batch


def by_length(lengths: list[int], *, tokens: int) -> list[list[int]]:
    """Indices into ``lengths`` cut into batches of similar length: ascending, each batch as
    many as fit in ``tokens`` once padded to its longest (rows x longest <= tokens). A sample
    longer than ``tokens`` is a batch of its own. Ties keep the given order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:  # ascending, so the newcomer sets the batch's width
        if cur and (len(cur) + 1) * lengths[i] > tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def loss_mask(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: the targets the loss scores (trained, and not a packed sample's first token).

    A target whose position id is 0 starts a new packed sample and is never predicted from the
    previous sample's last token.
    """
    return (labels[:, 1:] != IGNORE_INDEX) & (position_ids[:, 1:] != 0)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (fp32) and the number of trained tokens.

    Token t+1 is predicted from logits t, over the targets of ``loss_mask``. The caller divides
    the sum by the count over all gradient-accumulation micro-batches.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = loss_mask(labels, position_ids)
    # Select first, then upcast: avoids an fp32 copy of the full [B, T, V] logits.
    picked = logits[:, :-1][keep].float()
    loss = F.cross_entropy(picked, targets[keep], reduction="sum")
    return loss, int(keep.sum())
