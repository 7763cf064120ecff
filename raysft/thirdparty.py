"""Two shims over third-party libraries, each for something a user can neither use nor act on.

1. **bitsandbytes without its Hub kernel lookup.** On a CPU with AVX512-BF16, ``import
   bitsandbytes`` (0.50) asks the Hugging Face Hub for an optional CPU kernel
   (``kernels.get_kernel("kernels-community/quantization-bitsandbytes")``). peft imports
   bitsandbytes whenever it is installed, so every process that loads an adapter does it, LoRA
   ones too. Offline the lookup fails and logs a warning naming a Hub repository. On a cluster
   whose firewall drops packets it waits for the Hub's timeout. Where the Hub answers, it
   downloads code and runs it at import. raysft runs offline by design (embedded model and
   data, no Hub at run time), so it imports bitsandbytes with ``kernels`` hidden.
   bitsandbytes then uses its built-in CPU kernels, as it does on every other CPU and whenever
   the lookup fails. ``RAYSFT_HUB_KERNELS=1`` leaves the import alone.
2. **peft's read of a deprecated transformers property.** peft 0.21 reads
   ``model.is_gradient_checkpointing`` when it wraps a model, and transformers 5.x warns
   (FutureWarning) on every read: 2 lines per adapter loaded, in every trial's log.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

HUB_KERNELS_VAR = "RAYSFT_HUB_KERNELS"  # "1": let bitsandbytes look up its Hub kernel
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"  # where bitsandbytes reports the failed lookup
_ABSENT = object()


class _QuietBitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as the other finders do; its loader runs with ``kernels`` hidden."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "bitsandbytes":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WithoutKernels(spec.loader)
                return spec
        return None


class _WithoutKernels(importlib.abc.Loader):
    def __init__(self, inner: Any):
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        created: ModuleType | None = self.inner.create_module(spec)
        return created

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps bitsandbytes' own loader (source, resources) once it runs.
        module.__loader__ = self.inner
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        with kernels_hidden():
            self.inner.exec_module(module)


class _DropHubKernelNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


@contextmanager
def kernels_hidden() -> Iterator[None]:
    """``import kernels`` fails inside (bitsandbytes catches it); no log line about it."""
    saved: Any = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # import -> ImportError
    note = _DropHubKernelNote()
    logger = logging.getLogger(_BNB_LOGGER)
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)
        if saved is _ABSENT:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved


def install_bitsandbytes_hook() -> None:
    """From now on, this process imports bitsandbytes without the Hub lookup (once, and only if
    it is not imported yet and ``RAYSFT_HUB_KERNELS`` is not ``1``)."""
    if os.environ.get(HUB_KERNELS_VAR) == "1" or "bitsandbytes" in sys.modules:
        return
    if not any(isinstance(f, _QuietBitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietBitsandbytesFinder())


@contextmanager
def peft_quietly() -> Iterator[None]:
    """peft wrapping or loading a model, without transformers' FutureWarning about the
    deprecated property ``is_gradient_checkpointing``, which peft 0.17 to 0.21 read (0.22 reads
    its successor)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield
