"""``python -m raysft.train CONFIG.yaml``: one SFT training run (no Ray).

--dry-run validates, checks the device, reads the data as the run will and prints the resolved
config, parameter counts (meta device, no weights) and the data's size;
--preview N [--json] prints the first N training examples (held-out rows left out) exactly as
trained;
--resume-from DIR continues from a checkpoint (OUTPUT_DIR/checkpoints/step-N, written at every
eval) exactly where it stopped; with --dry-run, checks the resume as it would start (the
checkpoint, the config against it, the data's bytes) and trains nothing.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from raysft.cli import config_parser, run_command, setup_logging, stops_interrupt
from raysft.config import Config, load_config
from raysft.data.pipeline import (
    PreparedData,
    TrainingRows,
    check_template,
    render_row,
    training_rows,
)
from raysft.data.shared import SharedData
from raysft.data.tokens import Segment, tokenize, trained_spans
from raysft.errors import ConfigError, DataError, ModelError, TemplateError
from raysft.paths import missing_dirs, remove_if_unused
from raysft.search.preflight import check_model
from raysft.search.redact import saved_config_text
from raysft.train.model import (
    build_meta_model,
    check_vocab,
    count_parameters,
    format_parameter_counts,
    load_tokenizer,
    training_tokenizer,
)
from raysft.train.run_dir import (
    check_output_dir,
    hold_output_dir,
    interrupted_note,
    moved_run,
    nothing_left,
)

log = logging.getLogger("raysft.train")  # __name__ is "__main__" under -m


def _check_model(cfg: Config, source: str) -> Any:
    """The model on the meta device (config.json only), adapter attached: an unsupported
    architecture or a ``lora.target_modules`` name that matches nothing is one error naming
    the config file, before anything is printed or loaded."""
    try:
        config = check_model(cfg.model)
        check_vocab(config.vocab_size, training_tokenizer(cfg), name=cfg.model.name_or_path)
        return build_meta_model(cfg)
    except ModelError as err:
        if str(err).startswith(("model.", "lora.")):
            raise ModelError(f"{source}: {err}") from None
        raise


def _check_data(cfg: Config, source: str) -> PreparedData:
    """The data read and tokenized as the run will: a missing file, a malformed row or a
    template the tokenizer cannot render is one error naming the place, as a run's would be."""
    from raysft.data.pipeline import prepare_data

    try:
        return prepare_data(cfg.data, training_tokenizer(cfg), seed=cfg.data_seed())
    except (DataError, TemplateError, ModelError) as err:
        if str(err).startswith(("data.", "model.")):
            raise type(err)(f"{source}: {err}") from None
        raise


def _epochs_as_steps(cfg: Config, source: str) -> tuple[Config, SharedData]:
    """``cfg`` with ``train.epochs`` resolved into ``train.max_steps`` (``raysft.train.epochs``),
    and the data read for it, which the run then takes instead of reading it again."""
    from raysft.data.shared import read_once
    from raysft.train.epochs import resolve_epochs

    try:
        shared = read_once(cfg, training_tokenizer(cfg), seed_searched=False)
    except (DataError, TemplateError, ModelError) as err:
        if str(err).startswith(("data.", "model.")):
            raise type(err)(f"{source}: {err}") from None
        raise
    resolved = resolve_epochs(cfg, shared.prepared().train, world_size=1, source=source)
    return resolved, shared


