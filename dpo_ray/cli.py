"""Command-line plumbing shared by the workflows: ``--config FILE`` and repeatable ``--set key=value``."""

from __future__ import annotations

import argparse
import logging
import sys

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
    try:
        cfg = build_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg


def print_config(cfg: Config) -> None:
    print("[dpo-ray] resolved config:\n" + "\n".join("  " + line for line in cfg.to_yaml().splitlines()), flush=True)


def main() -> None:
    """``dpo-ray`` console script: the same as ``python workflows/train.py``."""
    from dpo_ray.workflow import main_train

    main_train(sys.argv[1:])
