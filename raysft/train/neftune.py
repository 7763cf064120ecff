"""NEFTune (Jain et al. 2023): uniform noise on input embeddings during training.

The noise is ``Uniform(-1, 1) * alpha / sqrt(L * d)`` with ``L`` the length of the token's OWN
sample. transformers' built-in hook takes ``L`` from the (packed) row, which shrinks the noise of
every packed sample; here each packed segment is scaled separately via ``seg_lens``.

Noise is drawn from torch's global RNG on the embedding's device, which the trainer seeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def neftune_scale(seg_lens: torch.Tensor, *, alpha: float, dim: int) -> torch.Tensor:
    """Noise half-width per token, [B, T, 1]: alpha / sqrt(L * d); 0 where L == 0 (padding)."""
    import torch

    lengths = seg_lens.to(torch.float32)
    scale = alpha / torch.sqrt(lengths.clamp(min=1.0) * dim)
    return torch.where(lengths > 0, scale, torch.zeros_like(scale)).unsqueeze(-1)


class NEFTune:
    """Forward hook on the input embeddings; active only while the model is training."""

    def __init__(self, model: Any, *, alpha: float):
        self.alpha = alpha
        self._model = model
        self._seg_lens: torch.Tensor | None = None
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def set_lengths(self, seg_lens: torch.Tensor) -> None:
        """Per-token sample lengths [B, T] of the next forward (0 on padding)."""
        self._seg_lens = seg_lens

    def remove(self) -> None:
        self._handle.remove()
        self._seg_lens = None

    def _hook(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        import torch

        if not self._model.training:
            return None  # None keeps the output unchanged
        seg_lens = self._seg_lens
        if seg_lens is None:
            raise RuntimeError("NEFTune: call set_lengths(seg_lens) before each training forward")
        if tuple(seg_lens.shape) != tuple(output.shape[:2]):
            raise RuntimeError(
                f"NEFTune: seg_lens shape {tuple(seg_lens.shape)} does not match the embedding "
                f"output {tuple(output.shape[:2])}"
            )
        scale = neftune_scale(seg_lens.to(output.device), alpha=self.alpha, dim=output.shape[-1])
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * scale.to(output.dtype)


def attach_neftune(model: Any, *, alpha: float | None) -> NEFTune | None:
    """NEFTune hooked on ``model``'s input embeddings; None (nothing attached) for alpha 0/None."""
    if not alpha:
        return None
    return NEFTune(model, alpha=alpha)
