"""Device resolution: no silent CPU fallback, the no-CUDA message, driver detection, the torch
wheel a driver runs (cluster.yaml), native bf16 and where bf16 is emulated."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysft.config import Config, ConfigError, validate_spec
from raysft.errors import ModelError
from raysft.search.spec import load_spec
from raysft.train import device as device_mod
from raysft.train.device import (
    NO_DRIVER,
    TORCH_VERSION,
    bf16_emulation,
    driver_version,
    granted_gpus,
    main,
    native_bf16,
    no_cuda_message,
    resolve_device,
    torch_wheel_index,
)

ROOT = Path(__file__).resolve().parents[2]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure")


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """Put an ``nvidia-smi`` that prints ``stdout`` and exits ``rc`` first on PATH."""

    def install(stdout: str, rc: int = 0) -> None:
        exe = tmp_path / "nvidia-smi"
        exe.write_text(f"#!/bin/sh\nprintf '{stdout}'\nexit {rc}\n")
        exe.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")

    return install


# ---------------------------------------------------------------- the message


def test_no_cuda_message_names_node_cuda_build_and_driver():
    msg = no_cuda_message(
        "torch.cuda.is_available() is False",
        host="gpu-node-7",
        torch_version="2.13.0+cu130",
        torch_cuda="13.0",
        driver="570.86.15",
        visible="0",
    )
    assert "on node gpu-node-7" in msg
    assert "torch 2.13.0+cu130 is CUDA 13.0" in msg
    assert "NVIDIA driver: 570.86.15" in msg and "CUDA_VISIBLE_DEVICES=0" in msg
    assert "README: GPU clusters" in msg and "train.device: cpu" in msg


def test_no_cuda_message_of_a_single_run_names_no_search_setting():
    facts = {"host": "h", "torch_version": "2.13.0+cpu", "torch_cuda": None, "driver": NO_DRIVER,
             "visible": None}  # fmt: skip
    run = no_cuda_message("x", trial=False, **facts)
    assert run.startswith("train.device: this run needs a CUDA GPU but x on node h: ")
    assert "search." not in run and run.endswith(
        "or train on the CPU with --set train.device=cpu (auto takes a GPU only where one works)."
    )
    trial = no_cuda_message("x", trial=True, **facts)
    assert trial.startswith("train.device: this trial needs a CUDA GPU")
    assert "search.resources.gpus_per_worker: 0" in trial


@needs_no_cuda
def test_outside_ray_cuda_asked_for_is_a_single_runs_error():
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    with pytest.raises(ModelError, match=r"^train\.device: this run needs a CUDA GPU") as err:
        resolve_device("cuda")
    assert "gpus_per_worker" not in str(err.value)


@needs_no_cuda
@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"train.device": "cuda"}, "train.device: this run needs a CUDA GPU but "),
        ({"model.attn_implementation": "flex_attention"},
         "model.attn_implementation: flex_attention needs a CUDA GPU"),
    ],
)  # fmt: skip
def test_a_dry_run_refuses_what_the_run_refuses_at_once(tmp_path, settings, said):
    from raysft.config import load_config
    from raysft.train.__main__ import _dry_run

    cfg = load_config(None, {**settings, "output_dir": str(tmp_path / "out")})
    with pytest.raises(ModelError) as err:
        _dry_run(cfg, "c.yaml")
    assert str(err.value).startswith(said)


def test_no_cuda_message_for_a_cpu_build_without_driver():
    msg = no_cuda_message(
        "x", host="h", torch_version="2.13.0+cpu", torch_cuda=None, driver=NO_DRIVER, visible=None
    )
    assert "CPU-only build (torch.version.cuda is None)" in msg
    assert "NVIDIA driver: no NVIDIA driver found" in msg
    assert "CUDA_VISIBLE_DEVICES=(unset)" in msg


@needs_no_cuda
def test_cuda_requested_on_this_machine_fails_with_the_real_facts(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi, whatever the machine has
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ModelError) as err:
        resolve_device("cuda")
    msg = str(err.value)
    assert f"on node {socket.gethostname()}" in msg
    assert f"torch {torch.__version__} is " in msg
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "torch.version.cuda is None"
    assert cuda in msg
    assert f"NVIDIA driver: {NO_DRIVER}" in msg and "CUDA_VISIBLE_DEVICES=3" in msg


@needs_no_cuda
def test_a_worker_granted_a_gpu_never_falls_back_to_the_cpu():
    with pytest.raises(ModelError, match=r"Ray granted GPU 0 and torch\.cuda\.is_available"):
        resolve_device("auto", granted=["0"])


@needs_no_cuda
def test_auto_without_a_grant_and_cpu_always_train_on_the_cpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu", granted=["0"]) == torch.device("cpu")


def test_granted_gpus_outside_ray_is_empty():
    assert granted_gpus() == []


@needs_no_cuda
def test_recipe_setup_fails_before_loading_anything(tmp_path):
    from raysft.train.recipe import Dist, setup

    cfg = Config(output_dir=str(tmp_path / "out"))
    cfg.train.device = "cuda"
    cfg.model.name_or_path = str(tmp_path / "no-such-model")  # would fail later if reached
    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        setup(cfg, dist=Dist())


def _search(device: str, gpus: float | str) -> dict[str, object]:
    return {
        "train": {"device": device},
        "search": {
            "params": {"train.learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3}},
            "resources": {"gpus_per_worker": gpus},
        },
    }


@pytest.mark.parametrize(
    ("device", "gpus", "accepted"),
    [
        ("cpu", 1, [("auto", 1)]),  # the trials would hold GPUs they never use
        ("cuda", 0, [("cuda", 1), ("cuda", 0.5), ("cuda", "auto")]),  # Ray gives them none
    ],
)
def test_spec_refuses_a_device_its_gpus_per_worker_contradicts(
    device: str, gpus: float, accepted: list[tuple[str, float | str]]
) -> None:
    with pytest.raises(ConfigError, match=f"train.device: {device} but search.resources.gpus_per"):
        validate_spec(_search(device, gpus), source="s.yaml")
    for ok_device, ok_gpus in accepted:
        assert validate_spec(_search(ok_device, ok_gpus)).train.device == ok_device


@pytest.mark.parametrize(("device", "gpus"), [("auto", 0), ("cpu", 0)])
def test_spec_refuses_flex_attention_for_trials_on_the_cpu(
    tmp_path: Path, device: str, gpus: float
) -> None:
    """Every trial would fail at its start, and be retried: refused before Ray starts, for a
    searched value too."""
    tree = {**_search(device, gpus), "model": {"attn_implementation": "flex_attention"}}
    with pytest.raises(ConfigError, match="flex_attention needs a CUDA GPU, but the trials"):
        validate_spec(tree, source="s.yaml")
    searched = _search(device, gpus)
    searched["search"]["params"]["model.attn_implementation"] = {  # type: ignore[index]
        "type": "choice",
        "values": ["sdpa", "flex_attention"],
    }
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(searched), encoding="utf-8")  # JSON is YAML
    with pytest.raises(ConfigError, match="value 'flex_attention': model.attn_implementation"):
        load_spec(str(path), [], preflight=False)
    ok = {**_search("auto", 1), "model": {"attn_implementation": "flex_attention"}}
    assert validate_spec(ok).model.attn_implementation == "flex_attention"


# ---------------------------------------------------------------- driver and wheel


def test_driver_version_from_nvidia_smi(fake_nvidia_smi):
    fake_nvidia_smi("570.86.15\\n570.86.15\\n")  # one line per GPU
    assert driver_version() == "570.86.15"


def test_driver_version_when_nvidia_smi_fails(fake_nvidia_smi):
    fake_nvidia_smi("NVIDIA-SMI has failed because it could not communicate with the driver\\n", 9)
    assert driver_version() == (
        "nvidia-smi failed (exit 9: NVIDIA-SMI has failed because it could not communicate "
        "with the driver)"
    )


def test_driver_version_without_nvidia_smi(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert driver_version() == NO_DRIVER


@pytest.mark.parametrize(
    ("driver", "variant"),
    [
        ("580.65.06", "cu130"),
        ("590.1", "cu130"),
        ("579.99", "cu128"),
        ("525.60.13", "cu128"),
        (NO_DRIVER, "cpu"),
        ("nvidia-smi failed (exit 9: x)", "cpu"),
    ],
)
def test_torch_wheel_index_for_driver(driver, variant):
    assert torch_wheel_index(driver) == f"https://download.pytorch.org/whl/{variant}"


def test_torch_wheel_index_refuses_an_old_driver():
    with pytest.raises(ValueError, match="NVIDIA driver 470.82.01 is older than 525"):
        torch_wheel_index("470.82.01")


def test_pinned_torch_is_pyprojects_upper_bound():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (torch_dep,) = re.findall(r'^\s*"(torch[^"]*)"', pyproject, flags=re.MULTILINE)
    assert f"<={TORCH_VERSION}" in torch_dep.replace(" ", "")


def test_main_prints_pip_args_for_the_driver(fake_nvidia_smi, capsys):
    fake_nvidia_smi("575.51.03\\n")
    assert main(["--torch-pip-args"]) == 0
    assert capsys.readouterr().out == (
        f"torch=={TORCH_VERSION} --index-url https://download.pytorch.org/whl/cu128\n"
    )
    fake_nvidia_smi("470.82.01\\n")
    assert main(["--torch-pip-args"]) == 1
    assert "older than 525" in capsys.readouterr().err


@needs_no_cuda
def test_main_require_cuda_fails_the_node_here(capsys):
    assert main(["--require-cuda"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_device_module_runs_without_torch(tmp_path):
    """cluster.yaml runs it with the system python before torch is installed."""
    code = "import sys, raysft.train.device; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False"


def test_native_bf16_is_false_off_cuda():
    assert native_bf16(torch.device("cpu")) is False


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "emulated"),
    [(False, False, True), (True, False, False), (False, True, False), (True, True, False)],
)
def test_bf16_emulation_on_the_cpu_follows_torchs_feature_probes(
    monkeypatch, avx512_bf16, amx, emulated
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    why = bf16_emulation(torch.device("cpu"))
    if emulated:
        assert why is not None and "neither AVX512-BF16 nor AMX" in why
        assert torch.backends.cpu.get_cpu_capability() in why
    else:
        assert why is None


def test_bf16_emulation_cannot_tell_without_torchs_probes(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert bf16_emulation(torch.device("cpu")) is None


def test_bf16_emulation_on_this_cpu_agrees_with_its_flags():
    """The probes read the same CPU flags as the kernel: no avx512_bf16 and no amx_bf16 in
    /proc/cpuinfo means emulation (this checks the probes' names and meaning, unpatched)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile)\b", cpuinfo.read_text()))
    assert (bf16_emulation(torch.device("cpu")) is None) == bool(flags)


def test_cluster_yaml_installs_the_driver_matched_torch_and_checks_it():
    import yaml

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    setup = cluster["setup_commands"]
    pick = next(i for i, c in enumerate(setup) if "--torch-pip-args" in c)
    install_raysft = "pip install -q -c ~/raysft/constraints.txt -e ~/raysft"
    install = next(i for i, c in enumerate(setup) if install_raysft in c)
    assert pick < install  # torch first: raysft's range then keeps it
    assert any("raysft.train.device --require-cuda" in c for c in cluster["worker_setup_commands"])


def test_cluster_yaml_makes_its_venv_with_a_python_raysft_supports():
    """The AMI's python3 is 3.10; pyproject's requires-python would refuse the install."""
    import re

    import tomllib
    import yaml

    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    need = tuple(int(x) for x in re.fullmatch(r">=(\d+)\.(\d+)", floor).groups())  # type: ignore[union-attr]
    setup = yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"]
    venv = next(c for c in setup if " -m venv " in c)
    got = re.search(r"python(\d+)\.(\d+) -m venv", venv)
    assert got, f"the venv is made with an unversioned python: {venv}"
    assert tuple(map(int, got.groups())) >= need
    installed = next(c for c in setup if "apt-get install" in c and "-venv" in c)
    assert f"python{got[1]}.{got[2]}-venv" in installed


# ---------------------------------------------------------------- on a GPU


@pytest.mark.cuda
def test_cuda_device_resolves_and_describes_the_node():
    dev = resolve_device("cuda")
    assert dev.type == "cuda"
    line = device_mod.describe_node()
    assert torch.version.cuda in line and torch.cuda.get_device_name(dev) in line
    assert native_bf16(dev) == (torch.cuda.get_device_capability(dev)[0] >= 8)
