"""``python -m raysft.tune SPEC.yaml``: SFT hyperparameter search.

Optuna TPE proposes configs, ASHA stops bad trials on the per-eval metric, each trial runs the SFT
recipe under Ray Train (TorchTrainer) launched from a Tune function trainable, the driver mirrors
every trial into MLflow, and the best adapter is promoted to the Model Registry.

Under ``ray job submit`` or with RAY_ADDRESS set it joins that cluster; otherwise it starts a
local Ray with the CPUs/GPUs of this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from raysft.cli import add_config_args, run_cli, setup_logging
from raysft.config import Config, ConfigError, parse_overrides, read_yaml, set_path, validate_tree
from raysft.search import ResourcePlan, describe_space, plan_resources, validate_search

log = logging.getLogger("raysft.tune")

STATE_FILE = "raysft_state.json"  # parent MLflow run id etc., for --resume and raysft.promote
SUMMARY_FILE = "summary.json"


# ---------------------------------------------------------------- spec


def meant_for_a_cluster(cfg: Config, nodes: list[dict[str, float]]) -> bool:
    """A spec that asks for GPUs, checked on a machine without any: a cluster spec."""
    assert cfg.search is not None
    return cfg.search.resources.gpus_per_worker > 0 and not any(n.get("GPU") for n in nodes)


def load_spec(
    path: str, overrides: list[str], *, dry_run: bool = False
) -> tuple[dict[str, Any], Config]:
    """Read, override and validate a spec; every problem at once, before Ray starts.

    Resources are checked against this machine (laptop mode) unless the driver joins a cluster,
    which is checked once joined; a dry run of a GPU spec on a GPU-less machine is a cluster
    spec being checked before submission, so its plan is printed, not refused.
    """
    tree = read_yaml(path)
    for key, value in parse_overrides(overrides).items():
        try:
            set_path(tree, key, value)
        except KeyError as err:
            raise ConfigError(path, [f"--set {err.args[0]}"]) from None
    problems: list[str] = []
    try:
        cfg = validate_tree(tree, source=path)
    except ConfigError as err:
        # A malformed search parameter (low > high, ...) must not hide the spec's other
        # problems: check the rest without the parameters pydantic rejected.
        rest = _without_malformed_params(tree)
        if rest is None:
            raise
        problems, (tree, cfg) = list(err.problems), rest
    if cfg.search is None:
        raise ConfigError(path, ["search: missing (a search spec needs a search section)"])
    problems += validate_search(tree, cfg, source=path)
    if not attaching_to_cluster():
        nodes = local_nodes()
        if not (dry_run and meant_for_a_cluster(cfg, nodes)):
            problems += plan_resources(cfg.search, nodes, where="this machine")[1]
    if problems:
        raise ConfigError(path, problems)
    return tree, cfg


def _without_malformed_params(tree: dict[str, Any]) -> tuple[dict[str, Any], Config] | None:
    """The spec minus its malformed search parameters, if that makes the rest valid."""
    from pydantic import ValidationError

    from raysft.config import SearchParam

    search = tree.get("search")
    if not isinstance(search, dict) or not isinstance(search.get("params"), dict):
        return None
    params: dict[str, Any] = search["params"]
    kept = {}
    for name, param in params.items():
        try:
            SearchParam.model_validate(param)
        except ValidationError:
            continue
        kept[name] = param
    if len(kept) == len(params):
        return None  # the problem lies elsewhere
    rest = {**tree, "search": {**search, "params": kept}}
    try:
        return rest, validate_tree(rest)
    except ConfigError:
        return None


def attaching_to_cluster() -> bool:
    """``ray job submit`` and RAY_ADDRESS both mean: join an existing cluster."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def local_nodes() -> list[dict[str, float]]:
    """What a laptop-mode Ray would see: this machine's CPUs and CUDA GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}]


def ray_nodes() -> list[dict[str, float]]:
    import ray

    return [
        {"CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)}
        for n in ray.nodes()
        if n.get("Alive")
    ]


# ---------------------------------------------------------------- what runs on the cluster


def _train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the SFT recipe with reports going to Ray (and on to Tune)."""
    import ray.train
    from ray.train import Checkpoint

    from raysft.search import trial_config
    from raysft.train.recipe import Dist, run_trial

    cfg = trial_config(loop["tree"], loop["sampled"], output_dir=loop["output_dir"])
    ctx = ray.train.get_context()
    dist = Dist(ctx.get_world_rank(), ctx.get_world_size())

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    prepare = None
    if dist.world_size > 1:
        from ray.train.torch import prepare_model

        prepare = prepare_model
    run_trial(cfg, report=report, dist=dist, prepare_model=prepare, eval_base=cfg.train.eval_base)


