"""Exports of real run folders (the tiny model with MoRA, LoRA and full fine-tuning results, as training saves them,
recorded in a real SQLite store), each checked by loading it back with another reader: transformers for merged,
peft for LoRA, `mora.load_adapter` for the adapter zip, transformers' GGUF reader for GGUF. And the bounds: formats
that do not fit a run, runs that did not succeed, outputs that exist or would touch the run's own files."""
import dataclasses
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import mora
from storage.repo import Store
from tests.mora.test_inject import _randomise_adapter
from workers import export as ex
from workers.export import ExportError, ExportRequest, export_for_download, export_to, request_for_run

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(5))
# How far a GGUF file's logits may be from the float32 merged model's, as a fraction of the largest logit. f16 rounds
# each weight to within 2^-11 (4.9e-4) of itself; q8_0 moves a weight by up to 1/254 (3.9e-3) of its block of 32's
# largest. Through the layers that became, measured: f16 1.3e-3 here (tiny model + MoRA sharing) and 1.1e-3 on
# SmolLM2-135M (30 layers); q8_0 2.7e-2 and 4.3e-2. The bounds leave about 4x and 2-4x room. The files must also
# equal, to float32 rounding, the merged model whose weights went through the same rounding, which pins names,
# layouts and the q/k permutation independently of any tolerance.
GGUF_TOLERANCE = {"f16": 5e-3, "q8_0": 0.1}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _base(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _record(store, kind, run_dir, output_dir, output_kind, adapter, r, variant=None, status="succeeded", **config):
    run = store.create_run({"model": "tiny-llama", "adapter": adapter, "r": r, "variant": variant, **config},
                           name=f"{kind} run", model="tiny-llama", adapter=adapter, r=r, variant=variant)
    store.set_output(run.id, run_dir=str(run_dir), output_dir=str(output_dir), output_kind=output_kind)
    store.set_status(run.id, "running")
    return store.set_status(run.id, status)


def _adapter_run(store, runs_dir, tiny_model_dir, kind, config, status="succeeded"):
    model = _base(tiny_model_dir)
    mora.add_adapter(model, "adapter", config)
    _randomise_adapter(model, "adapter", scale=0.05)
    run_dir = runs_dir / kind
    mora.save_adapter(model, "adapter", run_dir / "adapter", base_model_name_or_path="tiny-llama")
    (run_dir / "config.json").write_text("{}\n")
    return _record(store, kind, run_dir, run_dir / "adapter", "adapter", config.kind, config.r,
                   getattr(config, "variant", None), status=status), _logits(model)


CONFIGS = {"sharing": mora.MoRAConfig(r=8, variant="sharing"), "rope": mora.MoRAConfig(r=8, variant="rope"),
           "lora": mora.LoRAConfig(r=4, alpha=8)}


def adapter_runs(store, runs_dir, tiny_model_dir, kinds):
    """({kind: succeeded run}, {kind: the adapted model's logits}) for adapter runs of CONFIGS' kinds."""
    made = {kind: _adapter_run(store, runs_dir, tiny_model_dir, kind, CONFIGS[kind]) for kind in kinds}
    return {kind: run for kind, (run, _) in made.items()}, {kind: logits for kind, (_, logits) in made.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORA_DATA_DIR", str(root / "data"))
        patch.setenv("MORA_MODELS_DIR", str(tiny_model_dir.parent))
        store = Store(f"sqlite:///{root / 'studio.db'}")
        runs_dir = root / "data" / "runs"
        runs, expected = adapter_runs(store, runs_dir, tiny_model_dir, ("sharing", "rope", "lora"))
        runs["failed"], _ = _adapter_run(store, runs_dir, tiny_model_dir, "failed", mora.LoRAConfig(r=2),
                                         status="failed")
        full = _base(tiny_model_dir)
        with torch.no_grad():
            for parameter in full.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(9)) * 0.01)
        full.save_pretrained(runs_dir / "full" / "model")
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(runs_dir / "full" / "model")
        runs["full"] = _record(store, "full", runs_dir / "full", runs_dir / "full" / "model", "model", "full", 8)
        expected["full"] = _logits(full)
        yield SimpleNamespace(store=store, runs=runs, expected=expected, root=root, tiny=tiny_model_dir)
        store.close()


def _request(world, kind, format, gguf_type="f16"):
    return request_for_run(world.store.get_run(world.runs[kind].id), format, gguf_type)


