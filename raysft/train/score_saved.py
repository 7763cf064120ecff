"""Score a saved model, an adapter (a training checkpoint included) or a base model spec on
held-out rows, as its trials were scored: the rows, the model loaded as they trained it, the
metrics (``score_model``). ``raysft.evaluate`` and the search's base vs tuned comparison use it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysft.assets import adapter_base_path, available, resolve
from raysft.config import Config
from raysft.data.formats import Conversation, is_plain_text
from raysft.data.pipeline import DataReport, check_template, load_eval, render_row
from raysft.data.references import code_tests, scored_part
from raysft.data.tokens import Example, tokenize
from raysft.errors import ConfigError, DataError, ModelError
from raysft.thirdparty import peft_quietly
from raysft.train.device import resolve_device
from raysft.train.hub import from_pretrained
from raysft.train.metrics import METRICS, Metric
from raysft.train.model import (
    ADAPTER_WEIGHTS,
    build_bnb_config,
    check_bnb,
    keep_4bit_weights_trainable,
    load_tokenizer,
    resolve_dtype,
    torch_device,
)

log = logging.getLogger(__name__)

SCORABLE = [m.name for m in METRICS.values() if m.compute is not None]


@dataclass
class ModelScore:
    model: str
    scores: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on. A path ending in ``raysft/assets/NAME`` (the
    embedded base, resolved where the trial ran) maps back to ``embedded:NAME``."""

    try:
        meta = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not text (UnicodeDecodeError)
        raise ModelError(f"{adapter_dir}/adapter_config.json: not valid JSON: {err}") from None
    base = meta.get("base_model_name_or_path") if isinstance(meta, dict) else None
    if not base:
        raise ModelError(f"{adapter_dir}: adapter_config.json names no base model")
    if not isinstance(base, str):
        raise ModelError(
            f"{adapter_dir}/adapter_config.json: base_model_name_or_path: not a string "
            f"({json.dumps(base)})"
        )
    base = adapter_base_path(adapter_dir, base)  # a champion export's own copy, if it has one
    p = Path(base)
    if base.startswith("embedded:") or p.is_dir():
        return str(base)
    if p.parent.name == "assets" and p.parent.parent.name == "raysft" and p.name in available():
        return f"embedded:{p.name}"
    return str(base)  # a hub id, or a path on another machine: loading says which


def eval_rows(cfg: Config) -> list[Conversation]:
    """The held-out conversations ``cfg`` scores on (``data.eval``, or its seeded split)."""

    rows, report = load_eval(cfg.data, seed=cfg.data_seed())  # data.train only if split from
    if report.rows_skipped:  # dropped under data.on_error=skip: said, never silent
        log.warning(
            "%d row(s) skipped (data.on_error=skip), e.g. %s",
            report.rows_skipped,
            report.skipped[0],
        )
    return rows


def _as_trained(cfg: Config, device: Any) -> dict[str, Any]:
    """``from_pretrained`` settings that load a base as ``cfg``'s trials trained on it: in
    ``model.dtype`` (fp32 weights for full fine-tuning, half on a GPU for LoRA: a 7B base in
    fp32 would not fit the GPU its trial did), 4-bit for QLoRA, so the scores are those of the
    model the trials' metrics came from. Autocast is ``score_model``'s, as in training."""
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(cfg, device),
        "attn_implementation": cfg.model.attn_implementation,
        "device_map": {"": device},
    }
    if cfg.method == "qlora":
        check_bnb(device, cfg.qlora.quant_type)
        kwargs["quantization_config"] = build_bnb_config(cfg.qlora, device)
    return kwargs


