"""The "Reproduce the paper" preset as a user meets it, in headless Chromium against `mora-studio up`: launch the
whole memorisation set from the Train tab (the tiny preset, offered because its model is installed), let the queue
run it, and read its Table-2-shaped results and curves in the Runs tab."""
from app import bench
from storage.repo import TERMINAL_STATUSES, Store
from tests.e2e.browser import open_page, shot
from tests.workers.queue_harness import wait_for


def test_the_paper_preset_runs_as_one_group_and_shows_its_table(studio):
    url, data_dir = studio
    with open_page(url) as page:
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("Reproduce the paper: MoRA memorises what LoRA cannot").click()
        page.locator("#paper-preset input").click()
        page.get_by_role("option", name="tiny").click()
        page.wait_for_selector("text=tiny random Llama")  # the chosen preset's description
        page.locator("#paper-seeds input").fill("1")
        page.locator("#launch-paper").click()
        page.wait_for_selector("#paper-message:has-text('queued the group')")
        message = page.locator("#paper-message").inner_text()
        shot(page, "paper-1-launch")

        store = Store(f"sqlite:///{data_dir / 'studio.db'}")
        group = next(r.group_name for r in store.list_runs() if r.group_name)
        assert group in message and group.startswith("memorize-tiny-")
        runs = store.list_runs(group_name=group)
        assert len(runs) == 5  # full fine-tuning, LoRA and MoRA at two budgets, one rate, one seed
        wait_for(lambda: all(r.status in TERMINAL_STATUSES for r in store.list_runs(group_name=group)), 300,
                 "the group to finish", every=1.0)
        assert {r.status for r in store.list_runs(group_name=group)} == {"succeeded"}

        page.get_by_role("tab", name="Runs").click()
        page.get_by_text("Paper results (memorisation groups)").click()
        # Opening the accordion lists the groups and chooses the newest (ours, the only one): wait for that answer
        # rather than typing into a list that has not arrived yet (a typed value with no such option is dropped)
        choose = page.locator("#paper-group input")
        wait_for(lambda: choose.input_value() == group, 30, "the accordion to list and choose the group", every=0.2)
        page.locator("#paper-show").click()
        page.wait_for_selector("#paper-table:has-text('Character accuracy')")
        table = page.locator("#paper-table").inner_text()
        rows = bench.results_table(store, group)
        assert [row["label"] for row in rows] == ["full fine-tuning", "LoRA r=1", "MoRA r=1 (rope)", "LoRA r=4",
                                                  "MoRA r=4 (sharing)"]
        for row in rows:
            assert row["label"] in table
        assert "The paper (LLaMA-2-7B, 10k pairs)" in table
        traces = wait_for(lambda: page.evaluate("""() => {
            const el = document.querySelector('#paper-figure .js-plotly-plot');
            return el && el.data && el.data.length ? el.data.map(t => t.name) : null;
        }"""), 30, "the results figure")
        assert any("MoRA r=1" in (name or "") for name in traces) and any("LoRA r=4" in (name or "") for name in traces)
        shot(page, "paper-2-results")
        store.close()