def test_the_adapters_change_the_model(world):
    base = _logits(_base(world.tiny))
    for kind in ("sharing", "rope", "lora", "full"):
        assert (world.expected[kind] - base).abs().max() > 1e-2, kind


@pytest.mark.parametrize("kind", ["sharing", "rope", "lora"])
def test_merged_loads_in_plain_transformers_with_the_adapted_logits(world, kind, tmp_path):
    result = export_to(_request(world, kind, "merged"), tmp_path / "merged")
    folder = Path(result.path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", ex.MARKER} <= set(result.files)
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(merged), world.expected[kind], rtol=1e-5, atol=1e-5)
    tokenizer, original = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(world.tiny)
    assert tokenizer.chat_template == original.chat_template and tokenizer.eos_token == original.eos_token
    marker = json.loads((folder / ex.MARKER).read_text())
    assert marker["run_id"] == world.runs[kind].id and marker["check"]["max_abs_logit_difference"] < 1e-4
    assert not list(tmp_path.glob(".*"))  # no staging left


def test_merged_of_a_full_fine_tune_is_its_model_folder(world, tmp_path):
    result = export_to(_request(world, "full", "merged"), tmp_path / "merged")
    source = Path(world.runs["full"].output_dir)
    for item in source.iterdir():
        assert (Path(result.path) / item.name).read_bytes() == item.read_bytes()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(result.path)), world.expected["full"])


@pytest.mark.parametrize("kind", ["sharing", "lora"])
def test_the_adapter_zip_holds_the_adapter_folder(world, kind, tmp_path):
    result = export_to(_request(world, kind, "adapter"), tmp_path / "adapter")
    assert result.path.endswith("adapter.zip") and result.files == sorted(
        ["adapter_config.json", "adapter_model.safetensors", ex.MARKER])
    with zipfile.ZipFile(result.path) as archive:
        archive.extractall(tmp_path / "unzipped")
    model = _base(world.tiny)
    mora.load_adapter(model, tmp_path / "unzipped")
    torch.testing.assert_close(_logits(model), world.expected[kind], rtol=1e-6, atol=1e-6)
    if kind == "lora":  # peft's own format
        peft_model = PeftModel.from_pretrained(_base(world.tiny), str(tmp_path / "unzipped")).eval()
        torch.testing.assert_close(_logits(peft_model), world.expected[kind], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sharing", "lora"])
def test_lora_loads_in_peft_with_the_adapted_logits(world, kind, tmp_path):
    result = export_to(_request(world, kind, "lora"), tmp_path / "lora")
    config = json.loads((Path(result.path) / "adapter_config.json").read_text())
    assert "use_mora" not in config and config["peft_type"] == "LORA"
    if kind == "sharing":
        assert config["r"] == config["lora_alpha"] == 39 == result.check["lora_rank"]  # the largest r̂: 64→128 at r=8
    peft_model = PeftModel.from_pretrained(_base(world.tiny), result.path).eval()
    torch.testing.assert_close(_logits(peft_model), world.expected[kind], rtol=1e-5, atol=1e-5)


def _rounded_like_gguf(model, gguf_type):
    """The merged model with each 2-D weight through the rounding the GGUF type applies (1-D ones stay float32)."""
    import gguf

    kind = gguf.GGMLQuantizationType.Q8_0 if gguf_type == "q8_0" else gguf.GGMLQuantizationType.F16
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                data = parameter.detach().numpy()
                rounded = gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)
                parameter.copy_(torch.from_numpy(np.ascontiguousarray(rounded)).reshape(parameter.shape))
    return model


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_reads_back_with_the_merged_logits_tokenizer_and_template(world, gguf_type, tmp_path):
    merged_dir = Path(export_to(_request(world, "sharing", "merged"), tmp_path / "merged").path)
    result = export_to(_request(world, "sharing", "gguf", gguf_type), tmp_path / "gguf")
    folder = Path(result.path)
    gguf_file = f"sharing-run-{gguf_type}.gguf"
    assert result.files == sorted([gguf_file, "Modelfile", ex.MARKER])
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file).eval()
    got = _logits(back)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    expected = _logits(merged)
    scale = expected.abs().max().item()
    difference = (got - expected).abs().max().item()
    assert 0 < difference <= GGUF_TOLERANCE[gguf_type] * scale, (difference, scale)
    torch.testing.assert_close(got, _logits(_rounded_like_gguf(merged, gguf_type)), rtol=0, atol=1e-6)

    tokenizer, original = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file), AutoTokenizer.from_pretrained(
        world.tiny)
    text = original.apply_chat_template([{"role": "user", "content": "The capital of France is Paris."}],
                                        tokenize=False, add_generation_prompt=True)
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == original.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == (original.bos_token, original.eos_token)
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM ./{gguf_file}\n" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_of_a_full_fine_tune(world, tmp_path):
    result = export_to(_request(world, "full", "gguf"), tmp_path / "gguf")
    back = AutoModelForCausalLM.from_pretrained(result.path, gguf_file="full-run-f16.gguf").eval()
    torch.testing.assert_close(_logits(back), world.expected["full"], rtol=0,
                               atol=GGUF_TOLERANCE["f16"] * world.expected["full"].abs().max().item())


