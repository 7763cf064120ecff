"""``python -m raysft.evaluate DIR``: score a model, an adapter or an experiment's champion on
held-out rows, optionally beside the base model.

DIR is a full model directory (``config.json``), an adapter directory (``adapter_config.json``:
the base is loaded from its ``base_model_name_or_path``, a training checkpoint included) or an
experiment directory (its ``champion``). Settings (eval data, template, generation) come from
``--config``, else DIR's ``config.yaml`` (``raysft.train`` output), else the experiment's
``summary.json``, else the defaults; ``--data`` and ``--set`` override them.

``score_model`` is the library entry: the search driver scores the base model and the champion on
the same rows with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from raysft.assets import adapter_base_path, available, resolve
from raysft.cli import run_cli, setup_logging
from raysft.config import (
    Config,
    blame_overrides,
    load_config,
    read_yaml,
    set_path,
    split_overrides,
    validate_tree,
)
from raysft.data.formats import Conversation, code_tests, scored_part
from raysft.data.pipeline import DataReport, check_template, load_eval, render_row
from raysft.data.templates import Example, tokenize
from raysft.errors import ConfigError, DataError, ModelError, SearchStateError
from raysft.search.results import SUMMARY_FILE, read_summary
from raysft.thirdparty import peft_quietly
from raysft.train.device import resolve_device
from raysft.train.metrics import METRICS, Metric
from raysft.train.model import (
    ADAPTER_WEIGHTS,
    build_bnb_config,
    check_bnb,
    from_pretrained,
    keep_4bit_weights_trainable,
    load_tokenizer,
    resolve_dtype,
    torch_device,
)
from raysft.train.scoring import bleu_says_nothing

log = logging.getLogger("raysft.evaluate")

SCORABLE = [m.name for m in METRICS.values() if m.compute is not None]


@dataclass
class Target:
    """What DIR names: the model or adapter to load, its base, and the settings to score with."""

    kind: str  # "model", "adapter" or "experiment"
    path: Path  # the model or adapter directory
    cfg: Config
    base: str | None  # the base model (an adapter's, or the config's); None if unknown


@dataclass
class ModelScore:
    model: str
    scores: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0


# ---------------------------------------------------------------- what DIR is


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on. A path ending in ``raysft/assets/NAME`` (the
    embedded base, resolved where the trial ran) maps back to ``embedded:NAME``."""

    try:
        meta = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{adapter_dir}/adapter_config.json: not valid JSON: {err}") from None
    base = meta.get("base_model_name_or_path") if isinstance(meta, dict) else None
    if not base:
        raise ModelError(f"{adapter_dir}: adapter_config.json names no base model")
    base = adapter_base_path(adapter_dir, base)  # a champion export's own copy, if it has one
    p = Path(base)
    if base.startswith("embedded:") or p.is_dir():
        return str(base)
    if p.parent.name == "assets" and p.parent.parent.name == "raysft" and p.name in available():
        return f"embedded:{p.name}"
    return str(base)  # a hub id, or a path on another machine: loading says which


def resolve_target(
    directory: str, *, config: str | None = None, overrides: dict[str, Any] | None = None
) -> Target:
    """Classify DIR and find the settings to score it with."""
    root = Path(directory)
    if not root.is_dir():
        if root.exists():
            raise ModelError(f"{directory}: a file; give a model, adapter or experiment directory")
        raise ModelError(f"{directory}: no such directory")
    kind, path, summary = "model", root, None
    if any((root / name).exists() for name in ("summary.json", "tune", "champion")):
        kind, summary = "experiment", read_summary(root)
        path = _champion_dir(root, summary)
    elif (root / "adapter_config.json").is_file():
        kind = "adapter"
    elif not (root / "config.json").is_file():
        trial = re.match(r"run_trial_on_ray_([0-9a-f]+)_", root.name)
        hint = (
            f"; this is Ray Tune's record of trial {trial[1]}: score its output "
            f"({root.parent.parent / 'trials' / trial[1]}) or a checkpoint of it "
            f"({root.parent.parent / 'train' / ('train-' + trial[1])}/checkpoint_*)"
            if trial and root.parent.name == "tune"
            else ""
        )
        raise ModelError(
            f"{directory}: neither a model (config.json), an adapter (adapter_config.json) nor "
            f"an experiment directory (summary.json){hint}"
        )
    # An experiment without its summary (copied without it, say): its champion export's own.
    own = path if kind == "experiment" and summary is None else root
    cfg, known = _settings(own, summary, config=config, overrides=overrides or {})
    if not known and not overrides:  # nothing of the run's, nothing of yours
        log.warning(
            "%s: no config.yaml or summary.json to read the run's settings from: scored with "
            "the defaults (pass --config FILE, or --data and --set, for its data and template)",
            directory,
        )
    if (path / "adapter_config.json").is_file():
        base: str | None = adapter_base(path)
    else:
        base = cfg.model.name_or_path if known else None
    return Target(kind, path, cfg, base)


