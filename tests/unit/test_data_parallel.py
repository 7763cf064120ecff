"""Data-parallel trials: the step's loss is the mean over every trained token on every rank.

Two real processes (gloo on the CPU, DDP) against one process with doubled grad_accum, on rows of
very different lengths: the optimizer step and the reported train_loss must be the same.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_recipe import _model_dir

from raysft.config import load_config
from raysft.errors import DataError

# setup under another name: pytest 8.0 would call a module-level `setup` as nose's module setup.
from raysft.train.recipe import Dist, finish, run_trial, train
from raysft.train.recipe import setup as setup_run


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


# Answers at each eval, to 41 held-out rows: 2 generation batches of 32 and 9 (one per rank)
# and loss rows split 21 and 20.
_GENERATES = {"train.exact_match": True, "train.max_new_tokens": 4}


def _eval_rows(tmp: Path) -> Path:
    path = tmp / "eval.jsonl"
    rows = [{"instruction": f"Say {n}", "output": "w " * (n % 7 + 1)} for n in range(41)]
    for n, row in enumerate(rows[::8]):  # 6 code rows: pass@k, their programs shared too
        row["tests"] = f"assert True  # problem {n}"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _judge_in(tmp: Path, who: str) -> None:
    """The tiny model's answers are never Python (every program fails), so the code tests are
    judged by the problem instead, whatever the answer: even problems pass. Which problems
    this process ran goes to ``ran-WHO.txt``."""
    from raysft.train import ranks

    def judged(problems: list[tuple[list[str], str]], *, limits: object) -> list[list[bool]]:
        numbers = [int(tests.rsplit(" ", 1)[1]) for _, tests in problems]
        (tmp / f"ran-{who}.txt").write_text(" ".join(map(str, numbers)))
        return [
            [n % 2 == 0] * len(answers) for n, (answers, _) in zip(numbers, problems, strict=True)
        ]

    ranks.check_answers = judged  # type: ignore[assignment]


def _worker(rank: int, tmp: str, model_dir: str, rendezvous: str, compiled: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _judge_in(Path(tmp), f"rank{rank}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        cfg = _cfg(Path(tmp), Path(model_dir), grad_accum=2, out="ddp",
                   **{"train.compile": compiled, **_GENERATES,
                      "data.eval": str(Path(tmp) / "eval.jsonl")})  # fmt: skip
        run_trial(cfg, dist=Dist(rank, 2), prepare_model=DistributedDataParallel)
    finally:
        dist.destroy_process_group()


def _rendezvous(tmp: Path) -> str:
    """The ranks meet through a file, not a TCP port: a free port probed here could be taken
    by the other xdist lane's Ray before the spawned ranks bind it."""
    return f"file://{tmp / 'rendezvous'}"


