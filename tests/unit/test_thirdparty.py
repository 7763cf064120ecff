"""raysft/thirdparty.py: bitsandbytes imported without its Hub kernel lookup; peft's deprecated
read kept out of the logs. The imports run in fresh interpreters: an import hook acts once per
process, before the first import of bitsandbytes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from raysft.thirdparty import HUB_KERNELS_VAR, kernels_hidden, peft_quietly

ROOT = Path(__file__).resolve().parents[2]

# Imports raysft then peft (which imports bitsandbytes) with every DNS lookup and connect recorded.
_PROBE = """
import json, socket, sys
looked_up = []
_gai, _connect = socket.getaddrinfo, socket.socket.connect
socket.getaddrinfo = lambda *a, **k: (looked_up.append(str(a[0])), _gai(*a, **k))[1]
socket.socket.connect = lambda self, addr: (looked_up.append(str(addr)), _connect(self, addr))[1]
import raysft, peft, bitsandbytes
from bitsandbytes.functional import has_avx512bf16
print(json.dumps({
    "looked_up": looked_up,
    "avx512bf16": bool(has_avx512bf16()),
    "own_loader": type(bitsandbytes.__spec__.loader).__name__,
}))
"""


def _probe(env: dict[str, str]) -> tuple[dict, str]:
    ran = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    return json.loads(ran.stdout.strip().splitlines()[-1]), ran.stderr


def test_bitsandbytes_imports_without_looking_up_the_hub() -> None:
    report, stderr = _probe({HUB_KERNELS_VAR: "0"})
    assert report["looked_up"] == [], report
    assert "kernels-community" not in stderr, stderr[-2000:]
    # The module keeps bitsandbytes' own loader, not the hook's wrapper.
    assert report["own_loader"] == "SourceFileLoader", report
    if not report["avx512bf16"]:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not look up its Hub kernel")
    if importlib.util.find_spec("kernels") is None:  # transformers requires it from 5.2x on
        pytest.skip("kernels is not installed: bitsandbytes cannot look up its Hub kernel")
    # The control: left alone (the opt-out), the same import asks the Hub.
    control, control_err = _probe({HUB_KERNELS_VAR: "1"})
    assert any("huggingface.co" in host for host in control["looked_up"]), control
    assert "kernels-community" in control_err


def test_kernels_hidden_fails_the_import_inside_and_restores_it_after() -> None:
    before = sys.modules.get("kernels")
    with kernels_hidden(), pytest.raises(ImportError):
        from kernels import get_kernel  # noqa: F401
    assert sys.modules.get("kernels") is before
    if importlib.util.find_spec("kernels") is None:  # transformers requires it from 5.2x on
        return
    import kernels  # importable again

    assert hasattr(kernels, "get_kernel")


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    )  # fmt: skip


def test_peft_quietly_drops_only_the_deprecation_of_peft_s_read() -> None:
    """peft before 0.22 reads transformers' deprecated ``is_gradient_checkpointing`` when it
    wraps a model (0.22 no longer does; raysft accepts peft 0.18 on). The read is made here
    directly, so the shim is tested whichever peft is installed."""
    from peft import LoraConfig, get_peft_model

    model = _tiny_llama()
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        with peft_quietly():
            assert model.is_gradient_checkpointing is False
            get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    seen = [str(w.message) for w in quiet]
    assert not any("is_gradient_checkpointing" in m for m in seen), seen
    assert "another FutureWarning" in seen
    # The control: without the shim the read warns where transformers has its successor
    # (is_activation_checkpointing, 5.2x; if this fails there, transformers dropped the
    # property, and the shim can go), and is silent before (5.17).
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        assert model.is_gradient_checkpointing is False
    deprecated = hasattr(type(model), "is_activation_checkpointing")
    assert any("is_gradient_checkpointing" in str(w.message) for w in plain) == deprecated
