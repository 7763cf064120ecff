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


def umask() -> int:
    """The process's umask, read without setting it (``os.umask`` would change it for every
    thread for a moment); 0o022 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def give_plain_modes(root: Path) -> None:
    """``root`` and everything under it with the modes a plain write gives (0666 for files,
    0777 for folders, less the umask): safetensors writes weights through a 0600 temp file and
    ``tempfile.mkdtemp`` makes 0700 folders, which keep a colleague or a serving user out."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
