"""The process and queue commands of `mora-studio`: up, worker, web, submit, runs, status, cancel, resume, logs,
bench, export, eval."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from app import settings


def _service():
    from app.service import StudioService
    from storage.repo import Store

    return StudioService(Store())


def cmd_up(args: argparse.Namespace) -> int:
    from app.security import create_private_folder
    from workers.embedded_redis import EmbeddedRedis, stored_password
    from workers.default_model import ensure_default_model
    from workers.settings import (configured_redis_url, embedded_redis_config_file, embedded_redis_file,
                                  embedded_redis_password_file)
    from workers.processes import ProcessGroup, celery_command, run_until_signalled, worker_env, worker_specs

    settings.check_web()  # a bad setting stops `up` before it starts anything
    create_private_folder(settings.data_dir())  # first, so that nothing below creates it with the default mode
    if not args.no_prepare:
        ensure_default_model()  # one time: the default model is converted from its PyPI package
    env = {**os.environ, "MORA_DATA_DIR": str(settings.data_dir())}
    group = ProcessGroup(settings.logs_dir())
    published = embedded_redis_file()
    try:
        if not configured_redis_url():
            redis = EmbeddedRedis(log_file=settings.logs_dir() / "redis-server.log",
                                  password=stored_password(embedded_redis_password_file()),
                                  config_file=embedded_redis_config_file())
            # a restart comes back on the same port, empty (the reconciler re-sends queued runs)
            group.spawn("redis", redis.command(), ready=lambda process: redis.wait_ready(process=process))
            env["REDIS_URL"] = redis.url
            redis.publish(published)  # so `mora-studio submit`, `cancel`, ... in another terminal find it
        gpus = [g for g in args.gpus.split(",") if g]
        for spec in worker_specs(["train", "chat"], gpus, args.cpu_workers):
            group.spawn(f"worker-{spec.name}", celery_command(spec), worker_env(spec, env))
        group.spawn("web", [sys.executable, "-m", "app.cli", "web"], env)
    except Exception:
        group.stop()
        raise
    url = f"http://{settings.host()}:{settings.port()}"
    try:
        return run_until_signalled(group, f"MoRA Studio is starting at {url} (Redis {env['REDIS_URL']}; logs in "
                                          f"{settings.logs_dir()}). Ctrl-C stops everything.")
    finally:
        published.unlink(missing_ok=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.processes import ProcessGroup, celery_command, run_until_signalled, worker_env, worker_specs
    from workers.settings import configured_redis_url

    if not configured_redis_url():
        print("mora-studio worker: set REDIS_URL to the studio's Redis (the web host's)", file=sys.stderr)
        return 2
    gpus = [g for g in args.gpus.split(",") if g]
    try:
        specs = worker_specs([q for q in args.queues.split(",") if q], gpus, args.cpu_workers)
    except ValueError as error:
        print(f"mora-studio worker: {error}", file=sys.stderr)
        return 2
    group = ProcessGroup(settings.logs_dir())
    for spec in specs:
        group.spawn(f"worker-{spec.name}", celery_command(spec), worker_env(spec))
    names = ", ".join(spec.name for spec in specs)
    return run_until_signalled(group, f"workers {names} joined the pool; Ctrl-C stops them")


def cmd_web(args: argparse.Namespace) -> int:
    from app.web import serve

    return serve()


def cmd_submit(args: argparse.Namespace) -> int:
    from app.service import ServiceError
    from workers.train_config import ConfigError

    try:
        values = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError) as error:
        print(f"mora-studio submit: cannot read {args.config}: {error}", file=sys.stderr)
        return 2
    if not isinstance(values, dict):
        print(f"mora-studio submit: {args.config} must hold a mapping of train settings", file=sys.stderr)
        return 2
    try:
        run = _service().submit(values, name=args.name)
    except (ConfigError, ServiceError) as error:
        print(f"mora-studio submit: {error}", file=sys.stderr)
        return 2
    print(run.id)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    runs = _service().runs()
    print(f"{'id':<12}  {'status':<9}  {'adapter':<7}  {'r':>4}  {'step':>9}  {'loss':>8}  name")
    for run in runs:
        step = f"{run.step or 0}/{run.max_steps or '?'}"
        loss = f"{run.last_loss:.4f}" if run.last_loss is not None else "-"
        print(f"{run.id:<12}  {run.status:<9}  {run.adapter:<7}  {run.r:>4}  {step:>9}  {loss:>8}  {run.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run = _service().run(args.run_id)
    print(json.dumps({k: v for k, v in run.__dict__.items() if k != "config"}, indent=2, default=str))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    run = _service().cancel(args.run_id)
    print(f"{run.id}: {run.status}{' (stopping after the current step)' if run.status == 'running' else ''}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    run = _service().resume(args.run_id)
    print(run.id)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    for line in _service().logs(args.run_id):
        print(f"[{line.level}] {line.message}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from app import bench
    from storage.repo import Store

    if args.experiment == "results":
        return _write_bench_results(Store(), args.groups, args.out)
    try:
        preset = bench.get_preset(args.preset)
        if args.lr_factors:
            preset = bench.with_lr_factors(preset, args.lr_factors)
        seeds = bench.parse_seeds(args.seeds)
    except ValueError as error:
        print(f"mora-studio bench: {error}", file=sys.stderr)
        return 2
    store = Store()
    what = "ablation (Table 4)" if args.ablation else "memorisation (Table 2)"
    print(f"{what}, preset {preset.name}: {preset.description} Learning-rate factors: "
          f"{', '.join(f'{f:g}' for f in preset.lr_factors)}.")
    if args.local:
        group = bench.run_local(store, preset, seeds, ablation=args.ablation, on_event=_print_bench_event)
    else:
        problem = _train_workers_problem()
        if problem:
            print(f"mora-studio bench: {problem}", file=sys.stderr)
            return 2
        group = bench.submit_benchmark(_service(), preset, seeds, ablation=args.ablation)
        print(f"queued group {group}; waiting for it (Ctrl-C stops waiting, not the runs: write the results later "
              f"with `mora-studio bench results {group}`)")
        bench.wait_for_group(store, group)
    return _write_bench_results(store, group, args.out)


def _train_workers_problem() -> str:
    """Why the queue cannot take the benchmark now, or "" when a training worker is listening."""
    import redis

    from workers import api

    try:
        workers = api.workers()
    except redis.RedisError as error:
        return (f"cannot reach the studio's Redis ({error}): start the studio with `mora-studio up` and set "
                "REDIS_URL to its Redis, or run the benchmark here with --local")
    if not any("train" in worker.get("queues", ()) for worker in workers):
        return "no training worker is running: start the studio with `mora-studio up`, or use --local"
    return ""


def _print_bench_event(run, event: dict) -> None:
    if event["kind"] == "status" and event["status"] == "running":
        print(f"{run.name}: started")
    elif event["kind"] == "eval" and "char_accuracy" in event:
        print(f"{run.name}: step {event['step']}: character accuracy {100 * event['char_accuracy']:.1f}%, "
              f"exact match {100 * event['exact_match']:.1f}%")
    elif event["kind"] == "status" and event["status"] != "running":
        print(f"{run.name}: {event['status']} {event.get('message', '')}".rstrip())


def _write_bench_results(store, group, out) -> int:
    """`group`: one group's name, or a list of names read as one table."""
    from app import bench

    if not isinstance(group, str) and len(group) == 1:
        group = group[0]
    try:
        files = bench.write_results(store, group, out or bench.default_output_dir(group))
    except ValueError as error:
        print(f"mora-studio bench: {error}", file=sys.stderr)
        return 2
    print(files.markdown.read_text())
    for path in (files.json, files.markdown, files.html, files.png):
        if path is not None:
            print(f"wrote {path}")
    for problem in files.problems:
        print(f"mora-studio bench: {problem}", file=sys.stderr)
    return 0


