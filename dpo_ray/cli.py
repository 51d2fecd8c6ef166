"""Command-line plumbing shared by the workflows: ``--config FILE`` and repeatable ``--set key=value``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator

from dpo_ray.config import Config, ConfigError, build_config


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML preset (see configs/); defaults apply without one")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key, e.g. --set dpo.beta=0.2 (repeatable)",
    )
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse arguments and build the validated config; a bad key or value exits with one line."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[dpo-ray] %(message)s")
    with exit_on_input_error():
        cfg = build_config(args.config, args.overrides)
    return args, cfg


@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """A bad config value or unusable input data ends a workflow with one ``error:`` line and exit status 2."""
    from dpo_ray.data.formats import DataValidationError

    try:
        yield
    except (ConfigError, DataValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def print_config(cfg: Config) -> None:
    print("[dpo-ray] resolved config:\n" + "\n".join("  " + line for line in cfg.to_yaml().splitlines()), flush=True)


def main() -> None:
    """``dpo-ray`` console script: the same as ``python workflows/train.py``."""
    from dpo_ray.workflow import main_train

    main_train(sys.argv[1:])
