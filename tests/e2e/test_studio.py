"""The studio as a new user meets it, in real headless Chromium against `mora-studio up` (embedded Redis, real
workers, the tiny model registered through MORA_MODELS_DIR): upload a JSONL and see the preview, launch a MoRA/LoRA
pair, watch both curves grow in the overlay, reload mid-run and find the curve intact, cancel one, chat with both
side by side in blind A/B, vote. Screenshots land in test-artifacts/e2e/."""
import json
import statistics
import time
from pathlib import Path

from storage.repo import Store
from tests.e2e.browser import ARTIFACTS, open_page, shot as _shot
from tests.workers.queue_harness import wait_for
from tests.workers.sample_data import write_dataset

def _plot_points(page) -> dict:
    return page.evaluate("""() => {
        const el = document.querySelector('#loss-plot .js-plotly-plot');
        if (!el || !el._fullData) return {};  // _fullData: the traces as drawn, their typed arrays decoded
        return Object.fromEntries(el._fullData.filter(t => t.name.endsWith(' train')).map(t => [t.name, t.x.length]));
    }""")


def _check_all(page, selector):
    boxes = page.locator(f"{selector} input[type=checkbox]")
    for index in range(boxes.count()):
        boxes.nth(index).check()


def test_a_new_user_trains_compares_and_chats(studio, tmp_path):
    url, data_dir = studio
    dataset = write_dataset(tmp_path, "chat")
    with open_page(url) as page:

        # Data: upload, see the detected format and the preview with trained tokens highlighted
        page.locator("#upload input[type=file]").set_input_files(str(dataset))
        page.wait_for_selector("#upload-message:has-text('8 rows')")
        assert "chat format" in page.locator("#upload-message").inner_text()
        page.wait_for_selector("#preview .trained")
        trained = page.locator("#preview .trained").all_inner_texts()
        assert any("The capital of" in text for text in trained)
        _shot(page, "1-data")

        # Train: MoRA's budget beside LoRA's, then one click launches the pair
        page.get_by_role("tab", name="Train").click()
        page.wait_for_selector("#budget:has-text('LoRA')")
        page.locator("#train-dataset input").click()
        page.get_by_role("option").first.click()
        # the memory estimate beside Launch: fits the worker, and a run too big for it is refused with numbers
        page.wait_for_selector("#memory-estimate:has-text('Fits train-')")
        assert "Memory: about" in page.locator("#memory-estimate").inner_text()
        # a CPU worker has one device and no quantised bases: neither is offered
        assert not page.locator("#devices").is_visible() and not page.locator("#quantization").is_visible()
        page.locator("#batch-size input").fill("4096")
        page.locator("#max-length input").fill("131072")
        page.locator("#max-steps input").click()
        page.wait_for_selector("#memory-estimate:has-text('this run needs about')")
        page.locator("#launch").click()
        page.wait_for_selector("#launch-message:has-text('this run needs about')")
        assert "lower batch_size or max_length" in page.locator("#launch-message").inner_text()
        page.locator("#batch-size input").fill("4")
        page.locator("#max-length input").fill("512")
        # far more steps than the test watches (600 took 14 s on a quiet machine): both are still running when
        # they are cancelled below, however fast the machine
        page.locator("#max-steps input").fill("20000")
        page.locator("#learning-rate input").fill("0.01")
        _shot(page, "2-train")
        page.locator("#launch-pair").click()
        page.wait_for_selector("#launch-message:has-text('queued the pair')")

        # Runs: select both, watch both curves grow in one figure
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_selector("#compare input[type=checkbox] >> nth=1")
        _check_all(page, "#compare")
        first = wait_for(lambda: (lambda p: p if len(p) == 2 and min(p.values()) >= 3 else None)(_plot_points(page)),
                         120, "both curves to appear")
        later = wait_for(lambda: (lambda p: p if all(p[k] > first[k] + 3 for k in first) else None)(
            _plot_points(page)), 120, "both curves to grow")
        assert set(later) == set(first)
        seen_at = time.time()
        _shot(page, "3-runs-live")

        # The delay from a worker's step to its point on screen: watch the plot grow and compare with the worker's
        # own event times (same machine clock).
        appearances = []
        previous = _plot_points(page)
        deadline = time.time() + 8
        while time.time() < deadline:
            current = _plot_points(page)
            for name, count in current.items():
                if count > previous.get(name, 0):
                    appearances.append((name, count, time.time()))
            previous = current
            time.sleep(0.05)

        # Reload mid-run: the curves are all still there
        page.reload()
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_selector("#compare input[type=checkbox] >> nth=1")
        _check_all(page, "#compare")
        after_reload = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(_plot_points(page)), 60, "curves")
        assert all(after_reload[k] >= later[k] for k in later), (later, after_reload)

        # Cancel both runs while they train: each keeps the adapter of its last step
        store = Store(f"sqlite:///{data_dir / 'studio.db'}")
        for adapter in ("mora", "lora"):
            run = next(r for r in store.list_runs() if r.adapter == adapter)
            page.locator("#run-action-target input").click()
            page.get_by_role("option", name=f"{run.name} · {run.id}").click()
            page.locator("#cancel-run").click()
            page.wait_for_selector(f"#run-action-message:has-text('{run.name}: running — stopping after its "
                                   "current step')")
        wait_for(lambda: {r.status for r in store.list_runs()} == {"cancelled"}, 120, "the pair to stop")
        assert all(r.output_dir for r in store.list_runs())
        _shot(page, "4-runs-finished")

        # Chat: both adapters side by side, blind, streamed; then vote
        page.get_by_role("tab", name="Chat").click()
        page.wait_for_selector("#chat-adapters label >> nth=2")
        adapters = page.locator("#chat-adapters label")
        for index in range(1, adapters.count()):
            adapters.nth(index).click()
        page.locator("#blind input").check()
        page.locator("#chat-input textarea").fill("What is the capital of Peru?")
        page.locator("#chat-send").click()
        page.wait_for_selector("#vote-message:has-text('Which answer is better')", timeout=120_000)
        for bot in ("#bot-0", "#bot-1"):
            assert page.locator(f"{bot} .message-row").count() >= 2 or page.locator(f"{bot} [data-testid=bot]").count()
        _shot(page, "5-chat")
        page.locator("#vote-a").click()
        page.wait_for_selector("#vote-message:has-text('Vote stored')")
        votes = [store.votes_for_run(r.id) for r in store.list_runs()]
        assert sum(v.wins for v in votes) == 1 and sum(v.losses for v in votes) == 1
        _shot(page, "6-vote")

    # the measured delay, step end on the worker -> point drawn in the page
    delays = []
    for run in store.list_runs():
        events = [json.loads(line) for line in Path(run.run_dir, "metrics.jsonl").read_text().splitlines()]
        step_time = {e["step"]: e["time"] for e in events if e["kind"] == "step"}
        for name, count, seen in appearances:
            if name.startswith(run.name) and count in step_time:
                delays.append(seen - step_time[count])
    assert delays, "no step appeared on screen while watching"
    report = {"median_delay_s": statistics.median(delays), "max_delay_s": max(delays), "samples": len(delays),
              "first_curves_seen_at": seen_at}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "delay.json").write_text(json.dumps(report, indent=2))
    assert report["median_delay_s"] < 3.0, report