def _champion_dir(exp_dir: Path, summary: dict[str, Any] | None) -> Path:
    promotion = (summary or {}).get("promotion") or {}
    export = promotion.get("export_dir")
    moved = _mover((summary or {}).get("experiment_dir"), exp_dir)
    # The recorded export; where it is if the project moved with the experiment dir since;
    # EXP_DIR/champion.
    for path in [Path(p) for p in (export, moved(export)) if p] + [exp_dir / "champion"]:
        if path.is_dir():
            return path
    if promotion.get("promoted") and export:
        raise SearchStateError(
            f"{exp_dir}: its champion (v{promotion.get('version')}) was exported to {export}, "
            "which is not there (moved or deleted?); score the export where it is now"
        )
    recorded = ((summary or {}).get("best") or {}).get("checkpoint")
    best = next((p for p in (recorded, moved(recorded)) if p and Path(p).is_dir()), None)
    hint = f"; score the best trial's checkpoint directly: {best}" if best else ""
    if recorded and not best:
        hint = f"; the best trial's checkpoint was {recorded}, which is not there now"
    why = promotion.get("reason") or "the search has not finished"
    raise SearchStateError(f"{exp_dir}: no champion to score ({why}){hint}")


def _mover(old_exp: Any, new_exp: Path) -> Callable[[Any], str | None]:
    """Where a path the summary recorded is now, if the experiment dir moved from ``old_exp``
    to ``new_exp`` together with that path: the directories above their common tail (e.g.
    ``/old/proj`` for ``/old/proj/exp`` -> ``/new/proj/exp``) map onto each other."""
    if not isinstance(old_exp, str):
        return lambda _: None
    old, new = Path(old_exp).parts, new_exp.resolve().parts
    tail = 0
    while tail < min(len(old), len(new)) - 1 and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    old_root, new_root = Path(*old[: len(old) - tail]), Path(*new[: len(new) - tail])

    def moved(path: Any) -> str | None:
        if not isinstance(path, str) or old_root == new_root:
            return None
        try:
            return str(new_root / Path(path).relative_to(old_root))
        except ValueError:
            return None  # not under the directory that moved

    return moved


def _settings(
    root: Path, summary: dict[str, Any] | None, *, config: str | None, overrides: dict[str, Any]
) -> tuple[Config, bool]:
    """The config to score with, and whether it is known (not just the defaults).

    A run's own settings (its ``config.yaml``, or the spec in the experiment's summary.json)
    name data and model by the paths the run was given: relative ones are read from the
    directory it ran in (``_working_dir``), not from yours. ``--config`` is yours."""
    if config is not None:
        return load_config(config, overrides), True
    if (root / "config.yaml").is_file():
        source, tree, prefix = str(root / "config.yaml"), read_yaml(root / "config.yaml"), ""
    else:
        if summary is None and (root.parent / "summary.json").is_file():  # EXP_DIR/champion
            root = root.parent
            summary = read_summary(root)
        spec = (summary or {}).get("resolved_spec")
        if not isinstance(spec, dict):
            return load_config(None, overrides), False
        tree = {k: v for k, v in spec.items() if k != "search"}
        source, prefix = str(root / "summary.json"), "resolved_spec: "
    _rebase(tree, _working_dir(root))  # before --set: those are yours
    problems = []
    for key, value in overrides.items():
        try:
            set_path(tree, key, value)
        except KeyError as err:
            problems.append(f"--set {err.args[0]}")
    if problems:
        raise ConfigError(source, problems)
    try:
        return validate_tree(tree, source=source), True
    except ConfigError as err:
        blamed = blame_overrides(err.problems, overrides)
        raise ConfigError(
            source, [b if b.startswith("--set ") else f"{prefix}{b}" for b in blamed]
        ) from None


