"""constraints-lowest.txt (README "Install"): the oldest versions pyproject.toml admits, which
`make test-lowest` tests (torch included: the Makefile reads its pin from the file). It must
follow pyproject.toml: a lower end raised there and not here would leave the old version tested."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
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


def test_every_lower_end_of_pyproject_is_pinned_there() -> None:
    ends = _script().lower_ends(ROOT / "pyproject.toml")
    assert {"torch", "ray", "mlflow", "pytest"} <= set(ends)
    pins = {}
    for line in (ROOT / "constraints-lowest.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    for name, version in ends.items():
        assert pins.get(canonicalize_name(name)) == Version(version), (name, version)


def test_a_dependency_without_a_lower_end_is_refused(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["ray>=2.51", "mlflow<4"]\n'
        '[project.optional-dependencies]\ndev = ["pytest>=8", "types-PyYAML"]\n'
    )
    with pytest.raises(SystemExit, match=r"dependency 'mlflow<4' has no lower end"):
        _script().lower_ends(pyproject)
