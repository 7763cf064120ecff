"""A helper for the tests that load a model (imported by test_model and test_precision)."""

from __future__ import annotations

from typing import Any


def checkpointing_on(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on in ``model``, as transformers tells it:
    ``is_activation_checkpointing`` from 5.2x, ``is_gradient_checkpointing`` before (5.17 has
    only that one; later ones warn that it is deprecated). Both read the same flag of the
    model's layers, as this does."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
