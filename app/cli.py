"""The `mora-studio` command line: one entry point for every process and tool the studio has."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workers import cli as engine_cli
from workers.settings import SettingError

ENVIRONMENT = """environment:
  MORA_DATA_DIR       datasets, runs, adapters, logs and the SQLite store (default: ./data)
  MORA_DB_URL         the run store (default: sqlite:///$MORA_DATA_DIR/studio.db; postgresql+psycopg://... works)
  REDIS_URL           the broker and event bus; unset: `up` starts an embedded Redis on loopback
  MORA_MODELS_DIR     local transformers model folders (default: $MORA_DATA_DIR/models)
  MORA_HOST/MORA_PORT where the web app listens (default: 127.0.0.1:7860)
  MORA_AUTH           user:password turns on the login page (default: off)
  MORA_MAX_UPLOAD_MB  largest dataset upload (default: 512)
  MORA_MAX_ROWS       most rows a dataset may have (default: 5000000)
  MORA_MAX_DECODED_MB most MiB a dataset may hold once decoded, e.g. an expanded Parquet file (default: 4096)
  MORA_MAX_ROW_MB     most MiB one row, line or cell may hold (default: 16)
  MORA_ALLOWED_HOSTS  more host names the web app answers to, name or name:port, comma-separated (default: loopback
                      names and MORA_HOST); other Host headers get 403
  MORA_UPLOAD_CACHE_S Gradio's copies of uploads are deleted after this many seconds (default: 3600)
  MORA_CHAT_TIME_LIMIT_S  the longest one chat answer may take, in seconds (default: 300)
  MORA_CHAT_MAX_ADAPTERS  adapters a chat worker keeps loaded per base model, least recently used dropped (default: 8)
  MORA_API_KEYS       comma-separated bearer tokens the OpenAI-compatible API (/v1) requires (default: unset, the
                      API answers loopback clients only, and none while MORA_AUTH is set)
  MORA_API_MAX_BODY_KB   largest API request body (default: 1024)
  MORA_API_MAX_PENDING   most API requests followed at once; past it, 429 (default: 64)
  MORA_SERVE_WINDOW_MS   a chat worker collects API requests until none came for this long (default: 30)
  MORA_SERVE_MAX_BATCH   most API requests in one batched generation (default: 16)
  MORA_HEARTBEAT_TTL_S   how long a running job's heartbeat outlives its last beat, in seconds (default: 15)
  MORA_WORKER_LOST_AFTER_S  seconds without a heartbeat before a run is marked 'worker lost' (default: 15)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mora-studio",
        description="Fine-tune language models with MoRA or LoRA adapters and compare them.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    up = commands.add_parser("up", help="start the studio on this machine: web, workers and (unless REDIS_URL is "
                                        "set) an embedded Redis; Ctrl-C stops all of it", formatter_class=defaults)
    up.add_argument("--gpus", default="", help="GPU indices for training workers, e.g. 0,1 (default: CPU)")
    up.add_argument("--cpu-workers", type=int, default=1,
                    help="training workers on the CPU when no --gpus are given (each runs one job at a time)")
    up.add_argument("--no-prepare", action="store_true",
                    help="do not convert the default model now (it is converted on its first use instead)")
    worker = commands.add_parser("worker", help="join the worker pool (REDIS_URL must point at the shared Redis)",
                                 formatter_class=defaults)
    worker.add_argument("--gpus", default="", help="GPU indices: one training worker per GPU (empty: one on the CPU)")
    worker.add_argument("--queues", default="train,chat",
                        help="queues to serve: train, chat or both (a chat worker brings a utility worker for previews "
                             "and parameter budgets)")
    worker.add_argument("--cpu-workers", type=int, default=1, help="training workers on the CPU when no --gpus")
    commands.add_parser("web", help="run the web app and the event collector (what `up` starts)")
    train = commands.add_parser("train", help="fine-tune a model in the foreground, leaving a run folder",
                                description="Fine-tune a model with MoRA, LoRA or full fine-tuning. Ctrl-C stops "
                                            "after the current step and saves the adapter so far.")
    engine_cli.add_train_arguments(train)
    chat = commands.add_parser("chat", help="chat in the terminal with a model and an adapter", formatter_class=defaults)
    engine_cli.add_chat_arguments(chat)
    models = commands.add_parser("models", help="list, add or prepare models")
    engine_cli.add_models_arguments(models)
    submit = commands.add_parser("submit", help="queue a training run from a YAML or JSON config (train's options)")
    submit.add_argument("config", type=Path, help="a file of train settings, e.g. {data: my.jsonl, adapter: mora, r: 8}")
    submit.add_argument("--name", default="", help="a name for the run")
    commands.add_parser("runs", help="list runs, newest first")
    add_bench_arguments(commands.add_parser("bench", help="reproduce the MoRA paper's experiments"))
    add_export_arguments(commands.add_parser(
        "export", help="write a succeeded run's result in a format other tools load (merged, adapter, lora, gguf)",
        description="Export a succeeded run. merged: a transformers folder with the adapter merged (transformers, "
                    "vLLM); adapter: the adapter folder as a zip; lora: an exact LoRA in peft format (MoRA of the "
                    "sharing family, or a LoRA run) for LoRA servers; gguf: a GGUF file and an Ollama Modelfile "
                    "(Llama-family models) for llama.cpp and Ollama. Runs here, in this process: no studio needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_eval_arguments(commands.add_parser(
        "eval", help="answer a file's prompts with runs or adapter folders side by side and print their scores",
        description="Evaluate by generation: every prompt of --data (chat, ShareGPT, alpaca or prompt/completion "
                    "rows; the last assistant turn is the reference) is answered greedily by each run's adapter or "
                    "model (and the base model with --base), in batched passes on one copy of the base, and scored: "
                    "exact match, character accuracy, token F1, ROUGE-L, answer loss and perplexity. Runs here, in "
                    "this process: no studio needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    for name, text in (("status", "show one run"), ("cancel", "cancel a queued or running run"),
                       ("resume", "resume a failed or cancelled run from its last checkpoint, as a new run"),
                       ("logs", "print a run's log lines")):
        commands.add_parser(name, help=text).add_argument("run_id")
    return parser


def add_export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("run", help="the run's id or name (`mora-studio runs` lists them)")
    export.add_argument("--format", required=True, help="merged, adapter, lora or gguf")
    export.add_argument("--out", type=Path, required=True,
                        help="where to write: a folder (merged, lora, gguf) or a .zip file (adapter)")
    export.add_argument("--gguf-type", default="f16", help="the GGUF file's tensor type: f16 or q8_0")
    export.add_argument("--force", action="store_true",
                        help="replace --out if it exists (a file, an empty folder or an earlier export only)")


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("runs", nargs="*", metavar="RUN_OR_DIR",
                          help="a run's id or name, or an adapter or model folder")
    evaluate.add_argument("--base", action="store_true", help="the base model alone answers too")
    evaluate.add_argument("--data", type=Path, required=True, help="the prompts and references (a dataset file)")
    evaluate.add_argument("--limit", type=int, default=100, help="at most this many prompts (a seeded sample)")
    evaluate.add_argument("--seed", type=int, default=0, help="the seed of the sample")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens")
    evaluate.add_argument("--model", default=None,
                          help="the base model (default: the runs' model, else the default model)")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the scores and every answer here")


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    experiments = bench.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    memorize = experiments.add_parser(
        "memorize",
        help="UUID-pair memorisation (the paper's Table 2): LoRA and MoRA at two budgets, full fine-tuning",
        description="Train every method on the same random UUID pairs and measure recall by greedy generation at "
                    "four checkpoints; write the table (JSON, Markdown) and curves (HTML, PNG). By default the runs "
                    "go through the studio's queue (start it first with `mora-studio up`, REDIS_URL pointing at its "
                    "Redis) and this command waits for them; --local trains them here, one after another.")
    memorize.add_argument("--preset", default="cpu", help="cpu (SmolLM2-135M, about 20 min a seed on 2 cores) or "
                                                          "gpu (about 10 min a seed on one large GPU); default: cpu")
    memorize.add_argument("--seeds", default="3",
                          help="N for seeds 0..N-1, each with its own pairs, or a list such as 1,2 to add seeds to a "
                               "benchmark already run (default: 3)")
    memorize.add_argument("--ablation", action="store_true",
                          help="the paper's Table 4 instead: MoRA's variants (truncation, sharing, decouple, rope) "
                               "at the small budget")
    memorize.add_argument("--lr-factors", type=float, nargs="+", default=None, metavar="F",
                          help="the learning-rate sweep: each method's width-scaled paper rate times each F "
                               "(default: the preset's; cpu 0.5 2, gpu 0.5 1 2)")
    memorize.add_argument("--local", action="store_true", help="train in this process, without the queue")
    memorize.add_argument("--out", type=Path, default=None, help="results folder (default: $MORA_DATA_DIR/bench/GROUP)")
    results = experiments.add_parser("results",
                                     help="write the results of a benchmark group again (after it finished)")
    results.add_argument("groups", nargs="+", metavar="GROUP",
                         help="the group name that `bench memorize` printed; several are read as one table (a sweep "
                              "extended later with --lr-factors or more --seeds)")
    results.add_argument("--out", type=Path, default=None, help="results folder (default: $MORA_DATA_DIR/bench/GROUP)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command in ("train", "chat", "models"):
            return {"train": engine_cli.cmd_train, "chat": engine_cli.cmd_chat, "models": engine_cli.cmd_models}[
                args.command](args)
        from app import commands

        return commands.run(args)
    except SettingError as error:
        print(f"mora-studio {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
