"""What a trial computes in: bf16 autocast or none, the dtypes ``auto`` resolved to on this
device (recorded with each checkpoint, compared on resume), warnings where bf16 is emulated,
and the loss scaler an fp16 forward needs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raysft.config import Config
from raysft.train.device import bf16_emulation, native_bf16

log = logging.getLogger(__name__)


def computes_in_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether ``train.precision`` asks for bf16 compute on ``device``."""
    # Native bf16 only: is_bf16_supported() alone also counts slow emulation (T4, V100).
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and native_bf16(device))


NUMERICS = "numerics"  # progress.final's key: the dtypes the run resolved (``numerics``)


def numerics(cfg: Config, device: torch.device, model: Any) -> dict[str, str]:
    """The dtypes this run trains with, as its ``auto`` settings resolved them on this device:
    the frozen base's, QLoRA's matmuls', and the autocast. Recorded with every checkpoint (and
    in metrics.json), so that a resume on another kind of host says it computes otherwise."""
    from raysft.train.model import resolve_compute_dtype

    out = {
        "base_dtype": str(model.dtype).removeprefix("torch."),
        "autocast": "bfloat16" if computes_in_bf16(cfg, device) else "none",
    }
    if cfg.method == "qlora":
        out["compute_dtype"] = str(resolve_compute_dtype(cfg.qlora, device)).removeprefix("torch.")
    return out


def warn_of_other_numerics(
    saved: dict[str, str] | None, own: dict[str, str], checkpoint: str | Path
) -> None:
    """A checkpoint's run computed with other dtypes (``auto`` resolves per device: bf16 on a
    GPU or an AMX CPU, fp32 on an AVX2 one): it continues, no longer as the run would have."""
    if not saved:  # a checkpoint from before the record
        return
    changed = [f"{k} {own.get(k)} (was {v})" for k, v in saved.items() if own.get(k) != v]
    if changed:
        log.warning(
            "resumed from %s with other numerics than it was trained with: %s; the run goes "
            "on, but not as it would have on its first device (`auto` dtypes resolve per "
            "device: set model.dtype, qlora.compute_dtype and train.precision to keep them)",
            checkpoint,
            ", ".join(changed),
        )


def autocast_for(cfg: Config, device: torch.device) -> Callable[[], Any]:
    """A context-manager factory: bf16 autocast where ``train.precision`` asks for it, else none."""

    if not computes_in_bf16(cfg, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def asks_for_bf16(cfg: Config) -> list[str]:
    """The settings that explicitly ask for bf16 compute or weights (not `auto`)."""
    asked = []
    if cfg.train.precision == "bf16":
        asked.append("train.precision: bf16")
    if cfg.method != "full" and cfg.model.dtype == "bfloat16":
        asked.append("model.dtype: bfloat16")
    if cfg.method == "qlora" and cfg.qlora.compute_dtype == "bfloat16":
        asked.append("qlora.compute_dtype: bfloat16")
    return asked


def warn_of_emulated_bf16(cfg: Config, device: torch.device) -> None:
    """One warning in the trial's log when a setting asks for bf16 where it is emulated."""
    asked = asks_for_bf16(cfg)
    why = bf16_emulation(device) if asked else None
    if why:
        log.warning(
            "%s on %s, but %s: bf16 is emulated there (on an AVX2-only CPU about 10x slower than "
            "fp32, benchmarks/RESULTS.md); `auto` (or fp32 / float32) avoids it",
            " and ".join(asked),
            device,
            why,
        )


def loss_scaler(model: Any, cfg: Config, device: torch.device) -> Any:
    """A GradScaler where the forward computes in fp16 (a float16 base: `auto` on a GPU below
    compute capability 8.0, or asked for), else None. Unscaled, the step's loss, divided by
    its thousands of tokens, gives gradients that fp16 rounds to subnormals or to zero."""
    from raysft.train.model import resolve_compute_dtype

    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    if cfg.method == "qlora":
        fp16 = fp16 or resolve_compute_dtype(cfg.qlora, device) == torch.float16
    return torch.amp.GradScaler(device.type) if fp16 else None
