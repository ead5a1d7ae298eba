"""The Train tab's logic: turn form values into a run config, launch one run or a MoRA/LoRA pair at the same
budget, show MoRA's r̂ and parameter count beside LoRA's, and keep named presets."""
from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from app.service import StudioService, check_config
from storage.records import RunRecord
from workers import api, memory_estimate, model_shapes
from workers.formatting import format_bytes
from workers.models import ModelError
from workers.train_config import ConfigError, TrainConfig, default_learning_rate, default_variant

FORM_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name not in ("data", "eval_data"))
AUTO = "auto"
ZERO_MEANS_DEFAULT = ("learning_rate", "lora_alpha")  # a number box can't be blank; 0 there means "the default"


def config_from_form(values: dict[str, Any], data_path: str) -> TrainConfig:
    """Form values (blank meaning "the default") to a checked TrainConfig, the service's one check
    (`check_config`); raises ConfigError naming the field."""
    cleaned: dict[str, Any] = {"data": data_path}
    for name in FORM_FIELDS:
        value = values.get(name)
        if value in (None, "", AUTO) or (name in ZERO_MEANS_DEFAULT and value == 0):
            continue
        cleaned[name] = value
    # the one conversion (number boxes' floats, "a, b" lists, with messages), then the one check
    return check_config(TrainConfig.from_dict(cleaned))


def defaults_note(adapter: str, r: int, variant: Optional[str]) -> str:
    variant = None if variant in (None, "", AUTO) else variant
    chosen = variant or (default_variant(int(r)) if adapter == "mora" else None)
    lr = default_learning_rate(adapter, int(r), chosen)
    parts = [f"default learning rate {lr:g}"]
    if adapter == "mora":
        parts.insert(0, f"variant {chosen}" + ("" if variant else " (the paper's choice at this r)"))
    return " · ".join(parts)


def budget_markdown(model: Optional[str], r: int, variant: Optional[str], adapter: str) -> str:
    """MoRA's r̂ and trainable parameters beside LoRA's at the same r, computed by a worker from the real layers."""
    if adapter == "full":
        return "Full fine-tuning trains every weight of the model."
    variant = None if variant in (None, "", AUTO) else variant
    try:
        reply = parameter_budget(model, int(r), variant or default_variant(int(r)))
    except Exception as error:  # no worker yet: the form still works, it just can't show the figures
        return f"_Parameter budget unavailable: {error}_"
    if "error" in reply:
        return f"_Parameter budget unavailable: {reply['error']}_"
    sides = sorted({row["r_hat"] for row in reply["layers"]})
    side_text = f"{sides[0]}" if len(sides) == 1 else f"{sides[0]}–{sides[-1]}"
    mora, lora = reply["mora_parameters"], reply["lora_parameters"]
    return (f"| at r = {int(r)} | per layer | trainable parameters |\n|---|---|---|\n"
            f"| **MoRA** ({variant or default_variant(int(r))}) | square M, r̂ = {side_text} | **{mora:,}** |\n"
            f"| LoRA | A: r × in, B: out × r | {lora:,} |\n\n"
            f"{len(reply['layers'])} layers adapted; MoRA uses {100 * mora / lora:.1f}% of LoRA's budget "
            f"with rank up to {sides[-1]} instead of {int(r)}.")


MEMORY_FIELDS = ("model", "adapter", "r", "variant", "batch_size", "max_length", "gradient_checkpointing", "dtype",
                 "target_modules", "dropout")


