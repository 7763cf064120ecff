"""Write constraints-lowest.txt: every direct dependency of pyproject.toml (the dev extra's too)
at the lower end of its range, the rest at the newest versions that resolve with them.

    python .ci/constraints_lowest.py UV OUT

UV: a uv executable (``make constraints-lowest`` installs one, with ``packaging``, in a scratch
venv). Lower ends that cannot be resolved together are an error naming the conflict: the ranges
then claim versions no install can have, and pyproject.toml must say the oldest that resolve.

uv's own ``--resolution lowest-direct`` is a search, not a rule: on 2026-12-08 it took mlflow
3.13 and datasets 5.2 where 3.0 and 3.0 resolve. Each lower end is pinned here instead.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
_ANY_VERSION = {"types-pyyaml"}  # type stubs: no lower end needed


def lower_ends(pyproject: Path) -> dict[str, str]:
    """Each direct dependency's name -> its range's lower end (``>=``). A requirement without
    one is an error: nothing would say what it was tested at."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    ends = {}
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(text)
        lower = [spec.version for spec in req.specifier if spec.operator == ">="]
        if lower:
            ends[req.name] = lower[0]
        elif req.name.lower() not in _ANY_VERSION:
            sys.exit(f"{pyproject}: dependency {text!r} has no lower end (>=)")
    return ends


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit(__doc__)
    uv, out = argv
    ends = lower_ends(ROOT / "pyproject.toml")
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp, "lower-ends.txt")
        pins.write_text("".join(f"{n}=={v}\n" for n, v in sorted(ends.items())))
        ran = subprocess.run(
            [
                uv, "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "dev",
                "--python-version", "3.11", "--no-header", "--no-annotate",
                "-c", str(pins), "-o", out,
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if ran.returncode != 0:
        sys.exit(
            f"the lower ends of pyproject.toml's ranges do not resolve together:\n"
            f"{ran.stderr.strip()}"
        )
    header = (
        "# The oldest versions pyproject.toml admits: each direct dependency at its range's lower\n"
        "# end, the rest at the newest that resolved with them. `make test-lowest` runs the unit\n"
        "# tests on it; regenerate with `make constraints-lowest` when a lower end changes.\n"
    )
    body = Path(out).read_text(encoding="utf-8")
    Path(out).write_text(header + body, encoding="utf-8")
    print(f"{out}: {len(ends)} lower ends pinned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
