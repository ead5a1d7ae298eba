"""The benchmark's presets and methods, scaled from the paper's figures to a model's width (see `app.bench`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional, Sequence, Union

from mora.variants import ablation_variants
from workers.train_config import TrainConfig

PAPER_WIDTH = 4096
PAPER_BUDGETS = (8, 256)
PAPER_LEARNING_RATES = {"full": 2e-5, "lora": 3.5e-4, "rope": 4.5e-4, "sharing": 6e-5}
PAPER_CHECKPOINTS = (300, 500, 700, 900)
PAPER_TABLE2 = {  # MORA_SPEC.md §6: character accuracy (%) on LLaMA-2-7B, 10k pairs
    "full fine-tuning": (42.5, 100, 100, 100),
    "LoRA r=8": (9.9, 10.0, 10.7, 54.2),
    "MoRA r=8": (10.1, 15.7, 87.4, 100),
    "LoRA r=256": (9.9, 70.6, 100, 100),
    "MoRA r=256": (41.6, 100, 100, 100),
}
ABLATION = ablation_variants()  # the paper's Table 4, in its order, from the variant registry
"""The paper's Table 4: MoRA's compression variants, compared at the small budget."""


@dataclass(frozen=True)
class Method:
    adapter: str
    r: int = 8
    variant: Optional[str] = None
    lora_alpha: Optional[float] = None
    base_learning_rate: float = 0.0
    """The paper's rate for this method, before width scaling and the sweep."""

    @property
    def key(self) -> str:
        return method_key(self.adapter, self.r, self.variant)

    @property
    def label(self) -> str:
        return method_label(self.adapter, self.r, self.variant)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: Optional[str]
    """A model name or folder; None is the default model (SmolLM2-135M-Instruct)."""
    width: int
    """The model's hidden size, from which the budgets and learning rates are scaled."""
    pairs: int
    steps: int
    batch_size: int
    max_length: int
    lr_factors: tuple[float, ...]

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(max(1, round(self.steps * k / 9)) for k in (3, 5, 7, 9))

    @property
    def budgets(self) -> tuple[int, int]:
        return tuple(_power_of_two(r * self.width / PAPER_WIDTH) for r in PAPER_BUDGETS)

    @property
    def epochs(self) -> float:
        return self.steps * self.batch_size / self.pairs

    def learning_rates(self, base: float) -> tuple[float, ...]:
        return tuple(_round(base * PAPER_WIDTH / self.width * factor) for factor in self.lr_factors)

    def run_configs(self, data: str, seed: int, ablation: bool = False) -> list[TrainConfig]:
        """Every run of one seed on the pairs file `data`: a checked TrainConfig per method and learning rate, all
        with the same seed, batch, steps and checkpoints (`app.bench.plan` queues them; the GPU check trains them
        in place, without the store)."""
        configs = []
        for method in self.methods(ablation):
            for learning_rate in self.learning_rates(method.base_learning_rate):
                config = TrainConfig(
                    data=data, model=self.model, adapter=method.adapter, r=method.r, variant=method.variant,
                    lora_alpha=method.lora_alpha, learning_rate=learning_rate, max_steps=self.steps,
                    batch_size=self.batch_size, max_length=self.max_length, seed=seed, pack_text=False,
                    memorize_pairs_file=data, memorize_eval_steps=list(self.checkpoints),
                    name=f"{method.label} · lr {learning_rate:g} · seed {seed}")
                config.validate()
                configs.append(config)
        return configs

    def methods(self, ablation: bool = False) -> tuple[Method, ...]:
        small, large = self.budgets
        if ablation:
            return tuple(Method("mora", small, variant, base_learning_rate=PAPER_LEARNING_RATES["rope"])
                         for variant in ABLATION)
        return (
            Method("full", base_learning_rate=PAPER_LEARNING_RATES["full"]),
            Method("lora", small, lora_alpha=2.0 * small, base_learning_rate=PAPER_LEARNING_RATES["lora"]),
            Method("mora", small, "rope", base_learning_rate=PAPER_LEARNING_RATES["rope"]),
            Method("lora", large, lora_alpha=large / 2, base_learning_rate=PAPER_LEARNING_RATES["lora"]),
            Method("mora", large, "sharing", base_learning_rate=PAPER_LEARNING_RATES["sharing"]),
        )


