"""constraints-lowest.txt (README "Install"): the oldest versions pyproject.toml admits, which
`make test-lowest` tests. It must follow pyproject.toml: a lower end raised there and not here
would leave the old version tested."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "constraints_lowest", ROOT / ".ci" / "constraints_lowest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints-lowest.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_norm(name)] = Version(version)
    return pins


def test_every_lower_end_of_pyproject_is_pinned_there() -> None:
    ends = _script().lower_ends(ROOT / "pyproject.toml")
    assert "ray" in ends and "mlflow" in ends and "torch" not in ends
    pins = _pins()
    for name, version in ends.items():
        assert pins.get(_norm(name)) == Version(version), (name, version)


def test_torch_is_pinned_at_its_lower_end_as_make_test_lowest_installs_it() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    lower = re.search(r'"torch>=([0-9.]+),', pyproject)
    make = re.search(r"^TORCH_LOWEST \?= torch==([0-9.]+)$", (ROOT / "Makefile").read_text(), re.M)
    assert lower and make
    assert Version(lower.group(1)) == Version(make.group(1)) == _pins()["torch"]


def test_a_dependency_without_a_lower_end_is_refused(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["ray>=2.51", "mlflow<4"]\n'
        '[project.optional-dependencies]\ndev = ["pytest>=8"]\n'
    )
    with pytest.raises(SystemExit, match=r"dependency 'mlflow<4' has no lower end"):
        _script().lower_ends(pyproject)