# compiled: torch.compile over the DDP wrapper (DDP's no_sync through the compiled module).
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_workers_take_the_step_of_one_worker_with_doubled_accumulation(
    tmp_path: Path, compiled: bool
) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    _rows(tmp_path / "rows.jsonl")
    torch.set_num_threads(1)
    evals = {**_GENERATES, "data.eval": str(_eval_rows(tmp_path))}
    from raysft.train import ranks

    check_answers = ranks.check_answers
    _judge_in(tmp_path, "single")
    try:
        single = run_trial(_cfg(tmp_path, model_dir, grad_accum=4, out="single", **evals))
    finally:
        ranks.check_answers = check_answers
    os.environ.pop("RANK", None)
    args = (str(tmp_path), str(model_dir), _rendezvous(tmp_path), compiled)
    mp.spawn(_worker, args=args, nprocs=2, join=True)

    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    tol = 1e-5 if compiled else 1e-6  # inductor's fused kernels round differently
    assert ddp_metrics["history"][0]["train_loss"] == pytest.approx(
        single.history[0]["train_loss"], abs=tol
    )
    # The step's tokens are those of both workers, not rank 0's alone.
    assert ddp_metrics["history"][0]["tokens"] == single.history[0]["tokens"]
    # The gradients, averaged over the workers, are those of the one worker: so is their norm.
    assert ddp_metrics["history"][0]["grad_norm"] == pytest.approx(
        single.history[0]["grad_norm"], rel=1e-4
    )
    # Each rank scored half of the eval rows: added up, they are the whole eval, and the
    # answers come back in the rows' order.
    assert ddp_metrics["history"][0]["eval_loss"] == pytest.approx(
        single.history[0]["eval_loss"], abs=tol
    )
    assert ddp_metrics["history"][0]["exact_match"] == single.history[0]["exact_match"]
    # Each rank ran the programs of every other problem, and every rank got all results.
    assert (tmp_path / "ran-single.txt").read_text() == "0 1 2 3 4 5"
    assert (tmp_path / "ran-rank0.txt").read_text() == "0 2 4"
    assert (tmp_path / "ran-rank1.txt").read_text() == "1 3 5"
    assert single.final["pass_at_k"] == 0.5
    assert ddp_metrics["final"]["pass_at_k"] == single.final["pass_at_k"]
    # The same greedy answers and code results, per row (eval_samples: the first 10 rows, rank
    # 0's batch, problems 0 (passes) and 1 (fails); the rows' order over ranks:
    # test_generation.py).
    assert [s.get("passed") for s in single.final["eval_samples"]][::8] == [[True], [False]]
    assert ddp_metrics["final"]["eval_samples"] == single.final["eval_samples"]
    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    # AdamW's first step moves a weight by lr * g / (|g| + eps): where g is near eps, inductor's
    # rounding of g shows amplified (seen: 2e-5 on 1 of 1024 weights). A wrong gradient (one
    # rank's, or unsynchronised) moves weights by up to lr = 1e-2, 100x the compiled tolerance.
    wtol = 1e-4 if compiled else 1e-6
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=wtol, rtol=1e-2 if compiled else 1e-5)
        if "lora_B" in key:  # B starts at zero: only a step moves it (A starts random)
            moved += int(not torch.equal(a[key], torch.zeros_like(a[key])))
    assert moved, "the step changed no adapter weight"


def _resume_worker(rank: int, tmp: str, model_dir: str, rendezvous: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)

    def keep(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, Path(tmp) / f"ckpt-{metrics['step']}")

    # Dropout and NEFTune: each rank's RNG draws as many numbers as its rows have tokens.
    extra = {"train.max_steps": 6, "train.eval_every": 3, "lora.dropout": 0.1,
             "train.neftune_alpha": 5}  # fmt: skip
    try:
        for out, resume in (("whole", None), ("resumed", f"{tmp}/ckpt-3")):
            cfg = _cfg(Path(tmp), Path(model_dir), grad_accum=1, out=out, **extra)
            run_trial(cfg, dist=Dist(rank, 2), prepare_model=DistributedDataParallel,
                      report=keep if resume is None else None, resume_from=resume)  # fmt: skip
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _rng_worker(rank: int, tmp: str, model_dir: str, rendezvous: str) -> None:
    import random

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        extra = {"lora.dropout": 0.1, "train.neftune_alpha": 5}
        cfg = _cfg(Path(tmp), Path(model_dir), grad_accum=1, out="rng", **extra)
        setup_run(cfg, dist=Dist(rank, 2), prepare_model=DistributedDataParallel)
        noise = torch.empty(64).uniform_(-1, 1)  # what NEFTune's first draw would be
        draws = {"torch": noise.tolist(), "python": random.random()}
        (Path(tmp) / f"rng-{rank}.json").write_text(json.dumps(draws), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def test_each_worker_draws_its_own_dropout_and_neftune_noise(tmp_path: Path) -> None:
    """Seeded alike, every rank drew the noise rank 0 drew, so W workers gave the method W
    times fewer draws than one worker accumulating W micro-batches."""
    model_dir = _model_dir(tmp_path, "llama")
    _rows(tmp_path / "rows.jsonl")
    os.environ.pop("RANK", None)
    args = (str(tmp_path), str(model_dir), _rendezvous(tmp_path))
    mp.spawn(_rng_worker, args=args, nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rng-{r}.json").read_text()) for r in (0, 1))
    assert first["torch"] != second["torch"] and first["python"] != second["python"]


def test_two_workers_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    # 7 rows: the ranks cannot split them evenly; and rows of different lengths, so the
    # ranks' RNGs part ways from the first step.
    rows = _rows(tmp_path / "rows.jsonl").read_text().splitlines()[:7]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows), encoding="utf-8")
    torch.set_num_threads(1)
    os.environ.pop("RANK", None)
    args = (str(tmp_path), str(model_dir), _rendezvous(tmp_path))
    mp.spawn(_resume_worker, args=args, nprocs=2, join=True)

    whole, resumed = (
        json.loads((tmp_path / out / "metrics.json").read_text())["history"]
        for out in ("whole", "resumed")
    )
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)


