"""Resumable training state: what a checkpoint needs beyond the adapter for a run to continue
exactly where it stopped.

Saved beside the adapter (or model) in every reported checkpoint, as one ``torch.save`` file:
the trainable weights in fp32 (the exported adapter may be cast for inference), optimizer and
scheduler state, every RNG the loop draws from (LoRA dropout, NEFTune noise), the data stream's
epoch and position, the metric history and the time spent so far. Beside it the run's
``config.yaml`` and ``data.json`` (its data sources' digests): a resume is checked against both.
"""

from __future__ import annotations

import logging
import pickle
import random
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysft.errors import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"  # the run's resolved config, written into every checkpoint


@dataclass
class Progress:
    """Where the loop is: the last finished optimizer step and the data stream's position."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of ``epoch`` already consumed
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)  # e.g. the base model's scores
    # Time spent up to this checkpoint (Run.times, train_s, elapsed_s): a resume adds to it.
    seconds: dict[str, float] = field(default_factory=dict)


def rng_states() -> dict[str, Any]:
    """This process's RNG states (python, torch CPU, and its own CUDA device's: a rank sees
    every GPU of its trial, but draws on its own, and a retry may place it where it sees
    fewer)."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device: the rank's
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, list | tuple):  # a checkpoint from before 2026-12-07: one per device
        here = torch.cuda.current_device()
        if here < len(cuda):
            torch.cuda.set_rng_state(cuda[here])
        return
    torch.cuda.set_rng_state(cuda)


def save_state(
    directory: str | Path,
    *,
    progress: Progress,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    full: tuple[dict[str, Any], dict[str, Any]] | None = None,
    rng: list[dict[str, Any]] | None = None,
    scaler: Any = None,
) -> Path:
    """Write the training state into ``directory`` (the checkpoint being reported). ``full``:
    the weights and optimizer state a sharded model gathered (``fsdp.gather``), else they are
    read from ``model`` and ``optimizer``. ``rng``: every data-parallel rank's RNG states
    (``rng_states``, gathered; rank order), else this process's."""
    path = Path(directory) / STATE_FILE
    if full is None:
        trainable = {
            name: p.detach().to("cpu", copy=True)
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        optim = optimizer.state_dict()
    else:
        weights, optim = full
        trainable = {name: t.float() for name, t in weights.items()}
    torch.save(
        {
            "progress": asdict(progress),
            "trainable": trainable,
            "optimizer": optim,
            "scheduler": scheduler.state_dict(),
            # Each rank's own: dropout and NEFTune draw as many numbers as their rows' tokens,
            # so the ranks' RNGs part ways after the first step of unequal batch shapes.
            "rng": rng if rng is not None else [rng_states()],
            "sharded": full is not None,
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        path,
    )
    return path


def load_state(
    directory: str | Path,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    rank: int = 0,
    world_size: int = 1,
    scaler: Any = None,
) -> Progress:
    """Restore weights, optimizer, scheduler and RNGs (data-parallel ``rank``'s own) from a
    checkpoint; returns its progress. Refused on another number of workers than it was written
    by: each worker's share of the data and its RNG are the checkpoint's."""
    check_is_checkpoint(directory)
    path = Path(directory) / STATE_FILE
    _check_archive(path)  # a trial Ray restarts comes here without check_resumable
    state = _read_state(path)
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) != world_size:  # one RNG state per worker, in rank order (save_state)
        raise ConfigError(
            "--resume-from",
            [
                f"{directory}: written by {len(rngs)} data-parallel worker(s), resumed by "
                f"{world_size}: the data's split across workers and their random streams would "
                f"differ, so the run would not continue exactly; resume with "
                f"search.resources.workers: {len(rngs)}, or start over"
            ],
        )
    from raysft.train import fsdp

    if state.get("sharded", False) != fsdp.is_sharded(model):
        kinds = ("a single model or DDP", "FSDP (search.resources.strategy: fsdp)")
        raise ConfigError(
            "--resume-from",
            [
                f"{directory}: a checkpoint of {kinds[state.get('sharded', False)]} training "
                f"cannot resume {kinds[fsdp.is_sharded(model)]} training"
            ],
        )
    _check_param_groups(directory, state["optimizer"], optimizer)
    if state.get("sharded"):
        fsdp.restore(model, optimizer, state["trainable"], state["optimizer"])
    else:
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state["trainable"]]
        unknown = [
            n
            for n, t in state["trainable"].items()
            if n not in params or tuple(params[n].shape) != tuple(t.shape)
        ]
        if missing or unknown:
            raise ConfigError(
                "--resume-from",
                [
                    f"{directory}: checkpoint does not match this config's model "
                    f"({len(missing)} trainable tensors missing, {len(unknown)} unknown or of "
                    f"another shape, e.g. {(missing or unknown)[0]})"
                ],
            )
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_states(rngs[rank])
    return Progress(**state["progress"])


