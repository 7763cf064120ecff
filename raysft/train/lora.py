"""LoRA's peft config (``build_lora_config``) and its targets: names in ``lora.target_modules``
that match no layer LoRA can adapt are refused, naming the model's linear layers
(``check_targets``), and a target that is a tied embedding or LM head is warned of.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from raysft.config import Config, LoraSection
from raysft.errors import ModelError

if TYPE_CHECKING:
    import peft

log = logging.getLogger(__name__)


def unmatched_targets(targetable: Iterable[str], targets: list[str] | str) -> list[str]:
    """The names of ``lora.target_modules`` that match none of the ``targetable`` modules (the
    layers LoRA adapts, ``targetable_modules``), by peft's rule (``LoraSection.matches``). peft
    refuses a list none of which matches, but adapts the matching ones of a list and drops the
    rest without a word."""
    if isinstance(targets, str):  # all-linear
        return []
    names = list(targetable)
    return [t for t in targets if not any(LoraSection.matches(n, t) for n in names)]


def check_targets(
    targetable: Iterable[str], linears: Iterable[str], lora: LoraSection, *, model: str
) -> None:
    """ModelError naming the ``lora.target_modules`` that match no layer LoRA can adapt in
    ``model`` (``targetable_modules``), with the names of its linear layers."""
    missing = unmatched_targets(targetable, lora.target_modules)
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ModelError(
            f"lora.target_modules: {', '.join(map(repr, missing))} "
            f"match{'es' if len(missing) == 1 else ''} no layer LoRA can adapt in {model} "
            f"(its linear layers: {', '.join(kinds)}; or all-linear)"
        )


def targetable_modules(model: Any) -> tuple[list[str], list[str]]:
    """(the layers peft's LoRA adapts, the linear ones but the LM head) of ``model``, by name.

    peft adapts ``nn.Linear`` (bitsandbytes' 4-bit layers are subclasses), transformers'
    ``Conv1D`` (GPT-2's projections), ``nn.Embedding``, ``nn.Conv1d/2d/3d`` and
    ``nn.MultiheadAttention``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    head = model.get_output_embeddings()
    linear = (nn.Linear, Conv1D)
    kinds = (*linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    targetable = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    linears = [n for n, m in model.named_modules() if isinstance(m, linear) and m is not head]
    return targetable, linears


def check_model_targets(model: Any, cfg: Config) -> None:
    check_targets(*targetable_modules(model), cfg.lora, model=cfg.model.name_or_path)
    warn_of_tied_targets(model, cfg.lora)


def warn_of_tied_targets(model: Any, lora: LoraSection) -> list[str]:
    """Warn where ``lora.target_modules`` names the input embedding or the LM head of a model
    that ties them (one weight): the adapter trains and scores as it should, but merging it
    (``merge_and_unload``) changes the other use of the weight too, so the merged model is not
    the one scored. Returns the tied layers named."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if (
        out is None
        or inp is None
        or inp.weight is not out.weight
        or isinstance(lora.target_modules, str)
    ):
        return []
    tied = [n for n, m in model.named_modules() if m is inp or m is out]
    named = [n for n in tied if any(LoraSection.matches(n, t) for t in lora.target_modules)]
    if named:
        log.warning(
            "lora.target_modules: %s shares its weight with %s (tied embeddings): the adapter "
            "is right as it is, but merged into the base it would change both; serve it "
            "unmerged, or target other layers",
            ", ".join(named),
            ", ".join(n for n in tied if n not in named) or "the other",
        )
    return named


def build_lora_config(lora: LoraSection) -> peft.LoraConfig:
    """peft LoraConfig for a causal LM; ``all-linear`` is passed through (peft skips lm_head)."""
    from peft import LoraConfig

    targets = lora.target_modules
    # peft annotates an int but computes alpha / r in float; keep 32 (not 32.0) in adapter_config.
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return LoraConfig(
        r=lora.r,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
