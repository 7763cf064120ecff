"""Where outputs go: checked before any work, so a run never fails at its first write."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


def give_plain_modes(folder: Path | None, files: list[Path]) -> None:
    """A ``folder`` this process made and ``files`` it wrote with the modes a plain write gives
    (0777 for a folder, 0666 for a file, less the umask): ``tempfile.mkdtemp`` makes 0700
    folders and safetensors writes weights through a 0600 temp file, which keep a colleague or
    a serving user out. Only a 0600 file is changed (others were made as the user's umask
    says). A filesystem that refuses ``chmod`` (CIFS, some FUSE) is said, never an error."""
    mask = umask()
    try:
        if folder is not None:
            folder.chmod(0o777 & ~mask)
        for path in files:
            if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
                path.chmod(0o666 & ~mask)
    except OSError as err:
        log.warning("could not give %s the modes of a plain write: %s", folder or files, err)


def replace_text(path: Path, text: str) -> None:
    """``path`` replaced whole by ``text`` (a temporary file beside it renamed over it): a kill
    or a full disk leaves the old file or the new one, never one cut short."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


LOCK_FILE = ".raysft.lock"  # held by the search or run writing into a directory (its pid inside)
# In every checkpoint: where its run read its config's relative paths from (raysft.evaluate
# reads them there when no finished run or experiment around the checkpoint says: a stopped run).
ORIGIN_FILE = "origin.json"


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, innermost first: what a start
    that makes ``path`` creates, and removes again if it is refused (``remove_if_unused``)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_if_unused(directory: Path, created: list[Path], *, empty: tuple[str, ...] = ()) -> None:
    """Remove ``created`` (``missing_dirs`` of ``directory``, made by a start that failed before
    it wrote anything) where ``directory`` holds no more than the lock file and the empty
    folders named in ``empty``; another process that came in meanwhile keeps them (rmdir
    refuses a folder it wrote to)."""
    if not created or not directory.is_dir():
        return
    names = {p.name for p in directory.iterdir()}
    if not names <= {LOCK_FILE, *empty}:
        return
    with contextlib.suppress(OSError):
        for name in empty:
            if (directory / name).is_dir():
                (directory / name).rmdir()
        (directory / LOCK_FILE).unlink(missing_ok=True)
        for path in created:
            path.rmdir()


def origin_working_dir(checkpoint: str | Path) -> str | None:
    """The directory a checkpoint's run read its relative paths from (its ``ORIGIN_FILE``),
    None where it records none."""
    try:
        origin = json.loads((Path(checkpoint) / ORIGIN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    where = origin.get("working_dir") if isinstance(origin, dict) else None
    return where if isinstance(where, str) else None


class InUse(Exception):
    """The directory is held by another process (``holder``: its pid and host as it wrote them)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_dir(directory: Path, *, what: str) -> Any:
    """An exclusive lock on ``directory`` (which must exist) for this process's work there: the
    returned file releases it when closed, or when the process ends however it ends. Raises
    ``InUse`` where another process holds it; where the filesystem has no flock (Lustre without
    -o flock, some FUSE) it warns that a second ``what`` would not be refused, and goes on."""
    import fcntl
    import socket
    import time

    handle = (directory / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise InUse(holder) from None
    except OSError as err:
        log.warning(
            "%s: cannot be locked (%s): a second %s started into it would not be refused",
            directory, err, what,
        )  # fmt: skip
        return handle
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}")
    handle.flush()
    return handle


def dir_holder(directory: Path) -> str | None:
    """Who holds ``directory``'s lock (``hold_dir``), or None when no one does (or the lock
    cannot be read)."""
    import fcntl

    try:
        with (directory / LOCK_FILE).open("r", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as it closes
            except BlockingIOError:
                return handle.read().strip() or "another process"
    except OSError:  # no lock file, or a filesystem without flock
        return None
    return None
