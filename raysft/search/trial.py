"""What runs on the cluster for one trial: the Tune function trainable, its retries, and the
Ray Train worker that runs the SFT recipe.

A retry (a killed worker, a lost node) is a new Train run with the same name and storage path:
Ray Train restores the run's latest checkpoint and the workers resume from it exactly. An
out-of-memory trial, or one whose storage the nodes do not share, is failed at once, never
retried.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from raysft.config import validate_spec
from raysft.errors import (
    AssetError,
    ConfigError,
    DataError,
    SearchStateError,
    TemplateError,
)
from raysft.paths import replace_text
from raysft.search.resources import cap_process_memory
from raysft.search.results import CHECKPOINT_PATH_KEY, error_cause
from raysft.search.space import TrialConfigs, trial_output_dir

log = logging.getLogger(__name__)

ATTEMPTS_FILE = "attempts.json"  # a trial's failed attempts: cause, whether it was retried


def _train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the SFT recipe, reporting to Ray (and on to Tune).

    After a restart Ray hands back the trial's last reported checkpoint: training resumes there.
    """
    import ray
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    from raysft.train.recipe import Dist, run_trial

    quiet_worker_logs()
    if loop.get("gpu_share"):
        # Before the first CUDA allocation: this trial's cache cannot starve its GPU's others.
        cap_process_memory(loop["gpu_share"])
    cfg = loop["resolve"](loop["trial_id"], loop["sampled"])
    keep_bitsandbytes_out(cfg.method, cfg.train.optimizer)
    ctx = ray.train.get_context()
    sharded = loop["resources"].shards(cfg.method)  # this trial's method: it may be searched
    dist = Dist(ctx.get_world_rank(), ctx.get_world_size(), sharded=sharded)
    restored = ray.train.get_checkpoint()
    replayed = [restored.path] if restored is not None else []
    shared = ray.get(loop["shared"]) if loop.get("shared") is not None else None

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        metrics = name_restored_checkpoint(
            metrics, has_checkpoint=ckpt is not None, restored=replayed
        )
        # Uploaded to the run's storage in a background thread, then deleted here: training
        # goes on meanwhile (a 7B full checkpoint is tens of GB). Reports stay in order.
        ray.train.report(
            metrics, checkpoint=ckpt, checkpoint_upload_mode=CheckpointUploadMode.ASYNC
        )

    report.takes_checkpoint_dir = True  # type: ignore[attr-defined]

    prepare = None
    if dist.world_size > 1 and not dist.sharded:  # FSDP: the recipe shards the model itself
        from ray.train.torch import prepare_model

        prepare = prepare_model
    if restored is None:
        run_trial(cfg, report=report, dist=dist, prepare_model=prepare, shared=shared)
        return
    with restored.as_directory() as ckpt_dir:
        run_trial(
            cfg,
            report=report,
            dist=dist,
            prepare_model=prepare,
            resume_from=ckpt_dir,
            shared=shared,
        )


def name_restored_checkpoint(
    metrics: dict[str, Any], *, has_checkpoint: bool, restored: list[str]
) -> dict[str, Any]:
    """A resumed run's first report, which says its checkpoint's record again with no new
    checkpoint (``recipe.train``), names the restored checkpoint (``restored``, emptied here) as
    Tune's callback names a reported one. A trial resumed at max_steps (``--resume`` after the
    driver died past its last report, a retry after a fault in ``finish``) reports nothing else:
    without it, its row would have no checkpoint and could be neither ranked nor promoted."""
    if not restored:
        return metrics
    path = restored.pop()
    return metrics if has_checkpoint else {**metrics, CHECKPOINT_PATH_KEY: path}


def quiet_worker_logs() -> None:
    """Ray Train logs every report at INFO, its metrics in full ("Reporting training result N:
    TrainingReport(...)"): a trial's reports carry the steps since the last one, thousands of
    characters on the driver's console for what MLflow shows. Its logger is named by its file."""
    no_progress_bars()
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another layout of Ray's: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def no_progress_bars() -> None:
    """transformers' progress bars ("Loading weights: 0%|..."): in a Ray worker's log, lines
    of carriage returns on the driver's console."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def keep_bitsandbytes_out(method: str, optimizer: str = "adamw") -> bool:
    """In a Train worker of a method that does not quantize, with an optimizer that is not
    bitsandbytes' 8-bit one, make ``import bitsandbytes`` fail; returns whether it did.

    peft imports bitsandbytes whenever it is installed (``peft/helpers.py``, in a try/except
    ImportError), and bitsandbytes wraps its CPU kernels in ``torch.compile`` at import, which
    loads inductor: 1.9 s of a LoRA trial's 5.4 s setup on 2 idle cores (2026-12-03), on the
    critical path of every trial, for a module only QLoRA uses. A Train worker is a process of its
    own, for one run of one trial's method, so this cannot reach a QLoRA trial (nor can the
    base-vs-tuned task's, ``compare._score_pair_task``: one scoring of one method); it is never done
    in a user's process.
    """
    if method == "qlora" or optimizer != "adamw":
        return False
    if "bitsandbytes" in sys.modules or "peft" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import -> ImportError
    return True


class TrialFailure(RuntimeError):
    """A trial failed for good (out of memory, on its inputs, or out of retries); the message is
    its cause."""


_OOM_MARKERS = (
    "OutOfMemoryError",  # torch (CUDA), and Ray's memory monitor killing a worker
    "MemoryError",  # Python
    "out of memory",
    "can't allocate memory",  # torch's CPU allocator (a RuntimeError)
)


def is_out_of_memory(cause: str) -> bool:
    """Whether a trial's cause of failure is running out of (accelerator or host) memory."""
    return any(marker in cause for marker in _OOM_MARKERS)


