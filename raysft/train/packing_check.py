"""Whether a loaded model keeps packed samples apart (``check_packing``).

A packed row carries no attention mask: transformers builds each sample's causal mask from the
row's ``position_ids`` (``evaluate.forward_loss``). Most decoder models do (Llama, Mistral,
Qwen, Gemma, Phi), but not every one: OPT, Bloom and MPT build their mask from the attention
mask alone, so each packed sample would attend to the samples before it in its row, and a
recurrent model carries its state across them. No config field says which a model does, so
the loaded model is asked: one forward of two packed rows that differ only in their first
sample.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from raysft.errors import ConfigError

log = logging.getLogger(__name__)

# A first sample longer than the second, so that a second sample that sees it is moved by it.
_FIRST, _SECOND = 24, 6
# Kept apart, the second sample's logits are the same computation in both rows (its own
# tokens and positions; masked keys add exact zeros), so they agree to rounding. Seen on tiny
# random models (relative to the largest logit): exactly 0 for Llama, Mistral, Qwen2/3, Gemma
# 1-3, Phi, Phi-3, GPT-2, GPT-NeoX, GPT-J, Falcon, StarCoder2, OLMo, Cohere, Granite in fp32
# (in bf16 too for Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2); up to 3e-7 for MoE models in
# fp32 (Mixtral, Qwen2-MoE: experts sum in another order);
# leaking: 0.15 OPT, 0.004-0.005 Bloom (ALiBi), 0.16 MPT, 0.016 BioGPT, 0.002 XGLM, 0.22 Mamba.
# In bf16 and fp16 (CPU) every model that keeps samples apart, MoE included, gave exactly 0,
# and the leaking ones 0.002-0.005 (XGLM, Bloom) and more: the same bound would do, but a GPU's
# half-precision kernels are unmeasured here, so they get 1e-3, below every leak measured.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
_HALF_TOLERANCE = 1e-3  # bf16, fp16 logits


@torch.no_grad()
def packed_leak(model: Any, *, vocab_size: int, device: Any) -> tuple[float, torch.dtype]:
    """How far the second sample's logits in a packed row move when the first sample's tokens
    change, relative to their largest magnitude (0 where packed samples are kept apart), and
    the logits' dtype."""
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab_size, (2, _FIRST), generator=gen)
    second = torch.randint(0, vocab_size, (1, _SECOND), generator=gen).expand(2, -1)
    ids = torch.cat([first, second], dim=1).to(device)
    positions = torch.cat([torch.arange(_FIRST), torch.arange(_SECOND)]).expand(2, -1).to(device)
    was_training = model.training
    model.eval()  # no dropout, no NEFTune noise
    try:
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    finally:
        model.train(was_training)
    tail = logits[:, _FIRST:].float()
    scale = tail.abs().max().clamp_min(1e-6)
    return float((tail[0] - tail[1]).abs().max() / scale), logits.dtype


def check_packing(model: Any, *, name: str, vocab_size: int, device: Any) -> None:
    """``data.packing`` is refused, naming the model's class, when it does not keep packed
    samples apart (``packed_leak``)."""
    leak, dtype = packed_leak(model, vocab_size=vocab_size, device=device)
    log.debug("packing: the second sample's logits moved by %.2e (relative, %s)", leak, dtype)
    if leak > _TOLERANCE.get(dtype, _HALF_TOLERANCE):
        kind = type(model).__name__
        raise ConfigError(
            "data.packing",
            [
                f"{name} ({kind}) does not keep packed samples apart: a sample's logits change "
                f"with the sample packed before it (by {leak:.1%} of their largest), since this "
                "architecture builds its attention mask without the rows' position_ids; set "
                "data.packing: false (data.group_by_length: true batches samples of similar "
                "lengths without packing them)"
            ],
        )
