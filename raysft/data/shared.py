"""A search's data, read and tokenized once by its driver and handed to every trial.

Every trial of a search reads the same data: spec validation refuses searching ``data.*`` (but
``data.packing`` and ``data.group_by_length``, which batch the rows after tokenization) and the
model's path and revision (its tokenizer), and ``train.seed`` where it picks the eval rows. The
driver already reads and tokenizes all of it before Ray starts (preflight), so it puts that in
Ray's object store and each trial's workers take it from there instead of reading, hashing and
tokenizing the sources again: on a large dataset that is seconds to minutes of every trial's
start (``benchmarks/RESULTS.md``), and the workers need no copy of the data files.

A worker takes it only when its own config would tokenize the same (``SharedData.fits``: the
key below), and otherwise reads the data itself as before. Pure Python, no torch or Ray.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raysft.config import Config
from raysft.data.digest import TOKENS, Digests, data_digests, token_digests
from raysft.data.formats import Conversation, load_conversations
from raysft.data.pipeline import PreparedData, prepare_data

# Data settings that batch the tokenized rows (raysft.data.batching), not what they hold.
_BATCHING = {"packing", "group_by_length"}


def data_key(cfg: Config, *, seed_matters: bool) -> str:
    """Everything that decides what ``prepare_data`` returns for ``cfg``: the data settings,
    the tokenizer, and the seed where it picks the eval rows (``seed_matters``)."""
    return json.dumps(
        {
            "data": cfg.data.model_dump(mode="json", exclude=_BATCHING),
            "tokenizer": [cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code],
            "seed": cfg.data_seed() if seed_matters else None,
        },
        sort_keys=True,
    )


@dataclass(frozen=True)
class SharedData:
    key: str
    seed_matters: bool
    # The PreparedData, pickled: the driver keeps a few bytes a token for the whole search, not
    # Python's objects (several times more), and a trial it does not fit never unpickles it.
    payload: bytes
    digests: Digests  # data_digests of the sources it was read from, with their TOKENS

    def fits(self, cfg: Config) -> bool:
        """Whether ``cfg`` would read and tokenize exactly this."""
        return self.key == data_key(cfg, seed_matters=self.seed_matters)

    def prepared(self) -> PreparedData:
        """A fresh copy of the data, the caller's own."""
        data: PreparedData = pickle.loads(self.payload)
        return data


def read_once(
    cfg: Config,
    tokenizer: Any,
    *,
    seed_searched: bool,
    check_eval: Callable[[list[Conversation]], object] | None = None,
) -> SharedData:
    """``cfg``'s data read and tokenized as a trial's setup does it (the sources' digests
    first, as there: a file edited meanwhile then fails a resume's check, never passes it).
    ``check_eval``: called with the held-out conversations generation would score.

    Without a searched ``train.seed`` every trial has the spec's, so the key keeps it; with one,
    it is in the key only where it picks the eval rows (read again to count them)."""
    digests = data_digests(cfg.data)
    prepared = prepare_data(cfg.data, tokenizer, seed=cfg.data_seed())
    digests[TOKENS] = token_digests(prepared)
    if check_eval is not None:
        check_eval(prepared.eval_conversations)
    seed_matters = train_seed_picks_eval_rows(cfg) if seed_searched else True
    payload = pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL)
    return SharedData(data_key(cfg, seed_matters=seed_matters), seed_matters, payload, digests)


def train_seed_picks_eval_rows(cfg: Config) -> bool:
    """Whether ``train.seed`` selects which rows are scored: it seeds the data (no
    ``data.seed``), and ``seed_picks_eval_rows``."""
    return cfg.data.seed is None and seed_picks_eval_rows(cfg)


def seed_picks_eval_rows(cfg: Config) -> bool:
    """Whether the data's seed (``Config.data_seed``) selects which rows are scored: it splits
    the eval set off ``data.train`` (``data.eval: null``), or it samples
    ``data.max_eval_samples`` of more rows.

    Counts the eval source's usable rows the way the data pipeline does before sampling.
    """

    d = cfg.data
    if d.eval is None:
        return True
    if d.max_eval_samples is None:
        return False
    held = load_conversations(
        d.eval, role="eval", fmt=d.format, on_error=d.on_error, system_prompt=d.system_prompt
    )
    return len(held.conversations) > d.max_eval_samples
