"""``python -m raysft.merge DIR OUT``: an adapter merged into its base, saved as one plain
transformers model (weights, tokenizer with the chat template it was trained with, the
template's end of answer in generation_config.json), for servers and tools that take no adapter.

DIR is an adapter directory (a run's output, a training checkpoint, a champion export) or an
experiment directory (its champion), as ``raysft.evaluate`` reads it. A QLoRA adapter is merged
into the unquantized base (merging into 4-bit weights would round the update away): the merged
model's outputs then differ from the 4-bit model's by the quantization error of the base.

OUT is written whole or not at all: staged beside it, loaded back with plain transformers and
checked to give the adapter's logits, then renamed into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, NoReturn

from raysft.cli import run_cli, setup_logging
from raysft.errors import ModelError
from raysft.search.eval_target import resolve_target

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Largest logit difference accepted between the saved model and the adapter it was merged from,
# in float32 (the sum W + BA rounds differently from W x + B(A x)); wider in half precision.
_ATOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raysft.merge", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("dir", help="an adapter dir or an experiment dir (its champion)")
    p.add_argument("out", help="the merged model's directory (new, or empty)")
    p.add_argument("--base-model", help="the base model, if not the adapter's own")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the saved weights (auto: as the run loaded the base, model.dtype)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _out_problem(out: Path) -> str | None:
    if out.is_dir() and any(out.iterdir()):
        return f"{out}: not empty; give a new or empty directory"
    if out.exists() and not out.is_dir():
        return f"{out}: a file; give a new or empty directory"
    if not out.parent.is_dir():
        return f"{out.parent}: no such directory"
    return None


def merge(directory: str, out: Path, *, base_model: str | None = None, dtype: str = "auto") -> Any:
    """Merge DIR's adapter into its base and save it to ``out``; returns the merged model."""
    import torch

    from raysft.train.score_saved import load_for_scoring

    problem = _out_problem(out)
    if problem:
        raise ModelError(problem)
    target = resolve_target(directory)
    if not (target.path / "adapter_config.json").is_file():
        raise ModelError(f"{target.path}: a full model, not an adapter: nothing to merge")
    # Loaded as LoRA: the base unquantized whatever the run trained on (QLoRA's NF4).
    cfg = target.cfg.model_copy(update={"method": "lora"})
    net, tokenizer = load_for_scoring(str(target.path), cfg=cfg, base_model=base_model)
    probe = tokenizer("Merging checks these logits.", return_tensors="pt")["input_ids"]
    probe = probe.to(next(net.parameters()).device)
    with torch.no_grad():
        want = net(input_ids=probe).logits.float()
    merged = net.merge_and_unload()
    if (target.path / "generation_config.json").is_file():  # the template's end of answer
        from transformers import GenerationConfig

        merged.generation_config = GenerationConfig.from_pretrained(str(target.path))
    if dtype != "auto":
        merged = merged.to(getattr(torch, dtype))
    stage = out.parent / f".{out.name}.merging-{uuid.uuid4().hex[:8]}"
    try:
        merged.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        record = {"merged_from": str(target.path.resolve()), "base": base_model or target.base}
        (stage / "merged.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        _check(stage, probe, want, tokenizer)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return merged


def _check(stage: Path, probe: Any, want: Any, tokenizer: Any) -> None:
    """The saved model, loaded by plain transformers, gives the adapter's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stage)).to(probe.device).eval()
    with torch.no_grad():
        got = model(input_ids=probe).logits.float()
    dtype = str(model.dtype).removeprefix("torch.")
    gap = float((got - want).abs().max())
    if gap > _ATOL.get(dtype, _ATOL["float16"]):
        raise ModelError(
            f"{stage}: the merged model's logits differ from the adapter's by {gap:.3g} "
            f"(at most {_ATOL.get(dtype, _ATOL['float16'])} expected in {dtype}); nothing saved"
        )


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    out = Path(args.out)
    merge(args.dir, out, base_model=args.base_model, dtype=args.dtype)
    print(f"merged: {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def main() -> NoReturn:
    """Entry point (``python -m raysft.merge``): user errors exit 2 with one message."""
    run_cli(run)


if __name__ == "__main__":
    main()
