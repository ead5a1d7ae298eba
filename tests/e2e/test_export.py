"""Exporting from the Runs tab, in real headless Chromium against `mora-studio up` (its utility worker makes the
export): a stored MoRA run of the tiny model, exported as GGUF q8_0 and as the adapter zip, each downloaded by the
browser and opened. Slow (the studio starts in about a minute on 2 cores)."""
import zipfile
from pathlib import Path

import pytest

import mora
from storage.repo import Store
from tests.e2e.browser import open_page, shot
from tests.workers.test_export import adapter_runs

pytestmark = pytest.mark.slow


def _export_and_download(page, label, tmp_path):
    page.locator("#export-format input").click()
    page.get_by_role("option", name=label).click()
    page.locator("#export-run").click()
    page.wait_for_selector("#export-message:has-text('download it below')", timeout=120_000)
    with page.expect_download() as download:
        page.locator("#export-file a").first.click()
    target = tmp_path / download.value.suggested_filename
    download.value.save_as(target)
    return target


def test_export_from_the_runs_tab_downloads_the_file(studio, tiny_model_dir, tmp_path):
    url, data_dir = studio
    store = Store(f"sqlite:///{data_dir / 'studio.db'}")
    run = adapter_runs(store, data_dir / "runs", tiny_model_dir, ("sharing",))[0]["sharing"]
    with open_page(url) as page:
        page.get_by_role("tab", name="Runs").click()
        page.locator("#run-action-target input").click()
        page.get_by_role("option", name=f"{run.name} · {run.id}").click()

        gguf = _export_and_download(page, "gguf q8_0: llama.cpp, Ollama, half the size", tmp_path)
        assert gguf.name == f"sharing-run-{run.id}-gguf-q8_0.zip"
        with zipfile.ZipFile(gguf) as archive:
            assert sorted(archive.namelist()) == ["Modelfile", "mora_export.json", "sharing-run-q8_0.gguf"]
            assert archive.read("sharing-run-q8_0.gguf")[:4] == b"GGUF"
        shot(page, "export-gguf")

        adapter = _export_and_download(page, "adapter: the adapter folder (peft format for LoRA, mora for MoRA)",
                                       tmp_path)
        with zipfile.ZipFile(adapter) as archive:
            archive.extractall(tmp_path / "adapter")
        assert mora.read_adapter_config(tmp_path / "adapter")["use_mora"] is True

        page.locator("#export-format input").click()
        page.get_by_role("option", name="lora: an exact LoRA, peft format (vLLM, LoRA servers)").click()
        page.locator("#export-run").click()  # sharing is exact as LoRA: this one succeeds too
        page.wait_for_selector("#export-message:has-text('as lora')", timeout=120_000)
    exports = sorted(p.name for p in (data_dir / "exports").iterdir())
    assert exports == sorted(f"sharing-run-{run.id}-{suffix}.zip" for suffix in ("gguf-q8_0", "adapter", "lora"))
    store.close()
