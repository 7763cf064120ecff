"""Ray Train's torch backend for a one-worker trial, with torch imported only in the worker.

Ray's ``TorchConfig`` imports torch at module level, and a ``TorchTrainer`` hands it to two
processes that never run torch: Tune's function trainable, which builds the trainer, and the Train
controller, which unpickles the config and calls ``torch.distributed.is_available()`` before it
sets up a process group. That is 2.0 CPU-s of imports in each (``ray.train.torch`` after
``ray.train``) on the critical path of every trial (2026-12-03, 2 cores; see
benchmarks/RESULTS.md, "Search overhead").

A trial of one worker has no process group to set up: raysft's recipe communicates only when
``world_size > 1`` (``raysft.train.recipe``). So ``OneWorkerTorchConfig`` keeps what Ray's torch
backend does *in the worker* (the torchrun environment variables, the CUDA device of the training
function, the CUDA cache emptied at shutdown), by calling Ray's own functions there, and leaves out
the one-member process group. Trials of more workers use Ray's ``TorchConfig`` unchanged
(``raysft.search.trial``).

Nothing here imports torch at module level; each function that needs it imports it in the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30  # Ray's DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S


def _worker_env() -> None:
    """In the worker: LOCAL_RANK, RANK, WORLD_SIZE, ... as torchrun sets them (Ray's function)."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _worker_shutdown() -> None:
    """In the worker: release its CUDA cache, as Ray's torch backend does (no process group)."""
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=False)


def _train_func_context() -> Any:
    """Around the training function, in the worker: Ray's ``TorchConfigContextManager`` (it makes
    the worker's granted GPU the current CUDA device)."""
    from ray.train.torch.config import TorchConfigContextManager

    return TorchConfigContextManager()


class _OneWorkerTorchBackend(Backend):
    share_cuda_visible_devices: bool = True  # as Ray's torch backend

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        if len(worker_group) != 1:
            raise ValueError(
                f"OneWorkerTorchConfig runs 1 worker, not {len(worker_group)}: "
                "use ray.train.torch.TorchConfig for data-parallel trials"
            )
        worker_group.execute(_worker_env)

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        try:  # bounded, as Ray's torch backend bounds it: a hung worker must not hold teardown
            ray.get(worker_group.execute_async(_worker_shutdown), timeout=SHUTDOWN_TIMEOUT_S)
        except GetTimeoutError:
            log.warning("the worker's CUDA cache release timed out after %s s", SHUTDOWN_TIMEOUT_S)


@dataclass
class OneWorkerTorchConfig(BackendConfig):
    """The backend of a one-worker trial: Ray's torch backend without the process group, and
    without importing torch outside the worker."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _OneWorkerTorchBackend

    @property
    def train_func_context(self) -> Callable[[], Any]:
        return _train_func_context

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH
