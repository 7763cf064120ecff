"""Data-parallel trials: the step's loss is the mean over every trained token on every rank.

Two real processes (gloo on the CPU, DDP) against one process with doubled grad_accum, on rows of
very different lengths: the optimizer step and the reported train_loss must be the same.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_recipe import _model_dir

from raysft.config import load_config
from raysft.errors import DataError
from raysft.train.recipe import Dist, run_trial


def _rows(path: Path) -> Path:
    # Answers of 1 to 60 words: per-rank token counts differ a lot, so a mean of per-rank means
    # would weigh tokens unequally.
    rows = [
        {"instruction": f"Repeat {n}", "input": "", "output": " ".join(["w"] * n)}
        for n in (1, 60, 3, 45, 2, 30, 5, 50)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _cfg(tmp: Path, model_dir: Path, *, grad_accum: int, out: str, **extra: object):
    return load_config(
        None,
        {
            "model.name_or_path": str(model_dir),
            "data.train": str(tmp / "rows.jsonl"),
            "data.eval": str(tmp / "rows.jsonl"),
            "data.packing": False,
            "data.max_seq_len": 160,
            "train.batch_size": 1,
            "train.grad_accum": grad_accum,
            "train.max_steps": 1,
            "train.eval_every": 1,
            "train.exact_match": False,
            "train.learning_rate": 1e-2,
            "train.warmup_ratio": 0.0,
            "lora.dropout": 0.0,
            "lora.target_modules": "all-linear",
            "output_dir": str(tmp / out),
            **extra,
        },
    )


def _worker(rank: int, tmp: str, model_dir: str, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = _cfg(Path(tmp), Path(model_dir), grad_accum=2, out="ddp")
        run_trial(cfg, dist=Dist(rank, 2), prepare_model=DistributedDataParallel)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_take_the_step_of_one_worker_with_doubled_accumulation(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    _rows(tmp_path / "rows.jsonl")
    torch.set_num_threads(1)
    single = run_trial(_cfg(tmp_path, model_dir, grad_accum=4, out="single"))
    os.environ.pop("RANK", None)
    mp.spawn(_worker, args=(str(tmp_path), str(model_dir), _free_port()), nprocs=2, join=True)

    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["history"][0]["train_loss"] == pytest.approx(
        single.history[0]["train_loss"], abs=1e-6
    )
    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(a[key], torch.zeros_like(a[key])))
    assert moved, "the step changed no adapter weight"


def test_fewer_rows_than_workers_is_an_error_before_training(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"instruction": "a", "input": "", "output": "b"}), encoding="utf-8"
    )
    cfg = _cfg(tmp_path, model_dir, grad_accum=1, out="x")
    with pytest.raises(DataError, match="1 training row\\(s\\) .* for 2 workers"):
        run_trial(cfg, dist=Dist(0, 2))
    assert not (tmp_path / "x").exists()
