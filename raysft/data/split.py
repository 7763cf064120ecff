"""A seeded split of training conversations into training and held-out ones (``data.eval: null``),
copies of one conversation kept on one side."""

from __future__ import annotations

import random

from raysft.data.formats import Conversation
from raysft.errors import DataError


def split_train_eval(
    conversations: list[Conversation], *, eval_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded split; each side gets at least one conversation. Copies of one conversation (the
    same roles and texts) go to the same side, so no held-out row is also a training row, and
    the held-out side is at most ``eval_fraction`` (a conversation with more copies than that
    stays in training; the one with fewest copies where all have more). With no copies the
    split is the first ``eval_fraction`` of a seeded shuffle."""
    if len(conversations) < 2:
        raise DataError(
            f"data.eval is null: need at least 2 conversations to split off an eval set, "
            f"have {len(conversations)}"
        )
    copies: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, conv in enumerate(conversations):
        copies.setdefault(_content(conv), []).append(i)
    if len(copies) < 2:
        raise DataError(
            f"data.eval is null: all {len(conversations)} conversations are the same, so none "
            f"can be held out without also being trained on"
        )
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    # Both sides non-empty, whatever the fraction.
    n_eval = min(len(order) - 1, max(1, round(len(order) * eval_fraction)))
    held: set[int] = set()
    for i in order:
        if len(held) >= n_eval:
            break
        group = copies[_content(conversations[i])]
        if i in held or len(held) + len(group) > n_eval:
            continue  # taken with an earlier copy, or more copies than the fraction has room for
        held.update(group)
    if not held:  # every conversation has more copies than the fraction: the fewest, then
        fewest = min(copies.values(), key=lambda ids: (len(ids), order.index(ids[0])))
        held.update(fewest)
    train = [c for i, c in enumerate(conversations) if i not in held]
    evals = [c for i, c in enumerate(conversations) if i in held]
    return train, evals


def _content(conv: Conversation) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in conv)
