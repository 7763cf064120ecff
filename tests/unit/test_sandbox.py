"""The pass@k sandbox: a separate process with a time limit, a scratch dir, no network, resource
limits and an emptied environment; and how a code row carries its tests."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raysft.data.formats import load_conversations
from raysft.data.references import code_tests
from raysft.errors import DataError
from raysft.train.sandbox import (
    Limits,
    check_answers,
    extract_code,
    isolation,
    run_python,
    run_tests,
)


def _unshare_can(*flags: str) -> bool:
    """Whether ``unshare`` can make these namespaces here: probed by the test itself, apart
    from the sandbox's own probe (``_unshare_prefix``), so a broken probe there shows."""
    unshare = shutil.which("unshare")
    user = [] if os.geteuid() == 0 else ["-r"]
    if unshare is None:
        return False
    run = subprocess.run([unshare, *user, *flags, "true"], capture_output=True, check=False)
    return run.returncode == 0


NETNS = _unshare_can("-n")
PIDNS = _unshare_can("-n", "-p", "-f", "--kill-child")
PROC = _unshare_can("-n", "-p", "-f", "--kill-child", "--mount-proc")


# ---------------------------------------------------------------- pass / fail


def test_a_correct_answer_passes_and_a_wrong_one_fails() -> None:
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert run_tests("def add(a, b):\n    return a + b", tests).status == "passed"
    wrong = run_tests("def add(a, b):\n    return a - b", tests)
    assert wrong.status == "failed" and "AssertionError" in wrong.output
    assert run_tests("def add(a, b) return", tests).status == "failed"  # SyntaxError


def test_code_comes_from_the_first_fenced_block() -> None:
    answer = "Here you go:\n```python\ndef f():\n    return 1\n```\nand\n```\nf = None\n```"
    assert extract_code(answer) == "def f():\n    return 1\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"
    assert run_tests(answer, "assert f() == 1").passed
    # A block in another language first: passed over, its closing fence not read as an opening.
    shell_first = "```bash\npip install x\n```\nthen\n```python\nx = 1\n```"
    assert extract_code(shell_first) == "x = 1\n"
    assert extract_code("```py3\ny = 2\n```") == "y = 2\n"
    assert extract_code("```Python\nz = 3\n```") == "z = 3\n"


def test_exiting_early_is_not_a_pass() -> None:
    # exit(0) before the tests ran: the runner's completion marker is missing.
    assert run_tests("import sys\nsys.exit(0)", "assert False").status == "exited_early"
    assert run_tests("import os\nos._exit(0)", "assert False").status == "exited_early"


def test_time_limit_kills_a_program_that_never_ends() -> None:
    out = run_python("while True:\n    pass", limits=Limits(timeout_s=1))
    assert out.status == "timeout" and not out.passed


def test_check_answers_gives_pass_fail_per_answer() -> None:
    problems = [(["x = 1", "x = 2", "x = 1"], "assert x == 1"), (["y = 0"], "assert y == 1")]
    assert check_answers(problems) == [[True, False, True], [False]]


# ---------------------------------------------------------------- isolation


def test_runs_in_another_process_with_an_emptied_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAYSFT_SECRET", "hunter2")
    code = f"""
import os
assert os.getpid() != {os.getpid()}
assert "RAYSFT_SECRET" not in os.environ, os.environ
assert set(os.environ) <= {{"HOME", "TMPDIR", "LC_CTYPE"}}, sorted(os.environ)
"""
    out = run_python(code)
    assert out.passed, out.output


def test_scratch_dir_is_the_cwd_and_is_removed_afterwards() -> None:
    out = run_python(
        "import os, tempfile\n"
        "open('mine.txt', 'w').write('ok')\n"
        "assert os.environ['TMPDIR'] == os.environ['HOME'] == os.getcwd()\n"
        "assert tempfile.gettempdir() == os.getcwd()\n"
        "print(os.getcwd())"
    )
    assert out.passed, out.output
    scratch = Path(out.output.strip())
    assert scratch.name.startswith("raysft-sandbox-") and not scratch.exists()