def _trial(config: dict[str, Any], *, tree: dict[str, Any], exp_dir: str) -> None:
    """Tune function trainable: launch this trial's Ray Train run (Train V2 style)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = validate_tree(tree).search.resources  # type: ignore[union-attr]
    trial_id = ray.tune.get_context().get_trial_id()
    resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "tree": tree,
            "sampled": config,
            "output_dir": str(Path(exp_dir) / "trials" / trial_id),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=str(Path(exp_dir) / "train"),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train callback
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


# ---------------------------------------------------------------- driver


def pin_ray_address() -> None:
    """Worker setup hook: point Ray's State API at the cluster this worker belongs to.

    Train V2's placement-group cleaner asks the State API whether its controller is alive. With
    no RAY_ADDRESS it asks "the latest cluster on this machine", which may be another one: it
    then crashes, or hears "no such actor" and removes a live placement group. Either way the
    CPUs of finished trials are never released and the search hangs.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _init_ray(plan_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": "raysft.tune.pin_ray_address"}
    if attaching_to_cluster():
        ray.init(runtime_env=runtime_env)  # num_cpus would raise when joining a cluster
    else:
        # address="local": start our own, never silently join a cluster someone left running.
        # The dashboard stays on: the State API it serves is what releases finished trials.
        ray.init(
            address="local", num_cpus=plan_cpus, include_dashboard=True, runtime_env=runtime_env
        )


def _trainable(tree: dict[str, Any], exp_dir: Path) -> Any:
    """The Tune trainable of a search: ``_trial`` bound to the spec, with its resources."""
    import ray.tune

    from raysft.search import TRIAL_DRIVER_RESOURCES

    trainable = ray.tune.with_parameters(_trial, tree=tree, exp_dir=str(exp_dir))
    return ray.tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)


def build_tuner(
    tree: dict[str, Any], cfg: Config, plan: ResourcePlan, exp_dir: Path, callbacks: list
) -> Any:
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from raysft.search import build_space

    s = cfg.search
    assert s is not None
    searcher = OptunaSearch(
        space=build_space(cfg),
        metric=s.metric,
        mode=s.mode,
        sampler=optuna.samplers.TPESampler(seed=s.seed),
    )
    if s.scheduler.type == "asha":
        # One "iteration" is one eval; max_t is the eval count of a full trial.
        n_evals = -(-cfg.train.max_steps // cfg.train.eval_every)
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration",
            max_t=n_evals,
            grace_period=min(s.scheduler.grace_period, n_evals),
            reduction_factor=s.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return ray.tune.Tuner(
        _trainable(tree, exp_dir),
        tune_config=ray.tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=plan.concurrent,
        ),
        run_config=ray.tune.RunConfig(
            name="tune",
            storage_path=str(exp_dir),
            callbacks=callbacks,
            verbose=1,
        ),
    )


def _trial_rows(
    grid: Any, cfg: Config, runs: dict[str, str], status: dict[str, str]
) -> list[dict[str, Any]]:
    s = cfg.search
    assert s is not None
    rows: list[dict[str, Any]] = []
    for r in grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path).name
        st = status.get(trial_id) or (
            "failed"
            if r.error
            else "finished"
            if m.get("step", 0) >= cfg.train.max_steps
            else "stopped_early"
        )
        if r.error:
            st = "failed"
        value = m.get(s.metric)
        rows.append(
            {
                "trial_id": trial_id,
                "status": st,
                "metric": value if isinstance(value, (int, float)) else None,
                "step": m.get("step"),
                "exact_match": m.get("exact_match"),
                "base_exact_match": m.get("base_exact_match"),
                "sampled": dict(r.config),
                "checkpoint": m.get("checkpoint_path"),
                "mlflow_run_id": runs.get(trial_id),
                "error": str(r.error).splitlines()[0][:500] if r.error else None,
            }
        )
    sign = -1.0 if s.mode == "max" else 1.0  # best first; trials without a metric last
    rows.sort(key=lambda t: (t["metric"] is None, sign * float(t["metric"] or 0.0)))
    return rows


