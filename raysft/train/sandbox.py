"""Run a generated answer's code against its tests for pass@k, never in the caller's process.

Each program (the answer's code, then the row's tests) runs in a fresh ``python -I -B`` child:

- **time limit**: the wall-clock ``timeout_s`` (the child's process group is killed), backed by
  RLIMIT_CPU. Where a PID namespace can be made, the child is its namespace's first process, so
  when it ends or is killed the kernel kills every process it left behind, even one that left its
  process group (``setsid``); with a /proc of that namespace mounted where it may be, the
  environment of the search's own processes (``/proc/PID/environ``: tokens) is out of its sight;
- **resource limits**, set by the child itself before the program runs: RLIMIT_AS (memory),
  RLIMIT_CPU, RLIMIT_NPROC (no new processes for a non-root user; Linux does not enforce it for
  root, the audit hook below covers that case), RLIMIT_FSIZE, RLIMIT_NOFILE and RLIMIT_CORE = 0.
  Not in ``preexec_fn``: the caller (a Ray worker) has threads, and Python code between fork and
  exec can deadlock on a lock one of them held;
- **scratch directory**: a fresh temporary directory, the child's cwd, HOME and TMPDIR, deleted
  afterwards;
- **emptied environment**: nothing of the caller's environment is inherited (only HOME and TMPDIR,
  both the scratch dir), and ``-I`` ignores PYTHON* variables, the user site and the script dir;
- **no network**, two layers: a fresh network namespace (``unshare -n``, or ``unshare -rn`` for a
  non-root user), in which no interface is up, when this machine allows it (``isolation`` says
  which layers it has); and, always, an audit hook (PEP 578) in the child that raises
  ``PermissionError`` on socket connect/bind/send/resolve, process creation, signals, ``ctypes``,
  changing the limits or the working directory, and writes outside the scratch directory (or
  opening a directory outside it, whose descriptor would let a relative path escape; a SQLite
  database, owner, times or extended attributes there). ``os.mknod``, ``os.mkfifo`` outside the
  scratch directory and ``_posixsubprocess.fork_exec`` (multiprocessing's spawn), which raise no
  audit event, are replaced by refusals. The hook is a guard against accidents, not a security
  boundary: code written to get past it (restoring those functions through ``ctypes``-free
  tricks) writes wherever the user running the search may. Run searches that score untrusted
  models' code as an unprivileged user. What the program leaves (its output, the completion
  marker) is read through descriptors the scorer holds, never by path: a FIFO or a link put in
  their place can neither block the scorer nor point it at another file.

The program passes when it exits 0 after running to its end: a completion marker with a nonce,
written only then, tells "ran the tests" from an early ``exit(0)``. The nonce is a local of the
runner's frame, not a global the program could import; a program that walks the stack to it
(``sys._getframe``, which the standard library itself uses, stays allowed) could forge a pass.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["passed", "failed", "timeout", "exited_early"]

# A fenced block of an answer: its language tag (```python, ```bash, none), then its text. Each
# match takes its closing fence, so the next search starts after it.
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py", "py3"}

_EXITED_EARLY = 97  # the runner's exit code when the program called exit(0) before its end

_RUNNER = r"""
import os, resource, sys
for _what, _value in {limits!r}:
    _hard = resource.getrlimit(_what)[1]
    # An unprivileged process cannot raise a hard limit: never ask above it.
    _value = _value if _hard == resource.RLIM_INFINITY else min(_value, _hard)
    resource.setrlimit(_what, (_value, _value))
_EXITED_EARLY = {exited_early}
AUDIT = {audit}
scratch = os.path.realpath(os.getcwd())
DENY = {deny!r}
WRITES = {writes!r}
WFLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _inside(path):
    if isinstance(path, int):
        return True  # an already open file descriptor
    real = os.path.realpath(os.fsdecode(path))
    return real == scratch or real.startswith(scratch + os.sep)

def _hook(event, args):
    if event in DENY:
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "sqlite3.connect":  # sqlite3 writes its database past the "open" event
        database = args[0]
        if database not in (":memory:", "", b":memory:", b"") and not _inside(database):
            raise PermissionError("sandbox: a database outside the scratch directory")
    elif event == "open":
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags > 0 and flags & WFLAGS)
        if writing and not _inside(args[0]):
            raise PermissionError("sandbox: writing outside the scratch directory is not allowed")
        if os.path.isdir(args[0]) and not _inside(args[0]):  # a dir_fd for relative paths
            raise PermissionError("sandbox: opening a directory outside the scratch directory")
    elif event in WRITES:
        for path in args[: WRITES[event]]:
            if path is not None and not _inside(path):
                raise PermissionError("sandbox: " + event + " outside the scratch directory")

