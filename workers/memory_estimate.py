"""How much memory a training run will need, from the model's shapes and the run's settings alone, before launch.

The web process shows it beside the Launch button and refuses a run that fits no training worker, so a run too big
for its device is told so with numbers instead of being killed at its first step. Torch-free (the web process imports
it); the shapes come from `workers.model_shapes`.

The figure is the peak of one training step, as the sum of:
- the base weights, in the dtype they are loaded in (float32 on a CPU; bfloat16 on a GPU; full fine-tuning float32);
- the trainable parameters (the adapters are float32) and AdamW's two moments, held for the whole run, and their
  gradients, which the backward makes as it frees the activations (so the peak takes the larger of the two);
- the activations saved for the backward pass, for batch_size × max_length tokens (a packed or padded batch is never
  longer): per block, the inputs the linears, norms, attention and SwiGLU keep, and the adapter branches' own; with
  gradient checkpointing only each block's input, plus one block recomputed at a time;
- the logits and the loss: the LM head's output and four float32 copies (the shifted logits, their log-softmax and
  the gradients of both); for a 49k vocabulary this is the largest term with gradient checkpointing;
- the process itself: Python, torch and transformers on a CPU, the CUDA context on a GPU; and a margin for the
  allocator's fragmentation.
It was checked against the peak resident memory of real CPU runs of the default model (README, "Memory before
launch"); the calibration test keeps it within its stated margin.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from mora.variants import get_variant, r_hat
from workers.formatting import format_bytes
from workers.model_shapes import ModelShapes, _targeted
from workers.train_config import TrainConfig

GIB = 2**30
CPU_PROCESS_BYTES = int(0.55 * GIB)  # python + torch + transformers + tokenizers, resident, before the model
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # the CUDA context and kernels, outside torch's allocator
FRAGMENTATION = 1.10  # the allocators hold about a tenth more than the live tensors at the peak
LOGIT_COPIES = 4  # float32: the shifted logits, their log-softmax, and the gradients of both in the backward
FITS_FRACTION = 0.92  # what of a device's memory a run may plan to use: the rest is the system's and the chat's


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of one training step's peak; `total` adds the process and the allocator margin."""
    weights: int
    trainable: int
    optimizer: int
    activations: int
    logits: int
    process: int
    tokens: int
    gradient_checkpointing: bool

    @property
    def total(self) -> int:
        """Weights and AdamW's moments stay for the whole run; the gradients are made as the backward frees the
        activations (the Trainer sets them to None after each step), so the step's peak is the larger of the two."""
        tensors = self.weights + self.optimizer + max(self.activations + self.logits, self.trainable)
        return int(tensors * FRAGMENTATION) + self.process

    def parts(self) -> list[tuple[str, int]]:
        peak = max(self.activations + self.logits, self.trainable)
        return [("weights", self.weights), ("optimizer state (AdamW)", self.optimizer),
                ("saved activations", self.activations), ("logits and loss", self.logits),
                ("gradients (made as the activations are freed)", self.trainable),
                ("process and margin", self.total - self.weights - self.optimizer - peak)]


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""A 4-bit NF4 weight: half a byte, plus its block's absmax (one per 64 weights, itself 8-bit with double quantisation)
and the second level's float32 constant per 256 blocks."""
INT8_BYTES = 1.0  # plus one float32 scale a row: under a hundredth of a byte a weight at the widths here


def _base_bytes(shapes: ModelShapes, config: TrainConfig, device_kind: str) -> int:
    """The frozen base: quantisation holds the blocks' linear layers in 4 or 8 bits, the rest (embeddings, norms, an
    untied head) in the compute dtype; otherwise every weight in the dtype it is loaded in."""
    if config.adapter == "full":
        return 0
    weight_bytes = _weight_bytes(config, device_kind)
    if config.quantization == "none":
        return shapes.parameters * weight_bytes
    linears = sum(k * d for _, k, d in shapes.linear_layers())
    held = NF4_BYTES if config.quantization == "nf4" else INT8_BYTES
    return int(linears * held) + (shapes.parameters - linears) * weight_bytes


