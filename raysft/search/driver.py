"""Run a search on Ray: the Train worker, the Tune trainable, Ray init, the tuner, the run.

Optuna TPE proposes configs, ASHA stops bad trials on the per-eval metric, each trial runs the
SFT recipe under Ray Train (TorchTrainer) launched from a Tune function trainable (Train V2),
the driver mirrors every trial into MLflow, and the best adapter is promoted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from raysft.config import SearchSpec, validate_spec
from raysft.errors import ConfigError, SearchStateError
from raysft.search.resources import (
    TRIAL_DRIVER_RESOURCES,
    ResourcePlan,
    attaching_to_cluster,
    local_nodes,
    plan_resources,
    ray_nodes,
)
from raysft.search.space import TrialConfigs, build_space, describe_space
from raysft.train.metrics import objective_mode

log = logging.getLogger(__name__)

STATE_FILE = "raysft_state.json"  # parent MLflow run id etc., for --resume and raysft.promote


# ---------------------------------------------------------------- what runs on the cluster


def _train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the SFT recipe, reporting to Ray (and on to Tune).

    After a restart Ray hands back the trial's last reported checkpoint: training resumes there.
    """
    import ray.train
    from ray.train import Checkpoint

    from raysft.train.recipe import Dist, run_trial

    cfg = loop["resolve"](loop["trial_id"], loop["sampled"])
    ctx = ray.train.get_context()
    dist = Dist(ctx.get_world_rank(), ctx.get_world_size())

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    prepare = None
    if dist.world_size > 1:
        from ray.train.torch import prepare_model

        prepare = prepare_model
    restored = ray.train.get_checkpoint()
    if restored is None:
        run_trial(cfg, report=report, dist=dist, prepare_model=prepare)
        return
    with restored.as_directory() as ckpt_dir:
        run_trial(cfg, report=report, dist=dist, prepare_model=prepare, resume_from=ckpt_dir)


def _trial(config: dict[str, Any], *, tree: dict[str, Any], exp_dir: str) -> None:
    """Tune function trainable: launch this trial's Ray Train run (Train V2 style)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = validate_spec(tree).search.resources
    trial_id = ray.tune.get_context().get_trial_id()
    resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "resolve": TrialConfigs(tree, exp_dir),
            "trial_id": trial_id,
            "sampled": config,
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


def pin_ray_address() -> None:
    """Worker setup hook: point Ray's State API at the cluster this worker belongs to.

    Train V2's placement-group cleaner asks the State API whether its controller is alive. With
    no RAY_ADDRESS it asks "the latest cluster on this machine", which may be another one: it
    then crashes, or hears "no such actor" and removes a live placement group. Either way the
    CPUs of finished trials are never released and the search hangs.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


# ---------------------------------------------------------------- driver


def init_ray(plan_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": f"{__name__}.pin_ray_address"}
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

    trainable = ray.tune.with_parameters(_trial, tree=tree, exp_dir=str(exp_dir))
    return ray.tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)


def build_tuner(
    tree: dict[str, Any], cfg: SearchSpec, plan: ResourcePlan, exp_dir: Path, callbacks: list
) -> Any:
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.search
    searcher = OptunaSearch(
        space=build_space(cfg, s),
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
            name="tune", storage_path=str(exp_dir), callbacks=callbacks, verbose=1
        ),
    )


def _open_experiment(spec_path: str, cfg: SearchSpec, *, resume: bool) -> Path:
    """The experiment dir, checked against ``--resume`` before anything starts."""
    exp_dir = Path(cfg.search.experiment_dir).resolve()
    tune_dir = exp_dir / "tune"
    if tune_dir.exists() and not resume:
        raise SearchStateError(
            f"{spec_path}: search.experiment_dir: {exp_dir} already holds a search; "
            "pass --resume to continue it or choose another directory"
        )
    if resume and not tune_dir.exists():
        raise SearchStateError(f"{spec_path}: --resume: no search to resume in {exp_dir}")
    exp_dir.mkdir(parents=True, exist_ok=True)
    return exp_dir


def _connect(spec_path: str, cfg: SearchSpec) -> ResourcePlan:
    """Start (laptop) or join (cluster) Ray and plan the search on the nodes it has."""
    import ray

    s = cfg.search
    if attaching_to_cluster():
        init_ray(None)
        where = f"cluster {ray.get_runtime_context().gcs_address}"
        plan, problems = plan_resources(s, ray_nodes(), where=where)
    else:
        nodes = local_nodes()
        plan, problems = plan_resources(s, nodes, where="this machine")
        if plan is not None:
            init_ray(int(nodes[0]["CPU"]))
    if problems or plan is None:
        raise ConfigError(spec_path, problems)
    log.info("search space:\n  %s\n%s", "\n  ".join(describe_space(s)), plan.describe(s))
    return plan