def _working_dir(root: Path) -> str | None:
    """The directory the run under ``root`` read its relative paths from: its own record
    (metrics.json: a raysft.train output, a trial, an export), else its experiment's
    (summary.json, there or up to 4 levels above: EXP/train/train-ID/checkpoint_*), else its run's
    (metrics.json, up to 2 levels above: OUT/checkpoints/step-N); None when no record says."""
    here = root.resolve()
    own = _json_field(here / "metrics.json", "working_dir")
    if own is not None:
        return own
    for d in [here, *list(here.parents)[:4]]:
        if (d / SUMMARY_FILE).is_file():  # the nearest experiment: older ones record none
            wd = _json_field(d / SUMMARY_FILE, "working_dir")
            if wd is not None:
                return wd
            break
    for d in list(here.parents)[:2]:
        wd = _json_field(d / "metrics.json", "working_dir")
        if wd is not None:
            return wd
    return None


def _json_field(path: Path, key: str) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # not there, or not a record of ours: no working dir from it
    return value if isinstance(value, str) else None


def _rebase(tree: dict[str, Any], working_dir: Any) -> None:
    """The search's relative local paths (``data.train``, ``data.eval``,
    ``model.name_or_path``) made absolute in the directory it ran in (summary.json's
    ``working_dir``), where they are there; a Hub id such as ``org/name`` is not, and stays."""
    if not isinstance(working_dir, str) or not Path(working_dir).is_dir():
        return

    def moved(value: Any) -> Any:
        if isinstance(value, list):
            return [moved(v) for v in value]
        if not isinstance(value, str) or value.startswith(("embedded:", "hf:")):
            return value
        if Path(value).is_absolute():
            return value
        here = Path(working_dir, value)
        dir_part = Path(working_dir, value.rsplit(":", 1)[0])  # DIR:SPLIT
        if not (here.exists() or dir_part.exists()):
            return value
        return str(here)

    for section, key in (("data", "train"), ("data", "eval"), ("model", "name_or_path")):
        part = tree.get(section)
        if isinstance(part, dict) and key in part:
            part[key] = moved(part[key])


# ---------------------------------------------------------------- loading and scoring


def eval_rows(cfg: Config) -> list[Conversation]:
    """The held-out conversations ``cfg`` scores on (``data.eval``, or its seeded split)."""

    rows, report = load_eval(cfg.data, seed=cfg.train.seed)  # data.train only if split from
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
        raise (_placed(err, place) if adapter else err) from None
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


def _placed(err: ModelError, place: str) -> ModelError:
    """``err`` (a ``model.name_or_path: ...`` message) naming ``place`` instead."""
    return ModelError(f"{place}: {str(err).removeprefix('model.name_or_path: ')}")


def _at_dir(err: ModelError, path: Path) -> ModelError:
    """``err`` naming the model directory ``path`` (DIR, or an experiment's champion) where it
    says the model at ``path`` does not load: the directory came from the command line, not
    from a ``model.name_or_path`` setting."""
    said = f"model.name_or_path: cannot load {str(path)!r}: "
    if not str(err).startswith(said):
        return err  # an adapter's or its base's problem, placed already
    return ModelError(f"{path}: cannot load the model: {str(err).removeprefix(said)}")


def select_metrics(names: list[str] | None, conversations: list[Conversation]) -> list[Metric]:
    """The metrics to compute: ``names``, else every scorable one (pass@k when a row has tests)."""
    has_tests = any(code_tests(c) is not None for c in conversations)
    if names is None:
        return [METRICS[n] for n in SCORABLE if n != "pass_at_k" or has_tests]
    unknown = [n for n in names if n not in SCORABLE]
    if unknown:
        raise ConfigError(
            "--metrics", [f"cannot score {n!r} (scorable: {', '.join(SCORABLE)})" for n in unknown]
        )
    if "pass_at_k" in names and not has_tests:
        raise DataError("--metrics pass_at_k: no eval row has a `tests` field to run answers with")
    return [METRICS[n] for n in dict.fromkeys(names)]