def _check_param_groups(directory: str | Path, saved: dict[str, Any], optimizer: Any) -> None:
    """The optimizer's parameter groups are the checkpoint's: one where weight decay is 0, two
    (matrices decayed, norm gains and biases not) where it is set. A checkpoint of a run with
    weight decay written before 2026-12-07 decayed every parameter in one group."""
    had, has = len(saved.get("param_groups", [])), len(optimizer.param_groups)
    if had != has:
        raise ConfigError(
            "--resume-from",
            [
                f"{directory}: its optimizer state has {had} parameter group(s), this run's "
                f"{has}: it was written before raysft kept train.weight_decay off norm gains and "
                "biases (2026-12-07), and cannot be continued exactly; score it "
                "(python -m raysft.evaluate), or start a new run"
            ],
        )


def serving_files(checkpoint: str | Path) -> list[Path]:
    """A checkpoint's files and folders but its training state (optimizer and RNG: for resuming
    a trial, not for serving, and often the largest file): what an export or an artifact holds."""
    return sorted(p for p in Path(checkpoint).iterdir() if p.name != STATE_FILE)


def _not_a_checkpoint(directory: str | Path) -> ConfigError:
    where = Path(directory)
    what = (
        "no such directory"
        if not where.exists()
        else "a file, not a checkpoint directory"
        if not where.is_dir()
        else f"not a raysft checkpoint (no {STATE_FILE})"
    )
    return ConfigError(
        "--resume-from",
        [f"{directory}: {what}; checkpoints are written at every eval to OUTPUT_DIR/checkpoints/"],
    )  # fmt: skip


def _unreadable(path: Path, why: str) -> ConfigError:
    return ConfigError(
        "--resume-from",
        [f"{path}: {why}: the checkpoint is truncated or corrupt; resume from another of the "
         "run's if it has one (raysft.train keeps only its latest), or start the run over"],
    )  # fmt: skip


def read_progress_final(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's ``Progress.final``: the base model's scores, the run's numerics."""
    return dict(_read_state(Path(directory) / STATE_FILE, mmap=True)["progress"]["final"])


def checkpoint_step(directory: str | Path) -> int:
    """The step a checkpoint was written at; its tensors are mapped, not read (``mmap``)."""
    return int(_read_state(Path(directory) / STATE_FILE, mmap=True)["progress"]["step"])


def _read_state(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    try:
        # Tensors and plain data only: unpickling anything else could run code from the file.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err).lower().replace(" ", "_"):
            raise _unreadable(path, f"cannot be read ({str(err).splitlines()[0][:200]})") from None
        raise ConfigError(
            "--resume-from",
            [f"{path}: holds objects other than tensors and plain data, which raysft never "
             "writes; refused, since loading them could run code from the file"],
        ) from None  # fmt: skip
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise _unreadable(path, f"cannot be read ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "progress" not in state:
        raise _unreadable(path, "holds no training state")
    return state


# Archives this process found intact, by (path, size, mtime): `--resume-from` checks one before
# the model loads (check_resumable) and load_state again (a trial Ray restarts comes there
# alone); a full fine-tuning's optimizer state is several times the model, so it is read once.
_INTACT: set[tuple[str, int, int]] = set()


def _check_archive(path: Path) -> None:
    """Every member of the torch.save zip archive passes its CRC: a corrupt file is called
    corrupt, not (by the weights-only unpickler it would trip) one that holds code."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _INTACT:
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise _unreadable(path, f"not a complete torch.save archive ({err})") from None
    if bad is not None:
        raise _unreadable(path, f"{bad} fails its checksum")
    _INTACT.add(key)


def check_is_checkpoint(directory: str | Path) -> None:
    """``directory`` holds a checkpoint's training state; else what it is instead."""
    if not (Path(directory) / STATE_FILE).is_file():
        raise _not_a_checkpoint(directory)


STAGING_PREFIX = ".raysft-ckpt-"  # a checkpoint being written (recipe._checkpoint)


class LocalCheckpoints:
    """A reporter for ``python -m raysft.train``: keeps the latest checkpoint in ``directory``
    (``step-000050/``), each written beside the previous and swapped in by rename."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        # Where a checkpoint is written before it is reported (the writer makes the folder):
        # in ``directory``, so that it moves in by rename (no copy, nothing in the system's
        # temp folder).
        self.staging_dir = str(self.directory)

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"step-{int(metrics['step']):06d}"
        tmp = self.directory / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if Path(checkpoint_dir).parent.resolve() == self.directory.resolve():
            Path(checkpoint_dir).rename(tmp)  # written in staging_dir: moved, not copied
        else:
            shutil.copytree(checkpoint_dir, tmp)  # the writer removes its own
        for stale in self.directory.glob(f"{STAGING_PREFIX}*"):  # a killed run's, half written
            shutil.rmtree(stale, ignore_errors=True)
        # A directory rename does not replace a non-empty one (ENOTEMPTY): a checkpoint of
        # this step may be there already (a run resumed into a directory that has one).
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in self.directory.glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The checkpoint kept (the latest written), if any."""
        kept = sorted(self.directory.glob("step-*"))
        return kept[-1] if kept else None
