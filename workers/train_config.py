"""A training run's configuration: every choice a user makes, its default, and its validation.

Defaults follow the paper (MORA_SPEC.md §5): rope for r ≤ 32, sharing above; learning rates per adapter and rank,
sharing at large rank wanting a rate 5–10× lower than rope at r=8. The same dataclass is what the command line,
the queue and the web app build, so one validation serves them all.
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, Optional

from mora import variants
from mora.variants import default_variant

ADAPTERS = ("mora", "lora", "full")
# Mirrors mora.functional's names: this module must import without torch, because the web app validates configs.
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")
"""How the base weights are held: as they are, 4-bit NormalFloat (QLoRA's) or 8-bit, through bitsandbytes."""
MAX_DEVICES = 64


class ConfigError(ValueError):
    """A configuration a run cannot start from; the message names the field."""


class Bound(NamedTuple):
    low: float
    high: float
    why: str
    low_open: bool = False  # True: `low` itself is refused (a rate of 0 trains nothing)
    high_open: bool = False


MAX_STEPS = 10_000_000
"""No optimizer step count beyond this: at 10 steps a second it is 11 days of one run."""
MAX_CHECKPOINTS = 1000
"""save_steps is at least max_steps / MAX_CHECKPOINTS, so one run cannot write thousands of checkpoints."""
MIN_SAVE_STEPS = 10
MAX_NAME_CHARS = 200
MAX_PATH_CHARS = 4096
MAX_TARGET_MODULES = 64
MAX_MODULE_NAME_CHARS = 200
MAX_MEMORIZE_STEPS = 100
MAX_GENERATE_EVALS = 100

# Every numeric setting's bounds and why. A run outside them cannot be useful, or would exhaust the worker before
# its first step; what depends on the model and the device (the memory a step needs) is estimated from the model's
# config.json before launch, in `workers.memory_estimate`.
BOUNDS: dict[str, Bound] = {
    "r": Bound(1, 1024, "a rank above 1024 costs more than many full layers of the models here; use adapter full"),
    "lora_alpha": Bound(0, 10_000, "alpha/r scales the update; a larger scale makes the first steps diverge",
                        low_open=True),
    "dropout": Bound(0, 1, "a probability; 1 would drop every input", high_open=True),
    "learning_rate": Bound(0, 1, "AdamW rates above 1 diverge at the first step; 0 trains nothing",
                           low_open=True, high_open=True),
    "warmup_ratio": Bound(0, 1, "a fraction of the steps", high_open=True),
    "epochs": Bound(0, 1000, "more passes than 1000 only memorise the data", low_open=True),
    "max_steps": Bound(-1, MAX_STEPS, "10 million steps is 11 days at 10 steps a second"),
    "batch_size": Bound(1, 4096, "a larger batch does not fit one device; use grad_accum for larger batches"),
    "grad_accum": Bound(1, 1024, "batch_size × grad_accum examples per optimizer step; more is one step an epoch"),
    "max_length": Bound(8, 131_072, "no model here reads more than 128k tokens at once"),
    "seed": Bound(0, 2**32 - 1, "the random generators take 32-bit seeds"),
    "weight_decay": Bound(0, 1, "AdamW removes lr × weight_decay of each weight every step"),
    "eval_fraction": Bound(0, 1, "a fraction of the data; 1 would leave nothing to train on", high_open=True),
    "eval_steps": Bound(0, MAX_STEPS, "a step count, at most max_steps' bound"),
    "save_steps": Bound(0, MAX_STEPS, "a step count, at most max_steps' bound"),
    "eval_generate_steps": Bound(0, MAX_STEPS, "a step count, at most max_steps' bound"),
    "eval_generate_samples": Bound(1, 1000, "each prompt is answered at every eval_generate_steps; an evaluation "
                                            "holds at most 1000"),
    "keep_checkpoints": Bound(1, MAX_CHECKPOINTS, "the newest checkpoint is what a run resumes from"),
    "logging_steps": Bound(1, MAX_STEPS, "a step count, at most max_steps' bound"),
    "remora_steps": Bound(0, MAX_STEPS, "a step count, at most max_steps' bound"),
    "remora_warmup": Bound(0, MAX_STEPS, "a step count, at most max_steps' bound"),
    "devices": Bound(1, MAX_DEVICES, f"one job on more than {MAX_DEVICES} devices is started with torchrun on each "
                                     "host, not by one worker (README, several devices)"),
}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _bound_problem(name: str, value: float, bound: Bound) -> Optional[str]:
    too_low = value <= bound.low if bound.low_open else value < bound.low
    too_high = value >= bound.high if bound.high_open else value > bound.high
    if not (too_low or too_high):
        return None
    low = f"above {bound.low:g}" if bound.low_open else f"at least {bound.low:g}"
    high = f"below {bound.high:g}" if bound.high_open else f"at most {bound.high:g}"
    shown = _describe(value) if isinstance(value, int) else f"{value:g}"
    return f"{name}: must be {low} and {high} ({bound.why}), got {shown}"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ConfigError(f"{name}: expected a whole number, got {_describe(value)}") from None
    if isinstance(number, float) and math.isfinite(number) and number == int(number):
        return int(number)
    raise ConfigError(f"{name}: expected a whole number, got {_describe(value)}")


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    number = value
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {_describe(value)}") from None
    if not isinstance(number, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {_describe(value)}")
    try:
        number = float(number)
    except OverflowError:
        raise ConfigError(f"{name}: {_describe(value)} is too large a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}: expected a finite number, got {_describe(value)}")
    return number


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{name}: expected true or false, got {_describe(value)}")


def _to_str(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # variant: 6 is the reference's rope
        return str(value)
    raise ConfigError(f"{name}: expected text, got {_describe(value)}")


def _to_list(name: str, value: Any, item: type) -> list:
    items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{name}: expected a list, got {_describe(value)}")
    convert = _to_int if item is int else _to_str
    return [convert(name, entry) for entry in items]


_COERCERS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def coerce_value(name: str, annotation: Any, value: Any) -> Any:
    """One setting's value as its field's type: "1e-4" → 1e-4, "8" or 8.0 → 8, "yes" → True, "a, b" → [a, b];
    anything else raises ConfigError naming the setting and what was found."""
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        annotation = next(arg for arg in args if arg is not type(None))
    if value is None:
        raise ConfigError(f"{name}: a value is required (got nothing)")
    if typing.get_origin(annotation) is list:
        return _to_list(name, value, typing.get_args(annotation)[0])
    return _COERCERS[annotation](name, value)


def canonical_variant(variant: object) -> Optional[str]:
    """The variant's registered name (`mora.variants`, which imports no torch), or None for an unknown one."""
    try:
        return variants.normalize_variant(variant)
    except ValueError:
        return None


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
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept: the newest N, plus the best by eval loss"})
    logging_steps: int = field(default=1, metadata={"help": "report metrics every N steps"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    remora_steps: int = field(default=0, metadata={"help": "MoRA sharing only: ReMoRA merge-and-restart every N steps"})
    remora_warmup: int = field(default=50, metadata={"help": "steps of learning-rate re-warm-up after each ReMoRA merge"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16"})
    name: str = field(default="", metadata={"help": "a name for the run"})
    pack_text: bool = field(default=True, metadata={"help": "raw text: pack documents into max_length blocks (off: one document per example, padded)"})
    eval_generate_steps: int = field(default=0, metadata={"help": "every N steps, answer a fixed sample of the eval split (else of the training rows) by greedy generation and score it (exact match, character accuracy, token F1, ROUGE-L, answer loss): curves beside the loss (0: off)"})
    eval_generate_samples: int = field(default=16, metadata={"help": "how many prompts eval_generate_steps answers each time (the same ones every time)"})
    memorize_pairs_file: Optional[str] = field(default=None, metadata={"help": "key:value pairs (text JSONL) whose recall is measured by greedy generation"})
    memorize_eval_steps: list[int] = field(default_factory=list, metadata={"help": "steps at which to measure recall of memorize_pairs_file (character accuracy, exact match)"})
    devices: int = field(default=1, metadata={"help": "devices one run trains on together, data-parallel (DDP under torchrun): GPUs, or CPU processes on a CPU; batch_size is per device, so a step takes devices × batch_size × grad_accum examples"})
    quantization: str = field(default="none", metadata={"help": "how the frozen base is held: none, nf4 (4-bit, QLoRA) or int8, through bitsandbytes on a CUDA GPU; adapters stay in float32"})

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
        """Every problem at once, each naming its setting; types first, since bounds compare numbers."""
        problems = self._type_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        problems += self._bound_problems()
        if not self.data:
            problems.append("data: a training file is required")
        if self.adapter not in ADAPTERS:
            problems.append(f"adapter: expected one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        if self.r < 1:
            problems.append(f"r: must be at least 1, got {self.r}")
        if self.variant is not None and self.adapter == "mora" and canonical_variant(self.variant) is None:
            types = ", ".join(str(number) for number in sorted(variants.reference_types()))
            problems.append(f"variant: expected one of {', '.join(variants.variant_names())} (or {types}), "
                            f"got {self.variant!r}")
        if self.lr_scheduler not in SCHEDULES:
            problems.append(f"lr_scheduler: expected one of {', '.join(SCHEDULES)}, got {self.lr_scheduler!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        problems += self._quantization_problems()
        if self.max_steps == 0:
            problems.append("max_steps: must be positive or -1 (use epochs), got 0")
        if self.save_steps and self.save_steps < self.min_save_steps():
            problems.append(f"save_steps: must be 0 (no checkpoints) or at least {self.min_save_steps()} "
                            f"(at least {MIN_SAVE_STEPS}, and max_steps / {MAX_CHECKPOINTS} so a run writes at most "
                            f"{MAX_CHECKPOINTS} checkpoints), got {self.save_steps}")
        if self.remora_steps:
            if self.adapter != "mora":
                problems.append("remora_steps: ReMoRA applies to MoRA adapters only")
            elif canonical_variant(self.resolved().variant) not in variants.remora_variants():
                problems.append("remora_steps: ReMoRA switches groupings, so it needs variant sharing (not rope)")
        problems += self._memorize_problems()
        problems += self._generate_eval_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def min_save_steps(self) -> int:
        return max(MIN_SAVE_STEPS, math.ceil(self.max_steps / MAX_CHECKPOINTS))

    def _type_problems(self) -> list[str]:
        """A config built directly (not through `from_dict`) can still hold a wrong type: name it."""
        problems = []
        for f, annotation in _field_types().items():
            try:
                if coerce_value(f, annotation, getattr(self, f)) != getattr(self, f):
                    raise ConfigError(f"{f}: expected {_type_name(annotation)}, got {_describe(getattr(self, f))}")
            except ConfigError as error:
                problems.append(str(error))
        return problems

    def _bound_problems(self) -> list[str]:
        problems = []
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and (problem := _bound_problem(name, value, bound)):
                problems.append(problem)
        for name in ("name", "data", "eval_data", "memorize_pairs_file", "model"):
            value = getattr(self, name)
            limit = MAX_NAME_CHARS if name == "name" else MAX_PATH_CHARS
            if value is not None and len(value) > limit:
                problems.append(f"{name}: at most {limit} characters, got {len(value)}")
        modules = self.target_modules or []
        if len(modules) > MAX_TARGET_MODULES or any(len(m) > MAX_MODULE_NAME_CHARS for m in modules):
            problems.append(f"target_modules: at most {MAX_TARGET_MODULES} names of at most "
                            f"{MAX_MODULE_NAME_CHARS} characters, got {len(modules)}")
        if len(self.memorize_eval_steps) > MAX_MEMORIZE_STEPS:
            problems.append(f"memorize_eval_steps: at most {MAX_MEMORIZE_STEPS} steps (each one generates an "
                            f"answer for every pair), got {len(self.memorize_eval_steps)}")
        return problems

    def _quantization_problems(self) -> list[str]:
        if self.quantization not in QUANTIZATIONS:
            return [f"quantization: expected one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"]
        if self.quantization == "none":
            return []
        if self.adapter == "full":
            return [f"quantization: {self.quantization} holds the base frozen in {self.quantization}, and full "
                    "fine-tuning trains the base itself: use adapter mora or lora"]
        if self.remora_steps:
            return ["quantization: ReMoRA folds M into the base weights, which a quantised base cannot take: set "
                    "remora_steps to 0 or quantization to none"]
        if self.dtype == "float32":
            return ["quantization: a quantised base computes in bfloat16 or float16; set dtype auto, bfloat16 or "
                    "float16"]
        return []

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

    def _generate_eval_problems(self) -> list[str]:
        if self.eval_generate_steps and self.max_steps > 0 and self.max_steps / self.eval_generate_steps > \
                MAX_GENERATE_EVALS:
            return [f"eval_generate_steps: at most {MAX_GENERATE_EVALS} generation evals a run (each answers "
                    f"eval_generate_samples prompts), so at least {math.ceil(self.max_steps / MAX_GENERATE_EVALS)} "
                    f"for max_steps={self.max_steps}, got {self.eval_generate_steps}"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The one way in from outside (YAML, the form, the queue): unknown settings refused, each value coerced
        to its field's type with a message naming the setting (`coerce_value`). Bounds are `validate`'s."""
        if not isinstance(values, dict):
            raise ConfigError(f"the settings must be a mapping of names to values, got {type(values).__name__}")
        types = _field_types()
        unknown = sorted(str(key) for key in values if key not in types)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(types))}")
        problems, coerced = [], {}
        for name, value in values.items():
            try:
                coerced[name] = coerce_value(name, types[name], value)
            except ConfigError as error:
                problems.append(str(error))
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**coerced)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_name(annotation: Any) -> str:
    plain = next((arg for arg in typing.get_args(annotation) if arg is not type(None)), annotation)
    if typing.get_origin(plain) is list:
        return "a list"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(plain, str(plain))
