"""One training run: a model, an adapter from `mora`, the user's data, transformers' `Trainer`, and events out.

The run is a plain function (`run_training`) so the command line, the queue worker and the tests all call the same
thing. It talks to the outside only through an event publisher (see `workers.events`) and a `should_stop` callable
checked between steps, so it never depends on who listens or who cancels.

Run folder layout: `config.json` (the resolved config), `metrics.jsonl` (every event), `checkpoints/checkpoint-N`
(adapter + optimizer + scheduler + RNG + data position), and the result: `adapter/` (the `mora` format) or, for full
fine-tuning and ReMoRA (whose update lives in the base weights), `model/` (a transformers folder).
"""
from __future__ import annotations

import json
import logging
import resource
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

import mora
from workers import distributed
from workers.data import build_datasets, collate
from workers.events import EventPublisher, EventSink, JsonlSink
from workers.memorize import evaluate_pairs, read_pairs
from workers.model_loading import load_model
from workers.models import resolve_model
from workers.settings import distributed_local_rank
from workers.train_config import TrainConfig

log = logging.getLogger(__name__)

ADAPTER_NAME = "adapter"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    status: str
    run_dir: str
    output_dir: Optional[str]
    output_kind: Optional[str]
    steps: int
    final_loss: Optional[float]
    message: str = ""


def choose_dtype(preference: str) -> torch.dtype:
    """bfloat16 on a GPU that supports it, float32 otherwise (CPU bf16 training is slower and less exact here)."""
    if preference == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, preference)


def adapter_config(config: TrainConfig) -> mora.AdapterConfig:
    if config.adapter == "mora":
        return mora.MoRAConfig(r=config.r, variant=config.variant, dropout=config.dropout,
                               target_modules=config.target_modules)
    return mora.LoRAConfig(r=config.r, alpha=config.lora_alpha, use_rslora=config.use_rslora,
                           dropout=config.dropout, target_modules=config.target_modules)


def saves_full_model(config: TrainConfig) -> bool:
    """Full fine-tuning and ReMoRA change the base weights, so their checkpoints and result are whole models."""
    return config.adapter == "full" or bool(config.remora_steps)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class EventCallback(TrainerCallback):
    """Turns the Trainer's logs, evaluations and saves into events, and checks for cancellation between steps."""

    def __init__(self, publisher: EventPublisher, should_stop: Callable[[], bool]) -> None:
        self.publisher = publisher
        self.should_stop = should_stop
        self.cancelled = False
        self.last_loss: Optional[float] = None
        self._last_time = time.perf_counter()
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        elapsed = max(now - self._last_time, 1e-9)
        self.last_loss = float(logs["loss"])
        self.publisher.emit(
            "step", step=state.global_step, max_steps=state.max_steps, loss=self.last_loss,
            learning_rate=logs.get("learning_rate"), grad_norm=_float(logs.get("grad_norm")),
            epoch=logs.get("epoch", state.epoch), tokens_seen=int(tokens),
            tokens_per_second=(tokens - self._last_tokens) / elapsed, peak_memory_mb=_peak_memory_mb(),
        )
        self._last_time, self._last_tokens = now, tokens

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.publisher.emit("eval", step=state.global_step, eval_loss=float(metrics["eval_loss"]),
                                epoch=state.epoch)

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.publisher.emit("checkpoint", step=state.global_step, path=str(path))

    def on_step_end(self, args, state, control, **kwargs):
        # on several devices rank 0 decides and every rank hears it, so all stop after the same step
        if distributed.rank0_decides(lambda: not self.cancelled and self.should_stop()):
            self.cancelled = True
            self.publisher.log(f"cancel requested: stopping after step {state.global_step} and saving")
            control.should_training_stop = True
            control.should_save = True


def _float(value) -> Optional[float]:
    return None if value is None else float(value)


