"""Subprocess entry: run ONE contender (or write a random-init model) and write its JSON.

    python -m raysft.bench.child SPEC.json OUT.json

A fresh process per contender keeps peak memory, allocator state and thread pools apart.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _held_out_loss(model: Any, ctx: Any) -> dict[str, float]:
    """Mean loss over the eval rows' answer tokens (+ EOS), one sample per row, fp32 on the
    CPU and bf16 autocast on CUDA, the same function for every contender."""
    import contextlib

    import torch
    from transformers import AutoTokenizer

    from raysft.bench.data import eval_examples
    from raysft.train.evaluate import eval_loss_sum

    tok = AutoTokenizer.from_pretrained(ctx.model_dir)
    examples = eval_examples(ctx.eval_rows, tok, max_len=ctx.max_len)
    device = next(p.device for p in model.parameters())
    autocast: Any = contextlib.nullcontext
    if device.type == "cuda":

        def autocast() -> Any:
            return torch.autocast("cuda", dtype=torch.bfloat16)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, count = eval_loss_sum(
        model,
        examples,
        [[i] for i in range(len(examples))],
        packing=False,
        batch_size=8,
        pad_id=pad,
        device=device,
        autocast=autocast,
    )
    return {"eval_loss": total / max(count, 1), "eval_tokens": count}


def run_contender(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the named contender of the spec's preset; its measurements as a dict."""
    import torch

    from raysft.bench.contenders import FAMILIES, Context
    from raysft.bench.data import train_eval_rows
    from raysft.bench.measure import (
        WARMUP_STEPS,
        MemoryProbe,
        StepClock,
        matmul_params,
        mfu,
    )
    from raysft.bench.presets import PRESETS

    preset = PRESETS[spec["preset"]].with_overrides(**spec.get("overrides", {}))
    contender = {c.name: c for c in preset.all_contenders()}[spec["contender"]]
    opt = contender.options
    if preset.threads:
        torch.set_num_threads(preset.threads)
    # The rows are the preset's; the training seed (data order, dropout, noise) may be a round's.
    train_seed = spec.get("train_seed", preset.seed)
    torch.manual_seed(train_seed)
    device = preset.device
    rows, eval_rows = train_eval_rows(preset.rows, preset.eval_rows, seed=preset.seed)
    clock = StepClock(sync=torch.cuda.synchronize if device == "cuda" else None)
    workdir = Path(spec["workdir"]) / contender.name
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        model_dir=Path(spec["model_dirs"][opt.get("model", "base")]),
        workdir=workdir,
        device=device,
        rows=rows,
        eval_rows=eval_rows,
        batch_size=opt.get("batch_size", preset.batch_size),
        max_len=opt.get("max_len", preset.max_len),
        steps=opt.get("steps", preset.steps),
        seed=train_seed,
        threads=preset.threads,
        clock=clock,
    )
    # Library code is no contender's memory: import every family's libraries before the reset.
    import contextlib
    import importlib

    for mod in ("transformers.trainer", "peft", "raysft.train.recipe", "datasets", "trl"):
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    probe = MemoryProbe(device)
    probe.start()
    t0 = time.perf_counter()
    model = FAMILIES[contender.family](ctx, opt, contender.name)
    out: dict[str, Any] = {"name": contender.name, "family": contender.family}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out.update(clock.summary(warmup=min(WARMUP_STEPS, max(ctx.steps // 4, 1))))
    out["peak_mib"] = probe.peak_mib()
    if device == "cuda":  # what the caching allocator held: closer to what an OOM sees
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    out.update(_held_out_loss(model, ctx))
    if device == "cuda" and out.get("tokens_per_s"):
        n = matmul_params(model)
        out["matmul_params"] = n
        out["mfu"] = mfu(n, out["tokens_per_s"], torch.cuda.get_device_name())
    out["batch_size"], out["max_len"], out["threads"] = ctx.batch_size, ctx.max_len, ctx.threads
    out["train_seed"] = train_seed
    return out


def write_random_model(config: dict[str, Any], out_dir: Path, *, device: str, seed: int) -> None:
    """A Llama of ``config``'s shape with seeded random weights (bf16 on disk), the embedded
    byte-level tokenizer and the benchmark's chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from raysft.assets import resolve
    from raysft.bench.data import install_chat_template

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="4GB")
    del model
    AutoTokenizer.from_pretrained(resolve("embedded:tiny-base")).save_pretrained(out_dir)
    install_chat_template(out_dir)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    out_path = Path(args[1])
    logging.basicConfig(level=logging.WARNING)
    try:
        if spec.get("write_model"):
            w = spec["write_model"]
            write_random_model(w["config"], Path(w["dir"]), device=w["device"], seed=w["seed"])
            result: dict[str, Any] = {"written": w["dir"]}
        else:
            result = run_contender(spec)
    except Exception as err:  # reported as a failed row; the benchmark goes on
        result = {"name": spec.get("contender"), "error": f"{type(err).__name__}: {err}"}
        result["traceback"] = traceback.format_exc()[-4000:]
    out_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
