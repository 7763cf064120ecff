"""Every shipped YAML validates; the README's configuration reference matches the schema."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from raysft import docs
from raysft.search.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_the_promised_specs_ship() -> None:
    names = {p.name for p in SPECS}
    assert {"lora.yaml", "qlora.yaml", "full.yaml", "qlora-7b.yaml"} <= names


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_spec_validates_and_opens_with_its_command(spec: Path) -> None:
    first = spec.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and "raysft.tune search_spaces/" + spec.name in first
    _, cfg = load_spec(str(spec), [], dry_run=True)
    assert cfg.search is not None and cfg.search.params


@pytest.mark.parametrize("name", ["lora.yaml", "qlora.yaml", "full.yaml"])
def test_embedded_specs_run_anywhere(name: str) -> None:
    # No GPU, no network: the laptop specs use the embedded model and data and fit 2 CPUs.
    _, cfg = load_spec(str(ROOT / "search_spaces" / name), [])
    assert cfg.model.name_or_path.startswith("embedded:")
    assert cfg.search is not None and cfg.search.resources.gpus_per_worker == 0
    assert cfg.method == name.removesuffix(".yaml")


def test_full_spec_searches_learning_rate_and_neftune_only() -> None:
    _, cfg = load_spec(str(ROOT / "search_spaces" / "full.yaml"), [])
    assert cfg.search is not None
    assert set(cfg.search.params) == {"train.learning_rate", "train.neftune_alpha"}


def test_cluster_yaml_has_head_gpu_workers_and_mlflow() -> None:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert any("g5" in t["node_config"]["InstanceType"] for t in types.values())
    assert any("pip install" in c and "raysft" in c for c in cluster["setup_commands"])
    mlflow = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert mlflow and all("--host 127.0.0.1" in c for c in mlflow), "MLflow open beyond the head"
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text(encoding="utf-8")


def test_cluster_yaml_runs_ray_with_the_laptops_token_on_every_node() -> None:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    assert cluster["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"
    starts = [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in cluster[key]
        if "ray start" in c
    ]
    assert len(starts) == 2
    assert all("export RAY_AUTH_MODE=token && ray start" in c for c in starts)


def _head_mlflow_start(port: int, home: Path) -> str:
    """cluster.yaml's MLflow start on the head, wrapped as `ray up` runs a start command (an
    interactive login bash whose own command line holds the whole command), with ``port``."""
    from ray.autoscaler._private.command_runner import _with_interactive

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    (cmd,) = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    cmd = cmd.replace("5000", str(port)).replace("~/", f"{home}/")
    return " ".join(_with_interactive(cmd))


@pytest.mark.skipif(shutil.which("curl") is None, reason="the start command's check uses curl")
def test_cluster_yaml_starts_mlflow_on_the_head_once(tmp_path: Path) -> None:
    # A fake `mlflow` that notes it ran; a fake venv that puts it first on PATH.
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv.mkdir(parents=True)
    (bin_dir / "mlflow").write_text(f"#!/bin/sh\necho ran >> {tmp_path}/mlflow-ran\n")
    (bin_dir / "mlflow").chmod(0o755)
    (venv / "activate").write_text(f"export PATH={bin_dir}:$PATH\n")
    env = {**os.environ, "HOME": str(tmp_path)}

    def run_start(port: int) -> None:
        subprocess.run(
            ["bash", "-c", _head_mlflow_start(port, tmp_path)], env=env, timeout=60, check=False
        )
        time.sleep(0.5)  # the server is started in the background

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run_start(port)  # nothing answers there: started
    assert (tmp_path / "mlflow-ran").read_text().count("ran") == 1

    (tmp_path / "health").write_text("OK")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run_start(server.server_address[1])  # one answers /health there: not started again
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "mlflow-ran").read_text().count("ran") == 1


def test_readme_reference_matches_schema() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert docs.splice(readme, docs.reference()) == readme, (
        "README configuration reference is stale: run python -m raysft.docs --write README.md"
    )


def test_the_readmes_trl_table_names_real_settings_and_values() -> None:
    """Every raysft key the "Coming from TRL" table names (``train.epochs``, and ``key: value``
    where it gives one) is a field of the schema, and its value one the field takes."""
    import re

    from raysft.config import load_config
    from raysft.config.loading import field_annotation

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Coming from TRL", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ", 1)[1] for line in table.splitlines() if line.startswith("| `")]
    named = [
        m.group(1)
        for row in rows
        for m in re.finditer(r"`([a-z_]+(?:\.[a-z_0-9]+)+(?:: [a-z_]+)?)`", row)
        if not m.group(1).startswith("raysft.")
    ]
    assert len(named) > 30, named
    for item in named:
        path, _, value = item.partition(": ")
        field_annotation(path)  # KeyError: not a field
        if value:
            load_config(None, {path: yaml.safe_load(value)})  # a value the field takes
    for top in ("output_dir",):
        assert f"`{top}`" in table


def test_readme_quick_start_is_the_ci_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci.splitlines()[-1] and "make test" in readme and "make demo" in readme


def test_constraints_pin_every_requirement_inside_its_range() -> None:
    """constraints.txt (what `make setup` installs) pins each of pyproject's requirements, and
    the dev extra's, to a version its range admits; torch stays out (Makefile TORCH picks it)."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins: dict[str, Version] = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if line and not line.startswith("#"):
            name, eq, version = line.partition("==")
            assert eq and name.strip() == name, f"constraints.txt:{n}: not NAME==VERSION: {line}"
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_gpu_fractional_spec_plans_two_trials_on_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # benchmarks/gpu_check.sh runs it on a lent GPU; here its plan is checked without one.
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _, cfg = load_spec(str(ROOT / "benchmarks" / "gpu_fractional.yaml"), [], dry_run=True)
    r = cfg.search.resources
    assert (r.workers, r.gpus_per_worker, cfg.search.max_concurrent) == (1, 0.5, 2)
    assert cfg.train.device == "cuda" and cfg.search.num_samples == 2