# What raysft raises for the spec, data or templates it was given (raysft.errors): the same
# inputs fail the same way again, so a retry would only repeat the error, after a worker start.
# A model or a Hub dataset that fails to load (ModelError, DatasetLoadError, a DataError by
# another name) may be a download or a disk that comes back: retried.
_INPUT_ERRORS = frozenset(
    cls.__name__ for cls in (ConfigError, DataError, TemplateError, AssetError, SearchStateError)
)


def is_input_error(cause: str) -> bool:
    """Whether a trial failed on its inputs (``error_cause``'s ``Type: message``): no retry."""
    return cause.split(":", 1)[0] in _INPUT_ERRORS


# Ray Train's check that a run's storage path is the same directory on every node (its
# StorageContext writes a marker on the driver's node, then looks for it on each worker's): a
# path on the head alone fails it on every other node, again on every retry, each from step 0.
STORAGE_SETUP_ERROR = "Unable to set up cluster storage"
_SHARED_STORAGE = (
    "search.experiment_dir is not storage every node sees: mount shared storage (NFS/EFS) at "
    "the same path on every node"
)


def is_storage_error(cause: str) -> bool:
    """Whether a trial failed because its storage is not shared by every node: no retry."""
    return STORAGE_SETUP_ERROR in cause


def failure_message(cause: str) -> str:
    """What a trial failed for good says: its cause, with what to do where raysft knows."""
    if is_out_of_memory(cause):
        return f"out of memory: {cause}"
    if is_storage_error(cause):
        return f"{_SHARED_STORAGE} ({cause})"
    return cause


