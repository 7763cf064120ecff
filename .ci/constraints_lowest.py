"""Write constraints-lowest.txt: every direct dependency of pyproject.toml (the dev extra's too)
at the lower end of its range, the rest at the newest versions that resolve with them.

    python .ci/constraints_lowest.py UV TORCH_PIN OUT

UV: a uv executable (``make constraints-lowest`` installs one in a scratch venv); TORCH_PIN: the
torch requirement to resolve with (``torch==2.6.0``, the range's lower end). A lower end that
cannot be resolved with the others is an error naming it: the range then claims a version no
install can have, and pyproject.toml must say the oldest that resolves.

uv's own ``--resolution lowest-direct`` is a search, not a rule: on 2026-12-08 it took mlflow
3.13 and datasets 5.2 where 3.0 and 3.0 resolve. Each lower end is pinned here instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# A requirement's name and its lower end: "ray[default,train,tune]>=2.51,<3" -> ray, 2.51.
_LOWER = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(?:[^;]*?)>=\s*([0-9][^,;\s]*)")


def lower_ends(pyproject: Path) -> dict[str, str]:
    """Each direct dependency's name -> its range's lower end (torch apart: the caller pins it).
    A requirement without a lower end is an error: nothing would say what it was tested at."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    ends = {}
    for req in requirements:
        match = _LOWER.match(req)
        if match is None:
            name = re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0]
            if name.lower() in {"types-pyyaml"}:  # type stubs: any version
                continue
            sys.exit(f"{pyproject}: dependency {req!r} has no lower end (>=)")
        name, version = match.groups()
        if name.lower() != "torch":
            ends[name] = version
    return ends


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.exit(__doc__)
    uv, torch_pin, out = argv
    ends = lower_ends(ROOT / "pyproject.toml")
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp, "lower-ends.txt")
        pins.write_text("".join(f"{n}=={v}\n" for n, v in sorted(ends.items())))
        override = Path(tmp, "torch.txt")
        override.write_text(torch_pin + "\n")
        ran = subprocess.run(
            [
                uv, "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "dev",
                "--python-version", "3.11", "--no-header", "--no-annotate",
                "-c", str(pins), "--override", str(override), "-o", out,
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if ran.returncode != 0:
        sys.exit(
            f"the lower ends of pyproject.toml's ranges do not resolve together (with "
            f"{torch_pin}):\n{ran.stderr.strip()}"
        )
    header = (
        "# The oldest versions pyproject.toml admits: each direct dependency at its range's lower\n"
        "# end, the rest at the newest that resolved with them. `make test-lowest` runs the unit\n"
        "# tests on it; regenerate with `make constraints-lowest` when a lower end changes.\n"
    )
    body = Path(out).read_text(encoding="utf-8")
    Path(out).write_text(header + body, encoding="utf-8")
    print(f"{out}: {len(ends)} lower ends pinned, with {torch_pin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