def _weight_bytes(config: TrainConfig, device_kind: str) -> int:
    if config.adapter == "full" or config.dtype == "float32":
        return 4
    if config.dtype in ("bfloat16", "float16"):
        return 2
    return 2 if device_kind == "cuda" else 4  # "auto": bfloat16 on a GPU, float32 on a CPU


def _activation_bytes(config: TrainConfig, device_kind: str) -> int:
    if config.adapter == "full":
        return 2 if device_kind == "cuda" else 4  # bf16 autocast on a GPU
    return _weight_bytes(config, device_kind)


def _adapter_layers(shapes: ModelShapes, target_modules: Optional[Sequence[str]]) -> list[tuple[str, int, int]]:
    return [(path, k, d) for path, k, d in shapes.linear_layers() if _targeted(path, target_modules)]


def trainable_parameters(shapes: ModelShapes, config: TrainConfig) -> int:
    if config.adapter == "full":
        return shapes.parameters
    layers = _adapter_layers(shapes, config.target_modules)
    if config.adapter == "mora":
        return sum(r_hat(k, d, config.r, config.variant) ** 2 for _, k, d in layers)
    return sum((k + d) * config.r for _, k, d in layers)


def _block_values_per_token(shapes: ModelShapes, config: TrainConfig, act_bytes: int = 4) -> int:
    """Values one block keeps for its backward, per token: the two norms' inputs and outputs, q/k/v (rotated) and
    the attention output, SwiGLU's gate, its activation, up and their product; plus each adapted layer's branch
    (MoRA: the compressed input; a per-chunk variant's fused path keeps the layer's input itself, counted above, and
    a copy only when it is dropped out or cast up to the adapters' float32; LoRA: its r-wide middle and, with
    dropout, the dropped input). `act_bytes` is the size of one value as counted here."""
    h, f = shapes.hidden_size, shapes.intermediate_size
    q, kv = shapes.num_heads * shapes.head_dim, shapes.kv_size
    values = 4 * h + 3 * q + 2 * kv + 4 * f
    if config.adapter == "full":
        return values
    per_block = [layer for layer in _adapter_layers(shapes, config.target_modules)
                 if layer[0].startswith("model.layers.0.")]
    if config.adapter == "mora" and get_variant(config.variant).per_chunk:
        if config.dropout or act_bytes < 4:  # a float32 copy of the input, in values of act_bytes
            values += sum(k for _, k, _ in per_block) * 4 // act_bytes
    elif config.adapter == "mora":
        values += sum(r_hat(k, d, config.r, config.variant) for _, k, d in per_block)  # the compressed input
    else:
        values += sum(config.r + (k if config.dropout else 0) for _, k, _ in per_block)
    return values


def estimate(shapes: ModelShapes, config: TrainConfig, device_kind: str = "cpu") -> MemoryEstimate:
    """The peak memory of one training step of `config` (resolved) on a `device_kind` ("cpu" or "cuda") device; with
    several devices, on each of them."""
    tokens = config.batch_size * config.max_length
    weight_bytes, act_bytes = _weight_bytes(config, device_kind), _activation_bytes(config, device_kind)
    trainable = trainable_parameters(shapes, config)
    trainable_bytes = 4  # adapters and a full fine-tune's master weights are float32
    base = _base_bytes(shapes, config, device_kind)
    block = _block_values_per_token(shapes, config, act_bytes) * tokens * act_bytes
    if config.gradient_checkpointing:
        activations = shapes.num_layers * shapes.hidden_size * tokens * act_bytes + block
    else:
        activations = shapes.num_layers * block
    logits = tokens * shapes.vocab_size * (act_bytes + LOGIT_COPIES * 4)
    # several devices (DDP): each holds the whole model and its own batch_size × max_length, as one device does, and
    # its reducer's buckets: one more copy of the trainable gradients, all-reduced while the backward runs
    buckets = trainable * trainable_bytes if config.devices > 1 else 0
    return MemoryEstimate(
        weights=base + trainable * trainable_bytes + buckets,
        trainable=trainable * trainable_bytes, optimizer=2 * trainable * trainable_bytes, activations=activations,
        logits=logits, process=CUDA_CONTEXT_BYTES if device_kind == "cuda" else CPU_PROCESS_BYTES, tokens=tokens,
        gradient_checkpointing=config.gradient_checkpointing)


