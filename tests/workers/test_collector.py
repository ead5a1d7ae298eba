"""The collector's cost follows the live runs: finished streams leave the poll set and expire, and read positions
come from memory, not one store query per stream per poll. Real embedded Redis, real SQLite file."""
from __future__ import annotations

import pytest

from storage.repo import Store
from workers import bus
from workers.collector import Collector
from workers.embedded_redis import EmbeddedRedis
from workers.events import EventPublisher


@pytest.fixture()
def world(tmp_path):
    with EmbeddedRedis() as redis_server, Store(f"sqlite:///{tmp_path / 'studio.db'}") as store:
        yield redis_server, store


def _publisher(redis_server, run_id):
    return EventPublisher(run_id, [bus.RedisStreamSink(bus.connect(redis_server.url), run_id)])


def _step(publisher, step):
    publisher.emit("step", step=step, max_steps=100, loss=1.0 / (step + 1), learning_rate=1e-3, grad_norm=1.0,
                   epoch=step / 100, tokens_seen=64 * step, tokens_per_second=100.0, peak_memory_mb=10.0)


def test_a_finished_stream_leaves_the_poll_set_and_expires(world):
    redis_server, store = world
    live, done = (store.create_run({}, name=name, model="tiny", adapter="mora", r=8) for name in ("live", "done"))
    live_pub, done_pub = _publisher(redis_server, live.id), _publisher(redis_server, done.id)
    for publisher in (live_pub, done_pub):
        publisher.status("running", "started")
        for step in range(1, 4):
            _step(publisher, step)
    done_pub.status("succeeded", "done")
    collector = Collector(store, redis_server.url, block_ms=50)
    while collector.poll_once():
        pass
    client = bus.connect(redis_server.url)
    assert client.smembers(bus.STREAMS_SET) == {bus.stream_key(live.id)}
    assert 0 < client.ttl(bus.stream_key(done.id)) <= bus.FINISHED_STREAM_TTL_S
    assert client.ttl(bus.stream_key(live.id)) == -1  # a live stream never expires under its run
    assert store.get_run(done.id).status == "succeeded" and store.metric_count(done.id, "loss") == 3
    _step(live_pub, 4)
    assert collector.poll_once() == 1 and store.metric_count(live.id, "loss") == 4


def test_positions_are_read_from_the_store_once_per_stream(world, monkeypatch):
    redis_server, store = world
    runs = [store.create_run({}, name=f"run {i}", model="tiny", adapter="mora", r=8) for i in range(5)]
    publishers = [_publisher(redis_server, run.id) for run in runs]
    collector = Collector(store, redis_server.url, block_ms=10)
    reads = []
    original = store.get_stream_position
    monkeypatch.setattr(store, "get_stream_position", lambda stream: reads.append(stream) or original(stream))
    for step in range(1, 21):
        for publisher in publishers:
            _step(publisher, step)
        collector.poll_once()
    assert sorted(reads) == sorted(bus.stream_key(run.id) for run in runs)
    assert all(store.metric_count(run.id, "loss") == 20 for run in runs)
    # a new collector (a restarted web process) starts from the stored positions and stores nothing twice
    again = Collector(store, redis_server.url, block_ms=10)
    assert again.poll_once() == 0
