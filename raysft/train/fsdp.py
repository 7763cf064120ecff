"""Sharded data parallelism for full fine-tuning (FSDP2, ``torch.distributed.fsdp.fully_shard``).

With ``search.resources.strategy: fsdp`` (the default for ``method: full`` with several workers)
every rank holds 1/world_size of the parameters, gradients and AdamW state instead of a whole
copy each (DDP): a 7B model's 16 bytes per parameter split over the trial's workers. Each decoder
layer is its own shard group, all-gathered for its forward and backward and freed after, so one
layer at a time is whole. Gradients are reduce-scattered in fp32 (averaged over ranks, as DDP
does); with bf16 compute the all-gather sends bf16 parameters.

Checkpoints: the full (unsharded) weights and optimizer state are gathered to rank 0's CPU
memory, a collective every rank joins, and rank 0 writes them (the export in the run's compute
dtype, the training state in fp32 for an exact resume). A resume loads the full state on every
rank and each keeps its shard.

Loading (``load_sharded``): the model is built with its parameters on the meta device and sharded
before any weight lands on a GPU; rank 0 reads the weights into host memory and broadcasts them
(not on a resume, whose checkpoint holds them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _layer_classes(model: Any) -> set[str]:
    """The model's repeated block classes (what Hugging Face never splits across devices)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules): "
            "cannot shard it layer by layer"
        )
    return names


def shard(model: Any, *, bf16: bool) -> Any:
    """Shard ``model`` in place across the default process group (every decoder layer, then
    the rest: embeddings, final norm, head); returns it. Build the optimizer afterwards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    classes = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no module of class {sorted(classes)} found")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def load_sharded(cfg: Any, *, device: Any, bf16: bool, rank: int, weights: bool = True) -> Any:
    """Method full's model, sharded over the default process group with no worker ever holding
    all of it on its device: every rank builds it with its parameters on the meta device and
    shards it, and each allocates its own shard on ``device``. ``weights``: rank 0 alone reads
    them (into host memory) and broadcasts them, a tensor at a time, each rank keeping its
    shard; without (a resume), the checkpoint's fill the shards next and nothing is read."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    from raysft.train.hub import from_pretrained
    from raysft.train.model import resolve_dtype, weightless_full_model

    model = weightless_full_model(cfg)
    # Computed at construction (rotary frequencies), not in any weights file: allocating the
    # shards allocates the buffers anew, empty.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    shard(model, bf16=bf16)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    if weights:
        full: dict[str, Any] = {}
        if rank == 0:  # the weights do not depend on the attention kernel: eager loads anywhere
            cpu = torch.device("cpu")
            full = from_pretrained(
                AutoModelForCausalLM, cfg.model, dtype=resolve_dtype(cfg, cpu),
                device_map={"": cpu}, attn_implementation="eager",
            ).state_dict()  # fmt: skip
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
        del full
    return model


def is_sharded(model: Any) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


@contextlib.contextmanager
def gradient_sync(model: Any, sync: bool) -> Iterator[None]:
    """Synchronize gradients on this backward only when ``sync``: once per optimizer step, on
    its last micro-batch (DDP's ``no_sync``, FSDP's reduce-scatter switch), never per
    micro-batch. A model run alone has nothing to synchronize."""
    if sync:
        if is_sharded(model):
            model.set_requires_gradient_sync(True)
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        yield
    else:
        yield


def gather(model: Any, optimizer: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full weights (and optimizer state, given the optimizer) on rank 0's CPU, empty dicts
    on other ranks. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = {} if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)
    return weights, optim


def restore(model: Any, optimizer: Any, weights: dict[str, Any], optim: dict[str, Any]) -> None:
    """Load full weights and optimizer state (as ``gather`` returns them) into the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)