def fit_report(shapes: ModelShapes, config: TrainConfig, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimate for each kind of connected training worker, and whether the run fits any of them: what the
    Train tab shows and what the service checks before recording a run. No training worker connected: nothing to
    refuse against (the run waits in the queue), but the estimate for a CPU is still given."""
    trainers = [w for w in training_workers(workers) if w.get("memory_gb")]
    kinds = sorted({w.get("kind", "cpu") for w in trainers}) or ["cpu"]
    estimates = {kind: estimate(shapes, config, kind) for kind in kinds}
    fits = [w for w in trainers if estimates[w.get("kind", "cpu")].total <= w["memory_gb"] * GIB * FITS_FRACTION
            and can_take(w, config)]
    other = None if config.gradient_checkpointing else estimate(
        shapes, replace(config, gradient_checkpointing=True), kinds[-1]).total
    return {"estimates": estimates, "workers": trainers, "fits": fits, "with_checkpointing": other}


def training_workers(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The roster's workers that take training jobs."""
    return [w for w in workers if "train" in w.get("queues", [])]


def worker_devices(worker: dict[str, Any]) -> int:
    """The devices a training worker can give one run: its GPUs, or one for a CPU worker."""
    return max(1, worker.get("gpus") or 0)


def worker_quantizes(worker: dict[str, Any]) -> bool:
    """Whether a worker can hold a quantised base: a CUDA worker that announced no reason it cannot."""
    return worker.get("kind") == "cuda" and "quantization_problem" in worker and not worker["quantization_problem"]


def can_take(worker: dict[str, Any], config: TrainConfig) -> bool:
    """Whether a training worker has the devices the run asks for and, for a quantised base, the backend."""
    return config.devices <= worker_devices(worker) and (config.quantization == "none" or worker_quantizes(worker))


def refusal_message(config: TrainConfig, report: dict[str, Any]) -> Optional[str]:
    """Why the run of `report` (from `fit_report`) cannot fit any connected training worker, with the numbers and
    what to lower; None if it fits one (or none is connected: the run waits for one)."""
    if not report["workers"] or report["fits"]:
        return None
    able = [w for w in report["workers"] if can_take(w, config)]
    if not able:
        wants = [f"{config.devices} devices"] if config.devices > 1 else []
        wants += [f"a {config.quantization} base (bitsandbytes on a CUDA GPU)"] if config.quantization != "none" else []
        has = "; ".join(f"{w['name']}: {worker_devices(w)} device(s)"
                        + (f", {w['quantization_problem']}" if w.get("quantization_problem") else "")
                        for w in report["workers"])
        return f"this run asks for {' and '.join(wants)}, which no connected training worker has ({has})"
    largest = max(able, key=lambda w: w["memory_gb"])
    need = report["estimates"][largest.get("kind", "cpu")].total
    advice = "lower batch_size or max_length"
    if report["with_checkpointing"]:
        advice += f", or enable gradient_checkpointing (about {format_bytes(report['with_checkpointing'])})"
    return (f"this run needs about {format_bytes(need)} of memory ({config.batch_size} × {config.max_length} tokens a step) "
            f"and the largest training worker, {largest['name']}, has {largest['memory_gb']:g} GiB, of which "
            f"{int(FITS_FRACTION * 100)}% may be planned for: {advice}")
