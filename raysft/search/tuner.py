"""The Tune side of a search: its trainable (the SFT recipe under Ray Train, bound to the spec),
the Tuner (Optuna TPE, ASHA on the trial's own step, the divergence stopper), the quiet output
while its trials run, and the driver's data put in Ray's object store for them (``share_data``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysft.config import SearchSpec
from raysft.data.shared import SharedData
from raysft.environ import environ
from raysft.search import results as res
from raysft.search.resources import TRIAL_DRIVER_RESOURCES, ResourcePlan
from raysft.search.trial import run_trial_on_ray
from raysft.train.metrics import REPLAYED

log = logging.getLogger(__name__)


def search_trainable(tree: dict[str, Any], exp_dir: Path, shared: Any = None) -> Any:
    """The Tune trainable of a search: ``run_trial_on_ray`` bound to the spec and resources,
    and to ``shared``, the reference of the data the driver read (in a list: Ray hands a
    bare reference over as its value, in every trial process)."""
    import ray.tune

    trainable = ray.tune.with_parameters(
        run_trial_on_ray, tree=tree, exp_dir=str(exp_dir), shared=[shared]
    )
    return ray.tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)


_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # read by Tuner.fit, in this process


@contextlib.contextmanager
def quiet_tune_output(*, loggers_off: bool) -> Iterator[None]:
    """While the trials run, what Tune prints and logs beyond raysft's use: a report's earlier
    records (``REPLAYED``, the steps since the last report) left out of the result tables it
    prints, as Tune leaves out its own bookkeeping; with ``loggers_off``, no CSV or TensorBoard
    logger (the latter warns of every non-number, and names a log dir in the run's scratch Ray
    dir, gone after it). Not for a restored tuner: one saved before raysft passed its own JSON
    logger (``build_tuner``) would then write no result.json, which the finish reads."""
    try:
        from ray.tune.experimental.output import BLACKLISTED_KEYS
    except ImportError:  # another layout of Tune's: the tables show the records
        BLACKLISTED_KEYS = set()
    BLACKLISTED_KEYS.add(REPLAYED)
    try:
        with environ({_AUTO_LOGGERS: "1"} if loggers_off else {}):
            yield
    finally:
        BLACKLISTED_KEYS.discard(REPLAYED)


def build_tuner(
    tree: dict[str, Any],
    cfg: SearchSpec,
    plan: ResourcePlan,
    exp_dir: Path,
    callbacks: list,
    shared: Any = None,
) -> Any:
    import ray.tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raysft.search.searcher import build_searcher

    s = cfg.search
    searcher = build_searcher(cfg, s, concurrent=plan.concurrent)
    if s.scheduler.type == "asha":
        # Time is the trial's own optimizer step (reported with every eval), not Tune's report
        # count: a trial restarted from a checkpoint then keeps its place on the rungs.
        every, steps = cfg.train.eval_every, cfg.train.max_steps
        scheduler: Any = ASHAScheduler(
            time_attr="step",
            max_t=steps,
            grace_period=min(s.scheduler.grace_period * every, steps),
            reduction_factor=s.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return ray.tune.Tuner(
        search_trainable(tree, exp_dir, shared),
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
            # Tune's result.json (read at the finish) alone: its CSV and TensorBoard loggers
            # are off (quiet_tune_output), raysft's curves are in MLflow and the plots.
            callbacks=[*callbacks, JsonLoggerCallback()],
            # ASHA never stops a NaN trial (NaN compares false with every cutoff): this does.
            stop=res.DivergedStopper(),
            verbose=1,
        ),
    )


def share_data(shared: SharedData | None) -> Any:
    """The data the driver read, put in Ray's object store for the trials; None (each trial
    then reads its own, as it would without it) where the store cannot take it."""
    import ray

    if shared is None:
        return None
    try:
        return ray.put(shared)
    except Exception as err:  # ObjectStoreFullError, or spilling failed: never fatal here
        log.warning("trials read the data themselves: Ray's object store refused it (%s)", err)
        return None