def load_for_scoring(model: str, *, cfg: Config, base_model: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a model dir, an adapter dir or a base model spec."""
    from transformers import AutoModelForCausalLM

    path = Path(resolve(model))
    adapter = (path / "adapter_config.json").is_file()
    if adapter and not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        # peft would look the folder up on the Hub (a relative path) or blame a repo id
        raise ModelError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    own = adapter_base(path) if adapter else None
    base = (base_model or own) if adapter else model
    base_cfg = cfg.model.model_copy(update={"name_or_path": base})
    device = torch_device(resolve_device(cfg.train.device))
    try:
        net = from_pretrained(AutoModelForCausalLM, base_cfg, **_as_trained(cfg, device))
    except ModelError as err:
        # Name where the base came from: the command line, or the adapter's own config.
        place = (
            f"{path}/adapter_config.json: base_model_name_or_path"
            if base == own
            else "--base-model"
        )
        raise (placed(err, place) if adapter else err) from None
    if cfg.method == "qlora":  # the 4-bit layout training computes in, not the inference one
        keep_4bit_weights_trainable(net)
    has_tok = (path / "tokenizer_config.json").is_file()
    tok_cfg = cfg.model.model_copy(update={"name_or_path": str(path) if has_tok else base})
    tokenizer = load_tokenizer(tok_cfg)
    if adapter:
        from peft import PeftModel
        from safetensors import SafetensorError

        try:
            with peft_quietly():
                net = PeftModel.from_pretrained(net, str(path.resolve()))
        except (OSError, ValueError, SafetensorError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if isinstance(err, SafetensorError):
                first = f"a weights file is truncated or corrupt ({first})"
            raise ModelError(f"{path}: cannot load the adapter: {first}") from None
    net.eval()
    return net, tokenizer


def placed(err: ModelError, place: str) -> ModelError:
    """``err`` (a ``model.name_or_path: ...`` message) naming ``place`` instead."""
    return ModelError(f"{place}: {str(err).removeprefix('model.name_or_path: ')}")


def select_metrics(names: list[str] | None, conversations: list[Conversation]) -> list[Metric]:
    """The metrics to compute: ``names``, else every scorable one (pass@k when a row has tests;
    none that generates when every row is plain text, which has no answer)."""
    has_tests = any(code_tests(c) is not None for c in conversations)
    texts = bool(conversations) and all(is_plain_text(c) for c in conversations)
    if names is None:
        return [
            METRICS[n]
            for n in SCORABLE
            if (n != "pass_at_k" or has_tests) and not (texts and METRICS[n].generates)
        ]
    unknown = [n for n in names if n not in SCORABLE]
    if unknown:
        raise ConfigError(
            "--metrics", [f"cannot score {n!r} (scorable: {', '.join(SCORABLE)})" for n in unknown]
        )
    if "pass_at_k" in names and not has_tests:
        raise DataError("--metrics pass_at_k: no eval row has a `tests` field to run answers with")
    generating = [n for n in names if METRICS[n].generates]
    if texts and generating:  # said before any model loads
        raise DataError(
            f"--metrics {','.join(generating)}: the {len(conversations)} eval rows are plain "
            "text, with no answer to generate; score them with --metrics eval_loss"
        )
    return [METRICS[n] for n in dict.fromkeys(names)]


def _tokenized(
    rows: list[Conversation], cfg: Config, tokenizer: Any
) -> tuple[list[Example], list[Conversation], list[int]]:
    """Rows rendered and tokenized as in training (``render_row``: under data.on_error=skip a
    row the template refuses is dropped, under strict it is a DataError naming it), without
    those whose answer truncation cut off entirely (nothing to score). Drops are logged.
    Returns the examples, the conversations scored and their row numbers (1-based)."""
    check_template(cfg.data, tokenizer)
    report = DataReport()
    # The rows scored, numbered: eval rows may be a sampled split, so no file line to name.
    origins = {id(conv): f"eval row {i}" for i, conv in enumerate(rows, 1)}
    kept, cut = [], 0
    for number, conv in enumerate(rows, 1):
        segments = render_row(conv, cfg.data, tokenizer, report, origins=origins)
        if segments is None:
            continue
        ex = tokenize(segments, tokenizer, max_seq_len=cfg.data.max_seq_len)
        if ex.n_trained:
            kept.append((ex, scored_part(conv), number))  # generation: its last trained answer
        else:
            cut += 1
    drops = []
    if report.rows_skipped:
        drops.append(
            f"{report.rows_skipped} skipped as the template refuses them (data.on_error=skip), "
            f"e.g. {report.skipped[0]}"
        )
    if cut:
        drops.append(f"{cut} lost their answer to data.max_seq_len={cfg.data.max_seq_len}")
    if not kept:
        raise DataError(f"data.eval: no row left to score: {'; '.join(drops)}")
    for drop in drops:
        log.warning("%d of %d eval rows scored; %s", len(kept), len(rows), drop)
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]


def score_model(
    model: str,
    cfg: Config,
    *,
    conversations: list[Conversation] | None = None,
    metrics: list[str] | None = None,
    base_model: str | None = None,
) -> ModelScore:
    """Score ``model`` (a model dir, an adapter dir or a base spec such as ``embedded:tiny-base``)
    on ``conversations`` (default: ``eval_rows(cfg)``) with ``cfg``'s template and ``eval``
    settings. Scoring two models on the same rows makes their numbers comparable."""
    import functools

    from raysft.data.batching import group_by_length_tokens
    from raysft.train.evaluate import (
        compute,
        eval_loss_sum,
        generate_answers,
        generation_rows,
        warn_of_capped_references,
    )
    from raysft.train.precision import autocast_for

    rows = eval_rows(cfg) if conversations is None else conversations
    due = select_metrics(metrics, rows)
    net, tokenizer = load_for_scoring(model, cfg=cfg, base_model=base_model)
    examples, kept, numbers = _tokenized(rows, cfg, tokenizer)
    prompted = kept
    if any(m.generates for m in due):
        hint = "raise it with --set data.max_seq_len=..., or score --metrics eval_loss"
        prompted = generation_rows(kept, tokenizer, cfg, hint=hint)
        warn_of_capped_references(
            prompted, tokenizer, max_new_tokens=cfg.train.max_new_tokens, template=cfg.data.template
        )
    device = resolve_device(cfg.train.device)
    autocast = autocast_for(cfg, device)
    loss = functools.partial(
        eval_loss_sum, net, examples, [[i] for i in range(len(examples))], packing=False,
        batch_size=cfg.train.batch_size, pad_id=tokenizer.pad_token_id, device=device,
        autocast=autocast, group_tokens=group_by_length_tokens(cfg),
    )  # fmt: skip
    answers = functools.partial(
        generate_answers, net, tokenizer, prompted, template=cfg.data.template,
        max_new_tokens=cfg.train.max_new_tokens, batch_size=32, device=device, autocast=autocast,
    )  # fmt: skip
    scores, samples = compute(due, cfg, loss=loss, answers=answers)
    # Which eval row each answer is to (one per prompt, in order): models whose templates or
    # tokenizers keep different rows are shown side by side by row, not by position.
    number = {id(conv): n for conv, n in zip(kept, numbers, strict=True)}
    for sample, conv in zip(samples, prompted if samples else [], strict=True):
        sample["row"] = number[id(conv)]
    log.info("%s: %s", model, json.dumps(scores))
    return ModelScore(model, scores, samples, len(kept))
