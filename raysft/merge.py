"""``python -m raysft.merge DIR OUT``: an adapter merged into its base, saved as one plain
transformers model (weights, tokenizer with the chat template it was trained with, the
template's end of answer in generation_config.json), for servers and tools that take no adapter.

DIR is an adapter directory (a run's output, a training checkpoint, a champion export) or an
experiment directory (its champion), as ``raysft.evaluate`` reads it. A QLoRA adapter is merged
into the unquantized base (merging into 4-bit weights would round the update away): the merged
model's outputs then differ from the 4-bit model's by the quantization error of the base.

The merge is made and checked in float32 (the merged model's logits against the adapter's),
then cast to ``--dtype`` (auto: the dtype the run loaded its base in). OUT is written whole or
not at all: staged beside it, loaded back with plain transformers and checked to give the merged
model's logits in that dtype (finite, too), then renamed into place.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NoReturn

from raysft.cli import run_command, setup_logging
from raysft.errors import ModelError
from raysft.paths import give_plain_modes, writable_dir_problem
from raysft.search.eval_target import resolve_target
from raysft.search.export import recorded_numerics, use_saved_generation_config

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The merge is checked in float32: the merged model's logits against the adapter's, within this
# share of their largest (W + BA rounds differently from W x + B(A x)).
_MERGE_RTOL = 1e-4
# The saved model, loaded back, against the merged one cast to the saved dtype: the same
# computation, so as close as that dtype's kernels repeat (half precision: a few of its ulps).
_SAVED_RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


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
        help="dtype of the saved weights (auto: the dtype the run loaded its base in, as it "
        "recorded it; else model.dtype as it resolves on --device)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the merge runs (default cpu: it holds the base in float32, 4 bytes a "
        "parameter, 28 GB for a 7B model, which host memory holds more often than a GPU)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _out_problem(out: Path) -> str | None:
    if out.is_dir() and any(out.iterdir()):
        return f"{out}: not empty; give a new or empty directory"
    if out.exists() and not out.is_dir():
        return f"{out}: a file; give a new or empty directory"
    if out.parent.exists() and not out.parent.is_dir():
        return f"{out.parent}: a file, not a directory to write {out.name} into"
    if not out.parent.is_dir():
        return f"{out.parent}: no such directory"
    return writable_dir_problem(out.parent)  # the staging folder and the rename go there


def merge(
    directory: str,
    out: Path,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
) -> Any:
    """Merge DIR's adapter into its base and save it to ``out``; returns the merged model."""
    import torch

    from raysft.train.model import resolve_dtype, save_tokenizer
    from raysft.train.score_saved import load_for_scoring

    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: torch sees no CUDA GPU here; merge with --device cpu")
    if out.is_symlink():  # written where it points: the staging folder goes beside that
        out = out.resolve()
    problem = _out_problem(out)
    if problem:
        raise ModelError(problem)
    _sweep_stale_stages(out)
    target = resolve_target(
        directory,
        without_settings="merged with the default model settings (model.dtype, "
        "trust_remote_code, revision); pass --dtype and --base-model as needed",
        adapters_only="nothing to merge",
    )
    source = target.path.resolve()  # the adapter's own directory (an experiment's champion)
    if out.resolve().is_relative_to(source):  # the merge would land in what it reads
        raise ModelError(f"{out}: inside {source}, the adapter merged; give a directory outside it")
    # As LoRA in float32 on --device, whatever the run loaded where: the base unquantized
    # (QLoRA's NF4 would round the update away) and a check the merge's rounding alone can fail.
    as_lora = target.cfg.model_copy(
        update={
            "method": "lora",
            "train": target.cfg.train.model_copy(update={"device": device}),
        }
    )
    cfg = as_lora.model_copy(
        update={"model": as_lora.model.model_copy(update={"dtype": "float32"})}
    )
    net, tokenizer = load_for_scoring(str(target.path), cfg=cfg, base_model=base_model)
    on = next(net.parameters()).device
    probe = tokenizer("Merging checks these logits.", return_tensors="pt")["input_ids"]
    probe = probe.to(on)
    want = _logits(net, probe)
    merged = net.merge_and_unload()
    _compare(_logits(merged, probe), want, rtol=_MERGE_RTOL, what="the merged model's logits")
    use_saved_generation_config(merged, target.path)  # the template's end of answer
    if dtype == "auto":
        recorded = _recorded_base_dtype(target.path)
        saved = getattr(torch, recorded) if recorded else resolve_dtype(as_lora, on)
        if not recorded:
            log.warning(
                "%s records no dtype its run loaded the base in: saved in %s, model.dtype %s "
                "as it resolves on %s (--dtype to choose)",
                target.path, str(saved).removeprefix("torch."), as_lora.model.dtype, device,
            )  # fmt: skip
    else:
        saved = getattr(torch, dtype)
    merged = merged.to(saved)
    expected = _logits(merged, probe)
    stage = out.parent / f".{out.name}.merging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        merged.save_pretrained(stage)
        save_tokenizer(tokenizer, stage)
        record = {"merged_from": str(target.path.resolve()), "base": base_model or target.base}
        (stage / "merged.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        give_plain_modes(None, list(stage.iterdir()))  # safetensors' 0600 weights
        _check_saved(stage, probe, expected, trust=cfg.model.trust_remote_code)
        try:
            if out.is_dir():
                out.rmdir()  # empty (checked above)
            stage.rename(out)
        except OSError:  # another merge into OUT got there first
            problem = _out_problem(out)
            if problem is None:
                raise
            raise ModelError(f"{problem} (written meanwhile); nothing saved") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return merged


def _sweep_stale_stages(out: Path) -> None:
    """The staging folders of merges into ``out`` killed half way go; those of a merge still
    running (its process alive: ``.OUT.merging-PID-*``) stay."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.merging-*"):
        pid = stale.name.rsplit(".merging-", 1)[1].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _recorded_base_dtype(path: Path) -> str | None:
    """The dtype the run of the adapter at ``path`` loaded its base in, as it recorded it: a
    run's metrics.json (``final``), a champion export's (``numerics``), or a checkpoint's
    training state. A record whose base dtype is no float one: its matmuls' dtype
    (``compute_dtype``, a QLoRA run's) then."""
    from raysft.train.precision import NUMERICS
    from raysft.train.state import STATE_FILE

    try:
        if (path / "metrics.json").is_file():
            record = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
            numerics = record["final"][NUMERICS] if "final" in record else record[NUMERICS]
        elif (path / STATE_FILE).is_file():
            numerics = recorded_numerics(path)
        else:
            return None
        found = [numerics.get("base_dtype"), numerics.get("compute_dtype")]
    except (KeyError, TypeError, ValueError, OSError, AttributeError):
        return None
    return next((d for d in found if d in DTYPES[1:]), None)


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _compare(got: Any, want: Any, *, rtol: float, what: str) -> None:
    """``got`` finite and within ``rtol`` of ``want``'s largest magnitude, or ModelError."""
    import torch

    scale = max(float(want.abs().max()), 1.0)
    gap = float((got - want).abs().max())
    if not bool(torch.isfinite(got).all()) or not math.isfinite(gap):
        raise ModelError(f"{what} are not finite (NaN or inf); nothing saved")
    if gap > rtol * scale:
        raise ModelError(
            f"{what} differ from the adapter's by {gap:.3g} (at most {rtol * scale:.3g} "
            "expected); nothing saved"
        )


def _check_saved(stage: Path, probe: Any, expected: Any, *, trust: bool) -> None:
    """The saved model, loaded by plain transformers, gives the merged model's logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stage), dtype="auto", trust_remote_code=trust)
    model = model.to(probe.device).eval()
    dtype = str(model.dtype).removeprefix("torch.")
    what = f"the saved model's logits (in {dtype})"
    _compare(_logits(model, probe), expected, rtol=_SAVED_RTOL.get(dtype, 2e-2), what=what)


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    out = Path(args.out)
    merge(args.dir, out, base_model=args.base_model, dtype=args.dtype, device=args.device)
    print(f"merged: {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def main() -> NoReturn:
    """Entry point (``python -m raysft.merge``): user errors exit 2 with one message."""
    run_command(run)


if __name__ == "__main__":
    main()