def _in_this_process(command: str, what: str, expected: type[Exception], job: Callable[[], Any]) -> tuple[Any, int]:
    """Run a torch-side job here and its exit code: its own errors (`expected`, the user's to fix) as one line,
    exit 2; anything else (out of memory, a torch error) as one line too, exit 1; never a traceback."""
    try:
        return job(), 0
    except expected as error:
        print(f"mora-studio {command}: {error}", file=sys.stderr)
        return None, 2
    except Exception as error:  # noqa: BLE001 (the one line is the point)
        print(f"mora-studio {command}: the {what} failed ({type(error).__name__}: {error})", file=sys.stderr)
        return None, 1


def cmd_export(args: argparse.Namespace) -> int:
    """In this process (torch-side, like `train`): the run is read from the store, the export written to --out."""
    from workers.export import ExportError, ExportRequest, export_to

    request = ExportRequest.from_dict(_service().export_request(args.run, args.format, args.gguf_type))
    result, code = _in_this_process("export", "export", ExportError,
                                    lambda: export_to(request, args.out, force=args.force))
    if code == 0:
        print(result.summary())
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    """In this process (torch-side, like `export`): the rows are runs of the store or folders, nothing is recorded."""
    from app.evaluations import BASE_LABEL
    from workers.evaluation import EvalError, EvalRequest, run_evaluation

    if not args.runs and not args.base:
        print("mora-studio eval: name the runs or folders to evaluate, or --base", file=sys.stderr)
        return 2
    rows, base = ([{"label": BASE_LABEL}] if args.base else []), args.model
    for ref in args.runs:
        folder = Path(ref).expanduser()
        if folder.is_dir():
            kind = "adapter_path" if (folder / "adapter_config.json").is_file() else "model_path"
            rows.append({"label": folder.name, kind: str(folder.resolve())})
            continue
        run = _service().find_run(ref)
        if not run.output_dir:
            print(f"mora-studio eval: run {run.name} ({run.id}) is {run.status} and has no adapter or model",
                  file=sys.stderr)
            return 2
        kind = "model_path" if run.output_kind == "model" else "adapter_path"
        rows.append({"label": run.name, "run_id": run.id, kind: run.output_dir, "step": run.step})
        base = base or run.model or None
    def evaluate():
        request = EvalRequest.from_dict({"base_model": base, "rows": rows, "max_new_tokens": args.max_new_tokens,
                                         "source": {"data": str(args.data), "limit": args.limit, "seed": args.seed}})
        from workers.chat import ChatEngine  # torch: two seconds, only once the request is known to be good

        return request, run_evaluation(ChatEngine(), request, on_answers=lambda answers, done: print(
            f"answered {done} prompts", file=sys.stderr))

    done, code = _in_this_process("eval", "evaluation", EvalError, evaluate)
    if code:
        return code
    request, result = done
    labels = [row.label for row in request.rows]
    print(score_table(labels, result.scores, len(result.examples)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "data": str(args.data), "prompts": len(result.examples), "rows": labels,
            "scores": {labels[row]: means for row, means in result.scores.items()},
            "examples": [{"source_row": e.source_row, "prompt": e.prompt, "reference": e.reference,
                          "answers": {labels[a.row]: {"answer": a.answer, "scores": a.scores}
                                      for a in result.answers if a.example == e.example}}
                         for e in result.examples]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def score_table(labels: list[str], scores: dict, prompts: int) -> str:
    """The rows' scores as a text table: one line per row, one column per metric."""
    from workers.eval_metrics import METRICS

    width = max(len("row"), *(len(label) for label in labels))
    lines = [f"{prompts} prompts", f"{'row':<{width}}  " + "  ".join(f"{m:>13}" for m in METRICS)]
    for row, label in enumerate(labels):
        values = scores.get(row, {})
        lines.append(f"{label:<{width}}  " + "  ".join(
            f"{values[m]:>13.4f}" if values.get(m) is not None else f"{'-':>13}" for m in METRICS))
    return "\n".join(lines)


COMMANDS = {"up": cmd_up, "worker": cmd_worker, "web": cmd_web, "submit": cmd_submit, "runs": cmd_runs,
            "status": cmd_status, "cancel": cmd_cancel, "resume": cmd_resume, "logs": cmd_logs, "bench": cmd_bench,
            "export": cmd_export, "eval": cmd_eval}


def run(args: argparse.Namespace) -> int:
    import redis

    from app.service import ServiceError
    from storage.repo import StorageError

    try:
        return COMMANDS[args.command](args)
    except (ServiceError, StorageError) as error:
        print(f"mora-studio {args.command}: {error}", file=sys.stderr)
        return 2
    except redis.ConnectionError as error:
        print(f"mora-studio {args.command}: cannot reach Redis ({error}); is `mora-studio up` running, or REDIS_URL "
              "set to the studio's Redis?", file=sys.stderr)
        return 2