def _dry_run(cfg: Config, source: str, *, resume_from: str | None = None) -> int:
    from raysft.train.device import training_device

    training_device(cfg)  # the run's own first check: CUDA asked for and unusable, and the like
    epochs = cfg.train.epochs
    read = None
    if epochs is not None:  # a resume's checks count steps
        cfg, read = _epochs_as_steps(cfg, source)
    if resume_from is not None:
        from raysft.train.resume_checks import check_resumable

        check_resumable(resume_from, cfg)
    meta = _check_model(cfg, source)
    prepared = read.prepared() if read is not None else _check_data(cfg, source)
    report = prepared.report
    from raysft.train.evaluate import generation_rows
    from raysft.train.metrics import computed_at

    if any(m.generates for m in computed_at(cfg, final=True)):
        try:  # the run's own check, before its model loads
            generation_rows(prepared.eval_conversations, training_tokenizer(cfg), cfg)
        except DataError as err:
            raise DataError(f"{source}: {err}") from None
    if resume_from is not None:  # as the run's setup does
        from raysft.data.digest import TOKENS, data_digests, token_digests
        from raysft.train.resume_checks import check_same_data, check_same_tokens

        digests = data_digests(cfg.data)
        check_same_data(resume_from, digests)
        check_same_tokens(resume_from, {**digests, TOKENS: token_digests(prepared)})
    print(saved_config_text(cfg), end="")
    print(format_parameter_counts(*count_parameters(meta)))
    lost = report.train_dropped_no_trained_tokens + report.eval_dropped_no_trained_tokens
    dropped = [
        f"{report.train_truncated:,} training samples truncated to data.max_seq_len"
        if report.train_truncated
        else "",
        f"{report.rows_skipped:,} rows skipped" if report.rows_skipped else "",
        f"{lost:,} samples dropped (truncated to nothing to train)" if lost else "",
    ]
    sampled = (
        f" (picked from {report.eval_sampled_from:,} held-out rows: data.max_eval_samples)"
        if report.eval_sampled_from
        else ""
    )
    print(
        f"data: {report.train_examples:,} training and {report.eval_examples:,} eval examples"
        f"{sampled}, {report.train_tokens:,} training tokens ({report.trained_tokens:,} trained)"
        + "".join(f", {d}" for d in dropped if d)
    )
    # The first of each, as --preview says it: a count alone does not say what to fix.
    for what, reasons in (("skipped", report.skipped), ("dropped", report.dropped)):
        if reasons:
            print(f"  first {what}: {reasons[0]}")
    if epochs is not None:
        print(f"train.epochs {epochs:g}: {cfg.train.max_steps:,} optimizer steps (train.max_steps)")
    if resume_from is not None:
        from raysft.train.state import checkpoint_step

        step = checkpoint_step(resume_from)
        print(f"resume: from step {step:,} of {cfg.train.max_steps:,}, in {cfg.output_dir}")
    try:  # said, not refused: a config may be checked before its output_dir is cleared
        check_output_dir(cfg, source, resuming=resume_from)
        if resume_from is not None:
            nothing_left(cfg, resume_from)
    except ConfigError as err:
        print(f"note: the run would be refused: {'; '.join(err.problems)}")
    return 0


def _runs(ex, tokenizer) -> list[tuple[str, bool]]:
    """Decoded text of each maximal run of trained / untrained tokens, in order."""
    runs: list[tuple[list[int], bool]] = []
    for tok, label in zip(ex.input_ids, ex.labels, strict=True):
        on = label != -100
        if not runs or runs[-1][1] != on:
            runs.append(([], on))
        runs[-1][0].append(tok)
    return [(tokenizer.decode(ids, skip_special_tokens=False), on) for ids, on in runs]


def _rendered(cfg: Config, rows: TrainingRows, n: int, tokenizer: Any) -> list[list[Segment]]:
    """The first ``n`` training rows as the run renders them. Every row goes through the
    pipeline's per-row handling, so ``rows.report`` counts the skipped ones over all rows, as a
    dry run does: a row the template refuses is skipped or (strict) an error naming its file
    and line."""
    shown: list[list[Segment]] = []
    for conv in rows.conversations:
        segments = render_row(
            conv, cfg.data, tokenizer, rows.report, origins=rows.origins, training=True
        )
        if segments is not None and len(shown) < n:
            shown.append(segments)
    return shown


