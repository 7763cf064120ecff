"""Which device a trial trains on, and why it cannot when CUDA was asked for and is unusable.

A worker that asked for a GPU and sees none must fail at once, naming the node, torch's CUDA
version and the driver's: the alternative is a 7B trial that "runs" on the CPU for days.

Imports only the standard library (and ``raysft.errors``) at module level, so
``python -m raysft.train.device --torch-pip-args`` runs on a fresh node before torch is installed
(cluster.yaml). torch is imported inside the functions that need it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from raysft.errors import ModelError

if TYPE_CHECKING:
    import torch

    from raysft.config import Config

NO_DRIVER = "no NVIDIA driver found"
# The torch release cluster.yaml installs: keep equal to pyproject's upper bound for torch (a
# unit test checks it).
TORCH_VERSION = "2.13.0"
_INDEX = "https://download.pytorch.org/whl/"
# (lowest driver major, wheel variant). CUDA 13.x needs a >= 580 driver; CUDA 12.x builds run
# on any >= 525 driver (CUDA minor-version compatibility). PyPI's default torch 2.13 Linux wheel
# is the CUDA 13.0 build: on a 525-579 driver torch.cuda.is_available() is False.
_WHEEL_FOR_DRIVER = ((580, "cu130"), (525, "cu128"))


def driver_version() -> str:
    """The NVIDIA driver's version from ``nvidia-smi``, or why there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return NO_DRIVER
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed ({err})"
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        why = (out.stderr or out.stdout).strip().splitlines()
        return f"nvidia-smi failed (exit {out.returncode}: {why[0] if why else 'no output'})"
    return lines[0]  # one line per GPU; a node has one driver


def no_cuda_message(
    why: str,
    *,
    host: str,
    torch_version: str,
    torch_cuda: str | None,
    driver: str,
    visible: str | None,
    trial: bool = True,
) -> str:
    """The error of a search trial (``trial``) or a single run that needs CUDA and cannot use
    it; pure, for tests."""
    build = f"CUDA {torch_cuda}" if torch_cuda else "a CPU-only build (torch.version.cuda is None)"
    # A single run (python -m raysft.train) has no search.resources to point at.
    who, cpu = (
        ("this trial", "train.device: cpu and search.resources.gpus_per_worker: 0")
        if trial
        else ("this run", "--set train.device=cpu (auto takes a GPU only where one works)")
    )
    return (
        f"train.device: {who} needs a CUDA GPU but {why} on node {host}: "
        f"torch {torch_version} is {build}; NVIDIA driver: {driver}; "
        f"CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'}. "
        f"Install a torch build the driver supports (README: GPU clusters), "
        f"or train on the CPU with {cpu}."
    )


def _fail(why: str, *, trial: bool) -> ModelError:
    import torch

    return ModelError(
        no_cuda_message(
            why,
            host=socket.gethostname(),
            torch_version=torch.__version__,
            torch_cuda=torch.version.cuda,
            driver=driver_version(),
            visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
            trial=trial,
        )
    )


def in_ray() -> bool:
    """True in a process Ray runs in (a search's trial); False in ``python -m raysft.train``.

    Never imports ray.
    """
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def granted_gpus() -> list[str]:
    """GPU ids Ray granted this process ([] when not running inside a Ray task or actor).

    Never imports ray: outside a Ray worker (``python -m raysft.train``) it is not loaded.
    """
    if not in_ray():
        return []
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return [str(i) for i in ids]


def resolve_device(
    setting: str, *, granted: Sequence[str] = (), trial: bool | None = None
) -> torch.device:
    """``train.device`` -> the device to train on; raises ModelError when CUDA is required
    (``cuda``, or ``auto`` in a worker Ray granted GPUs) and unusable. ``trial``: the message
    is a search trial's (default: when running under Ray), else a single run's."""
    import torch

    trial = in_ray() if trial is None else trial

    if setting == "cpu":
        return torch.device("cpu")
    required = setting == "cuda" or bool(granted)
    if not torch.cuda.is_available():
        if required:
            why = "torch.cuda.is_available() is False"
            if granted:
                why = f"Ray granted GPU {','.join(granted)} and {why}"
            raise _fail(why, trial=trial)
        return torch.device("cpu")
    dev = torch.device("cuda", torch.cuda.current_device())
    try:  # one kernel launch: catches a wheel without kernels for this GPU's architecture
        (torch.ones(1, device=dev) * 2).item()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(f"a kernel launch on {dev} failed ({first})", trial=trial) from err
    return dev


