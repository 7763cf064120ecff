"""Run a generated answer's code against its tests for pass@k, never in the caller's process.

Each program (the answer's code, then the row's tests) runs in a fresh ``python -I -B`` child:

- **time limit**: the wall-clock ``timeout_s`` (the child's process group is killed), backed by
  RLIMIT_CPU;
- **resource limits** set by ``resource.setrlimit`` in ``preexec_fn`` (between fork and exec):
  RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (no new processes for a non-root user; Linux does
  not enforce it for root, the audit hook below covers that case), RLIMIT_FSIZE, RLIMIT_NOFILE and
  RLIMIT_CORE = 0;
- **scratch directory**: a fresh temporary directory, the child's cwd, HOME and TMPDIR, deleted
  afterwards;
- **emptied environment**: nothing of the caller's environment is inherited (only HOME and TMPDIR,
  both the scratch dir), and ``-I`` ignores PYTHON* variables, the user site and the script dir;
- **no network**, two layers: a fresh network namespace (``unshare -n``, or ``unshare -rn`` for a
  non-root user), in which no interface is up, when this machine allows it (``network_isolation``
  says which); and, always, an audit hook (PEP 578) in the child that raises ``PermissionError`` on
  socket connect/bind/send/resolve, process creation, signals, ``ctypes`` and writes outside the
  scratch directory. The hook is a guard against accidents, not a security boundary on its own.

The program passes when it exits 0 after running to its end (a completion marker, written only
then, tells "ran the tests" from an early ``exit(0)``). Runs are sequential: ``preexec_fn`` is not
safe to call from several threads at once.
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
import subprocess
import sys
import tempfile
from collections.abc import Callable
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
import os, sys
_EXITED_EARLY = {exited_early}
nonce = sys.stdin.readline().strip()
sys.stdin.close()
done = os.path.abspath(".done")
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
    if event == "open":
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags > 0 and flags & WFLAGS)
        if writing and not _inside(args[0]):
            raise PermissionError("sandbox: writing outside the scratch directory is not allowed")
    elif event in WRITES:
        for path in args[: WRITES[event]]:
            if path is not None and not _inside(path):
                raise PermissionError("sandbox: " + event + " outside the scratch directory")

sys.addaudithook(_hook)
with open("candidate.py", encoding="utf-8") as f:
    code = compile(f.read(), "candidate.py", "exec")
try:
    exec(code, {{"__name__": "candidate", "__builtins__": __builtins__}})
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    sys.stderr.write("sandbox: the program exited before its end (its tests did not all run)\n")
    os._exit(_EXITED_EARLY)
with open(done, "w") as f:
    f.write(nonce)
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
)
# event -> how many leading arguments are paths that must stay inside the scratch directory
_WRITE_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.chmod": 1,
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


def network_isolation() -> str:
    """How this machine keeps candidate code off the network: ``"netns+audit"`` when a network
    namespace can be made, else ``"audit"`` (the in-process hook alone)."""
    return "netns+audit" if _unshare_prefix() else "audit"


def run_python(
    source: str, *, limits: Limits | None = None, netns: bool | None = None, audit: bool = True
) -> Outcome:
    """Run ``source`` in a sandboxed child. ``netns``: None uses a network namespace where one
    can be made; ``audit=False`` leaves out the hook (tests check each layer on its own)."""
    limits = limits or Limits()
    prefix = _unshare_prefix() if netns is not False else []
    if netns and not prefix:
        raise RuntimeError("no network namespace on this machine (unshare -n failed)")
    deny = (_NETWORK_EVENTS + _PROCESS_EVENTS) if audit else ()
    writes = _WRITE_EVENTS if audit else {}
    runner = _RUNNER.format(deny=deny, writes=writes, exited_early=_EXITED_EARLY)
    with tempfile.TemporaryDirectory(prefix="raysft-sandbox-") as scratch:
        (Path(scratch) / "candidate.py").write_text(source, encoding="utf-8")
        cmd = [*prefix, sys.executable, "-I", "-B", "-c", runner]
        return _execute(cmd, Path(scratch), limits)


def _execute(cmd: list[str], scratch: Path, limits: Limits) -> Outcome:
    nonce = secrets.token_hex(16)
    out_path, err_path = scratch / ".stdout", scratch / ".stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=scratch,
            env={"HOME": str(scratch), "TMPDIR": str(scratch)},
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            preexec_fn=_rlimits(limits),  # safe: runs are sequential (module doc)
            start_new_session=True,  # its own process group, killed whole on timeout
            close_fds=True,
        )
        try:
            proc.communicate(input=(nonce + "\n").encode(), timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
    output = _tail(out_path) + _tail(err_path)
    done = scratch / ".done"
    finished = done.is_file() and done.read_text(errors="replace") == nonce
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


def _tail(path: Path, limit: int = 2000) -> str:
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - limit))
        return fh.read().decode("utf-8", errors="replace")


def _rlimits(limits: Limits) -> Callable[[], None]:
    """``preexec_fn``: runs in the child between fork and exec; the limits bind the child only."""
    cpu = math.ceil(limits.timeout_s) + 1
    wanted = {
        resource.RLIMIT_CPU: cpu,
        resource.RLIMIT_AS: limits.memory_mb * 2**20,
        resource.RLIMIT_FSIZE: limits.file_mb * 2**20,
        resource.RLIMIT_NOFILE: limits.open_files,
        resource.RLIMIT_NPROC: 1,  # counts the user's processes: fork fails, exec does not
        resource.RLIMIT_CORE: 0,
    }

    def apply() -> None:
        for what, value in wanted.items():
            _, hard = resource.getrlimit(what)
            # An unprivileged process cannot raise a hard limit: never ask above it.
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(what, (value, value))

    return apply


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> list[str]:
    """``[unshare, -n]`` (root) or ``[unshare, -rn]`` if a network namespace can be made here
    (containers often forbid it), else ``[]``. Probed once per process."""
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None
    )
    if unshare is None:
        return []
    flags = ["-n"] if os.geteuid() == 0 else ["-rn"]
    try:
        probe = subprocess.run(
            [unshare, *flags, sys.executable, "-I", "-c", "pass"],
            env={},
            capture_output=True,
            timeout=30,
            preexec_fn=_rlimits(Limits()),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [unshare, *flags] if probe.returncode == 0 else []