@pytest.mark.parametrize("kind, format, message", [
    ("rope", "lora", "block-diagonal"),
    ("full", "lora", r"full fine-tuning changes every weight, a full-rank update\); merge it"),
    ("full", "adapter", "saved a whole model, not an adapter: export it as merged or gguf"),
])
def test_formats_that_do_not_fit_the_run_are_refused_with_the_reason(world, kind, format, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_to(_request(world, kind, format), tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_remora_is_refused_as_lora_because_its_update_is_not_one_product(world, tmp_path):
    request = dataclasses.replace(_request(world, "full", "lora"), adapter="mora", variant="sharing", remora=True)
    with pytest.raises(ExportError, match="ReMoRA folded a new update into the base weights"):
        export_to(request, tmp_path / "out")


def test_unknown_formats_and_unfinished_runs_are_refused(world):
    with pytest.raises(ExportError, match="unknown export format 'onnx': the formats are merged, adapter, lora, gguf"):
        _request(world, "sharing", "onnx")
    with pytest.raises(ExportError, match="unknown GGUF type 'q4_0': expected f16 or q8_0"):
        _request(world, "sharing", "gguf", "q4_0")
    with pytest.raises(ExportError, match=r"is failed; only a succeeded run can be exported"):
        _request(world, "failed", "merged")


def test_outputs_that_exist_or_touch_the_run_are_refused(world, tmp_path):
    request = _request(world, "lora", "lora")
    run_dir = Path(world.runs["lora"].run_dir)
    for out, message in ((run_dir / "exported", "is inside the run's folder"),
                         (run_dir.parent, "holds the run's folder"),
                         (Path(world.tiny) / "x", "is inside the base model's folder")):
        with pytest.raises(ExportError, match=message):
            export_to(request, out, force=True)
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists; pass --force to replace it"):
        export_to(request, existing)
    with pytest.raises(ExportError, match="is a folder that is not an earlier export"):
        export_to(request, existing, force=True)
    assert (existing / "notes.txt").read_text() == "mine"
    first = export_to(request, tmp_path / "lora")
    with pytest.raises(ExportError, match="exists"):
        export_to(request, tmp_path / "lora")
    again = export_to(request, tmp_path / "lora", force=True)  # an earlier export is replaced
    assert again.path == first.path and (Path(again.path) / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "taken"]


def test_download_lands_in_the_exports_folder_as_one_zip(world):
    result = export_for_download(_request(world, "sharing", "gguf", "q8_0"))
    path = Path(result.path)
    assert path.parent == world.root / "data" / "exports" and path.name == (
        f"sharing-run-{world.runs['sharing'].id}-gguf-q8_0.zip")
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == sorted(["sharing-run-q8_0.gguf", "Modelfile", ex.MARKER])
    again = export_for_download(_request(world, "sharing", "gguf", "q8_0"))
    assert again.path == result.path and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_one_export_at_a_time_per_worker(world, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: the call is refused first
    payload = {"export_id": "0" * 32, "request": _request(world, "sharing", "merged").to_dict()}
    assert ex._slots.acquire(blocking=False)
    ex._running["x"] = "run abc as merged"
    try:
        assert ex.start_export(payload) == {
            "error": "this worker is already exporting (run abc as merged); one export at a time: try again when "
                     "it finishes"}
    finally:
        ex._running.pop("x")
        ex._slots.release()
    outside = {**payload["request"], "output_dir": str(world.tiny)}
    assert "is outside the data folder" in ex.start_export({**payload, "request": outside})["error"]
    assert ex.start_export({**payload, "export_id": "../x"}) == {
        "error": "the export call needs an 'export_id' of 32 hex digits"}
    assert "lacks" in ex.start_export({**payload, "request": {"format": "merged"}})["error"]
    assert ExportRequest.from_dict(payload["request"]) == _request(world, "sharing", "merged")