def test_writes_outside_the_scratch_dir_are_refused(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    before = victim.stat()
    for code in (
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        # Writes past the "open" event, or with no audit event of their own.
        f"import sqlite3\ndb = sqlite3.connect({str(tmp_path / 'new.db')!r})\n"
        "db.execute('create table t(x)')",
        f"import os\nos.mkfifo({str(tmp_path / 'new.fifo')!r})",
        f"import os, stat\nos.mknod({str(tmp_path / 'new.node')!r}, stat.S_IFREG)",
        f"import os\nos.chown({str(victim)!r}, 4321, 4321)",
        f"import os\nos.utime({str(victim)!r}, (0, 0))",
        f"import os\nos.setxattr({str(victim)!r}, 'user.x', b'1')",
    ):
        out = run_python(code)
        assert out.status == "failed" and "PermissionError" in out.output, (code, out)
    assert victim.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "keep.txt"
    ]
    after = victim.stat()
    assert (after.st_uid, after.st_mtime_ns) == (before.st_uid, before.st_mtime_ns)
    # Inside the scratch directory they work.
    inside = run_python(
        "import os, sqlite3\nsqlite3.connect('t.db').execute('create table t(x)')\n"
        "sqlite3.connect(':memory:').execute('select 1')\nos.mkfifo('f')\n"
        "open('x', 'w').close()\nos.utime('x', (0, 0))"
    )
    assert inside.passed, inside.output


def _run_into(code: str, box: list[Any]) -> None:
    box.append(run_python(code, limits=Limits(timeout_s=2)))