def _parent_run(
    mlc: Any, exp_id: str, exp_dir: Path, cfg: SearchSpec, spec_path: str, *, uri: str
) -> str:
    """The search's parent MLflow run: created once, reopened by ``--resume``."""
    from raysft.search import tracking

    state_path = exp_dir / STATE_FILE
    if state_path.exists():
        parent_id: str = json.loads(state_path.read_text())["parent_run_id"]
        mlc.update_run(parent_id, status="RUNNING")
        return parent_id
    parent_id = tracking.start_parent(mlc, exp_id, name=exp_dir.name, cfg=cfg, spec_path=spec_path)
    state_path.write_text(json.dumps({"parent_run_id": parent_id, "tracking_uri": uri}))
    return parent_id


def run_search(
    spec_path: str, tree: dict[str, Any], cfg: SearchSpec, *, resume: bool
) -> dict[str, Any]:
    """Run (or ``resume``) the search of a validated spec; returns summary.json's content."""
    import ray
    import ray.tune

    from raysft.search import tracking

    t0 = time.perf_counter()
    exp_dir = _open_experiment(spec_path, cfg, resume=resume)
    plan = _connect(spec_path, cfg)
    uri = tracking.tracking_uri(cfg.tracking)
    mlc = tracking.client(uri)
    exp_id = tracking.experiment_id(mlc, cfg.tracking.experiment)
    parent_id = _parent_run(mlc, exp_id, exp_dir, cfg, spec_path, uri=uri)
    resolve = TrialConfigs(tree, str(exp_dir))
    callback = tracking.make_callback(
        mlc, exp_id=exp_id, parent_id=parent_id, resolve_trial=resolve
    )
    try:
        if resume:
            tuner = ray.tune.Tuner.restore(
                str(exp_dir / "tune"), _trainable(tree, exp_dir), resume_errored=True
            )
        else:
            tuner = build_tuner(tree, cfg, plan, exp_dir, [callback])
        grid = tuner.fit()
    except BaseException:
        mlc.set_terminated(parent_id, "FAILED")
        raise
    # After --resume, Tune drives its restored copy of the callback, not ``callback``: the
    # trial runs of earlier attempts are only known to MLflow.
    runs = {t: run for t, (run, _) in tracking.trial_runs(mlc, exp_id, parent_id).items()}
    runs.update(callback.runs)
    results = [_result_of(grid[i]) for i in range(len(grid))]
    ray.shutdown()  # flushes worker logs now, not after the summary table
    tracked = {"mlc": mlc, "uri": uri, "parent_id": parent_id, "runs": runs}
    return _finish(spec_path, cfg, exp_dir, results, tracked=tracked, resolve=resolve, t0=t0)


def _result_of(result: Any) -> dict[str, Any]:
    """A Tune result as plain values (no Ray types past this point)."""
    m = dict(result.metrics or {})
    error = str(result.error).splitlines()[0][:500] if result.error else None
    return {
        "trial_id": m.get("trial_id") or Path(result.path).name,
        "metrics": m,
        "sampled": dict(result.config),
        "error": error,
    }


def _finish(
    spec_path: str,
    cfg: SearchSpec,
    exp_dir: Path,
    results: list[dict[str, Any]],
    *,
    tracked: dict[str, Any],
    resolve: TrialConfigs,
    t0: float,
) -> dict[str, Any]:
    """Rows, the best trial, promotion, summary.json; the parent run is closed last."""
    from raysft.search import results as res
    from raysft.search.promote import promote

    s = cfg.search
    mlc, parent_id, runs = tracked["mlc"], tracked["parent_id"], tracked["runs"]
    rows = res.rank(
        [
            res.trial_row(
                trial_id=r["trial_id"],
                metrics=r["metrics"],
                sampled=r["sampled"],
                max_steps=resolve(r["trial_id"], r["sampled"]).train.max_steps,
                objective=s.metric,
                error=r["error"],
                mlflow_run_id=runs.get(r["trial_id"]),
            )
            for r in results
        ],
        objective_mode(s.metric, s.mode),
    )
    best = res.pick_best(rows)
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
        "counts": res.counts(rows),
        "mlflow": {
            "tracking_uri": tracked["uri"],
            "experiment": cfg.tracking.experiment,
            "parent_run_id": parent_id,
        },
        "promotion": promotion,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "resolved_spec": cfg.model_dump(mode="json"),
    }
    mlc.log_artifact(parent_id, str(res.write_summary(exp_dir, summary)))
    mlc.set_terminated(parent_id, "FINISHED")
    return summary
