"""The Runs tab with a year of history, in real headless Chromium against `mora-studio web`: 1,000 runs stored,
10 of them with 100,000 logged steps. The tab opens on one page of the table, the 10 curves are drawn from a bounded
number of sampled points with their min–max band. (What a tick costs, quiet or live, is measured side by side in
benchmarks/dashboard_scale.py, not timed here.)"""

from storage.repo import Store
from tests.app.test_up import _http_ok, studio_env, studio_process
from tests.e2e.browser import open_page, shot
from tests.workers.queue_harness import wait_for
from workers.embedded_redis import free_port

RUNS, LONG_RUNS, STEPS = 1000, 10, 100_000


def _seed(db_path) -> list[str]:
    with Store(f"sqlite:///{db_path}") as store:
        ids = [store.create_run({"r": 8, "seed": i}, name=f"sweep {i:04d}", model="tiny", adapter="mora", r=8).id
               for i in range(RUNS)]
        for run_id in ids[-LONG_RUNS:]:
            for start in range(0, STEPS, 25_000):
                store.add_metric_points(run_id, [{"name": "loss", "step": s, "value": 1.0 / (1 + s / 1000)
                                                  + (3.0 if s == 54_321 else 0.0)}
                                                 for s in range(start, start + 25_000)])
            store.set_status(run_id, "running")
            store.update_progress(run_id, step=STEPS - 1, max_steps=2 * STEPS)
            store.set_status(run_id, "succeeded")
    return ids[-LONG_RUNS:]


def _traces(page) -> dict:
    return page.evaluate("""() => {
        const el = document.querySelector('#loss-plot .js-plotly-plot');
        if (!el || !el._fullData) return {};
        return Object.fromEntries(el._fullData.map(t => [t.name, [t.x.length, Math.max(...t.x), Math.max(...t.y)]]));
    }""")


def test_a_thousand_runs_and_ten_long_curves(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    long_runs = _seed(data / "studio.db")
    port = free_port()
    with studio_process(["web"], studio_env(tmp_path, port, OMP_NUM_THREADS="1"), tmp_path):
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _http_ok(url), 120, "the web app to answer", every=0.5)
        with open_page(url) as page:
            page.get_by_role("tab", name="Runs").click()
            page.wait_for_selector("#runs-page-note:has-text('of 1000')")
            boxes = page.locator("#compare input[type=checkbox]")
            wait_for(lambda: boxes.count() == 25, 30, "the page's 25 runs to be offered")  # one page, not the history
            table = page.locator("#runs-table").inner_text()
            assert "sweep 0999" in table and "sweep 0974" not in table
            for index in range(LONG_RUNS):
                boxes.nth(index).check()
            traces = wait_for(lambda: (lambda t: t if sum(n.endswith(" train") for n in t) == LONG_RUNS else None)(
                _traces(page)), 120, "the ten curves")
            shot(page, "runs-1000")
            for name, (points, last_step, highest) in traces.items():
                assert points <= 200, (name, points)  # 2,000 sampled buckets shared by the 10 runs
                if name.endswith(" train"):
                    assert last_step == STEPS - 1
                if name.endswith("(max)"):
                    assert highest > 3.0  # the one-step spike at 54,321 survives sampling
            assert {name.split(" train")[0] for name in traces} == {f"sweep {i:04d}" for i in range(990, 1000)}
