"""A model's shape for the memory planner: read from its config.json, built on the meta device
(no weights, no network: a hub id is read from the local Hugging Face cache), and the linears a
LoRA config adapts."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from raysft.assets import resolve
from raysft.config import LoraSection, ModelSection
from raysft.errors import ModelError


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config.json on the meta device."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # every parameter, tied ones once
    linears: tuple[tuple[str, int, int], ...]  # every nn.Linear but the LM head: (name, in, out)

    @property
    def linear_params(self) -> int:
        """Weights of the linear layers: what 4-bit quantization stores in NF4."""
        return sum(i * o for _, i, o in self.linears)

    def layer_linears(self) -> list[tuple[str, int, int]]:
        """The first decoder layer's linears, named by their last component (``q_proj``)."""
        first = [(n, i, o) for n, i, o in self.linears if ".0." in f".{n}."]
        return [(n.rsplit(".", 1)[-1], i, o) for n, i, o in first]


def model_shape(model: ModelSection) -> ModelShape:
    """The shape of ``model`` from its config.json; ModelError when that cannot be read."""
    return _shape(model.name_or_path, model.revision, model.trust_remote_code)


@functools.lru_cache(maxsize=8)
def _shape(name_or_path: str, revision: str | None, trust_remote_code: bool) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        # Local files only: planning stays offline and instant (a hub id: from the HF cache).
        config = AutoConfig.from_pretrained(
            resolve(name_or_path),
            revision=revision,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    except (OSError, ValueError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hub = f"local files only: `hf download {name_or_path} config.json`"
        if not Path(resolve(name_or_path)).expanduser().exists():
            why = "no such directory" if name_or_path.startswith(("/", ".", "~")) else hub
        raise ModelError(f"no config.json for {name_or_path!r} on this machine ({why})") from None
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, attn_implementation="eager"
        )
    head = net.get_output_embeddings()
    linears = tuple(
        (name, m.in_features, m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    return ModelShape(
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", 0) or 4 * text.hidden_size),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab=int(text.vocab_size),
        params=sum(p.numel() for p in net.parameters()),
        linears=linears,
    )


def adapted_modules(shape: ModelShape, lora: LoraSection) -> list[tuple[str, int, int]]:
    """The linears peft adapts: ``all-linear`` is every linear but the LM head; a name matches
    a module whose dotted name equals it or ends with ``.name`` (peft's rule)."""
    targets = lora.target_modules
    if targets == "all-linear":
        return list(shape.linears)
    return [
        (n, i, o) for n, i, o in shape.linears if any(LoraSection.matches(n, t) for t in targets)
    ]


def lora_params(shape: ModelShape, lora: LoraSection) -> int:
    """Adapter parameters: r * (in + out) per adapted linear (+ out for DoRA's magnitude)."""
    return sum(
        lora.r * (i + o) + (o if lora.use_dora else 0) for _, i, o in adapted_modules(shape, lora)
    )