class RemoraCallback(TrainerCallback):
    """Every N steps: fold M into the base, restart it and its optimizer state, and re-warm the learning rate."""

    def __init__(self, every: int, warmup: int, publisher: EventPublisher) -> None:
        self.every, self.warmup, self.publisher = every, warmup, publisher
        self.last_merge = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """On resume, put each layer back on the grouping it had reached."""
        merges = state.global_step // self.every
        self.last_merge = merges * self.every
        for _ in range(merges % len(mora.remora.CYCLES["reference"])):
            for layer in mora.adapted_layers(model).values():
                adapter = layer.adapters[ADAPTER_NAME]
                adapter.variant = mora.remora.next_variant(adapter.variant)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            mora.reset_optimizer_state(optimizer, mora.remora_step(model, ADAPTER_NAME))
            self.last_merge = state.global_step
            self.publisher.log(f"ReMoRA: merged and restarted M at step {state.global_step}")
        since = state.global_step - self.last_merge
        if self.last_merge and since < self.warmup:
            for group in optimizer.param_groups:  # the scheduler set lr afresh this step; scale it for the next
                group["lr"] *= (since + 1) / self.warmup


class MemorizeCallback(TrainerCallback):
    """At the given steps (0: before the first), greedy-generate every pair's value from its key and emit an `eval`
    event with the character accuracy and exact-match rate (`workers.memorize`, MORA_SPEC.md §6)."""

    def __init__(self, pairs: list[tuple[str, str]], steps: Iterable[int], tokenizer, publisher: EventPublisher,
                 batch_size: Optional[int] = None) -> None:
        self.pairs, self.steps, self.tokenizer, self.publisher = pairs, set(steps), tokenizer, publisher
        # a GPU generates hundreds of sequences at once; two CPU cores gain little past a few dozen
        self.batch_size = batch_size or (256 if torch.cuda.is_available() else 32)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and 0 in self.steps:
            self._evaluate(model, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self._evaluate(model, state)

    def _evaluate(self, model, state) -> None:
        scores = evaluate_pairs(model, self.tokenizer, self.pairs, self.batch_size)
        self.publisher.emit("eval", step=state.global_step, epoch=state.epoch, pairs=len(self.pairs), **scores)


class GenerationEvalCallback(TrainerCallback):
    """Every `every` steps (and at the last), answer the same prompts greedily with the model being trained and emit
    an `eval` event with their mean scores (`workers.evaluation`, the evaluation's own functions) under
    `eval_metrics.curve_name` names, so they are drawn beside the loss."""

    def __init__(self, examples, every: int, tokenizer, publisher: EventPublisher, adapter: Optional[str]) -> None:
        from workers.evaluation import DEFAULT_BATCH_ROWS, MAX_NEW_TOKENS
        from workers.memorize import VALUE_MARGIN_TOKENS

        self.examples, self.every, self.tokenizer, self.publisher = examples, every, tokenizer, publisher
        self.adapter = adapter
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
        self.max_new_tokens = min(MAX_NEW_TOKENS, longest + VALUE_MARGIN_TOKENS)
        self.batch_rows = 256 if torch.cuda.is_available() else DEFAULT_BATCH_ROWS
        self.done: set[int] = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._evaluate(model, state)

    def _evaluate(self, model, state) -> None:
        from workers.eval_metrics import curve_name
        from workers.evaluation import answer_batches, summarize

        if state.global_step in self.done or not state.is_world_process_zero:
            return
        self.done.add(state.global_step)
        answers = [answer for batch in answer_batches(model, self.tokenizer, self.examples, [0], [self.adapter],
                                                      self.max_new_tokens, self.batch_rows) for answer in batch]
        means = summarize(answers)[0]
        self.publisher.emit("eval", step=state.global_step, epoch=state.epoch, prompts=len(self.examples),
                            **{curve_name(metric): value for metric, value in means.items()})


def generation_eval_examples(config: TrainConfig):
    """The fixed prompts of `eval_generate_steps`: a sample of the run's eval split (its eval file, or the rows
    `eval_fraction` holds out), else of its training rows."""
    from workers.evaluation import EvalSource, read_examples

    if config.eval_data:
        source = EvalSource(config.eval_data, "all", 0.0, config.seed, config.eval_generate_samples)
    elif config.eval_fraction:
        source = EvalSource(config.data, "eval", config.eval_fraction, config.seed, config.eval_generate_samples)
    else:
        source = EvalSource(config.data, "all", 0.0, config.seed, config.eval_generate_samples)
    return read_examples(source)


class StudioTrainer(Trainer):
    """A Trainer whose checkpoints hold the adapter alone (megabytes, not the whole base model)."""

    def __init__(self, *args, adapter_only: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adapter_only = adapter_only

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        if not self.adapter_only:
            return super()._save(output_dir, state_dict=state_dict)
        mora.save_adapter(self.model, ADAPTER_NAME, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.adapter_only:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        target = model or self.model
        mora.remove_adapter(target, ADAPTER_NAME)
        mora.load_adapter(target, resume_from_checkpoint, name=ADAPTER_NAME)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint. A worker killed while saving leaves a checkpoint without its
    trainer_state.json (Trainer writes it last), and resuming from that one would fail; the one before is whole."""
    candidates = [p for p in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    for checkpoint in sorted(candidates, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if _is_complete(checkpoint):
            return checkpoint
        log.warning("skipping %s: it was not finished (no readable trainer_state.json)", checkpoint)
    return None


def _is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoints_to_delete(checkpoints: list[Path], eval_losses: dict[int, float], keep: int) -> list[Path]:
    """The checkpoints beyond the newest `keep` complete ones and the best by eval loss (among the checkpoints whose
    own step was evaluated); a half-written one older than the newest complete one is a killed save's leftover and
    goes too. The newest complete checkpoint, what a run resumes from, is always kept."""
    by_step = sorted(checkpoints, key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in by_step if _is_complete(p)]
    if not complete:
        return []
    kept = set(complete[-keep:])
    evaluated = [p for p in complete if int(p.name.split("-")[1]) in eval_losses]
    if evaluated:
        kept.add(min(evaluated, key=lambda p: eval_losses[int(p.name.split("-")[1])]))
    newest = int(complete[-1].name.split("-")[1])
    return [p for p in by_step if p not in kept and int(p.name.split("-")[1]) < newest]


class CheckpointPruner(TrainerCallback):
    """Deletes old checkpoints after each save (a full fine-tune of SmolLM2 writes about 1.6 GB a checkpoint): an
    exact rule on our adapter-only checkpoints, where Trainer's save_total_limit keeps the best only together with
    load_best_model_at_end and its strategy rules. Eval losses come from the Trainer's log history, which a resumed
    run reads back from its checkpoint, so the best of before the resume is still known."""

    def __init__(self, keep: int, publisher: EventPublisher) -> None:
        self.keep = keep
        self.publisher = publisher

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        losses = {entry["step"]: entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry}
        folder = Path(args.output_dir)
        candidates = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
        for checkpoint in checkpoints_to_delete(candidates, losses, self.keep):
            shutil.rmtree(checkpoint, ignore_errors=True)
            self.publisher.log(f"deleted {checkpoint.name}: only the newest {self.keep} and the best are kept")


def _training_arguments(config: TrainConfig, run_dir: Path, has_eval: bool, dtype: torch.dtype) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval and config.eval_steps else "no",
        eval_steps=config.eval_steps or None,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        seed=config.seed,
        data_seed=config.seed,
        bf16=on_gpu and dtype == torch.bfloat16 and config.adapter == "full",
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not on_gpu,
        report_to=[],
        disable_tqdm=True,
        log_level="warning",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        save_only_model=False,
        ddp_find_unused_parameters=False,  # every parameter that trains is used in every step
    )


def run_training(
    config: TrainConfig,
    run_dir: Path,
    run_id: Optional[str] = None,
    sinks: Iterable[EventSink] = (),
    should_stop: Callable[[], bool] = lambda: False,
    resume_from: Optional[Path] = None,
    worker: str = "",
) -> TrainResult:
    """Train one model as `config` says, writing the run folder and emitting events; never raises for a bad run:
    the result (and a `status` event) says `failed` with the reason. `config` was checked where it entered (the
    service for the queue, `mora-studio train`, the bench's plans), once; it is not checked again here."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank, ranks = distributed.rank_and_world()
    own = [JsonlSink(run_dir / "metrics.jsonl"), *sinks] if rank == 0 else [
        JsonlSink(run_dir / distributed.RANK_EVENTS.format(rank=rank))]  # one voice: rank 0's (workers.distributed)
    publisher = EventPublisher(run_id or uuid.uuid4().hex[:12], own)
    try:
        config = config.resolved()
        if ranks != config.devices:
            raise ValueError(f"devices: the run asks for {config.devices} devices but was started as {ranks} "
                             f"process{'es' if ranks > 1 else ''}; several devices are started by a worker, "
                             f"`mora-studio train --devices N`, or torchrun (README, several devices)")
        if rank == 0:
            config.save(run_dir / "config.json")
        publisher.status("running", "loading model and data", worker=worker)
        return _train(config, run_dir, publisher, should_stop, resume_from)
    except Exception as error:  # the user sees a message; the traceback stays in the log line for developers
        publisher.log(f"{type(error).__name__}: {error}", level="error")
        return record_failure(run_dir, publisher, _user_message(error))


def record_failure(run_dir: Path, publisher: EventPublisher, message: str) -> TrainResult:
    """End a run as failed: its `status` event and its result.json say why (also used by the worker when the
    training process itself was killed and could not say so)."""
    publisher.status("failed", message)
    result = TrainResult("failed", str(run_dir), None, None, 0, None, message)
    if distributed.is_main_process():
        (Path(run_dir) / distributed.RESULT).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


LOWER_MEMORY = "lower batch_size or max_length, or enable gradient_checkpointing"


def _user_message(error: Exception) -> str:
    """What the run's page says. Running out of memory is the failure a user can most often fix, so it says how;
    CUDA's error is checked first (it is a RuntimeError too)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return f"the GPU ran out of memory: {LOWER_MEMORY}"
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
        return f"the machine ran out of memory: {LOWER_MEMORY}"
    if isinstance(error, ValueError):
        return str(error)
    return f"training failed: {type(error).__name__}: {error}"


def _train(config: TrainConfig, run_dir: Path, publisher: EventPublisher, should_stop, resume_from) -> TrainResult:
    dtype = choose_dtype(config.dtype)
    model_info = resolve_model(config.model)
    load_dtype = torch.float32 if config.adapter == "full" else dtype
    quantized = config.quantization != "none"
    device = f"cuda:{distributed_local_rank()}" if quantized else "cpu"  # the Trainer moves an unquantised model
    model, tokenizer = load_model(model_info.name if model_info.is_default else model_info.path, dtype=load_dtype,
                                  device=device, quantization=config.quantization)
    held = f"in {config.quantization}, computing in {load_dtype}" if quantized else f"in {load_dtype}"
    publisher.log(f"model {model_info.name} ({model_info.parameters:,} parameters) loaded {held}")
    data = build_datasets(config.data, tokenizer, config.max_length, eval_path=config.eval_data,
                          eval_fraction=config.eval_fraction, seed=config.seed, pack_text=config.pack_text)
    publisher.emit("data", report=asdict(data.report), schema=data.info.schema, rows=data.info.rows,
                   train_examples=len(data.train), eval_examples=len(data.eval))
    if not data.train:
        raise ValueError(f"{config.data}: no training example left after preparation")
    set_seed(config.seed)
    if config.adapter == "full":
        model.requires_grad_(True)
        trainable = sum(p.numel() for p in model.parameters())
    else:
        info = mora.add_adapter(model, ADAPTER_NAME, adapter_config(config))
        trainable = info.trainable_parameters
        if quantized:  # transformers' own mark for "adapters are attached", without which its Trainer refuses a
            model._hf_peft_config_loaded = True  # quantised model (the base is frozen; only the adapters train)
        budget = f" (LoRA at r={config.r}: {info.lora_equivalent_parameters:,})" if config.adapter == "mora" else ""
        publisher.log(f"{config.adapter} adapter on {len(info.layers)} layers: {trainable:,} trainable parameters{budget}")
    callback = EventCallback(publisher, should_stop)
    callbacks = [callback, CheckpointPruner(config.keep_checkpoints, publisher)]
    if config.remora_steps:
        callbacks.append(RemoraCallback(config.remora_steps, config.remora_warmup, publisher))
    if config.memorize_eval_steps:
        callbacks.append(MemorizeCallback(read_pairs(config.memorize_pairs_file), config.memorize_eval_steps,
                                          tokenizer, publisher))
    if config.eval_generate_steps:
        callbacks.append(GenerationEvalCallback(generation_eval_examples(config), config.eval_generate_steps,
                                                tokenizer, publisher, None if config.adapter == "full" else
                                                ADAPTER_NAME))
    trainer = StudioTrainer(
        model=model,
        args=_training_arguments(config, run_dir, bool(data.eval), dtype),
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id),
        callbacks=callbacks,
        adapter_only=not saves_full_model(config),
    )
    trainer.remove_callback(PrinterCallback)  # progress goes out as events, not as dicts printed to stdout
    if resume_from is not None:
        publisher.log(f"resuming from {resume_from}")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if data.eval and not callback.cancelled:
        trainer.evaluate()
    status = "cancelled" if callback.cancelled else "succeeded"
    message = f"stopped at step {trainer.state.global_step}" if callback.cancelled else "done"
    if not trainer.is_world_process_zero():  # the result is rank 0's to write (workers.distributed)
        publisher.status(status, message)
        return TrainResult(status, str(run_dir), None, None, trainer.state.global_step, callback.last_loss, message)
    output_dir, kind = _save_result(model, tokenizer, config, run_dir, publisher, trainable)
    publisher.status(status, message)
    result = TrainResult(status, str(run_dir), str(output_dir), kind, trainer.state.global_step, callback.last_loss,
                         message)
    (run_dir / distributed.RESULT).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _save_result(model, tokenizer, config: TrainConfig, run_dir: Path, publisher: EventPublisher,
                 trainable: int) -> tuple[Path, str]:
    """Write the adapter (or whole model) and report its size and the effective rank of its update."""
    if saves_full_model(config):
        output_dir = run_dir / "model"
        if config.adapter != "full":
            model = mora.merge_and_unload(model, [ADAPTER_NAME])
        model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        publisher.emit("adapter", path=str(output_dir), output_kind="model", trainable_parameters=trainable,
                       size_bytes=folder_size(output_dir), effective_rank=None, layers=[])
        return output_dir, "model"
    output_dir = run_dir / "adapter"
    mora.save_adapter(model, ADAPTER_NAME, output_dir, base_model_name_or_path=config.model or "")
    spectra = mora.delta_spectrum(model, ADAPTER_NAME)
    info = mora.adapter_info(model, ADAPTER_NAME)
    publisher.emit(
        "adapter", path=str(output_dir), output_kind="adapter", trainable_parameters=trainable,
        size_bytes=folder_size(output_dir), effective_rank=mora.effective_rank_summary(spectra),
        r_hat=sorted(set(info.r_hat.values())),
        layers=[{"layer": s.path, "effective_rank": s.effective_rank, "shape": list(s.shape)} for s in spectra],
    )
    return output_dir, "adapter"