def training_device(cfg: Config, *, granted: Sequence[str] = ()) -> torch.device:
    """The device ``cfg`` trains on; ModelError when it cannot train there: CUDA required and
    unusable, or flex_attention off CUDA. Shared by the run's setup and ``--dry-run``, so a
    dry run refuses what the run would refuse at once."""
    device = resolve_device(cfg.train.device, granted=granted)
    if device.type != "cuda" and cfg.model.attn_implementation == "flex_attention":
        # Checked before anything loads: torch fails only at the first backward pass.
        raise ModelError(
            f"model.attn_implementation: flex_attention needs a CUDA GPU (torch has no "
            f"flex_attention backward on {device.type}), and this run trains on {device.type}: "
            "use sdpa"
        )
    return device


def native_bf16(device: torch.device) -> bool:
    """True on a CUDA GPU that computes bf16 natively (compute capability >= 8.0).

    ``torch.cuda.is_bf16_supported()`` alone also counts emulation: slow bf16 on a T4 or V100.
    """
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def bf16_emulation(device: torch.device) -> str | None:
    """Why bf16 compute on ``device`` would be emulated (slow), or None where it is native or
    cannot be told.

    A CPU computes bf16 natively with AVX512-BF16 or AMX; without them bf16 matmuls take slow
    fallback paths: on an AVX2-only AMD EPYC the seed's training step took 6.1-7.1 s under bf16
    autocast against 0.60-0.65 s in fp32 (benchmarks/RESULTS.md). A CUDA GPU below compute
    capability 8.0 (T4, V100) emulates it too (unmeasured here).
    """
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available() or native_bf16(device):
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return f"GPU compute capability {major}.{minor} has no native bf16 (needs >= 8.0)"
    if device.type != "cpu":
        return None
    probes: list[Any] = [getattr(torch.cpu, name, None) for name in _CPU_BF16_PROBES]
    if not all(callable(probe) for probe in probes):  # a torch without the probes: cannot tell
        return None
    if any(probe() for probe in probes):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return f"this CPU has neither AVX512-BF16 nor AMX (torch's CPU capability: {capability})"


# torch's own CPU feature probes (private, present since torch 2.3).
_CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def torch_wheel_index(driver: str) -> str:
    """The PyTorch wheel index whose CUDA build the driver runs; the CPU index without a driver.

    Raises ValueError for a driver older than any supported CUDA build.
    """
    try:
        major = int(driver.split(".")[0])
    except ValueError:
        return _INDEX + "cpu"  # NO_DRIVER or a failing nvidia-smi: no usable GPU here
    for lowest, variant in _WHEEL_FOR_DRIVER:
        if major >= lowest:
            return _INDEX + variant
    raise ValueError(
        f"NVIDIA driver {driver} is older than {_WHEEL_FOR_DRIVER[-1][0]}: no torch "
        f"{TORCH_VERSION} CUDA build runs on it; use an image with a newer driver"
    )


def describe_node() -> str:
    """One line: node, torch and its CUDA build, driver, and the GPU torch sees (if any)."""
    import torch

    line = (
        f"node {socket.gethostname()}: torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), NVIDIA driver: {driver_version()}"
    )
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability(dev)
        bf16 = "native bf16" if native_bf16(dev) else "no native bf16: fp16"
        line += f"; {torch.cuda.get_device_name(dev)} (sm_{major}{minor}, {bf16})"
    return line


def main(argv: list[str] | None = None) -> int:
    """Node checks for cluster.yaml's setup commands (stdout is the node's setup log)."""
    parser = argparse.ArgumentParser(prog="python -m raysft.train.device")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--torch-pip-args",
        action="store_true",
        help="print `torch==VERSION --index-url URL` for this node's driver (no torch needed)",
    )
    group.add_argument(
        "--require-cuda",
        action="store_true",
        help="print the node's torch/CUDA/driver; exit 1 unless a CUDA GPU is usable",
    )
    args = parser.parse_args(argv)
    if args.torch_pip_args:
        try:
            index = torch_wheel_index(driver_version())
        except ValueError as err:
            sys.stderr.write(f"error: {err}\n")
            return 1
        sys.stdout.write(f"torch=={TORCH_VERSION} --index-url {index}\n")
        return 0
    try:
        resolve_device("cuda")
    except ModelError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(describe_node() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