def _preview(cfg: Config, n: int, as_json: bool) -> int:
    # Data first: a bad row is reported before the (slower) tokenizer load.
    rows = training_rows(cfg.data, seed=cfg.data_seed())
    tokenizer = load_tokenizer(cfg.model)
    check_template(cfg.data, tokenizer)
    rendered, report = _rendered(cfg, rows, n, tokenizer), rows.report
    color = sys.stdout.isatty() and not as_json
    start, end = ("\033[1;32m", "\033[0m") if color else ("«", "»")
    # Notes go to stderr beside --json's lines, which stay one JSON each.
    notes = sys.stderr if as_json else sys.stdout
    for i, segments in enumerate(rendered):
        ex = tokenize(segments, tokenizer, max_seq_len=cfg.data.max_seq_len)
        text = tokenizer.decode(ex.input_ids, skip_special_tokens=False)
        spans = trained_spans(ex, tokenizer)
        if as_json:
            print(
                json.dumps(
                    {"text": text, "trained": spans, "n_tokens": ex.n_tokens},
                    ensure_ascii=False,
                )
            )
            continue
        marked = [f"{start}{t}{end}" if trained else t for t, trained in _runs(ex, tokenizer)]
        note = " (truncated)" if ex.truncated else ""
        if ex.n_trained == 0:
            what = "refuses it" if cfg.data.on_error == "strict" else "drops and counts it"
            note = f" (truncated, nothing left to train: a run {what})"
        print(f"--- example {i}: {ex.n_tokens} tokens, {ex.n_trained} trained{note}")
        print("".join(marked))
    if report.rows_skipped:
        print(
            f"--- {report.rows_skipped} rows skipped (data.on_error=skip), e.g. "
            f"{report.skipped[0]}",
            file=notes,
        )
    if rows.no_split:
        print(f"--- note: a run would refuse this data: {rows.no_split}", file=notes)
    return 0


def _train(cfg: Config, resume_from: str | None, shared: SharedData | None = None) -> int:
    from raysft.errors import TrainingDiverged
    from raysft.train.recipe import DIVERGED_AT, divergence_hint, run_trial
    from raysft.train.state import LocalCheckpoints

    checkpoints = LocalCheckpoints(Path(cfg.output_dir) / "checkpoints")
    try:
        with stops_interrupt():  # the note says where the run can continue from
            result = run_trial(cfg, report=checkpoints, resume_from=resume_from, shared=shared)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            interrupted_note(cfg, checkpoints.latest(), resume_from=resume_from)
        ) from None
    f = result.final
    if DIVERGED_AT in f:
        kept = checkpoints.latest()
        last = (
            f"; the last finite checkpoint, to score (raysft.evaluate), not to resume with the "
            f"same settings: {kept}"
            if kept
            else ""
        )
        raise TrainingDiverged(
            f"training diverged at step {f[DIVERGED_AT]} (train_loss {f.get('train_loss')}, "
            f"eval_loss {f.get('eval_loss', '-')}) and stopped: {divergence_hint(cfg)}. "
            f"{result.output_dir} holds config.yaml and metrics.json, no model{last}"
        )
    print(f"output: {result.output_dir}")
    base_loss = f.get("base_eval_loss")
    vs_base = f" (base model {base_loss:.4f})" if isinstance(base_loss, int | float) else ""
    print(
        f"eval_loss: {f.get('eval_loss', float('nan')):.4f}{vs_base}  "
        f"train_seconds: {f['train_seconds']}"
    )
    computed = ("perplexity", "rouge_l", "bleu", "pass_at_k")
    others = [f"{m}: {f[m]:.4g}" for m in computed if isinstance(f.get(m), int | float)]
    if others:  # the generation metrics the run computed (its spec may search on one)
        print("  ".join(others))
    if "exact_match" in f:
        base = f.get("base_exact_match")
        line = f"held-out exact match: {f['exact_match']:.1%}"
        if base is not None:
            line += f" (base model {base:.1%}, gain {f['exact_match_gain'] * 100:+.1f} points)"
        print(line)
    return 0


def _follow_a_moved_run(cfg: Config, checkpoint: str) -> Config:
    """``cfg`` with the output_dir the resume of ``checkpoint`` goes on in (``moved_run``),
    said where its run folder moved."""
    moved = moved_run(cfg, checkpoint)
    if moved is None:
        return cfg
    then, now = moved
    if then == now:  # not moved: its relative output_dir is read from another directory here
        return cfg.model_copy(update={"output_dir": str(now)})
    print(
        f"note: {checkpoint} was written by a run in {then}; it is continued where the "
        f"checkpoint is, in {now} (--set output_dir=... for another folder)",
        file=sys.stderr,
    )
    return cfg.model_copy(update={"output_dir": str(now)})


