"""Shared command-line plumbing: logging, --set parsing, and turning user errors into exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from raysft.config import Config, ConfigError, load_config, parse_overrides

EXIT_USAGE = 2  # bad config, spec or data: the user's to fix


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


def load_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, parse_overrides(args.overrides))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run_cli(main: Callable[[], int]) -> NoReturn:
    """Run ``main``; user-caused errors print one clear message and exit 2, no traceback."""
    from raysft.errors import user_errors

    try:
        code = main()
    except ConfigError as err:
        print("\n".join(f"error: {line}" for line in str(err).splitlines()), file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except user_errors() as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