def _tokenized(
    rows: list[Conversation], cfg: Config, tokenizer: Any
) -> tuple[list[Example], list[Conversation]]:
    """Rows rendered and tokenized as in training (``render_row``: under data.on_error=skip a
    row the template refuses is dropped, under strict it is a DataError naming it), without
    those whose answer truncation cut off entirely (nothing to score). Drops are logged."""
    check_template(cfg.data, tokenizer)
    report = DataReport()
    # The rows scored, numbered: eval rows may be a sampled split, so no file line to name.
    origins = {id(conv): f"eval row {i}" for i, conv in enumerate(rows, 1)}
    kept, cut = [], 0
    for conv in rows:
        segments = render_row(conv, cfg.data, tokenizer, report, origins=origins)
        if segments is None:
            continue
        ex = tokenize(segments, tokenizer, max_seq_len=cfg.data.max_seq_len)
        if ex.n_trained:
            kept.append((ex, scored_part(conv)))  # generation scores its last trained answer
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
    return [ex for ex, _ in kept], [conv for _, conv in kept]


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

    from raysft.train.evaluate import (
        compute,
        eval_loss_sum,
        generate_answers,
        warn_of_capped_references,
    )
    from raysft.train.recipe import autocast_for, group_by_length_tokens

    rows = eval_rows(cfg) if conversations is None else conversations
    due = select_metrics(metrics, rows)
    net, tokenizer = load_for_scoring(model, cfg=cfg, base_model=base_model)
    examples, kept = _tokenized(rows, cfg, tokenizer)
    if any(m.generates for m in due):
        warn_of_capped_references(
            kept, tokenizer, max_new_tokens=cfg.train.max_new_tokens, template=cfg.data.template
        )
    device = resolve_device(cfg.train.device)
    autocast = autocast_for(cfg, device)
    loss = functools.partial(
        eval_loss_sum, net, examples, [[i] for i in range(len(examples))], packing=False,
        batch_size=cfg.train.batch_size, pad_id=tokenizer.pad_token_id, device=device,
        autocast=autocast, group_tokens=group_by_length_tokens(cfg),
    )  # fmt: skip
    answers = functools.partial(
        generate_answers, net, tokenizer, kept, template=cfg.data.template,
        max_new_tokens=cfg.train.max_new_tokens, batch_size=32, device=device, autocast=autocast,
    )  # fmt: skip
    scores, samples = compute(due, cfg, loss=loss, answers=answers)
    log.info("%s: %s", model, json.dumps(scores))
    return ModelScore(model, scores, samples, len(kept))


# ---------------------------------------------------------------- output


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def metrics_table(
    scores: dict[str, ModelScore], *, conversations: list[Conversation] | None = None
) -> str:
    """Metrics as rows, one column per scored model (e.g. base, tuned); with the scored
    ``conversations``, a note under a BLEU no answer can earn by a 4-gram match."""
    names = list(dict.fromkeys(n for s in scores.values() for n in s.scores))
    head = ["metric", *scores]
    body = [[n, *(_fmt(s.scores.get(n)) for s in scores.values())] for n in names]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    table = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *body]
    )
    if len({s.rows for s in scores.values()}) > 1:  # a --base-model of another tokenizer
        counts = ", ".join(f"{name} {s.rows}" for name, s in scores.items())
        table += (
            f"\n(rows scored: {counts}: the models' tokenizers or templates keep different "
            "rows (data.on_error=skip, truncation), so the columns are not of the same rows)"
        )
    references = [scored_part(c)[-1]["content"] for c in conversations or []]
    if "bleu" in names and bleu_says_nothing(references):
        table += (
            "\n(bleu: every reference answer is shorter than 4 tokens, so no answer can match a "
            "4-gram: BLEU is 0 for answers as short, and above 0 only through sacreBLEU's "
            "smoothing of answers of 4 tokens or more, which scores their length, not their "
            "match; read exact_match and rouge_l)"
        )
    return table


