"""A training run's configuration: every choice a user makes, its default, and its validation.

Defaults follow the paper (MORA_SPEC.md §5): rope for r ≤ 32, sharing above; learning rates per adapter and rank,
sharing at large rank wanting a rate 5–10× lower than rope at r=8. The same dataclass is what the command line,
the queue and the web app build, so one validation serves them all.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

ADAPTERS = ("mora", "lora", "full")
# Mirrors mora.functional's names: this module must import without torch, because the web app validates configs.
MORA_VARIANTS = ("rope", "sharing", "truncation", "decouple", "type2", "type3", "type4")
REFERENCE_TYPES = {"1": "sharing", "2": "type2", "3": "type3", "4": "type4", "6": "rope"}
REMORA_VARIANTS = ("sharing", "type2", "type3", "type4")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration a run cannot start from; the message names the field."""


def canonical_variant(variant: object) -> Optional[str]:
    name = str(variant).strip().lower()
    return REFERENCE_TYPES.get(name, name if name in MORA_VARIANTS else None)


def default_variant(r: int) -> str:
    return "rope" if r <= 32 else "sharing"


def default_learning_rate(adapter: str, r: int, variant: Optional[str] = None) -> float:
    """The paper's instruction-tuning rates: LoRA 2e-4; MoRA rope (small r) 3e-4, sharing (large r) 5e-5."""
    if adapter == "full":
        return 2e-5
    if adapter == "lora":
        return 2e-4
    return 3e-4 if (variant or default_variant(r)) in ("rope", "decouple", "truncation") else 5e-5


def default_lora_alpha(r: int) -> float:
    """The paper's LoRA settings: alpha 16 at r=8, 128 at r=256."""
    return float(max(16, r // 2))


@dataclass
class TrainConfig:
    data: str = field(default="", metadata={"help": "training data file (JSONL, JSON, CSV, Parquet or text)"})
    model: Optional[str] = field(default=None, metadata={"help": "model name or folder (default: the default model)"})
    adapter: str = field(default="mora", metadata={"help": "mora, lora or full (full fine-tuning)"})
    r: int = field(default=8, metadata={"help": "rank: LoRA's r, or MoRA's LoRA-equivalent budget"})
    variant: Optional[str] = field(default=None, metadata={"help": "MoRA variant (default: rope for r ≤ 32, else sharing)"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (default: max(16, r/2))"})
    use_rslora: bool = field(default=False, metadata={"help": "LoRA: scale by alpha/sqrt(r)"})
    dropout: float = field(default=0.0, metadata={"help": "adapter dropout"})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "module names to adapt (default: all block linears)"})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "default per adapter from the paper"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "cosine, linear, constant or constant_with_warmup"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps for linear warm-up"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored when max_steps is set)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: use epochs)"})
    batch_size: int = field(default=4, metadata={"help": "examples per device step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (longer ones are truncated)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, shuffling and the split"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    eval_data: Optional[str] = field(default=None, metadata={"help": "separate evaluation file"})
    eval_fraction: float = field(default=0.0, metadata={"help": "fraction of the data held out for evaluation"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: at the end only, if there is eval data)"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: no intermediate checkpoints)"})
    logging_steps: int = field(default=1, metadata={"help": "report metrics every N steps"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    remora_steps: int = field(default=0, metadata={"help": "MoRA sharing only: ReMoRA merge-and-restart every N steps"})
    remora_warmup: int = field(default=50, metadata={"help": "steps of learning-rate re-warm-up after each ReMoRA merge"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16"})
    name: str = field(default="", metadata={"help": "a name for the run"})
    pack_text: bool = field(default=True, metadata={"help": "raw text: pack documents into max_length blocks (off: one document per example, padded)"})
    memorize_pairs_file: Optional[str] = field(default=None, metadata={"help": "key:value pairs (text JSONL) whose recall is measured by greedy generation"})
    memorize_eval_steps: list[int] = field(default_factory=list, metadata={"help": "steps at which to measure recall of memorize_pairs_file (character accuracy, exact match)"})

    def resolved(self) -> "TrainConfig":
        """A copy with every default filled in, as recorded in the run folder."""
        copy = TrainConfig(**asdict(self))
        if copy.adapter == "mora":
            copy.variant = default_variant(copy.r) if copy.variant is None else canonical_variant(copy.variant)
        if copy.adapter == "lora" and copy.lora_alpha is None:
            copy.lora_alpha = default_lora_alpha(copy.r)
        if copy.learning_rate is None:
            copy.learning_rate = default_learning_rate(copy.adapter, copy.r, copy.variant)
        return copy

    def validate(self) -> None:
        problems = []
        if not self.data:
            problems.append("data: a training file is required")
        if self.adapter not in ADAPTERS:
            problems.append(f"adapter: expected one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        if self.r < 1:
            problems.append(f"r: must be at least 1, got {self.r}")
        if self.variant is not None and self.adapter == "mora" and canonical_variant(self.variant) is None:
            problems.append(f"variant: expected one of {', '.join(MORA_VARIANTS)} (or 1, 2, 3, 4, 6), got {self.variant!r}")
        if self.lr_scheduler not in SCHEDULES:
            problems.append(f"lr_scheduler: expected one of {', '.join(SCHEDULES)}, got {self.lr_scheduler!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate: must be between 0 and 1, got {self.learning_rate}")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_length < 8:
            problems.append(f"max_length: must be at least 8 tokens, got {self.max_length}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps: must be positive or -1, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            problems.append(f"epochs: must be positive, got {self.epochs}")
        if self.remora_steps:
            if self.adapter != "mora":
                problems.append("remora_steps: ReMoRA applies to MoRA adapters only")
            elif canonical_variant(self.resolved().variant) not in REMORA_VARIANTS:
                problems.append("remora_steps: ReMoRA switches groupings, so it needs variant sharing (not rope)")
            if self.remora_steps < 0:
                problems.append(f"remora_steps: must be positive, got {self.remora_steps}")
        problems += self._memorize_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _memorize_problems(self) -> list[str]:
        problems = []
        if self.memorize_eval_steps and not self.memorize_pairs_file:
            problems.append("memorize_eval_steps: name the pairs to test with memorize_pairs_file")
        if self.memorize_pairs_file and not self.memorize_eval_steps:
            problems.append("memorize_pairs_file: give the steps to test at with memorize_eval_steps")
        for step in self.memorize_eval_steps:
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                problems.append(f"memorize_eval_steps: steps must be whole numbers ≥ 0, got {step!r}")
            elif self.max_steps > 0 and step > self.max_steps:
                problems.append(f"memorize_eval_steps: step {step} lies after max_steps={self.max_steps}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        return cls(**values)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
