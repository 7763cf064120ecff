"""``python -m raysft.evaluate DIR``: score a model, an adapter or an experiment's champion on
held-out rows, optionally beside the base model.

DIR is a full model directory (``config.json``), an adapter directory (``adapter_config.json``:
the base is loaded from its ``base_model_name_or_path``, a training checkpoint included) or an
experiment directory (its ``champion``). Settings (eval data, template, generation) come from
``--config``, else DIR's ``config.yaml`` (``raysft.train`` output), else the experiment's
``summary.json``, else the defaults; ``--data`` and ``--set`` override them.

What DIR is: ``raysft.search.eval_target``; the scoring (``score_model``, with which the search
scores the base model and the champion on the same rows): ``raysft.train.score_saved``; the
tables and JSON: ``raysft.train.score_report``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NoReturn

from raysft.cli import run_command, setup_logging
from raysft.config import split_overrides
from raysft.errors import ConfigError, ModelError
from raysft.search.eval_target import resolve_target
from raysft.train.score_report import as_json, metrics_table, side_by_side
from raysft.train.score_saved import (
    SCORABLE,
    ModelScore,
    eval_rows,
    placed,
    score_model,
    select_metrics,
)


def _at_dir(err: ModelError, path: Path) -> ModelError:
    """``err`` naming the model directory ``path`` (DIR, or an experiment's champion) where it
    says the model at ``path`` does not load: the directory came from the command line, not
    from a ``model.name_or_path`` setting."""
    said = f"model.name_or_path: cannot load {str(path)!r}: "
    if not str(err).startswith(said):
        return err  # an adapter's or its base's problem, placed already
    return ModelError(f"{path}: cannot load the model: {str(err).removeprefix(said)}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raysft.evaluate", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("dir", help="a model dir, an adapter dir or an experiment dir (its champion)")
    p.add_argument(
        "--data",
        action="append",
        help="held-out data (sets data.eval; repeatable), every row scored: the run's or "
        "--config's data.max_eval_samples and eval.max_prompts do not apply, --set does",
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
        # Your held-out file is scored whole, not the run's data.max_eval_samples of it, nor
        # the run's eval.max_prompts of it for the generated answers.
        overrides.setdefault("data.max_eval_samples", None)
        overrides.setdefault("eval.max_prompts", None)
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
            raise (placed(err, "--base-model") if args.base_model else err) from None
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
    first = scores[next(iter(scores))]
    fewer = first.samples and len(first.samples) < first.rows  # prompts too long, max_prompts
    answered = f", answers generated for {len(first.samples)}" if fewer else ""
    print(f"{target.kind} {target.path} ({first.rows} eval rows{answered})")
    print(metrics_table(scores))
    if args.show:
        print(side_by_side(scores, n=args.show))
    return 0


def main() -> NoReturn:
    """Entry point (``python -m raysft.evaluate`` and the ``raysft-evaluate`` script): user errors
    exit 2 with one message, never a traceback."""
    run_command(run)


if __name__ == "__main__":
    main()
