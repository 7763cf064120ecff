"""The data a search's driver reads once and hands to its trials (raysft.data.shared)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from raysft.config import Config, load_config
from raysft.data.digest import DATA_FILE, TOKENS
from raysft.data.shared import read_once
from raysft.train.model import training_tokenizer
from raysft.train.recipe import run_trial
from raysft.train.state import LocalCheckpoints

ROWS = [{"instruction": "Upper case", "input": f"w{i}", "output": f"W{i}"} for i in range(24)]
EVAL = [{"instruction": "Upper case", "input": f"e{i}", "output": f"E{i}"} for i in range(8)]


@pytest.fixture(autouse=True)
def _data(tmp_path: Path) -> None:
    for name, rows in (("rows.jsonl", ROWS), ("eval.jsonl", EVAL)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")


def _config(tmp_path: Path, **extra: Any) -> Config:
    overrides = {
        "data.train": str(tmp_path / "rows.jsonl"),
        "data.eval": str(tmp_path / "eval.jsonl"),
        "data.max_seq_len": 96,
        "train.max_steps": 4,
        "train.eval_every": 2,
        "train.batch_size": 2,
        "train.max_new_tokens": 4,
        "train.num_threads": 1,
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    return load_config(None, overrides)


def _learned(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's history without its timings (``elapsed_s``, ``eval_s``, ...)."""
    return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]


@pytest.mark.parametrize(
    ("change", "fits"),
    [
        ({}, True),
        ({"data.packing": False}, True),  # batches the tokenized rows: same data
        ({"data.packing": False, "data.group_by_length": True}, True),
        ({"train.learning_rate": 1e-3, "lora.r": 4}, True),
        ({"train.seed": 7}, True),  # picks no eval row: 8 rows, none sampled
        ({"data.max_seq_len": 64}, False),
        ({"data.system_prompt": "Be brief."}, False),
        ({"data.template": "llama2"}, False),
        ({"model.revision": "main"}, False),
    ],
)
def test_a_trial_takes_the_drivers_data_only_where_it_would_read_the_same(
    tmp_path: Path, change: dict[str, Any], fits: bool
) -> None:
    cfg = _config(tmp_path)
    shared = read_once(cfg, training_tokenizer(cfg), seed_searched=True)
    assert not shared.seed_matters
    assert shared.fits(_config(tmp_path, **change)) is fits


def test_without_a_searched_seed_the_key_keeps_the_specs(tmp_path: Path) -> None:
    cfg = _config(tmp_path)  # every trial has the spec's seed: the eval file is not read again
    shared = read_once(cfg, training_tokenizer(cfg), seed_searched=False)
    assert shared.seed_matters and shared.fits(cfg)
    assert not shared.fits(_config(tmp_path, **{"train.seed": 7}))


def test_a_seed_that_samples_the_eval_rows_is_part_of_the_key(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"data.max_eval_samples": 4})  # 4 of 8 eval rows, by train.seed
    shared = read_once(cfg, training_tokenizer(cfg), seed_searched=True)
    assert shared.seed_matters
    assert shared.fits(_config(tmp_path, **{"data.max_eval_samples": 4}))
    assert not shared.fits(_config(tmp_path, **{"data.max_eval_samples": 4, "train.seed": 7}))


def test_a_trial_on_the_drivers_data_trains_as_on_its_own_and_reads_no_file(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path)
    # As a worker gets it from Ray's object store: pickled, a copy of the driver's.
    shared = pickle.loads(
        pickle.dumps(read_once(cfg, training_tokenizer(cfg), seed_searched=False))
    )
    own = run_trial(cfg, report=LocalCheckpoints(tmp_path / "own"))
    for name in ("rows.jsonl", "eval.jsonl"):  # the worker's node need not have them
        (tmp_path / name).rename(tmp_path / f"{name}.away")
    taken = run_trial(
        _config(tmp_path, output_dir=str(tmp_path / "out-shared")),
        shared=shared,
        report=LocalCheckpoints(tmp_path / "taken"),
    )
    # Its checkpoints record the same sources and token ids as a trial that read its own, so
    # either resumes the other's (``check_same_tokens``).
    records = [
        json.loads((d / "step-000004" / DATA_FILE).read_text())
        for d in (tmp_path / "own", tmp_path / "taken")
    ]
    assert records[0] == records[1] and set(records[0][TOKENS]) == {"train", "eval"}
    assert _learned(taken.history) == _learned(
        own.history
    )  # every loss, eval and learning rate, step by step
    assert taken.data == own.data  # the data report too (rows read, packing efficiency)
    assert shared.prepared().report.packing_efficiency is None  # the trial's copy got it
    with pytest.raises(Exception, match="rows.jsonl"):  # without it the trial reads the file
        run_trial(_config(tmp_path, output_dir=str(tmp_path / "out-own")))


def test_a_trial_whose_data_differs_reads_its_own(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    shared = read_once(cfg, training_tokenizer(cfg), seed_searched=False)
    change = {"data.system_prompt": "Be brief."}  # in every row's tokens
    other = _config(tmp_path, **change)
    assert not shared.fits(other)
    taken = run_trial(other, shared=shared)
    own = run_trial(_config(tmp_path, **change, output_dir=str(tmp_path / "o")))
    assert _learned(taken.history) == _learned(own.history)
    assert taken.data == own.data
    assert taken.data["train_tokens"] > shared.prepared().report.train_tokens


def test_token_digests_are_those_of_the_ids_as_written_before_they_were_arrays() -> None:
    # Checkpoints and searches record these digests (data.json, raysft_state.json); the hex
    # below is what raysft gave while samples were lists of ints (b3b7bce): a change of how
    # samples are held must not make every earlier checkpoint refuse to resume.
    from raysft.data.digest import _samples_digest
    from raysft.data.tokens import Example

    samples = [Example([1, 300, 70000], [-100, 300, 70000], False), Example([5], [5], True)]
    assert _samples_digest(samples) == (
        "30507f0d50939460f3fd3839a6387be05461be98c502cf2dbd17240ff2a77781"
    )


def test_the_drivers_data_unpickles_at_about_four_bytes_a_token() -> None:
    # Every trial's worker unpickles the search's data and keeps it for the whole trial: as
    # Python lists that is a pointer and an int object per token (about 36 bytes), 9x this.
    import tracemalloc

    from raysft.data.tokens import Example

    n, length = 2000, 100
    samples = [
        Example(range(1000 + i, 1000 + i + length), [-100] * 40 + list(range(60)), False)
        for i in range(n)
    ]
    assert samples[1].input_ids[:2] == [1001, 1002] and samples[1].n_trained == 60
    payload = pickle.dumps(samples, protocol=pickle.HIGHEST_PROTOCOL)
    tracemalloc.start()
    try:
        again = pickle.loads(payload)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert again == samples
    tokens = 2 * n * length  # ids and labels
    # 4 bytes a token, and each sample's three objects (~300 bytes over its 200 tokens)
    assert held < 8 * tokens, f"{held / tokens:.1f} bytes a token"


def test_the_data_memory_benchmark_measures_this_checkout(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "data_memory.py"),
         "--workdir", str(tmp_path), "--rows", "40"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    (line,) = out.strip().splitlines()
    got = json.loads(line)
    assert got["variant"] == "this" and got["samples"] > 40  # 40 training rows, the eval rows
    assert got["tokens"] > got["samples"] and got["object_mib"] > 0 and got["held_mib"] > 0
