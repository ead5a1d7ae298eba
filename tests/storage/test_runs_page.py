"""The runs table's page: filtered, sorted and cut in the query, with the count of all matching runs."""
from __future__ import annotations

import pytest

from storage.repo import StorageError


@pytest.fixture
def runs(store):
    made = []
    for index in range(30):
        adapter = ("mora", "lora", "full")[index % 3]
        made.append(store.create_run({}, name=f"run {index:02d}" + (" 100%_done" if index == 7 else ""),
                                     model="tiny", adapter=adapter, r=index + 1,
                                     tags=["sweep"] if index < 10 else (['q"uote'] if index == 12 else []),
                                     group_name="pair" if index in (3, 4) else None))
    store.update_progress(made[5].id, last_loss=0.5)
    store.update_progress(made[6].id, last_loss=0.25)
    store.set_status(made[8].id, "running")
    return made


def test_newest_first_pages_with_the_total(store, runs):
    first = store.runs_page(limit=10)
    assert first.total == 30 and [r.id for r in first.runs] == [r.id for r in reversed(runs)][:10]
    last = store.runs_page(offset=25, limit=10)
    assert [r.id for r in last.runs] == [r.id for r in reversed(runs)][25:]
    assert store.runs_page(offset=40).runs == [] and store.runs_page(offset=40).total == 30


def test_filters_combine_in_the_query(store, runs):
    assert {r.adapter for r in store.runs_page(adapter="lora", limit=50).runs} == {"lora"}
    assert store.runs_page(adapter="lora").total == 10
    assert store.runs_page(status="running").total == 1
    assert store.runs_page(tag="sweep").total == 10
    assert store.runs_page(tag="swee").total == 0  # a tag matches whole, not as a substring
    assert [r.id for r in store.runs_page(tag='q"uote').runs] == [runs[12].id]
    assert store.runs_page(tag="sweep", adapter="mora").total == 4  # runs 0, 3, 6, 9
    assert [r.id for r in store.runs_page(group_name="pair").runs] == [runs[4].id, runs[3].id]
    assert [r.id for r in store.runs_page(search="RUN 1").runs] == [r.id for r in reversed(runs[10:20])]
    assert [r.id for r in store.runs_page(search="100%_").runs] == [runs[7].id]  # % and _ are literal
    assert store.runs_page(search="0%x").total == 0
    assert store.runs_page(search="  ").total == 30


def test_sorting_puts_missing_values_last(store, runs):
    by_loss = store.runs_page(sort="last_loss", descending=False, limit=3).runs
    assert [r.id for r in by_loss[:2]] == [runs[6].id, runs[5].id] and by_loss[2].last_loss is None
    assert [r.id for r in store.runs_page(sort="last_loss", limit=2).runs] == [runs[5].id, runs[6].id]
    assert [r.r for r in store.runs_page(sort="r", descending=False, limit=3).runs] == [1, 2, 3]


@pytest.mark.parametrize("arguments,problem", [({"sort": "config"}, "sort"), ({"limit": 501}, "at most 500"),
                                               ({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
                                               ({"status": "lost"}, "status")])
def test_bad_page_requests_are_refused(store, runs, arguments, problem):
    with pytest.raises(StorageError, match=problem):
        store.runs_page(**arguments)


def test_runs_by_id_keeps_the_order_asked_and_skips_the_gone(store, runs):
    wanted = [runs[3].id, "gone", runs[1].id, runs[3].id]
    assert [r.id for r in store.runs_by_id(wanted)] == [runs[3].id, runs[1].id]
    assert store.runs_by_id([]) == []
