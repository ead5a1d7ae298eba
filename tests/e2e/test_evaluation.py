"""The Evaluation view in real headless Chromium against `mora-studio up`: tick two stored runs of the tiny model,
launch an evaluation with the base model on a stored dataset, and read the scores (the base a row) and the answers
side by side once the chat worker has answered. Slow (the studio starts in about a minute on 2 cores)."""
import pytest

from app.datasets import ingest_upload
from storage.repo import Store
from tests.e2e.browser import open_page, shot
from tests.workers.sample_data import write_dataset
from tests.workers.test_export import adapter_runs

pytestmark = pytest.mark.slow


def test_select_runs_launch_an_evaluation_and_read_scores_and_answers(studio, tiny_model_dir, tmp_path):
    url, data_dir = studio
    store = Store(f"sqlite:///{data_dir / 'studio.db'}")
    runs, _ = adapter_runs(store, data_dir / "runs", tiny_model_dir, ("sharing", "lora"))
    dataset = ingest_upload(store, data_dir / "datasets", write_dataset(tmp_path, "chat"), "capitals.jsonl").dataset
    with open_page(url) as page:
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_selector("#compare input[type=checkbox] >> nth=1")
        for run in runs.values():
            page.get_by_label(f"{run.name} · {run.id}").check()
        page.locator("#evaluation").get_by_text("Evaluation: which adapter learned the data").click()
        page.locator("#eval-prompts").get_by_label("file").check()
        page.locator("#eval-dataset input").click()
        page.get_by_role("option", name=f"{dataset.name} · 8 rows · chat").click()
        page.locator("#eval-limit input").fill("3")
        page.locator("#eval-max-tokens input").fill("6")
        page.locator("#eval-launch").click()
        page.wait_for_selector("#eval-message:has-text('on capitals (all, 3)')")
        page.wait_for_selector("#eval-status:has-text('succeeded')", timeout=180_000)
        page.wait_for_selector("#eval-scores:has-text('lora run')")
        scores = page.locator("#eval-scores").inner_text()
        for label in ("base model", "sharing run", "lora run", "token_f1", "exact_match", "perplexity"):
            assert label in scores
        table = page.locator("#eval-examples-table")
        assert table.locator("tr").count() == 4  # the header and three prompts
        header = table.locator("tr").first.inner_text()
        assert all(label in header for label in ("prompt", "reference", "base model", "sharing run", "lora run"))
        assert table.get_by_text("The capital of", exact=False).count() >= 3  # the references
        page.locator("#eval-sort input").click()
        page.get_by_role("option", name="file order").click()
        page.wait_for_selector("#eval-examples:has-text('by file order of token_f1')")
        shot(page, "evaluation")
    evaluation = store.list_evaluations()[0]
    assert evaluation.status == "succeeded" and [row["label"] for row in evaluation.rows] == [
        "base model", "sharing run", "lora run"]
    assert len(store.evaluation_answers(evaluation.id)) == 9
    store.close()
