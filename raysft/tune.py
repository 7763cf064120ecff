"""``python -m raysft.tune SPEC.yaml``: SFT hyperparameter search.

Optuna TPE proposes configs, ASHA stops bad trials on the per-eval metric, each trial runs the
SFT recipe under Ray Train, every trial is mirrored into MLflow, and the best adapter is promoted
to the Model Registry (alias ``champion``).

Under ``ray job submit`` or with RAY_ADDRESS set it joins that cluster; otherwise it starts a
local Ray with the CPUs/GPUs of this machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from raysft.cli import (
    EXIT_FINISH_FAILED,
    config_parser,
    run_command,
    setup_logging,
    stops_interrupt,
)
from raysft.config import SearchSpec
from raysft.search.driver import run_search
from raysft.search.experiment import (
    check_experiment_dir,
    experiment_dir_holder,
    foreign_notice,
    foreign_outputs,
)
from raysft.search.ray_start import attaching_to_cluster
from raysft.search.resources import (
    Node,
    local_nodes,
    meant_for_a_cluster,
    plan_memory,
    plan_resources,
)
from raysft.search.results import SUMMARY_FILE, table
from raysft.search.space import describe_sampler, describe_space
from raysft.search.spec import read_spec, trial_memory
from raysft.search.tracking_store import runs_page, spec_store_error, ui_command


def _dry_run(spec_path: str, cfg: SearchSpec, exp_dir: Path, *, resume: bool) -> int:
    """Print what the search would do; 2 where it would be refused (a note where the refusal
    depends on where it runs: a cluster's MLflow store may answer there and not here)."""
    nodes = local_nodes()
    cluster = attaching_to_cluster() or meant_for_a_cluster(cfg.search, nodes)
    store = spec_store_error(spec_path, cfg)
    if store is not None and not cluster:
        raise store
    code = _print_plan(cfg, nodes, cluster=cluster)
    if store is not None:
        print(f"note: {store} (from this machine; the search checks it again where it runs)")
    holder = experiment_dir_holder(exp_dir)
    if holder:
        print(
            f"note: search.experiment_dir {exp_dir} is in use by a running search ({holder}): "
            "the run would be refused until it ends"
        )
    elif (exp_dir / "tune").exists() and not resume:
        print(
            f"note: search.experiment_dir {exp_dir} already holds a search: the run would be "
            "refused; pass --resume to continue it, or choose another directory"
        )
    elif not resume and (foreign := foreign_outputs(exp_dir)):
        notice = foreign_notice(exp_dir, foreign)
        print(f"note: search.experiment_dir {notice}: the run would be refused")
    return code


def _print_plan(cfg: SearchSpec, nodes: list[Node], *, cluster: bool) -> int:
    s = cfg.search
    print("search space:")
    print("\n".join(f"  {line}" for line in describe_space(s)))
    print(
        f"metric: {s.metric} ({s.mode}), samples: {s.num_samples}, seed: {s.seed}, "
        f"scheduler: {s.scheduler.type}"
    )
    t = cfg.train
    length = (
        f"train.epochs {t.epochs:g} (counted in steps where the search reads its data)"
        if t.epochs is not None  # a cluster spec's dry run: its data may be on the cluster only
        else f"{t.max_steps:,} optimizer steps"
    )
    print(f"trial length: {length}, an eval every {t.eval_every} steps")
    memory = trial_memory(cfg)  # every spec, CPU ones too (host memory then)
    if cluster:
        r = s.resources
        why = "" if attaching_to_cluster() else " (this machine has no GPU)"
        print(
            f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, "
            f"{r.gpus:g} GPU; checked against the cluster's nodes when the "
            f"search starts there{why}"
        )
        print(describe_sampler(s, concurrent=s.max_concurrent))  # None: the cluster decides
        unknown = "the cluster's GPUs: unknown before joining it"
        lines = plan_memory(s, memory, None, where=unknown).lines()
    else:
        plan, problems = plan_resources(s, nodes, where="this machine", estimate=memory)
        if plan is None or plan.memory is None:  # load_spec refuses such a spec
            print("\n".join(problems))
            return 2
        print(describe_sampler(s, concurrent=plan.concurrent))
        print(plan.describe(s))
        lines = plan.memory.lines()
    print("\n".join(lines))
    return 0


def _print_summary(summary: dict[str, Any], metric: str) -> None:

    print()
    print(table(summary["trials"], metric))
    lost = [t["trial_id"] for t in summary.get("lost_trials") or []]
    if lost:
        print(
            f"lost: {', '.join(lost)} (begun just before an earlier start's driver was killed, "
            "before Tune saved its state; not continued nor ranked, see summary.json)"
        )
    best = summary["best"]
    if best:
        print(f"\nbest trial {best['trial_id']}: {metric}={best['metric']:.4g}", end="")
        if best.get("exact_match") is not None:
            print(f", held-out exact match {best['exact_match']:.1%}", end="")
            base = ((summary.get("base_vs_tuned") or {}).get("base") or {}).get("metrics", {})
            if base.get("exact_match") is not None:
                print(f" (base model {base['exact_match']:.1%})", end="")
        print()
    cmp = summary.get("base_vs_tuned")
    if cmp and cmp.get("failed"):
        print(f"\nbase vs tuned: not scored ({cmp['reason']})")
    elif cmp:
        print(f"\nbase vs tuned on the same held-out rows:\n{cmp['table']}")
        if cmp.get("side_by_side"):  # none where no metric generates
            print(f"\n{cmp['side_by_side']}")
    p = summary["promotion"]
    if not p.get("promoted"):
        line = f"none ({p.get('reason')})"
    elif str(p.get("reason", "")).startswith("already champion"):  # --resume of a finished one
        line = f"v{p['version']} stays @{p['alias']} ({p['reason']})"
        line += f", its export rebuilt at {p['export_dir']}" if p.get("export_rebuilt") else ""
    else:
        line = f"v{p['version']} is now @{p['alias']}"
        line += f", exported to {p['export_dir']}" if p.get("export_dir") else ""
    print(f"promotion: {line}")
    took = f"{summary['wall_seconds']} s"
    if summary.get("starts", 1) > 1:
        took += f"; {summary['wall_seconds_all_starts']} s over {summary['starts']} starts"
    print(f"summary: {summary['experiment_dir']}/{SUMMARY_FILE}  ({took})")
    m = summary["mlflow"]
    page = runs_page(m["experiment_id"], metric=metric, mode=summary["mode"])
    print(f"compare trials: {ui_command(m['tracking_uri'], page)}")
    if summary.get("plots"):
        print(f"plots: {Path(summary['plots'][0]).parent}")


def _main() -> int:
    # A stop while the spec, data and model are checked (minutes for a large file) is said, as
    # Ctrl-C is; once the search begins, it installs its own handlers (search/interrupt.py).
    with stops_interrupt():
        return _command()


def _command() -> int:
    parser = config_parser("python -m raysft.tune", __doc__)
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
    if not args.dry_run:
        setup_logging(args.verbose)  # before the data is read: a long read says how far it got
    t0 = time.perf_counter()
    tree, cfg, shared = read_spec(args.config, args.overrides, dry_run=args.dry_run)
    if args.dry_run:
        # Checked too, but a dry run may be of a spec edited after its search ran.
        exp_dir = check_experiment_dir(args.config, cfg, resume=args.resume, held_ok=True)
        return _dry_run(args.config, cfg, exp_dir, resume=args.resume)

    # run_search checks experiment_dir first; the trials take the data read_spec read.
    summary = run_search(
        args.config, tree, cfg, resume=args.resume, shared=shared, read_s=time.perf_counter() - t0
    )
    _print_summary(summary, cfg.search.metric)
    return exit_code(summary)


def exit_code(summary: dict[str, Any]) -> int:
    """0; 1 when no trial finished; ``EXIT_FINISH_FAILED`` when the search finished and wrote
    its summary but a step failed without ending it (each said on stderr)."""
    counts = summary["counts"]
    failures = summary.get("failed_steps") or []
    if not counts.get("finished") and not counts.get("stopped_early"):
        for line in failures:  # the finish's own failures, said here too
            print(f"error: {line}", file=sys.stderr)
        print(
            "error: no trial finished (see each trial's error above); a trial that failed for "
            "good fails again on --resume: fix the cause, then start the search in another "
            "search.experiment_dir",
            file=sys.stderr,
        )
        return 1
    if failures:
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        print(
            f"error: the search finished, but {len(failures)} of its steps failed; "
            f"{summary['experiment_dir']}/{SUMMARY_FILE} holds its results "
            "(python -m raysft.promote retries a promotion, --resume the whole finish)",
            file=sys.stderr,
        )
        return EXIT_FINISH_FAILED
    return 0


def main() -> NoReturn:
    """Entry point (``python -m raysft.tune`` and the ``raysft-tune`` script)."""
    run_command(_main)


if __name__ == "__main__":
    main()