def _main():
    # The nonce is this frame's local, not a global the program could import from __main__.
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    done = os.path.abspath(".done")
    with open("candidate.py", encoding="utf-8") as f:
        code = compile(f.read(), "candidate.py", "exec")
    if AUDIT:
        # Calls that raise no audit event: device nodes and FIFOs (made anywhere), and the
        # process start multiprocessing's spawn uses (past the hook's fork and exec events).
        import _posixsubprocess, posix
        def _denied(*args, **kwargs):
            raise PermissionError("sandbox: not allowed")
        _mkfifo = os.mkfifo
        def _fifo(path, mode=0o666, *, dir_fd=None):
            if dir_fd is not None or not _inside(path):
                raise PermissionError("sandbox: mkfifo outside the scratch directory")
            return _mkfifo(path, mode)
        for _mod in (os, posix):
            _mod.mknod, _mod.mkfifo = _denied, _fifo
        _posixsubprocess.fork_exec = _denied
        sys.addaudithook(_hook)
    try:
        exec(code, {{"__name__": "candidate", "__builtins__": __builtins__}})
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
        sys.stderr.write("sandbox: the program exited before its end (its tests did not all run)\n")
        os._exit(_EXITED_EARLY)
    with open(done, "w") as f:
        f.write(nonce)

