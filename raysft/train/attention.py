"""``sdpa_fp32``: transformers' sdpa attention with q, k and v in float32 under bf16 autocast.

On a CPU, bf16 autocast speeds up the matmuls, but on the host measured here (AMD EPYC:
AVX512-BF16, no AMX) the CPU flash-attention kernel is slower in bf16 than in fp32: 182 against
126 ms per step of length-grouped batches (benchmarks/RESULTS.md). Without autocast the casts
are no-ops and this is plain sdpa. Registered under its own name both as an attention function
and as a mask function (sdpa's): for a name with no mask function, transformers builds no mask,
and packed samples would attend to each other.
"""

from __future__ import annotations

from typing import Any

SDPA_FP32 = "sdpa_fp32"


def _sdpa_fp32(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> tuple[Any, Any]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(dtype), weights


def register() -> None:
    """Make ``attn_implementation="sdpa_fp32"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_FP32, _sdpa_fp32)
    AttentionMaskInterface.register(SDPA_FP32, sdpa_mask)
