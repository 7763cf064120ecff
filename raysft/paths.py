"""Where outputs go: checked before any work, so a run never fails at its first write."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def writable_dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be, or be made, a directory this process writes into; None if it
    can. Probed by creating (and removing) a directory where the first write would go: file
    modes alone miss read-only mounts, /proc and root's exemptions."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a directory"
    anchor = path if path.exists() else next(p for p in path.parents if p.exists())
    if not anchor.is_dir():
        return f"{path} cannot be created: {anchor} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".raysft-probe-", dir=anchor))
    except OSError as err:
        what = "written into" if anchor == path else "created"
        why = err.strerror or str(err)
        if err.errno == errno.ENOENT:  # the folder is there: a filesystem like /proc refuses
            why = "its filesystem takes no new directories"
        return f"{path} cannot be {what}: {why} ({anchor})"
    return None