def _pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Best finished trial (ASHA-stopped ones trained less and have no final eval)."""
    for wanted in ("finished", "stopped_early"):
        for row in rows:
            if row["status"] == wanted and row["metric"] is not None and row["checkpoint"]:
                return row
    return None


def _table(rows: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["sampled"]})
    head = ["trial", "status", "step", metric, "exact_match", *keys]
    lines = [head]
    for r in rows:
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
        lines.append(
            [
                r["trial_id"],
                r["status"],
                fmt(r["step"]),
                fmt(r["metric"]),
                fmt(r["exact_match"]),
                *[fmt(r["sampled"].get(k)) for k in keys],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def run_search(
    spec_path: str, tree: dict[str, Any], cfg: Config, *, resume: bool
) -> dict[str, Any]:
    import ray
    import ray.tune

    from raysft import tracking
    from raysft.promote import promote

    s = cfg.search
    assert s is not None
    t0 = time.perf_counter()
    exp_dir = Path(s.experiment_dir).resolve()
    tune_dir = exp_dir / "tune"
    if tune_dir.exists() and not resume:
        raise ConfigError(
            spec_path,
            [
                f"search.experiment_dir: {exp_dir} already holds a search; "
                "pass --resume to continue it or choose another directory"
            ],
        )
    if resume and not tune_dir.exists():
        raise ConfigError(spec_path, [f"--resume: no search to resume in {exp_dir}"])
    exp_dir.mkdir(parents=True, exist_ok=True)

    plan: ResourcePlan | None = None
    problems: list[str] = []
    if not attaching_to_cluster():
        plan, problems = plan_resources(s, local_nodes(), where="this machine")
    _init_ray(int(local_nodes()[0]["CPU"]) if not attaching_to_cluster() else None)
    if attaching_to_cluster():
        plan, problems = plan_resources(
            s, ray_nodes(), where=f"cluster {ray.get_runtime_context().gcs_address}"
        )
    if problems or plan is None:
        raise ConfigError(spec_path, problems)
    log.info("search space:\n  %s\n%s", "\n  ".join(describe_space(s)), plan.describe(s))

    uri = tracking.tracking_uri(cfg.tracking)
    mlc = tracking.client(uri)
    exp_id = tracking.experiment_id(mlc, cfg.tracking.experiment)
    state_path = exp_dir / STATE_FILE
    if resume and state_path.exists():
        parent_id = json.loads(state_path.read_text())["parent_run_id"]
        mlc.update_run(parent_id, status="RUNNING")
    else:
        parent_id = tracking.start_parent(
            mlc, exp_id, name=exp_dir.name, cfg=cfg, spec_path=spec_path
        )
        state_path.write_text(json.dumps({"parent_run_id": parent_id, "tracking_uri": uri}))
    base_params = tracking.flatten(
        cfg.model_dump(mode="json", exclude={"search", "tracking", "promote"})
    )
    callback = tracking.make_callback(
        mlc,
        exp_id=exp_id,
        parent_id=parent_id,
        max_steps=cfg.train.max_steps,
        base_params=base_params,
    )
    try:
        if resume:
            tuner = ray.tune.Tuner.restore(
                str(tune_dir), _trainable(tree, exp_dir), resume_errored=True
            )
        else:
            tuner = build_tuner(tree, cfg, plan, exp_dir, [callback])
        grid = tuner.fit()
    except BaseException:
        mlc.set_terminated(parent_id, "FAILED")
        raise
    # After --resume, Tune drives its restored copy of the callback, not ``callback``: the
    # trial runs of earlier attempts are only known to MLflow.
    known = tracking.trial_runs(mlc, exp_id, parent_id)
    runs = {**{t: run for t, (run, _) in known.items()}, **callback.runs}
    status = {**{t: st for t, (_, st) in known.items() if st}, **callback.status}
    ray.shutdown()  # flushes worker logs now, not after the summary table
    rows = _trial_rows(grid, cfg, runs, status)
    best = _pick_best(rows)
    if best:
        mlc.log_metric(parent_id, f"best_{s.metric}", float(best["metric"]))
        mlc.log_artifacts(parent_id, best["checkpoint"], artifact_path="best_adapter")
    promotion = promote(mlc=mlc, cfg=cfg, best=best, exp_dir=exp_dir)
    mlc.set_tag(parent_id, "raysft.promotion", json.dumps(promotion)[:5000])
    summary = {
        "spec": spec_path,
        "experiment_dir": str(exp_dir),
        "metric": s.metric,
        "mode": s.mode,
        "best": best,
        "trials": rows,
        "counts": {
            k: sum(r["status"] == k for r in rows) for k in ("finished", "stopped_early", "failed")
        },
        "mlflow": {
            "tracking_uri": uri,
            "experiment": cfg.tracking.experiment,
            "parent_run_id": parent_id,
        },
        "promotion": promotion,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "resolved_spec": cfg.model_dump(mode="json"),
    }
    (exp_dir / SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    mlc.log_artifact(parent_id, str(exp_dir / SUMMARY_FILE))
    mlc.set_terminated(parent_id, "FINISHED")
    return summary


def main() -> int:
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
    s = cfg.search
    assert s is not None
    if args.dry_run:
        print("search space:")
        print("\n".join(f"  {line}" for line in describe_space(s)))
        print(
            f"metric: {s.metric} ({s.mode}), samples: {s.num_samples}, seed: {s.seed}, "
            f"scheduler: {s.scheduler.type}"
        )
        nodes = local_nodes()
        if attaching_to_cluster() or meant_for_a_cluster(cfg, nodes):
            r = s.resources
            why = "" if attaching_to_cluster() else " (this machine has no GPU)"
            print(
                f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, "
                f"{r.gpus_per_worker:g} GPU; checked against the cluster's nodes when the "
                f"search starts there{why}"
            )
        else:
            plan, _ = plan_resources(s, nodes, where="this machine")
            assert plan is not None  # load_spec already rejected a plan that does not fit
            print(plan.describe(s))
        return 0
    setup_logging(args.verbose)
    summary = run_search(args.config, tree, cfg, resume=args.resume)
    from raysft.tracking import ui_command

    print()
    print(_table(summary["trials"], s.metric))
    best = summary["best"]
    if best:
        print(f"\nbest trial {best['trial_id']}: {s.metric}={best['metric']:.4g}", end="")
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
    return 0


if __name__ == "__main__":
    run_cli(main)