def memory_markdown(service: StudioService, values: dict[str, Any]) -> str:
    """The pre-flight memory estimate shown beside the Launch button: the peak of one step, its largest parts, and
    which connected training workers it fits (the service refuses a run that fits none, with the same numbers)."""
    try:
        config = config_from_form(values, data_path="(the dataset chosen above)")
        report = service.memory_report(config)
    except (ConfigError, ModelError, ValueError) as error:
        return f"_Memory estimate unavailable: {error}_"
    if report is None:
        return "_Memory estimate unavailable for this architecture (only Llama-like models are described)._"
    estimates = report["estimates"]
    lines = []
    for kind, estimate in estimates.items():
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in estimate.parts() if size)
        lines.append(f"**Memory: about {format_bytes(estimate.total)}** a step on a {kind.upper()} "
                     f"({config.batch_size} × {config.max_length} tokens): {parts}.")
    if not report["workers"]:
        lines.append("No training worker is connected yet; the run will wait for one.")
    elif report["fits"]:
        names = ", ".join(f"{w['name']} ({w['memory_gb']:g} GiB)" for w in report["fits"])
        lines.append(f"✅ Fits {names}.")
    else:
        lines.append(f"⛔ {memory_estimate.refusal_message(config, report)}.")
    if report["with_checkpointing"] and (report["fits"] or not report["workers"]):
        lines.append(f"With gradient checkpointing: about {format_bytes(report['with_checkpointing'])}.")
    return "  \n".join(lines)


def parameter_budget(model: Optional[str], r: int, variant: str) -> dict[str, Any]:
    """MoRA's and LoRA's budget, from the model's config.json here (Llama-like models: no torch, no waiting on a
    worker), or from a worker, which builds any other architecture on the meta device."""
    try:
        shapes = model_shapes.shapes_for(model)
    except ModelError as error:
        return {"error": str(error)}
    if shapes is not None:
        return model_shapes.parameter_budget(shapes, r, variant)
    return api.call_worker("budget", {"model": model, "r": r, "variant": variant}, timeout_s=20)


def launch_from_form(service: StudioService, values: dict[str, Any], dataset_id: Optional[int],
                     pair: bool) -> list[RunRecord]:
    """Check the form and queue one run, or the MoRA/LoRA pair; nothing is queued if anything is wrong."""
    if dataset_id is None:
        raise ConfigError("dataset: upload a dataset in the Data tab, then choose it here")
    dataset = service.dataset(int(dataset_id))
    config = config_from_form(values, dataset.path)
    if pair:
        return list(launch_pair(service, config, dataset.id, name=values.get("name") or ""))
    return [service.launch(config, name=values.get("name") or "", dataset_id=dataset.id)]


def launch_pair(service: StudioService, config: TrainConfig, dataset_id: Optional[int],
                name: str = "") -> tuple[RunRecord, RunRecord]:
    """MoRA and LoRA at the same r, data and seed, as one group; each takes its own paper default learning rate
    unless the user set one, which both then use. Both are checked before either is queued."""
    group = name or f"MoRA vs LoRA r={config.r} {datetime.now():%Y-%m-%d %H:%M:%S}"
    mora = check_config(replace(config, adapter="mora", variant=config.variant if config.adapter == "mora" else None,
                                name=""))
    lora = check_config(replace(config, adapter="lora", variant=None, name=""))
    first = service.launch(mora, name=f"{group} · MoRA", group_name=group, dataset_id=dataset_id)
    second = service.launch(lora, name=f"{group} · LoRA", group_name=group, dataset_id=dataset_id)
    return first, second


_PRESET_NAME = re.compile(r"[^A-Za-z0-9 _.-]+")


def preset_path(folder: Path, name: str) -> Path:
    """A preset's file: the name is reduced to safe characters, so it always stays inside `folder`."""
    safe = _PRESET_NAME.sub("", name).strip(" .")
    if not safe:
        raise ValueError("preset name: use letters, digits, spaces, '-', '_' or '.'")
    return Path(folder) / f"{safe}.json"


def save_preset(folder: Path, name: str, values: dict[str, Any]) -> Path:
    path = preset_path(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: values.get(k) for k in FORM_FIELDS if k in values}, indent=2) + "\n")
    return path


def load_preset(folder: Path, name: str) -> dict[str, Any]:
    path = preset_path(folder, name)
    if not path.exists():
        raise ValueError(f"preset '{name}' does not exist")
    values = json.loads(path.read_text())
    return {k: v for k, v in values.items() if k in FORM_FIELDS}


def list_presets(folder: Path) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.json"))