_main()
"""

_NETWORK_EVENTS = (
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "socket.sendmsg",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
)
_PROCESS_EVENTS = (
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    # ctypes could call libc's connect/fork past every hook above. Looking a C function up is
    # denied; loading a library is not (numpy imports ctypes, which loads libpython).
    "ctypes.dlsym",
    "ctypes.string_at",
    # Root may raise its hard limits again; a changed cwd would make the hook resolve a relative
    # path against another directory than the kernel does with a dir_fd.
    "resource.setrlimit",
    "resource.prlimit",
    "os.chdir",
    "sqlite3.enable_load_extension",
    "sqlite3.load_extension",
)
# event -> how many leading arguments are paths that must stay inside the scratch directory
_WRITE_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.utime": 1,
    "os.setxattr": 1,
    "os.removexattr": 1,
    "os.truncate": 1,
    "shutil.rmtree": 1,
    "os.rename": 2,
    "os.link": 2,
    "os.symlink": 2,
}


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 5.0  # wall clock, Python's startup included (~0.05 s)
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64


@dataclass(frozen=True)
class Outcome:
    status: Status
    returncode: int | None
    output: str  # the tail of stdout + stderr, for a person reading why it failed

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def extract_code(answer: str) -> str:
    """The code of an answer: its first fenced Python block (```python, ```py3 or untagged)
    if it has one, else the whole answer. Blocks tagged with another language (```bash) are
    passed over."""
    for match in _FENCE.finditer(answer):
        if match.group(1).lower() in _PYTHON_TAGS:
            return match.group(2)
    return answer


def program(answer: str, tests: str) -> str:
    """What runs: the answer's code, then the row's tests."""
    return f"{extract_code(answer).rstrip()}\n\n\n{tests.strip()}\n"


def run_tests(answer: str, tests: str, *, limits: Limits | None = None) -> Outcome:
    """Run ``answer``'s code followed by ``tests`` in the sandbox."""
    return run_python(program(answer, tests), limits=limits)


def check_answers(
    problems: list[tuple[list[str], str]], *, limits: Limits | None = None
) -> list[list[bool]]:
    """Pass/fail of every answer of every problem ``(answers, tests)``, one program at a time."""
    return [
        [run_tests(a, tests, limits=limits).passed for a in answers] for answers, tests in problems
    ]


def isolation() -> str:
    """The layers this machine gives candidate code: ``"pidns+proc+netns+audit"`` where PID and
    network namespaces can be made and a /proc of its own mounted, ``"pidns+netns+audit"``
    without that /proc, ``"netns+audit"`` where only a network namespace can, else ``"audit"``
    (the in-process hook alone)."""
    prefix = _unshare_prefix()
    return "+".join(
        [
            *(["pidns"] if "-p" in prefix else []),
            *(["proc"] if "--mount-proc" in prefix else []),
            *(["netns"] if prefix else []),
            "audit",
        ]
    )


def run_python(
    source: str,
    *,
    limits: Limits | None = None,
    namespaces: bool | None = None,
    audit: bool = True,
) -> Outcome:
    """Run ``source`` in a sandboxed child. ``namespaces``: None uses the PID and network
    namespaces this machine allows; ``False`` and ``audit=False`` leave a layer out (tests check
    each layer on its own)."""
    limits = limits or Limits()
    prefix = _unshare_prefix() if namespaces is not False else []
    if namespaces and not prefix:
        raise RuntimeError("no network namespace on this machine (unshare -n failed)")
    runner = _RUNNER.format(
        limits=_rlimits(limits),
        audit=audit,
        deny=_NETWORK_EVENTS + _PROCESS_EVENTS,
        writes=_WRITE_EVENTS,
        exited_early=_EXITED_EARLY,
    )
    with tempfile.TemporaryDirectory(prefix="raysft-sandbox-") as scratch:
        (Path(scratch) / "candidate.py").write_text(source, encoding="utf-8")
        cmd = [*prefix, sys.executable, "-I", "-B", "-c", runner]
        return _execute(cmd, Path(scratch), limits)


def _execute(cmd: list[str], scratch: Path, limits: Limits) -> Outcome:
    """Run ``cmd`` in ``scratch``. Once it ends, what it left there is read through descriptors
    this process holds, never by path: the program may have replaced its output files or
    ``.done`` with a FIFO (an open that blocks for ever) or a link out of the directory."""
    nonce = secrets.token_hex(16)
    with (
        (scratch / ".stdout").open("w+b") as out,
        (scratch / ".stderr").open("w+b") as err,
        _open_dir(scratch) as dir_fd,
    ):
        proc = subprocess.Popen(
            cmd,
            cwd=scratch,
            env={"HOME": str(scratch), "TMPDIR": str(scratch)},
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, killed whole on timeout
            close_fds=True,
        )
        # The runner sets its own limits; `unshare -f` re-raises its child's fatal signal on
        # itself, so it must not dump core either.
        with contextlib.suppress(OSError):
            resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))
        try:
            proc.communicate(input=(nonce + "\n").encode(), timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
        output = _tail(out) + _tail(err)
        finished = _read_marker(dir_fd, ".done", len(nonce) + 1) == nonce.encode()
    if timed_out:
        status: Status = "timeout"
    elif proc.returncode == 0 and finished:
        status = "passed"
    elif proc.returncode in (0, _EXITED_EARLY):
        status = "exited_early"
    else:
        status = "failed"
    return Outcome(status, None if timed_out else proc.returncode, output)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill whatever is left of the child's process group, then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _open_dir(path: Path) -> Any:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _tail(fh: Any, limit: int = 2000) -> str:
    """The last ``limit`` bytes written to the open file ``fh``."""
    fh.seek(max(0, os.fstat(fh.fileno()).st_size - limit))
    return fh.read(limit).decode("utf-8", errors="replace")


def _read_marker(dir_fd: int, name: str, limit: int) -> bytes | None:
    """At most ``limit`` bytes of the regular file ``name`` in the directory ``dir_fd``; None
    where it is missing, a link, a FIFO or anything else."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, limit) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


def _rlimits(limits: Limits) -> list[tuple[int, int]]:
    """(resource, value) pairs the runner sets on itself before the program runs."""
    return [
        (resource.RLIMIT_CPU, math.ceil(limits.timeout_s) + 1),
        (resource.RLIMIT_AS, limits.memory_mb * 2**20),
        (resource.RLIMIT_FSIZE, limits.file_mb * 2**20),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_NPROC, 1),  # counts the user's processes: fork fails, exec does not
        (resource.RLIMIT_CORE, 0),
    ]


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> list[str]:
    """The ``unshare`` command line that puts the child in new PID and network namespaces
    (``-p -f --kill-child``: the child is the first process of its PID namespace; ``-r`` for a
    non-root user), or in a network namespace alone, whichever this machine allows first
    (containers often forbid both); else ``[]``. Probed once per process."""
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None
    )
    if unshare is None:
        return []
    user = [] if os.geteuid() == 0 else ["-r"]
    pid = ["-p", "-f", "--kill-child"]
    # --mount-proc: a /proc of the new PID namespace alone, so the program cannot read the
    # environment (tokens, passwords) of the search's processes in /proc/PID/environ.
    for flags in ([*user, "-n", *pid, "--mount-proc"], [*user, "-n", *pid], [*user, "-n"]):
        try:
            probe = subprocess.run(
                [unshare, *flags, sys.executable, "-I", "-c", "import sys; sys.exit(3)"],
                env={},
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 3:  # the child ran, and its exit status came back
            return [unshare, *flags]
    return []
