"""A directory held by another process, as a running search or training run holds it
(``raysft.paths.hold_dir``): for the tests of what a second one is told (test_search, test_cli)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def held_elsewhere(directory: Path) -> Iterator[int]:
    """``directory`` locked by another process until the block ends; yields its pid."""
    holder = subprocess.Popen(  # holds the lock until its stdin closes
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from raysft.paths import hold_dir; "
         f"x = hold_dir(Path({str(directory)!r}), what='test'); print('held', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.communicate(input="", timeout=30)
