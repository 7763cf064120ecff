"""Interleaved A/B of raysft training-step variants in ONE process, for a machine shared with
other work: each round runs one step of every variant in a shuffled order, so outside load hits
all of them alike, and the median over rounds is reported (the subprocess benchmark runs
contenders one after another, so a burst of load lands on one of them only).

    python -m raysft.bench.ab [--variants raysft,compile,...] [--rounds 10]

``seed-step`` is the seed recipe's step without the Trainer around it (a 512-wide padded batch,
labels = input_ids, the model's own loss, AdamW): the reference the ratios divide by.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "seed-step": {},
    "seed-step-bf16": {"bf16": True},
    "raysft": {},
    "eager": {"attn": "eager"},
    "bf16": {"precision": "bf16"},
    "padded": {"packing": False},
    "row1024": {"row_len": 1024},
    "sellogits": {"selective_logits": True},
    "compile": {"compile": True},
    "compile-bf16": {"compile": True, "precision": "bf16"},
    "bf16-a32": {"precision": "bf16", "attn": "sdpa_fp32"},
    "grouped": {"group_by_length": True},
    "grouped-bf16": {"group_by_length": True, "precision": "bf16"},
    "grouped-bf16-a32": {"group_by_length": True, "precision": "bf16", "attn": "sdpa_fp32"},
    "grouped-compile": {"group_by_length": True, "compile": True},
    "grouped-compile-bf16-a32": {
        "group_by_length": True,
        "precision": "bf16",
        "attn": "sdpa_fp32",
        "compile": True,
    },
}
_FULL_LR = 1e-3


def _seed_stepper(ctx: Any, *, bf16: bool = False) -> Any:
    """One optimizer step of the seed's recipe per call (``bf16``: its ``bf16=True``, CPU
    autocast); returns the real tokens it trained."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysft.bench.data import seed_text

    model = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=torch.float32)
    model.train()
    tok = AutoTokenizer.from_pretrained(ctx.model_dir)
    tok.pad_token = tok.eos_token
    enc = tok([seed_text(r) for r in ctx.rows], truncation=True, max_length=ctx.max_len,
              padding="max_length", return_tensors="pt")  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=_FULL_LR)
    state = {"i": 0}

    def step() -> int:
        s = state["i"] * ctx.batch_size % (len(ctx.rows) - ctx.batch_size)
        state["i"] += 1
        rows = slice(s, s + ctx.batch_size)
        ids, mask = enc["input_ids"][rows], enc["attention_mask"][rows]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(mask.sum())

    return step


def _raysft_stepper(ctx: Any, options: dict[str, Any], name: str) -> Any:
    from raysft.bench.contenders import raysft_run
    from raysft.train import recipe

    run = raysft_run(ctx, {"lr": _FULL_LR, "method": "full", **options}, name)
    return lambda: recipe.train_step(run)["tokens"]


def measure(variants: list[str], *, rounds: int, warmup: int, threads: int) -> dict[str, Any]:
    import torch

    from raysft.assets import resolve
    from raysft.bench.contenders import Context
    from raysft.bench.data import copy_model_dir, train_eval_rows
    from raysft.bench.measure import StepClock

    torch.set_num_threads(threads)
    rows, held = train_eval_rows(600, 8, seed=0)
    work = Path("runs/bench-ab")
    model_dir = copy_model_dir(Path(resolve("embedded:tiny-base")), work / "model")
    ctx = Context(model_dir, work, "cpu", rows, held, 8, 512, 10_000, 0, threads, StepClock())
    steppers = {
        v: _seed_stepper(ctx, bf16=VARIANTS[v].get("bf16", False))
        if v.startswith("seed-step")
        else _raysft_stepper(ctx, VARIANTS[v], v)
        for v in variants
    }
    out: dict[str, Any] = {v: {"wall": [], "cpu": [], "tokens": []} for v in variants}
    for v, step in steppers.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        out[v]["warmup_s"] = round(time.perf_counter() - t0, 2)
    order = list(steppers)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no variant always runs right after a given other one
        for v in order:
            step = steppers[v]
            w0, c0 = time.perf_counter(), time.process_time()
            n = step()
            out[v]["wall"].append(time.perf_counter() - w0)
            out[v]["cpu"].append(time.process_time() - c0)
            out[v]["tokens"].append(n)
    return _summarise(out)


def _summarise(raw: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for v, r in raw.items():
        tokens = statistics.mean(r["tokens"])
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        res[v] = {"tokens_per_step": tokens, "median_step_s": wall, "median_step_cpu_s": cpu,
                  "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
                  "warmup_s": r["warmup_s"]}  # fmt: skip
    ref = next(iter(res.values()))
    for r in res.values():
        r["x_first"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["x_first_cpu"] = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raysft.bench.ab", description=__doc__)
    p.add_argument("--variants", default="seed-step,raysft,sellogits,eager,bf16,padded,compile")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON of the medians")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    res = measure(variants, rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    print("| variant | real tok/step | step s (median) | tok/s | x first | tok/CPU-s | x first "
          "(CPU) | warm-up s |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for v, r in res.items():
        print(f"| {v} | {r['tokens_per_step']:,.0f} | {r['median_step_s']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['x_first']:.2f} | {r['tokens_per_cpu_s']:,.0f} | "
              f"{r['x_first_cpu']:.2f} | {r['warmup_s']:.1f} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
