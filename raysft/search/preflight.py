"""Before Ray starts: read the data and the model exactly as a trial will, on the driver.

A missing, empty or malformed dataset, a model path that does not exist or an architecture that
``AutoModelForCausalLM`` cannot build is then one message and exit 2 from ``load_spec``, for
``--dry-run`` and a real search alike, instead of a first trial failing inside Ray. One check
covers every trial: spec validation refuses searching ``data.*`` and the model path, so every
trial reads the data and model the spec names.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from raysft.assets import resolve
from raysft.config import ModelSection, SearchSpec
from raysft.data.shared import SharedData, read_once
from raysft.errors import ConfigError, DataError, ModelError, TemplateError
from raysft.train.hub import from_pretrained
from raysft.train.lora import check_targets, targetable_modules
from raysft.train.model import build_meta_model, check_vocab, training_tokenizer

log = logging.getLogger(__name__)


def preflight(spec: SearchSpec, *, source: str) -> SharedData:
    """Check model and data as a trial would read them; returns the data as read, for the
    trials to take (``raysft.data.shared``).

    Raises ``ModelError``, ``DataError`` or ``TemplateError`` (one message naming the place),
    or ``ConfigError`` for a searched ``train.seed`` that picks the eval rows.
    """

    try:
        config = check_model(spec.model)
        check_searched_targets(spec)
        tokenizer = training_tokenizer(spec)
        check_vocab(config.vocab_size, tokenizer, name=spec.model.name_or_path)
        data = read_once(
            spec,
            tokenizer,
            seed_searched="train.seed" in spec.search.params,
            check_eval=functools.partial(_generation_rows, tokenizer=tokenizer, spec=spec),
        )
    except (ModelError, DataError, TemplateError) as err:
        # "model.name_or_path: ..." names a field: say which file holds it. A message that
        # names a data file and row is already its own place.
        if str(err).startswith(("model.", "data.", "lora.", "search.")):
            raise type(err)(f"{source}: {err}") from None
        raise
    if "train.seed" in spec.search.params and data.seed_matters:
        raise ConfigError(
            source,
            [
                "search.params.train.seed: train.seed cannot be searched here: it picks the "
                f"eval rows (data.eval has more than data.max_eval_samples="
                f"{spec.data.max_eval_samples} rows), so trials would be scored on different "
                "rows; set data.seed (the data's own seed), data.max_eval_samples: null (score "
                "every eval row) or fix train.seed"
            ],
        )
    # Debug: the driver's logging is on by now, and a spec refused after this (its experiment
    # dir held, say) must still say one line.
    log.debug("preflight: data and model of %s read as a trial will", source)
    return data


def _generation_rows(convs: list[Any], *, tokenizer: Any, spec: SearchSpec) -> None:
    """Where the trials generate: their held-out prompts fit (``generation_rows``), said here
    before Ray starts, and none fitting refused."""
    from raysft.train.evaluate import generation_rows
    from raysft.train.metrics import computed_at

    if any(m.generates for m in computed_at(spec, final=True)):
        generation_rows(convs, tokenizer, spec)


_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def check_model(model: ModelSection) -> Any:
    """The model's config loads and names an architecture ``AutoModelForCausalLM`` builds;
    returns it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = model.name_or_path
    path = Path(resolve(name)).expanduser()
    if _looks_local(name) and not path.exists():
        raise ModelError(f"model.name_or_path: {name}: no such directory")
    if path.exists() and not path.is_dir():
        raise ModelError(
            f"model.name_or_path: {name}: not a directory (a model directory holds "
            "config.json and the weights)"
        )
    config = from_pretrained(AutoConfig, model)
    auto_map = getattr(config, "auto_map", None) or {}
    remote = model.trust_remote_code and "AutoModelForCausalLM" in auto_map
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ModelError(
            f"model.name_or_path: {name}: architecture {config.model_type!r} is not a causal "
            "language model AutoModelForCausalLM can build (Llama, Qwen2, Mistral style bases are)"
        )
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in _WEIGHTS):
        # Only the config is read here (the model is built on the meta device): without this,
        # every trial would fail at its load, inside Ray.
        raise ModelError(
            f"model.name_or_path: {name}: no weights in the directory (model.safetensors, "
            "pytorch_model.bin or their sharded *.index.json)"
        )
    return config


def check_searched_targets(spec: SearchSpec) -> None:
    """Every ``lora.target_modules`` a trial may train with (the spec's, or each searched
    choice) names layers of the model: else every trial would fail inside Ray, or quietly
    adapt fewer layers than the spec says."""
    searched = spec.search.params.get("lora.target_modules")
    method = spec.search.params.get("method")
    if spec.method == "full" and method is None and searched is None:
        return
    choices = list(searched.values or []) if searched is not None else [spec.lora.target_modules]
    base = build_meta_model(spec.model_copy(update={"method": "full"}))
    targetable, linears = targetable_modules(base)
    for targets in choices:
        lora = spec.lora.model_copy(update={"target_modules": targets})
        try:
            check_targets(targetable, linears, lora, model=spec.model.name_or_path)
        except ModelError as err:
            if searched is None:
                raise
            why = str(err).removeprefix("lora.target_modules: ")
            raise ModelError(
                f"search.params.lora.target_modules: the choice {targets}: {why}"
            ) from None


def _looks_local(name: str) -> bool:
    """A path, not a hub id (``org/name``): absolute, relative with ./ or ../, ~, or deeper."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