def _power_of_two(value: float) -> int:
    return 2 ** max(0, round(math.log2(max(value, 1.0))))


def _round(value: float) -> float:
    return float(f"{value:.2g}")


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        description=(
            "SmolLM2-135M on two CPU cores, about 20 minutes a seed. 16 pairs, batch 4, 45 steps (checkpoints 15, "
            "25, 35, 45: about 11 passes over the pairs, as 900 steps at batch 128 over 10k pairs would be), "
            "max_length 80 (a pair is 61-72 tokens with its end-of-text token). 10 runs a seed (5 methods x 2 "
            "learning rates). Measured on 2 quiet cores, medians of whole runs including model load, four recalls "
            "of the 16 pairs and the save: LoRA r=1 96 s, MoRA r=1 rope 115 s, LoRA r=32 109 s, MoRA r=32 "
            "sharing 108 s, full fine-tuning 126 s; 3 seeds (30 runs) took 59 minutes."),
        model=None, width=576, pairs=16, steps=45, batch_size=4, max_length=80, lr_factors=(0.5, 2.0)),
    "gpu": Preset(
        name="gpu",
        description=(
            "SmolLM2-135M on one large GPU (an H200), estimated at about 10 minutes a seed, not measured. "
            "1000 pairs, batch 64, 180 steps (checkpoints 60, 100, 140, 180; about 11.5 passes over the data), "
            "max_length 80, three learning rates per method: 15 runs of roughly 30-40 s each (a step of this small "
            "model takes tens of milliseconds; recall of 1000 pairs in batches of 256 a few seconds per checkpoint)."),
        model=None, width=576, pairs=1000, steps=180, batch_size=64, max_length=80, lr_factors=(0.5, 1.0, 2.0)),
}
_HIDDEN_PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", description="The tests' tiny random Llama ('tiny-llama' in MORA_MODELS_DIR): a few seconds.",
        model="tiny-llama", width=64, pairs=4, steps=9, batch_size=2, max_length=96, lr_factors=(1.0,)),
}


def with_lr_factors(preset: Union[str, Preset], factors: Sequence[float]) -> Preset:
    """The preset with another learning-rate sweep, for when a method's best rate lies at an edge of the preset's."""
    factors = tuple(float(f) for f in factors)
    if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
        raise ValueError(f"learning-rate factors must be positive numbers, got {' '.join(map(str, factors)) or 'none'}")
    return replace(get_preset(preset), lr_factors=factors)


def offered_presets(installed_models: Iterable[str]) -> list[str]:
    """The presets the studio offers: the public ones, and any other whose model is installed here (a preset is
    only worth a button when its model can load)."""
    installed = set(installed_models)
    return list(PRESETS) + [name for name, preset in _HIDDEN_PRESETS.items() if preset.model in installed]


def get_preset(preset: Union[str, Preset]) -> Preset:
    if isinstance(preset, Preset):
        return preset
    found = PRESETS.get(preset) or _HIDDEN_PRESETS.get(preset)
    if found is None:
        raise ValueError(f"unknown preset {preset!r}; the presets are {', '.join(PRESETS)}")
    return found



def method_key(adapter: str, r: int, variant: Optional[str]) -> str:
    if adapter == "full":
        return "full"
    return f"lora r={r}" if adapter == "lora" else f"mora r={r} {variant}"


def method_label(adapter: str, r: int, variant: Optional[str]) -> str:
    if adapter == "full":
        return "full fine-tuning"
    return f"LoRA r={r}" if adapter == "lora" else f"MoRA r={r} ({variant})"


def method_order(config: dict[str, Any]) -> tuple:
    """The paper's order: full fine-tuning, then by budget, LoRA before MoRA, MoRA variants as in Table 4."""
    adapter, variant = config["adapter"], config.get("variant")
    variant_rank = ABLATION.index(variant) if variant in ABLATION else len(ABLATION)
    return (adapter != "full", config["r"] if adapter != "full" else 0, adapter == "mora", variant_rank)