def run_trial_on_ray(
    config: dict[str, Any], *, tree: dict[str, Any], exp_dir: str, shared: list[Any] | None = None
) -> None:
    """Tune function trainable: this trial's Ray Train run (Train V2 style), retried on faults.
    ``shared``: ``[reference]`` of the data the driver read (``raysft.data.shared``), or
    ``[None]``; the workers fetch it, this process never does.

    A retry is a new Train run with the same name and storage path: Ray Train restores the
    run's latest checkpoint and the workers resume from it (``_train_worker``). The same holds
    when ``--resume`` restarts a trial after the driver died.
    """
    import ray.train
    import ray.tune
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    search = validate_spec(tree).search
    res = search.resources
    gpus = res.gpus  # load_spec resolved auto to a number
    trial_id = ray.tune.get_context().get_trial_id()
    resources = {"CPU": res.cpus_per_worker}
    if gpus:
        resources["GPU"] = gpus

    backend = backend_config(res.workers)

    def trainer() -> Any:
        # TorchTrainer is this with Ray's TorchConfig (which imports torch where it is built).
        return DataParallelTrainer(
            _train_worker,
            backend_config=backend,
            train_loop_config={
                "resolve": TrialConfigs(tree, exp_dir),
                "trial_id": trial_id,
                "sampled": config,
                "gpu_share": gpus if 0 < gpus < 1 else None,  # a GPU shared between trials
                "resources": res,
                "shared": (shared or [None])[0],
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=res.workers,
                use_gpu=gpus > 0,
                resources_per_worker=resources,
            ),
            run_config=ray.train.RunConfig(
                name=f"train-{trial_id}",
                storage_path=str(Path(exp_dir) / "train"),
                callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train callback
                # 2, not 1: the worker runs on while Tune reads a report, so the next
                # checkpoint may be registered (and the one before it deleted) before ASHA stops
                # the trial on that report; its row must still find the checkpoint it names.
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                # Retries are ours (below): an out-of-memory trial must not be retried.
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )

    record = Path(trial_output_dir(exp_dir, trial_id)) / ATTEMPTS_FILE
    _fit_with_retries(trainer, retries=search.max_retries, record=record)


def backend_config(workers: int) -> Any:
    """Ray Train's backend for a trial of ``workers`` workers: Ray's ``TorchConfig`` (its process
    group: gloo, or nccl when workers have GPUs), or for one worker ``OneWorkerTorchConfig``,
    which keeps torch out of this process and the Train controller."""
    if workers == 1:
        from raysft.search.backend import OneWorkerTorchConfig

        return OneWorkerTorchConfig()
    from ray.train.torch.config import TorchConfig

    return TorchConfig()


def tune_is_running_this_trial() -> bool:
    """False once Tune has stopped this trial (ASHA, a stopper, the search's end): its session
    is gone, and the Ray Train run it launched is torn down with it."""
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
    except ImportError:  # a Ray that moved it: assume running (a stopped trial then retries once)
        return True
    return bool(_in_tune_session())


def read_attempts(record: Path) -> list[dict[str, Any]]:
    """A trial's failed attempts (``ATTEMPTS_FILE``); none where there is no record, and none,
    said, where it cannot be read (one cut short by a full disk, written before writes were
    atomic): the record reports on the trial, it must not stop the search."""
    if not record.is_file():
        return []
    try:
        attempts = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        attempts = err
    if isinstance(attempts, list) and all(isinstance(a, dict) for a in attempts):
        return attempts
    log.warning("%s: unreadable, its failed attempts are not counted (%s)", record, attempts)
    return []


def _fit_with_retries(make_trainer: Any, *, retries: int, record: Path) -> None:

    # Attempts of an earlier driver (before a --resume) count too.
    attempts = read_attempts(record)
    if attempts and not attempts[-1]["retried"]:
        # It failed for good before a --resume (out of memory, on its inputs, or out of
        # retries), and Tune's resume_errored starts it again: it stays failed, for the same
        # cause, without running (--resume refuses changed data or a changed spec anyway).
        raise TrialFailure(failure_message(attempts[-1]["error"]))
    if len(attempts) > retries:
        # search.max_retries lowered on --resume below the attempts already failed: out of
        # retries, recorded so (a trial that ran no attempt must not pass for one that ended).
        attempts[-1]["retried"] = False
        replace_text(record, json.dumps(attempts, indent=2))
        cause = attempts[-1]["error"]
        raise TrialFailure(
            f"{failure_message(cause)} (out of retries: {len(attempts)} failed attempts, "
            f"search.max_retries={retries})"
        )
    for attempt in range(len(attempts) + 1, retries + 2):
        try:
            make_trainer().fit()
            try:
                let_tune_take_the_last_report()
            except Exception as err:  # the fit succeeded: never a failed attempt for this
                log.warning("could not wait for Tune to take the last report: %s", err)
            return
        except Exception as err:  # Ray Train's TrainingFailedError and its kin
            if not tune_is_running_this_trial():
                # Stopped by Tune (ASHA, ...), which ended the Train run: no failure, no retry.
                log.info("trial stopped by Tune: %s", error_cause(err))
                return
            cause = error_cause(err)
            last = (
                is_out_of_memory(cause)
                or is_input_error(cause)
                or is_storage_error(cause)
                or attempt > retries
            )
            attempts.append({"attempt": attempt, "error": cause, "retried": not last})
            record.parent.mkdir(parents=True, exist_ok=True)
            replace_text(record, json.dumps(attempts, indent=2))  # never left cut short
            if last:
                raise TrialFailure(failure_message(cause)) from None
            log.warning("attempt %d failed (%s); retrying from the last checkpoint", attempt, cause)


def let_tune_take_the_last_report(timeout_s: float = 600.0) -> None:
    """Return only once Tune has taken this trial's last report. In Ray 2.60 the Train run's
    reports reach the trial's main thread through a one-slot actor queue (TuneReportCallback);
    when the trial function returns, Tune's wrapper puts a final result in a one-slot queue
    that the same main thread reads, and a main thread that then takes a report still waiting
    in the actor queue blocks for ever queueing it behind that result. Seen when Tune's loop
    was held up by an MLflow server out of reach: the trial stayed RUNNING with its Train run
    gone. Gives up after ``timeout_s`` (and on a Ray without these internals)."""
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        if session is None:
            return
        reports, results = session._inter_actor_queue, session.result_queue
    except (ImportError, AttributeError):
        return
    if reports is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reports.empty() and results.empty():
            # The main thread may be between taking a report and queueing it: look again.
            time.sleep(1.0)
            if reports.empty() and results.empty():
                return
        time.sleep(0.5)
    log.warning("Tune did not take the trial's last report in %.0f s", timeout_s)


def pin_ray_address() -> None:
    """Worker setup hook: point Ray's State API at the cluster this worker belongs to.

    Train V2's placement-group cleaner asks the State API whether its controller is alive. With
    no RAY_ADDRESS it asks "the latest cluster on this machine", which may be another one: it
    then crashes, or hears "no such actor" and removes a live placement group. Either way the
    CPUs of finished trials are never released and the search hangs.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
