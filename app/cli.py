"""The `mora-studio` command line: one entry point for every process the studio runs."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mora-studio",
        description="Fine-tune language models with MoRA or LoRA adapters and compare them.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("up", help="start the studio on this machine (web, worker, embedded Redis)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        print("mora-studio up: the web studio is not yet available; the adapter library `mora` is (see README).")
        return 0
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