def test_what_the_program_leaves_is_read_without_following_it(tmp_path: Path) -> None:
    """Its output files or completion marker replaced by a FIFO (an open of it blocks for
    ever) or by a link out of the scratch directory: the scorer neither hangs nor reads
    beyond a few bytes, and a forged marker is no pass."""
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2**20)
    for code, status in (
        ("import os\nos.remove('.stderr')\nos.mkfifo('.stderr')\nraise SystemExit(1)", "failed"),
        ("import os\nos.remove('.stdout')\nos.mkfifo('.stdout')\nprint('hi')", "passed"),
        # The runner's own write of the marker then blocks: the time limit ends it.
        ("import os\nos.mkfifo('.done.tmp')\nos.rename('.done.tmp', '.done')", "timeout"),
        (f"import os\nos.symlink({str(big)!r}, '.done')", "failed"),
    ):
        box: list[Any] = []
        worker = threading.Thread(target=_run_into, args=(code, box), daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert box, f"the scorer hung on: {code}"
        assert box[0].status == status, (code, box[0])


def test_spawned_processes_are_refused() -> None:
    """multiprocessing's spawn starts its interpreter through _posixsubprocess, which raises no
    audit event of its own (and the new interpreter would have no hook)."""
    code = (
        "import multiprocessing as mp\n"
        "p = mp.get_context('spawn').Process(target=print)\np.start()\np.join()"
    )
    out = run_python(code)
    assert out.status == "failed" and "PermissionError" in out.output, out


def test_the_searchs_environment_is_not_readable_through_proc() -> None:
    """With a /proc of its own PID namespace, the program cannot read the environment of the
    search's processes (an MLflow token, ...) from /proc/PID/environ."""
    if not PROC:
        pytest.skip("unshare cannot mount a /proc of a new PID namespace here")
    # A process started with the secret in its environment (/proc shows the one it began with).
    holder = subprocess.Popen(["sleep", "60"], env={"RAYSFT_SECRET": "hunter2"})
    code = (
        "import glob\nfound = []\n"
        "for path in glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n        found += [path] if b'hunter2' in open(path, 'rb').read() else []\n"
        "    except OSError:\n        pass\n"
        "assert not found, found"
    )
    try:
        # The same program finds it without the namespaces: the check can fail.
        assert run_python(code, namespaces=False).status == "failed"
        out = run_python(code)
    finally:
        holder.kill()
        holder.wait()
    assert out.passed, out.output


def test_no_new_processes() -> None:
    for code in (
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.fork()",
        "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)",
        "import ctypes\nctypes.CDLL(None).fork()",
    ):
        out = run_python(code)
        assert out.status == "failed" and "PermissionError" in out.output, (code, out)


def test_a_process_that_left_the_process_group_dies_with_the_program(tmp_path: Path) -> None:
    """One the hook missed (audit=False stands for it) and that left the process group: killed
    with its program, at the time limit or at the end, where a PID namespace can be made."""

    def program(name: str, wait: str) -> str:
        marker = tmp_path / name
        return (
            "import subprocess, time\n"
            f"subprocess.Popen(['/bin/sh', '-c', 'sleep 1.5; echo out > {marker}'],"
            " start_new_session=True)\n"
            f"{wait}\n"
        )

    limits = Limits(timeout_s=1)
    runs = {
        "timeout": run_python(program("timeout", "time.sleep(30)"), limits=limits, audit=False),
        "ended": run_python(program("ended", "pass"), limits=limits, audit=False),
        # Control: the same programs without namespaces leave their process running.
        "timeout-bare": run_python(
            program("timeout-bare", "time.sleep(30)"), limits=limits, audit=False, namespaces=False
        ),
        "ended-bare": run_python(
            program("ended-bare", "pass"), limits=limits, audit=False, namespaces=False
        ),
    }
    time.sleep(2.5)
    assert runs["timeout"].status == runs["timeout-bare"].status == "timeout"
    if os.geteuid() != 0:  # RLIMIT_NPROC stops the Popen of a non-root user in every variant
        pytest.skip("not root: no process starts, with or without namespaces")
    assert runs["ended"].passed and runs["ended-bare"].passed
    # The control: without namespaces the process outlives its program, so the check can fail.
    assert (tmp_path / "timeout-bare").exists() and (tmp_path / "ended-bare").exists()
    if not PIDNS:
        pytest.skip("no PID namespace on this machine: the hook alone stops new processes")
    assert not (tmp_path / "timeout").exists() and not (tmp_path / "ended").exists()


def test_a_directory_outside_cannot_be_opened_for_relative_writes(tmp_path: Path) -> None:
    code = (
        "import os\n"
        f"d = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.write(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d), b'x')\n"
    )
    out = run_python(code)
    assert out.status == "failed" and "PermissionError" in out.output, out.output
    assert not (tmp_path / "escaped.txt").exists()
    assert run_python(code, audit=False).passed  # control: the check can fail
    assert (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.chdir('/')",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    ],
)
def test_the_limits_and_the_working_directory_stay(code: str) -> None:
    out = run_python(code)
    assert out.status == "failed" and "PermissionError: sandbox" in out.output, out.output


def test_the_completion_nonce_is_not_a_global_of_the_runner() -> None:
    out = run_python(
        "import __main__, os\n"
        "open('.done', 'w').write(getattr(__main__, 'nonce', 'not there'))\n"
        "os._exit(0)\n"
        "assert False\n"
    )
    assert out.status == "exited_early", out


def test_resource_limits_are_set_in_the_child() -> None:
    limits = Limits(timeout_s=2, memory_mb=512, file_mb=1, open_files=32)
    code = f"""
import resource as r
assert r.getrlimit(r.RLIMIT_AS) == ({512 * 2**20}, {512 * 2**20})
assert r.getrlimit(r.RLIMIT_CPU) == (3, 3)
assert r.getrlimit(r.RLIMIT_FSIZE) == ({2**20}, {2**20})
assert r.getrlimit(r.RLIMIT_NOFILE) == (32, 32)
assert r.getrlimit(r.RLIMIT_NPROC) == (1, 1)
assert r.getrlimit(r.RLIMIT_CORE) == (0, 0)
"""
    out = run_python(code, limits=limits)
    assert out.passed, out.output
    # ...and only there: this process keeps its own.
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != 512 * 2**20


def test_memory_and_file_size_limits_bind() -> None:
    big = run_python("x = bytearray(1024 * 2**20)", limits=Limits(memory_mb=256))
    assert big.status == "failed" and "MemoryError" in big.output
    write = run_python("open('f', 'wb').write(b'0' * 2 * 2**20)", limits=Limits(file_mb=1))
    assert write.status == "failed" and "File too large" in write.output


@pytest.fixture
def server() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on loopback in this process, recording what reaches it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                got.append(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1], got
    stop.set()
    thread.join()
    srv.close()


def _connect(port: int) -> str:
    return (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'leak')\n"
        "s.close()\n"
    )


