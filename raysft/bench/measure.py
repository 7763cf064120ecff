"""What the benchmark measures, the same way for every contender.

- Throughput: real (non-padding) tokens per second after the warm-up steps (``WARMUP_STEPS``;
  they carry one-off costs: lazy init, optimizer state, kernel selection, torch.compile; on
  this CPU steps 2-3 still run 2-3x slower than later ones); warm-up time is reported apart.
  Also the median over those steps of each step's tokens/s (a burst of outside load on a shared
  machine moves it much less than the mean), and real tokens per CPU-second of the process (all
  its threads; on this 2-core VM it rises and falls with outside load nearly as much as wall
  time does, so it is no cure).
- Peak memory: on CUDA, ``torch.cuda.max_memory_allocated``; on the CPU, the process's peak RSS
  (``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs once the imports are done)
  minus the RSS at that moment. Python-level tracers (tracemalloc) miss torch's allocations.
- MFU: 6 * N * tokens/s / peak FLOP/s, N = parameters that do matmuls (the input embedding is a
  lookup and is left out unless tied to the LM head). For LoRA / QLoRA the frozen base needs no
  weight gradients (~4N), so 6N overstates their useful work: read it as hardware use.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WARMUP_STEPS = 3  # not timed for throughput (a preset of 20 steps times 17)

# Dense bf16 tensor-core peaks (vendor data sheets, no sparsity), matched by substring of
# torch.cuda.get_device_name(); first match wins, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),  # half its "1,671 with sparsity" as recalled; not checked offline
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device name, or None when the table has no entry."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def matmul_params(model: Any) -> int:
    """Parameters that take part in matmuls: all, minus an untied input embedding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen: set[int] = set()
    total = 0
    for p in base.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()  # two 4-bit weights per byte
        total += n
    emb = base.get_input_embeddings().weight
    out = base.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total if tied else total - emb.numel()


def mfu(n_params: int, tokens_per_s: float, device_name: str) -> float | None:
    peak = peak_flops(device_name)
    return None if peak is None else 6 * n_params * tokens_per_s / peak


# ------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


class MemoryProbe:
    """Peak memory from ``start()`` on: CUDA allocator peak, or peak RSS growth on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self._rss0 = 0

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError):  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        self._rss0 = _status_kib("VmRSS") or 0

    def peak_mib(self) -> float | None:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _status_kib("VmHWM")
        return None if hwm is None else (hwm - self._rss0) / 1024


# ------------------------------------------------------------------------------------- timing


@dataclass
class StepClock:
    """Wall time and cumulative real tokens at the end of each optimizer step."""

    sync: Any = None  # torch.cuda.synchronize on a GPU, so a step's time is its own
    t0: float = 0.0
    cpu0: float = 0.0
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds (all threads)
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def begin(self) -> None:
        if self.sync:
            self.sync()
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def step(self, tokens_so_far: int, loss: float | None = None) -> None:
        if self.sync:
            self.sync()
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.tokens.append(tokens_so_far)
        if loss is not None:
            self.losses.append(loss)

    def summary(self, *, warmup: int = 1) -> dict[str, Any]:
        """Throughput over the steps after the first ``warmup`` (timed apart as warm-up); final
        train loss = mean of the last 5 steps."""
        n = len(self.times)
        out: dict[str, Any] = {"steps": n, "real_tokens": self.tokens[-1] if n else 0}
        w = min(max(warmup, 1), n - 1) if n >= 2 else 0
        if n:
            out["warmup_steps"] = w
            out["first_step_s"] = round(self.times[0] - self.t0, 3)
            out["warmup_s"] = round(self.times[w - 1] - self.t0, 3) if w else None
            out["train_s"] = round(self.times[-1] - self.t0, 3)
            marks = [self.t0, *self.times]
            out["step_times"] = [round(b - a, 3) for a, b in zip(marks, marks[1:], strict=False)]
        if w:
            dt = self.times[-1] - self.times[w - 1]
            tokens = self.tokens[-1] - self.tokens[w - 1]
            out["tokens_per_s"] = tokens / dt if dt > 0 else None
            out["step_s"] = dt / (n - w)
            # Median over the timed steps of each step's own tokens/s: a burst of outside load
            # that hits a few steps moves it much less than the mean.
            marks, toks = self.times[w - 1 :], self.tokens[w - 1 :]
            rates = [
                (t1 - t0) / (b - a)
                for a, b, t0, t1 in zip(marks, marks[1:], toks, toks[1:], strict=False)
                if b > a
            ]
            out["tokens_per_s_median"] = statistics.median(rates) if rates else None
            cpu = self.cpu[-1] - self.cpu[w - 1]
            # Robust to other load on a shared machine: work per CPU-second of this process.
            out["tokens_per_cpu_s"] = tokens / cpu if cpu > 0 else None
        if self.losses:
            tail = self.losses[-5:]
            out["final_train_loss"] = sum(tail) / len(tail)
        return out


def count_real_tokens(kwargs: dict[str, Any]) -> int:
    """Non-padding tokens of one HF forward call: the attention mask's ones, or (padding-free,
    no mask) every input id."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = kwargs.get("input_ids")
    return 0 if ids is None else int(ids.numel())


# ------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """CPU model, cores, torch's CPU capability and bf16 support, GPU name: what the numbers
    were measured on (one VM's "AMD EPYC" has been an AVX512-BF16 host one day and an AVX2-only
    one the next, with bf16 10x slower there)."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s+(.+)$", out, re.MULTILINE)
        info["cpu_model"] = m.group(1).strip() if m else platform.processor()
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = platform.processor()
    try:
        import torch

        from raysft.train.device import bf16_emulation

        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_bf16"] = "emulated" if bf16_emulation(torch.device("cpu")) else "native"
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
