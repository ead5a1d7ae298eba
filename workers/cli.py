"""The command-line faces of the engine: `train`, `chat`, `models`.

Argument parsers are built here from `TrainConfig`'s own fields and help texts, so `--help` documents every option
with its default and the CLI can never drift from the config. torch and transformers are imported only inside the
commands, so `mora-studio --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from workers.formatting import format_bytes
from workers.train_config import ADAPTERS, ConfigError, TrainConfig

def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        help_text = field.metadata.get("help", "")
        if "default" not in help_text:
            help_text += f" (default: {default if default not in ('', None) else 'none'})"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "default": default}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.name == "target_modules":
            kwargs.update(nargs="+", metavar="NAME")
        elif field.name == "memorize_eval_steps":
            kwargs.update(nargs="+", type=int, metavar="STEP")
        elif field.name == "adapter":
            kwargs["choices"] = ADAPTERS
        elif field.name in ("learning_rate", "lora_alpha"):
            kwargs["type"] = float
        elif default is not None and not isinstance(default, str):
            kwargs["type"] = type(default)
        parser.add_argument(_option(field.name), **kwargs)
    parser.add_argument("--out", required=True, type=Path, help="run folder to create (config, metrics, adapter)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue from a checkpoint folder, or a run folder's latest checkpoint")


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="an adapter folder (or a run folder) to chat with; a full-fine-tuned model folder works too")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default: 0.7)")
    parser.add_argument("--system", default=None, help="a system prompt (default: none)")


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--add", type=Path, default=None, metavar="FOLDER", help="register a local transformers folder")
    parser.add_argument("--name", default=None, help="with --add: the name to list it under (default: folder name)")
    parser.add_argument("--remove", default=None, metavar="NAME", help="unregister a model added with --add")
    parser.add_argument("--prepare", action="store_true", help="convert the default model now (one time, about a minute)")


class _ProgressLine:
    """One updating terminal line: step, loss, tokens/s, ETA; other events print above it."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, event: dict) -> None:
        kind = event["kind"]
        if kind == "step":
            done, total = event["step"], max(event.get("max_steps") or 0, 1)
            elapsed = time.monotonic() - self.started
            eta = elapsed / max(done, 1) * max(total - done, 0)
            bar = "#" * int(20 * done / total)
            self.stream.write(f"\r[{bar:<20}] step {done}/{total} | loss {event['loss']:.4f} | "
                              f"{event['tokens_per_second']:,.0f} tok/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            self.stream.flush()
        elif kind == "eval" and "eval_loss" in event:
            self._line(f"eval loss {event['eval_loss']:.4f} at step {event['step']}")
        elif kind == "eval":
            self._line(f"recall at step {event['step']}: character accuracy {100 * event['char_accuracy']:.1f}%, "
                       f"exact match {100 * event['exact_match']:.1f}%")
        elif kind in ("log", "status") and event.get("message"):
            prefix = event.get("status") or event.get("level", "info")
            self._line(f"{prefix}: {event['message']}")
        elif kind == "checkpoint":
            self._line(f"checkpoint saved: {event['path']}")
        elif kind == "data":
            report = event["report"]
            self._line(f"data: {event['rows']} rows ({event['schema']}) -> {event['train_examples']} train / "
                       f"{event['eval_examples']} eval examples; {len(report.get('dropped', []))} dropped, "
                       f"{len(report.get('truncated', []))} truncated")
        elif kind == "adapter":
            rank = event.get("effective_rank") or {}
            extra = f", mean effective rank {rank['mean']:.1f}" if rank else ""
            self._line(f"saved {event['output_kind']} to {event['path']} ({format_bytes(event['size_bytes'])}, "
                       f"{event['trainable_parameters']:,} trained parameters{extra})")

    def _line(self, text: str) -> None:
        self.stream.write("\r\033[K" + text + "\n")
        self.stream.flush()


def cmd_train(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**values)
    try:
        config.validate()
    except ConfigError as error:
        print(f"mora-studio train: {error}", file=sys.stderr)
        return 2
    from workers.events import CallbackSink
    from workers.settings import distributed_rank
    from workers.training import latest_checkpoint, run_training

    resume = args.resume
    if resume is not None and not (resume / "trainer_state.json").exists():
        resume = latest_checkpoint(resume)
        if resume is None:
            print(f"mora-studio train: no checkpoint found in {args.resume}", file=sys.stderr)
            return 2
    if config.devices > 1 and distributed_rank()[1] == 1:  # not yet under torchrun: start it, one rank a device
        return _train_on_devices(config, Path(args.out), resume)
    stop_requested = {"flag": False}

    def on_interrupt(signum, frame):
        if stop_requested["flag"]:
            raise KeyboardInterrupt
        stop_requested["flag"] = True
        print("\nstopping after this step and saving the adapter (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = run_training(config, args.out, sinks=[CallbackSink(_ProgressLine())],
                              should_stop=lambda: stop_requested["flag"], resume_from=resume)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.status == "failed":
        print(f"mora-studio train: {result.message}", file=sys.stderr)
        return 1
    print(f"{result.status}: {result.steps} steps, final loss {result.final_loss}, run folder {result.run_dir}")
    return 0


def _train_on_devices(config: TrainConfig, out: Path, resume: Optional[Path]) -> int:
    """`train --devices N`: torchrun on this host, one process a device (workers.distributed). Ctrl-C asks rank 0 to
    stop after its step and save, through a file every rank's stop check reads; a second Ctrl-C ends the job."""
    import json

    from workers import distributed

    out.mkdir(parents=True, exist_ok=True)
    stop_file, launch_file = out / ".stop-requested", out / "launch.json"
    stop_file.unlink(missing_ok=True)
    (out / distributed.RESULT).unlink(missing_ok=True)
    launch_file.write_text(json.dumps({"config": config.to_dict(), "out": str(out), "resume": str(resume or ""),
                                       "stop_file": str(stop_file)}))
    process = distributed.start_job(distributed.launch_command(
        config.devices, ["workers.distributed", "cli", str(launch_file)]))

    def on_interrupt(signum, frame):
        if stop_file.exists():
            distributed.kill_job(process)
            return
        stop_file.touch()
        print("\nstopping after this step and saving the adapter (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        code, _ = distributed.wait_for_job(process)
    finally:
        signal.signal(signal.SIGINT, previous)
    status, problem = distributed.job_outcome(code, out, config.devices)
    if status is None or status == "failed":
        message = problem or json.loads((out / distributed.RESULT).read_text())["message"]
        print(f"mora-studio train: {message}", file=sys.stderr)
        return 1
    result = json.loads((out / distributed.RESULT).read_text())
    print(f"{status} on {config.devices} devices: {result['steps']} steps, final loss {result['final_loss']}, "
          f"run folder {out}")
    return 0


def train_as_rank(config: dict[str, Any], out: str, resume: str, stop_file: str) -> int:
    """One rank of `train --devices N` (started by torchrun through workers.distributed): rank 0 draws the progress
    line; a rank's exit code is non-zero only for a failed run, so torchrun stops the other ranks then."""
    from workers.events import CallbackSink
    from workers.training import run_training

    result = run_training(TrainConfig.from_dict(config), Path(out), sinks=[CallbackSink(_ProgressLine())],
                          should_stop=Path(stop_file).exists, resume_from=Path(resume) if resume else None)
    return 1 if result.status == "failed" else 0


def resolve_chat_target(model: Optional[str], adapter: Optional[Path]) -> tuple[Optional[str], Optional[Path]]:
    """A run folder stands for its result: `adapter/` (base + adapter) or `model/` (a whole model)."""
    if adapter is None:
        return model, None
    for candidate, is_model in ((adapter / "adapter", False), (adapter / "model", True)):
        if candidate.is_dir():
            return (str(candidate), None) if is_model else (model, candidate)
    if (adapter / "config.json").exists() and not (adapter / "adapter_config.json").exists():
        return str(adapter), None
    return model, adapter


def cmd_chat(args: argparse.Namespace) -> int:
    import mora
    from workers.generation import GenerationSettings, LengthError, check_lengths, context_length, stream_chat
    from workers.model_loading import load_model
    from workers.models import ModelError

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    try:  # before the model loads: a bad option costs nothing
        settings.validate()
    except ValueError as error:
        print(f"mora-studio chat: {error}", file=sys.stderr)
        return 2
    model_name, adapter_dir = resolve_chat_target(args.model, args.adapter)
    try:
        model, tokenizer = load_model(model_name)
        adapter = mora.load_adapter(model, adapter_dir, name="chat") if adapter_dir else None
    except (ModelError, mora.AdapterFormatError, ValueError) as error:
        print(f"mora-studio chat: {error}", file=sys.stderr)
        return 2
    model.eval()
    try:
        check_lengths([], settings.max_new_tokens, context_length(model))
    except LengthError as error:
        print(f"mora-studio chat: {error}", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; /reset starts over, /exit (or Ctrl-D) quits.")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        shown = ""
        try:
            for texts in stream_chat(model, tokenizer, [messages], [adapter], settings):
                print(texts[0][len(shown):], end="", flush=True)
                shown = texts[0]
        except LengthError as error:  # this message does not fit: say so, and let the user send a shorter one
            print(f"\nmora-studio chat: {error}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": shown})


def cmd_models(args: argparse.Namespace) -> int:
    from workers.default_model import ensure_default_model
    from workers.models import ModelError, add_model, describe_models_table, list_models, remove_model

    try:
        if args.add:
            info = add_model(args.add, name=args.name)
            print(f"added {info.name}: {info.path}")
        if args.remove:
            remove_model(args.remove)
            print(f"removed {args.remove}")
        if args.prepare:
            ensure_default_model()
    except ModelError as error:
        print(f"mora-studio models: {error}", file=sys.stderr)
        return 2
    print(describe_models_table(list_models()))
    return 0
