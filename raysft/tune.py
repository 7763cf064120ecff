"""``python -m raysft.tune SPEC.yaml``: SFT hyperparameter search.

Optuna TPE proposes configs, ASHA stops bad trials on the per-eval metric, each trial runs the
SFT recipe under Ray Train, every trial is mirrored into MLflow, and the best adapter is promoted
to the Model Registry (alias ``champion``).

Under ``ray job submit`` or with RAY_ADDRESS set it joins that cluster; otherwise it starts a
local Ray with the CPUs/GPUs of this machine.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from raysft.cli import add_config_args, run_cli, setup_logging
from raysft.config import SearchSpec
from raysft.search.resources import (
    attaching_to_cluster,
    local_nodes,
    meant_for_a_cluster,
    plan_resources,
)
from raysft.search.space import describe_space
from raysft.search.spec import load_spec


def _dry_run(cfg: SearchSpec) -> int:
    s = cfg.search
    print("search space:")
    print("\n".join(f"  {line}" for line in describe_space(s)))
    print(
        f"metric: {s.metric} ({s.mode}), samples: {s.num_samples}, seed: {s.seed}, "
        f"scheduler: {s.scheduler.type}"
    )
    nodes = local_nodes()
    if attaching_to_cluster() or meant_for_a_cluster(s, nodes):
        r = s.resources
        why = "" if attaching_to_cluster() else " (this machine has no GPU)"
        print(
            f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, "
            f"{r.gpus_per_worker:g} GPU; checked against the cluster's nodes when the "
            f"search starts there{why}"
        )
    else:
        plan, problems = plan_resources(s, nodes, where="this machine")
        if plan is None:  # load_spec refuses such a spec; kept for a direct caller
            print("\n".join(problems))
            return 2
        print(plan.describe(s))
    return 0


def _print_summary(summary: dict[str, Any], metric: str) -> None:
    from raysft.search.results import SUMMARY_FILE, table
    from raysft.search.tracking import ui_command

    print()
    print(table(summary["trials"], metric))
    best = summary["best"]
    if best:
        print(f"\nbest trial {best['trial_id']}: {metric}={best['metric']:.4g}", end="")
        if best.get("exact_match") is not None:
            print(f", held-out exact match {best['exact_match']:.1%}", end="")
            if best.get("base_exact_match") is not None:
                print(f" (base model {best['base_exact_match']:.1%})", end="")
        print()
    p = summary["promotion"]
    print(
        "promotion: "
        + (
            f"v{p['version']} is now @{p['alias']}, exported to {p['export_dir']}"
            if p.get("promoted")
            else f"none ({p.get('reason')})"
        )
    )
    print(f"summary: {summary['experiment_dir']}/{SUMMARY_FILE}  ({summary['wall_seconds']} s)")
    print(f"compare trials: {ui_command(summary['mlflow']['tracking_uri'])}")


def _main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raysft.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the spec, print the space and resource plan; no Ray",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the search in experiment_dir"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    tree, cfg = load_spec(args.config, args.overrides, dry_run=args.dry_run)
    if args.dry_run:
        return _dry_run(cfg)
    setup_logging(args.verbose)
    from raysft.search.driver import run_search

    summary = run_search(args.config, tree, cfg, resume=args.resume)
    _print_summary(summary, cfg.search.metric)
    return 0


def main() -> NoReturn:
    """Entry point (``python -m raysft.tune`` and the ``raysft-tune`` script)."""
    run_cli(_main)


if __name__ == "__main__":
    main()
