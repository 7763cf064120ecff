"""Saving a trained model: a LoRA/QLoRA run's adapter, or a full fine-tuning's whole model (in
its compute dtype, tied weights written once), with its tokenizer and a generation config that
stops where the template's answers end."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from raysft.errors import ModelError
from raysft.paths import give_plain_modes
from raysft.train.model import save_tokenizer


def _serving_generation_config(model: Any, stop_ids: Sequence[int]) -> Any | None:
    """A copy of the model's generation_config with ``stop_ids`` added to its EOS ids, or None
    where there is nothing to add."""
    gen = getattr(model, "generation_config", None)
    if gen is None or not stop_ids:
        return None
    eos = gen.eos_token_id
    own = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ids = list(dict.fromkeys([*own, *stop_ids]))
    if ids == own:
        return None
    gen = copy.deepcopy(gen)
    gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    return gen


def save_model(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    method: str,
    weights: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    stop_ids: Sequence[int] = (),
) -> Path:
    """lora/qlora: the adapter only; full: the whole model, from ``weights`` when given (a
    sharded model's gathered state), cast to ``dtype`` when given (bf16: half the bytes of an
    fp32 export). The tokenizer goes alongside, and a generation_config.json whose EOS ids
    include ``stop_ids`` (the template's one-token end of answer: ``answer_stops``), so a plain
    ``generate`` stops where the eval's answers did, not at the base's own EOS alone."""
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    serving = _serving_generation_config(model, stop_ids)
    if method in ("lora", "qlora"):
        if not isinstance(model, PeftModel):
            raise ModelError(f"method: {method} but the model has no adapter to save")
        model.save_pretrained(str(out))
        if serving is not None:  # peft saves none: load_champion applies this one
            serving.save_pretrained(out)
    else:
        # A copy: save_pretrained pops what it writes from the dict it is given (transformers
        # 5, for a model it did not load itself), and the caller's weights go on to the
        # training state.
        state = dict(weights) if weights is not None else model.state_dict()
        _tie_as_the_model(model, state)
        if dtype is not None:
            state = _cast_state(state, dtype)
        # Inference from the export should use the KV cache again; restore after saving.
        model.config.use_cache = True
        saved_dtype, saved_generation = model.config.dtype, model.generation_config
        try:
            if dtype is not None:
                model.config.dtype = dtype
            if serving is not None:
                model.generation_config = serving
            model.save_pretrained(out, state_dict=state)
        finally:
            model.config.use_cache = False
            model.config.dtype = saved_dtype
            model.generation_config = saved_generation
        if dtype is not None:
            _record_dtype(out / "config.json", dtype)
    save_tokenizer(tokenizer, out)
    # The files written here (new or rewritten), not the folder: output_dir may be the user's,
    # with modes of their choosing (0700, a group's setgid).
    written = [p.name for p in out.iterdir() if before.get(p.name) != p.stat().st_mtime_ns]
    give_plain_modes(None, [out / name for name in written])
    return out


def _tie_as_the_model(model: Any, state: dict[str, Any]) -> None:
    """The names of a tied embedding and LM head on one tensor in ``state``, as in the model:
    an FSDP model's gathered state holds a copy per name, and save_pretrained drops the tied
    copy only when the two share storage (it wrote the matrix twice)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or head.weight is not emb.weight:
        return
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight]
    present = [n for n in names if n in state]
    for name in present[1:]:
        state[name] = state[present[0]]


def _cast_state(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``state``'s floating tensors in ``dtype``, those that shared storage (tied embedding and
    LM head) still sharing it: save_pretrained drops a tied copy only when it shares, and cast
    apart, a tied 1B model's export carried its embedding twice."""
    cast: dict[tuple[int, int, Any, Any], torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        # The same view of the same storage: one cast for all its names (not for tensors
        # without storage, meta ones, whose data pointers are all 0).
        ptr = value.untyped_storage().data_ptr()
        ident = (ptr, value.storage_offset(), value.shape, value.stride())
        if not ptr:
            out[key] = value.to(dtype)
            continue
        if ident not in cast:
            cast[ident] = value.to(dtype)
        out[key] = cast[ident]
    return out


def _record_dtype(config_json: Path, dtype: torch.dtype) -> None:
    """config.json says the dtype the weights were written in. transformers 5's
    ``save_pretrained`` writes the live model's (fp32 training weights) over the one set, and
    ``from_pretrained(dtype="auto")`` would load a bf16 export in fp32, at twice the memory."""
    config = json.loads(config_json.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
