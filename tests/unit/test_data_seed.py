"""``data.seed``: the data's own seed (transformers' ``data_seed``): the split, the eval sample and
the batches' order, apart from ``train.seed`` (adapter init, dropout, NEFTune)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import raysft.search.spec as spec_module
from raysft.config import SearchParam, load_config
from raysft.data.batching import make_bins, training_stream
from raysft.data.pipeline import prepare_data
from raysft.errors import ConfigError
from raysft.search.searchable import check_param
from raysft.search.spec import read_spec
from raysft.train.model import training_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _data(cfg: Any) -> tuple[list[list[int]], list[list[int]], list[Any]]:
    """(training rows' ids, eval rows' ids, the first batches' ids) of ``cfg``'s data."""
    data = prepare_data(cfg.data, training_tokenizer(cfg), seed=cfg.data_seed())
    bins = make_bins(data.train, packing=False, max_len=cfg.data.max_seq_len)
    stream = training_stream(cfg, data.train, bins, pad_id=0)
    first = [next(stream)["input_ids"].tolist() for _ in range(3)]
    return [e.input_ids for e in data.train], [e.input_ids for e in data.eval], first


def test_data_seed_fixes_the_split_the_eval_sample_and_the_order_whatever_train_seed() -> None:
    split = {"data.eval": None, "data.eval_fraction": 0.2, "data.max_eval_samples": 50,
             "data.packing": False, "data.seed": 7}  # fmt: skip
    a = load_config(None, {**split, "train.seed": 1})
    b = load_config(None, {**split, "train.seed": 2})
    assert (a.data_seed(), b.data_seed()) == (7, 7)
    assert _data(a) == _data(b)
    # Without it, train.seed seeds the data, as it always did.
    unset = {k: v for k, v in split.items() if k != "data.seed"}
    c = load_config(None, {**unset, "train.seed": 1})
    d = load_config(None, {**unset, "train.seed": 2})
    assert c.data_seed() == 1
    train_c, eval_c, batches_c = _data(c)
    train_d, eval_d, batches_d = _data(d)
    assert eval_c != eval_d and batches_c != batches_d


def test_train_seed_can_be_searched_over_a_split_when_data_seed_holds_the_rows() -> None:
    seeds = SearchParam(type="choice", values=[1, 2, 3])
    split = load_config(None, {"data.eval": None})
    assert "picks the eval rows" in (check_param("train.seed", seeds, {}, split) or "")
    held = load_config(None, {"data.eval": None, "data.seed": 0})
    assert check_param("train.seed", seeds, {}, held) is None


def test_a_search_of_train_seed_over_an_eval_sample_needs_data_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.setattr(spec_module, "local_nodes", lambda: [{"CPU": 8.0, "GPU": 0.0}])
    tree = yaml.safe_load((ROOT / "search_spaces" / "lora.yaml").read_text(encoding="utf-8"))
    tree["search"]["experiment_dir"] = str(tmp_path / "exp")
    tree["search"]["params"] = {"train.seed": {"type": "choice", "values": [1, 2]}}
    tree["data"]["max_eval_samples"] = 50  # of the 100 embedded eval rows: a sample
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        read_spec(str(path), [])
    assert "set data.seed (the data's own seed)" in str(err.value)
    fixed = copy.deepcopy(tree)
    fixed["data"]["seed"] = 0
    path.write_text(yaml.safe_dump(fixed), encoding="utf-8")
    _, spec, shared = read_spec(str(path), [])
    # Every trial takes the driver's data: its rows do not depend on the trial's train.seed.
    trial = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": 2})})
    assert shared is not None and shared.fits(trial)