def test_fewer_rows_than_workers_is_an_error_before_training(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"instruction": "a", "input": "", "output": "b"}), encoding="utf-8"
    )
    cfg = _cfg(tmp_path, model_dir, grad_accum=1, out="x")
    with pytest.raises(DataError, match="1 training row\\(s\\) .* for 2 workers"):
        run_trial(cfg, dist=Dist(0, 2))
    assert not (tmp_path / "x").exists()


def _fsdp_worker(rank: int, tmp: str, model_dir: str, rendezvous: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        full = {"method": "full", "train.max_steps": 2}
        cfg = _cfg(Path(tmp), Path(model_dir), grad_accum=2, out="fsdp", **full)
        seen: list[str] = []

        def report(metrics: dict, checkpoint_dir: str | None) -> None:
            if checkpoint_dir is not None:  # rank 0 writes; keep step 1's to resume from
                shutil.copytree(checkpoint_dir, Path(tmp) / f"fsdp-ckpt-{metrics['step']}")

        run = setup_run(cfg, dist=Dist(rank, 2, sharded=True))
        # Every parameter is a shard: this rank holds about half of the model.
        local = sum(p.to_local().numel() for p in run.model.parameters())
        total = sum(p.numel() for p in run.model.parameters())
        seen.append(f"{local}/{total}")
        train(run, report)
        finish(run)
        (Path(tmp) / f"fsdp-shard-{rank}.txt").write_text(seen[0])
        # Resumed from step 1 (sharded state restored on both ranks), it ends where it ended;
        # the checkpoint holds the weights, so no rank reads the model's.
        _refuse_to_load_weights(f"rank {rank}, resuming")
        again = _cfg(Path(tmp), Path(model_dir), grad_accum=2, out="fsdp-resumed", **full)
        run_trial(again, dist=Dist(rank, 2, sharded=True), resume_from=f"{tmp}/fsdp-ckpt-1")
    finally:
        dist.destroy_process_group()


def test_fsdp_shards_full_fine_tuning_and_takes_the_step_of_one_worker(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    _rows(tmp_path / "rows.jsonl")
    torch.set_num_threads(1)
    full = {"method": "full", "train.max_steps": 2}
    single = run_trial(_cfg(tmp_path, model_dir, grad_accum=4, out="single", **full))
    os.environ.pop("RANK", None)
    args = (str(tmp_path), str(model_dir), _rendezvous(tmp_path))
    mp.spawn(_fsdp_worker, args=args, nprocs=2, join=True)

    for rank in (0, 1):
        local, total = map(int, (tmp_path / f"fsdp-shard-{rank}.txt").read_text().split("/"))
        assert 0.45 * total <= local <= 0.55 * total, (rank, local, total)
    history = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())["history"]
    for ours, theirs in zip(history, single.history, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5), ours["step"]
        # The norm of the whole gradient, over both workers' shards, not of rank 0's shard.
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), ours["step"]
    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    c = load_file(str(tmp_path / "fsdp-resumed" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(c[key], b[key], atol=1e-6, rtol=1e-5)
    resumed = json.loads((tmp_path / "fsdp-resumed" / "metrics.json").read_text())
    assert resumed["final"]["eval_loss"] == pytest.approx(history[-1]["eval_loss"], abs=1e-5)


def _refuse_to_load_weights(who: str) -> None:
    """In this process, loading a model's weights (``AutoModelForCausalLM.from_pretrained``)
    fails the test."""
    from transformers import AutoModelForCausalLM

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{who} loaded the weights itself")

    AutoModelForCausalLM.from_pretrained = refused  # type: ignore[assignment,method-assign]


def _sharded_load_worker(rank: int, tmp: str, model_dir: str, rendezvous: str) -> None:
    import torch.distributed as dist

    from raysft.train import fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        if rank != 0:  # only rank 0 reads the weights
            _refuse_to_load_weights(f"rank {rank}")
        cfg = load_config(
            None, {"model.name_or_path": model_dir, "method": "full", "output_dir": tmp}
        )
        model = fsdp.load_sharded(cfg, device=torch.device("cpu"), bf16=False, rank=rank)
        weights, _ = fsdp.gather(model)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
        stops = model.generation_config.eos_token_id
        torch.save(
            {"weights": weights, "buffers": buffers, "tied": tied, "stops": stops},
            Path(tmp) / f"loaded-{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_fsdp_workers_take_their_shards_of_the_weights_rank_0_alone_read(tmp_path: Path) -> None:
    """Each worker builds the model with its parameters on the meta device, shards it and gets
    its shard from rank 0's read (no worker holds the whole model on its device): the gathered
    weights, the rotary buffers (computed at construction, not in the weights file), tied
    embeddings and the generation config are the model's, on a model whose input and output
    embeddings are one tensor (Qwen2, tie_word_embeddings)."""
    from transformers import AutoModelForCausalLM

    model_dir = _model_dir(tmp_path, "qwen2")
    config = json.loads((model_dir / "config.json").read_text())
    config["tie_word_embeddings"] = True
    tied_dir = tmp_path / "qwen2-tied"
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(
        type(AutoModelForCausalLM.from_pretrained(model_dir).config).from_dict(config)
    )
    ref.save_pretrained(tied_dir)
    shutil.copy(model_dir / "tokenizer.json", tied_dir)
    shutil.copy(model_dir / "tokenizer_config.json", tied_dir)
    ref = AutoModelForCausalLM.from_pretrained(tied_dir)
    assert ref.get_input_embeddings().weight is ref.get_output_embeddings().weight
    os.environ.pop("RANK", None)
    args = (str(tmp_path), str(tied_dir), _rendezvous(tmp_path))
    mp.spawn(_sharded_load_worker, args=args, nprocs=2, join=True)

    want = ref.state_dict()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"loaded-{rank}.pt", weights_only=False)
        assert got["tied"] and got["stops"] == ref.generation_config.eos_token_id
        assert sorted(got["buffers"]) == sorted(n for n, _ in ref.named_buffers())
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(got["buffers"][name], buf, atol=0, rtol=0)
    weights = torch.load(tmp_path / "loaded-0.pt", weights_only=False)["weights"]
    assert sorted(weights) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(weights[key], value, atol=0, rtol=0)


def test_fsdp_with_lora_is_refused(tmp_path: Path) -> None:
    from raysft.errors import ConfigError

    model_dir = _model_dir(tmp_path, "llama")
    _rows(tmp_path / "rows.jsonl")
    cfg = _cfg(tmp_path, model_dir, grad_accum=1, out="x")
    with pytest.raises(ConfigError, match="fsdp shards full fine-tuning"):
        setup_run(cfg, dist=Dist(0, 2, sharded=True))


def test_fsdp_with_an_8bit_optimizer_is_refused(tmp_path: Path) -> None:
    from raysft.errors import ConfigError

    model_dir = _model_dir(tmp_path, "llama")
    _rows(tmp_path / "rows.jsonl")
    over = {"train.optimizer": "adamw_8bit"}
    cfg = _cfg(tmp_path, model_dir, grad_accum=1, out="x", method="full", **over)
    with pytest.raises(ConfigError, match="train.optimizer: adamw_8bit not with FSDP yet"):
        setup_run(cfg, dist=Dist(0, 2, sharded=True))


def test_fsdp_with_compile_is_refused(tmp_path: Path) -> None:
    from raysft.errors import ConfigError

    model_dir = _model_dir(tmp_path, "llama")
    _rows(tmp_path / "rows.jsonl")
    cfg = _cfg(tmp_path, model_dir, grad_accum=1, out="x", method="full", **{"train.compile": True})
    with pytest.raises(ConfigError, match="train.compile: not with FSDP yet"):
        setup_run(cfg, dist=Dist(0, 2, sharded=True))
