"""The `mora-studio` command line: one entry point for every process and tool the studio has."""
from __future__ import annotations

import argparse
import sys

from workers import cli as engine_cli

ENVIRONMENT = """environment:
  MORA_DATA_DIR     datasets, runs, adapters and logs (default: ./data)
  MORA_MODELS_DIR   local transformers model folders (default: $MORA_DATA_DIR/models)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mora-studio",
        description="Fine-tune language models with MoRA or LoRA adapters and compare them.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("up", help="start the studio on this machine (web, worker, embedded Redis)")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    train = commands.add_parser("train", help="fine-tune a model in the foreground, leaving a run folder",
                                description="Fine-tune a model with MoRA, LoRA or full fine-tuning. Ctrl-C stops "
                                            "after the current step and saves the adapter so far.")
    engine_cli.add_train_arguments(train)
    chat = commands.add_parser("chat", help="chat in the terminal with a model and an adapter",
                               formatter_class=defaults)
    engine_cli.add_chat_arguments(chat)
    models = commands.add_parser("models", help="list, add or prepare models")
    engine_cli.add_models_arguments(models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "up":
        from workers.models import ensure_default_model

        ensure_default_model()  # one time: the default model is converted from its PyPI package
        print("mora-studio up: the web studio is not yet available; `mora-studio train` and `chat` are (see README).")
        return 0
    handlers = {"train": engine_cli.cmd_train, "chat": engine_cli.cmd_chat, "models": engine_cli.cmd_models}
    if args.command in handlers:
        return handlers[args.command](args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
