"""The bad-input corpus (``bad_inputs/cases.yaml``) through the real command lines.

Each case is a file and the one message it must give: exit code 2, one ``error:`` line naming the
place (file and dotted path, or data file and row), no traceback, and nothing started or written:
no file appears in the working directory (no MLflow store, no experiment or output directory),
Ray is never initialised and no Ray process of the run exists.

The CLIs are run as a user runs them, in four processes (two at a time): ``python -m
raysft.train`` and ``python -m raysft.tune --dry-run`` cases each in one interpreter (the
commands run in turn with runpy, so torch is imported once), the real search starts in a third,
and one case in a plain fresh ``python -m raysft.tune`` process. Every case runs in its own copy
of the corpus. The real search starts get a Ray address nobody listens on: a regression fails
to connect instead of starting a cluster on a shared machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
# command -> (module, extra arguments)
COMMANDS = {
    "train-dry": ("raysft.train", ["--dry-run"]),
    "train-preview": ("raysft.train", ["--preview", "1"]),
    "tune-dry": ("raysft.tune", ["--dry-run"]),
    "tune": ("raysft.tune", []),
    "tune-plain": ("raysft.tune", []),
}
# Nothing listens there (port 9 is "discard"): joining it fails, it never starts a cluster.
DEAD_RAY_ADDRESS = "127.0.0.1:9"

# Runs jobs (module, argv, cwd) one after another in this interpreter, each exactly as
# `python -m MODULE ARGV` from cwd would; prints one JSON line of results.
SEQUENCE = r"""
import contextlib, io, json, logging, os, runpy, sys, traceback
jobs, results = json.loads(open(sys.argv[1]).read()), []
for job in jobs:
    logging.root.handlers.clear()  # a fresh process's logging: the CLI's basicConfig binds err
    os.chdir(job["cwd"])
    sys.argv = [job["module"], *job["argv"]]
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "raised"
    ray = sys.modules.get("ray")
    results.append({
        "name": job["name"], "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
        "ray_initialized": bool(ray and ray.is_initialized()),
    })
print(json.dumps(results))
"""

Result = dict[str, Any]


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def _ray_processes(under: Path) -> list[str]:
    """Command lines of Ray processes (gcs_server, raylet) whose session lives under ``under``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("gcs_server" in cmd or "raylet" in cmd) and str(under) in cmd:
            found.append(cmd)
    return found


class Corpus:
    """Every case's run, started at once in the background; results on demand."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.dirs = {c["name"]: self._copy(c["name"]) for c in CASES}
        self.before = {name: _files(d) for name, d in self.dirs.items()}
        groups: dict[str, list[dict[str, Any]]] = {}
        for case in CASES:
            module, extra = COMMANDS[case["command"]]
            job = {
                "name": case["name"],
                "module": module,
                "argv": [case["file"], *extra],
                "cwd": str(self.dirs[case["name"]]),
            }
            groups.setdefault(case["command"], []).append(job)
        self.procs: list[subprocess.Popen] = []
        pool = ThreadPoolExecutor(2)  # two at a time: the pytest process needs a core too
        self.futures: dict[str, Future[list[Result]]] = {}
        # The slowest first: each interpreter imports torch once.
        for command in ("tune-dry", "train-preview", "train-dry", "tune", "tune-plain"):
            if command in groups:
                self.futures[command] = pool.submit(self._run, command, groups[command])
        pool.shutdown(wait=False)

    def _copy(self, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(CORPUS, target, ignore=shutil.ignore_patterns("cases.yaml"))
        return target

    def _run(self, command: str, jobs: list[dict[str, Any]]) -> list[Result]:
        # No cluster to join and no tracking server: the defaults would write into the cwd.
        drop = ("RAY_ADDRESS", "RAY_JOB_ID", "MLFLOW_TRACKING_URI")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        if command in ("tune", "tune-plain"):
            env.update(RAY_ADDRESS=DEAD_RAY_ADDRESS, RAY_TMPDIR=str(self.tmp / f"ray-{command}"))
        if command == "tune-plain":
            return [self._plain(job, env) for job in jobs]
        spec_file = self.tmp / f"{command}.json"
        spec_file.write_text(json.dumps(jobs))
        proc = subprocess.Popen(
            [sys.executable, "-c", SEQUENCE, str(spec_file)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(proc)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return list(json.loads(out.splitlines()[-1]))

    def _plain(self, job: dict[str, Any], env: dict[str, str]) -> Result:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", job["module"], *job["argv"]],
            cwd=job["cwd"], env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return {
            "name": job["name"],
            "code": proc.returncode,
            "stdout": proc.stdout,
            "stderr": proc.stderr,
            "ray_initialized": None,  # another process: see the Ray process check
            "seconds": time.perf_counter() - t0,
        }

    def result(self, case: dict[str, Any]) -> Result:
        results = self.futures[case["command"]].result()
        return next(r for r in results if r["name"] == case["name"])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for future in self.futures.values():
            future.cancel()
            if not future.cancelled():
                future.exception()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    runs = Corpus(Path(tempfile.mkdtemp(prefix="raysft-bad-inputs-")))
    yield runs
    runs.close()


def test_the_corpus_is_complete() -> None:
    assert len(CASES) >= 30
    names = [c["name"] for c in CASES]
    assert len(set(names)) == len(names)
    files = [c["file"] for c in CASES]
    assert len(set(files)) == len(files), "one file per case"
    for case in CASES:
        assert set(case) == {"name", "command", "file", "expect"}, case
        assert case["command"] in COMMANDS, case
        assert (CORPUS / case["file"]).is_file(), case["file"]
        assert isinstance(case["expect"], list) and case["expect"], case
        # The message names the place: the file that holds the problem, where in it.
        assert case["expect"][0].startswith(("configs/", "specs/", "data")), case["expect"]
    for kind in ("train-dry", "train-preview", "tune-dry", "tune", "tune-plain"):
        assert any(c["command"] == kind for c in CASES), kind


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_gives_one_message_and_starts_nothing(
    corpus: Corpus, case: dict[str, Any]
) -> None:
    run = corpus.result(case)
    assert run["code"] == 2, run
    assert "Traceback" not in run["stderr"], run["stderr"]
    assert run["stdout"] == ""
    lines = run["stderr"].splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for fragment in case["expect"]:
        assert fragment in lines[0], (fragment, lines[0])
    assert run["ray_initialized"] in (False, None)
    name = case["name"]
    assert _files(corpus.dirs[name]) == corpus.before[name], "it wrote something"
    assert _ray_processes(corpus.tmp) == []
    assert not any(corpus.tmp.glob("ray-*/session_*")), "a Ray session was created"