def _main() -> int:
    # From the start, not from the first step: a stop while the model or the data is checked
    # (seconds, minutes for a large file) is said too.
    with stops_interrupt():
        return _command()


def _command() -> int:
    parser = config_parser("python -m raysft.train", __doc__)
    parser.add_argument("--dry-run", action="store_true", help="validate, print config and counts")
    parser.add_argument("--preview", type=int, metavar="N", help="print the first N examples")
    parser.add_argument("--json", action="store_true", help="with --preview: one JSON per line")
    parser.add_argument(
        "--resume-from",
        metavar="CHECKPOINT_DIR",
        help="continue from a checkpoint (OUTPUT_DIR/checkpoints/step-N) at its step",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.json and args.preview is None:
        parser.error("--json needs --preview N")
    # --dry-run --resume-from checks a resume: one mode.
    resuming = args.resume_from is not None and not args.dry_run
    modes = [f for f, on in (("--dry-run", args.dry_run), ("--preview", args.preview is not None),
                             ("--resume-from", resuming)) if on]  # fmt: skip
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} do different things: give one")
    if args.preview is not None and args.preview < 0:
        # train[:N] with N < 0 would print all but the last -N examples
        parser.error(f"--preview N: N must be >= 0 (got {args.preview})")
    # The --set pairs as given: a malformed one is reported with the file's problems.
    cfg = load_config(args.config, args.overrides, authored=True)
    if args.dry_run:
        if args.resume_from is not None:
            cfg = _follow_a_moved_run(cfg, args.resume_from)
        return _dry_run(cfg, args.config, resume_from=args.resume_from)
    if args.preview is not None:
        return _preview(cfg, args.preview, args.json)
    if args.resume_from is not None:
        from raysft.train.state import check_is_checkpoint

        check_is_checkpoint(args.resume_from)  # said as itself, not as an output_dir problem
        cfg = _follow_a_moved_run(cfg, args.resume_from)
    shared = None
    if cfg.train.epochs is not None:  # before anything counts steps: a resume's checks do
        if args.resume_from is None:  # counts none: a folder in use is said before the read
            check_output_dir(cfg, args.config, resuming=None)
        setup_logging(args.verbose)  # the read and the steps it gives are said
        _check_model(cfg, args.config)  # its tokenizer reads the data
        cfg, shared = _epochs_as_steps(cfg, args.config)
    check_output_dir(cfg, args.config, resuming=args.resume_from)
    if shared is None:  # else checked above
        _check_model(cfg, args.config)
    if args.resume_from is not None:
        from raysft.train.resume_checks import check_resumable

        check_resumable(args.resume_from, cfg)  # before any data or weights load
    finishing = args.resume_from is not None and nothing_left(cfg, args.resume_from)
    setup_logging(args.verbose)
    if finishing:
        log.info(
            "%s is the run's last step (train.max_steps=%d): nothing is left to train; writing "
            "its outputs to %s",
            args.resume_from,
            cfg.train.max_steps,
            cfg.output_dir,
        )
    out = Path(cfg.output_dir).resolve()
    created = missing_dirs(out)
    # Held before the try: a run refused because another holds the folder removes nothing.
    lock = hold_output_dir(cfg, args.config)
    try:
        return _train(cfg, args.resume_from, shared=shared)
    except BaseException:
        # Failed before its first checkpoint (its data or model refused, a Ctrl-C): the
        # directories this start made go again, nothing half-made is left.
        remove_if_unused(out, created, empty=("checkpoints",))
        raise
    finally:
        lock.close()  # releases it


def main() -> NoReturn:
    """Entry point (``python -m raysft.train`` and the ``raysft-train`` script): user errors
    exit 2 with one message, never a traceback."""
    run_command(_main)


if __name__ == "__main__":
    main()
