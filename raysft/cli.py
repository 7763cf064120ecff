"""Shared command-line plumbing: logging, --set parsing, and turning user errors into exit 2."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from raysft.errors import RaysftError

EXIT_USAGE = 2  # bad config, spec, data or state: the user's to fix
# raysft.tune: the search finished and wrote its summary, but a step failed without ending it
# (MLflow logging, promotion, plots, base vs tuned): summary.json's failed_steps say which
EXIT_FINISH_FAILED = 3


def config_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser for a command that takes a YAML config and ``--set`` overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    return parser


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see README: Configuration reference)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config path, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )


class _RedactingFormatter(logging.Formatter):
    """A handler's own formatter, each line it makes (traceback included) as ``redact`` lets it
    be seen: MLflow's and HTTP libraries' messages hold the request's address, a tracking URI's
    password with it."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        from raysft.search.redact import redact

        return redact("log", self.inner.format(record))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _RedactingFormatter):
            handler.setFormatter(_RedactingFormatter(handler.formatter or logging.Formatter()))
    for noisy in ("urllib3", "filelock", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def stops_interrupt() -> Iterator[None]:
    """While held, kill, docker stop, Slurm (SIGTERM) and a closed terminal (SIGHUP) raise
    KeyboardInterrupt, as Ctrl-C does: the command clears what it made and says where it can
    continue from, not a silent exit 143 (Python leaves SIGTERM to the system's default). The
    handlers before are put back after. (A search, once begun, installs its own:
    ``raysft.search.interrupt.stops_as_ctrl_c``.)"""
    stops = (signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.signal(sig, signal.default_int_handler) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def run_cli(main: Callable[[], int]) -> NoReturn:
    """Run ``main``; a user-caused error (``RaysftError``) prints one clear message and exits 2.

    Anything else is a bug: it keeps its traceback and Python's exit code 1. Ctrl-C exits 130;
    a ``KeyboardInterrupt`` raised with a message (what is left, how to continue) says it.
    """
    try:
        code = main()
    except RaysftError as err:
        print("\n".join(f"error: {line}" for line in err.lines()), file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt as err:
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def run_command(main: Callable[[], int]) -> NoReturn:
    """``run_cli(main)`` as the entry point of a command, whose process ends with it.

    Before Python's teardown, every object is frozen out of the garbage collector
    (``gc.freeze``): a search's driver, with torch, transformers, Ray, MLflow and Optuna
    imported, otherwise exited 2.85 s after its last line, 2.3 s of it in the teardown's
    collections with no system call (2-core dev VM, quiet; 0.31 s with the freeze), and 27 s
    (about 50 s in a CI run) beside other work, at the lowered CPU share the tests give it. The
    teardown still runs the atexit handlers (logging's flush, Ray's and MLflow's own, temporary
    directories' cleanup) and flushes stdout and stderr. What it no longer does is free the
    objects held in reference cycles, module globals among them: a file left open there would
    not be flushed. raysft's commands close every file they write before they return (a scan of
    a search driver's 905,000 objects at its exit found only stdio and matplotlib's fonts open).
    Not for ``run_cli`` called in a process that goes on (tests)."""
    try:
        run_cli(main)
    finally:
        gc.freeze()