def side_by_side(scores: dict[str, ModelScore], *, n: int = 3) -> str:
    """The first ``n`` prompts with the reference and each model's first answer, labelled by
    model (base, tuned) when there are several, else ``generated``."""
    first = next(iter(scores.values()))
    label = {name: name if len(scores) > 1 else "generated" for name in scores}
    blocks = []
    for i, sample in enumerate(first.samples[:n]):
        lines = [
            f"--- {i + 1}: {_flat(sample['prompt'])}",
            f"expected: {sample['expected']!r}",
        ]
        lines += [f"{label[name]}: {s.samples[i]['generated']!r}" for name, s in scores.items()]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _flat(prompt: str) -> str:
    """A prompt on one line, its end (the last user turn) kept when it is long."""
    flat = " ".join(prompt.split())
    return flat if len(flat) <= 160 else "..." + flat[-157:]


def as_json(scores: dict[str, ModelScore], *, n: int) -> dict[str, Any]:
    """Strict-JSON view (NaN -> null)."""
    return {
        name: {
            "model": s.model,
            "rows": s.rows,
            "metrics": {k: None if math.isnan(v) else v for k, v in s.scores.items()},
            "samples": s.samples[:n],
        }
        for name, s in scores.items()
    }


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raysft.evaluate", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("dir", help="a model dir, an adapter dir or an experiment dir (its champion)")
    p.add_argument(
        "--data",
        action="append",
        help="held-out data (sets data.eval; repeatable), every row scored: the run's or "
        "--config's data.max_eval_samples does not apply, --set data.max_eval_samples=N does",
    )
    p.add_argument("--metrics", help=f"comma-separated, of: {', '.join(SCORABLE)} (default: all)")
    p.add_argument("--base", action="store_true", help="also score the base model, same rows")
    p.add_argument("--base-model", help="the base model, if not the adapter's or the config's")
    p.add_argument("--config", help="YAML config with the data/template/eval settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--show", type=int, default=3, help="answers shown per model (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(argv: list[str] | None = None) -> int:
    """The CLI without the error edge (``main`` adds it)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.show < 0:
        parser.error(f"--show N: N must be >= 0 (got {args.show})")
    setup_logging(args.verbose)
    overrides, bad = split_overrides(args.overrides)
    if bad:  # named by what they override, as raysft.train and raysft.tune do
        raise ConfigError(args.config or args.dir, [f"--set {p}" for p in bad])
    if args.data:
        overrides["data.eval"] = args.data
        # Your held-out file is scored whole, not the run's data.max_eval_samples of it.
        overrides.setdefault("data.max_eval_samples", None)
    target = resolve_target(args.dir, config=args.config, overrides=overrides)
    metrics = None
    if args.metrics is not None:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not metrics:
            raise ConfigError("--metrics", [f"names no metric (scorable: {', '.join(SCORABLE)})"])
    base = args.base_model or target.base
    if args.base and base is None:
        raise ConfigError("--base", [f"no base model known for {args.dir}; pass --base-model"])
    rows = eval_rows(target.cfg)
    select_metrics(metrics, rows)  # a bad --metrics fails before any model loads
    scores: dict[str, ModelScore] = {}
    if args.base:
        assert base is not None  # for mypy: checked above
        try:
            scores["base"] = score_model(base, target.cfg, conversations=rows, metrics=metrics)
        except ModelError as err:
            raise (_placed(err, "--base-model") if args.base_model else err) from None
    try:
        scores["tuned" if args.base else "score"] = score_model(
            str(target.path), target.cfg, conversations=rows, metrics=metrics, base_model=base
        )
    except ModelError as err:
        raise _at_dir(err, target.path) from None
    if args.json:
        head = {"target": str(target.path), "kind": target.kind}
        print(json.dumps({**head, **as_json(scores, n=args.show)}, ensure_ascii=False))
        return 0
    print(f"{target.kind} {target.path} ({scores[next(iter(scores))].rows} eval rows)")
    print(metrics_table(scores, conversations=rows))
    if args.show:
        print(side_by_side(scores, n=args.show))
    return 0


def main() -> NoReturn:
    """Entry point (``python -m raysft.evaluate`` and the ``raysft-evaluate`` script): user errors
    exit 2 with one message, never a traceback."""
    run_cli(run)


if __name__ == "__main__":
    main()
