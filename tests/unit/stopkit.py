"""A stop (Ctrl-C, a kill, a closed terminal) that reaches a command while one of its steps
runs: for the tests of what ``raysft.train`` and ``raysft.tune`` say and leave (test_cli,
test_search)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from raysft.cli import run_cli

STOPS = ["SIGTERM", "SIGHUP"]  # kill / docker stop / Slurm, a closed terminal


def stopped_by(name: str, what: str) -> Callable[..., None]:
    """A stand-in for a step of ``what`` that is stopped by signal ``name`` as it runs."""

    def step(*_args: Any, **_kwargs: Any) -> None:
        if name == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(5)  # the handler raises at the next bytecode
        raise AssertionError(f"{name} did not stop {what}")

    return step


def exit_code_of_a_stop(main: Callable[[], Any]) -> None:
    """Runs ``main`` as its command line does and checks it exits as Ctrl-C does (130), with
    the SIGTERM and SIGHUP handlers it found put back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(SystemExit) as done:
        run_cli(main)
    assert done.value.code == 130
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # put back after