def test_socket_connect_from_candidate_code_fails(server: tuple[int, list[bytes]]) -> None:
    port, got = server
    out = run_python(_connect(port))  # as pass@k runs it: every layer on
    assert out.status == "failed" and ("PermissionError" in out.output), out.output
    assert got == []


def test_each_network_layer_blocks_on_its_own(server: tuple[int, list[bytes]]) -> None:
    port, got = server
    # Control: without either layer the same program reaches the server, so the checks can fail.
    assert run_python(_connect(port), namespaces=False, audit=False).passed
    assert got == [b"leak"]
    hook = run_python(_connect(port), namespaces=False, audit=True)
    assert hook.status == "failed" and "PermissionError: sandbox: socket" in hook.output
    assert got == [b"leak"]
    if not NETNS:
        pytest.skip("unshare makes no network namespace here: the hook alone blocks")
    # A namespace with no interface up: the parent's loopback is unreachable.
    ns = run_python(_connect(port), namespaces=True, audit=False)
    assert ns.status == "failed" and "Network is unreachable" in ns.output, ns.output
    assert got == [b"leak"]


def test_isolation_says_what_this_machine_uses() -> None:
    assert isolation() == (
        "pidns+proc+netns+audit"
        if PROC
        else "pidns+netns+audit"
        if PIDNS
        else "netns+audit"
        if NETNS
        else "audit"
    )
    if not NETNS:
        pytest.skip("unshare makes no namespace here")
    # The child's own namespaces, not the parent's, by their inodes.
    read = "import os; print(os.readlink('/proc/self/ns/net'), os.readlink('/proc/self/ns/pid'))"
    child = run_python(read, namespaces=True, audit=False)
    net, pid = child.output.split()[:2]
    assert net != os.readlink("/proc/self/ns/net"), child.output
    assert (pid != os.readlink("/proc/self/ns/pid")) is PIDNS, child.output


# ---------------------------------------------------------------- code rows


def _write(tmp_path: Path, *rows: dict) -> str:
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


CODE_ROW = {
    "instruction": "Write add(a, b).",
    "output": "def add(a, b):\n    return a + b",
    "tests": "assert add(2, 3) == 5",
}


def test_a_code_row_carries_its_tests_to_the_answer(tmp_path: Path) -> None:
    sharegpt = {
        "conversations": [{"from": "human", "value": "f?"}, {"from": "gpt", "value": "f = 1"}],
        "tests": "assert f == 1",
    }
    loaded = load_conversations(
        _write(tmp_path, CODE_ROW, sharegpt, {"instruction": "q", "output": "a"})
    )
    tests = [code_tests(c) for c in loaded.conversations]
    assert tests == ["assert add(2, 3) == 5", "assert f == 1", None]
    # The reference answers pass their own tests.
    for conv in loaded.conversations[:2]:
        assert run_tests(conv[-1]["content"], code_tests(conv) or "").passed


@pytest.mark.parametrize(
    ("tests", "why"),
    [
        (["assert 1"], "tests: must be a string of Python statements, got list"),
        ("  ", "tests: empty"),
        ("assert add(2, 3) = 5", "tests: not valid Python: line 1:"),
    ],
)
def test_bad_tests_field_names_file_row_and_field(tmp_path: Path, tests: object, why: str) -> None:
    path = _write(tmp_path, CODE_ROW, {**CODE_ROW, "tests": tests})
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert str(err.value).startswith(f"{path}: line 2: {why}")
