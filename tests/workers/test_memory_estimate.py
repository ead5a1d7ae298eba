"""The pre-flight memory estimate: each part checked by hand on small shapes, the parts reacting to the settings
they depend on, the refusal's numbers, the service refusing a run that fits no connected worker (real Redis) and
leaving nothing behind, and, as a slow test, the estimate against a real step of the default model."""
import subprocess
import sys
from pathlib import Path

import pytest

from app.service import ServiceError, StudioService
from mora.variants import r_hat
from storage.repo import Store
from workers import bus, memory_estimate as me
from workers.embedded_redis import EmbeddedRedis
from workers.formatting import format_bytes
from workers.model_shapes import DEFAULT_MODEL_SHAPES, ModelShapes
from workers.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ModelShapes(name="toy", model_type="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=512,
                     tie_word_embeddings=True)


def _config(**values):
    return TrainConfig.from_dict({"data": "x.jsonl", "r": 8, "batch_size": 4, "max_length": 128, **values}).resolved()


def test_each_part_by_hand_for_mora_on_a_cpu():
    config = _config(adapter="mora", variant="sharing")
    e = me.estimate(SHAPES, config, "cpu")
    layers = SHAPES.linear_layers()
    sides = [r_hat(k, d, 8, "sharing") for _, k, d in layers]
    trainable = sum(s * s for s in sides)
    assert e.weights == SHAPES.parameters * 4 + trainable * 4  # float32 base on a CPU, float32 adapters
    assert e.trainable == trainable * 4 and e.optimizer == 2 * trainable * 4
    tokens = 4 * 128
    per_block = 4 * 64 + 3 * 64 + 2 * 32 + 4 * 128 + sum(sides[:7])  # the block's values and the compressed inputs
    assert e.activations == 2 * per_block * tokens * 4
    assert e.logits == tokens * 1000 * (4 + 4 * 4)
    assert e.total == int((e.weights + e.optimizer + e.activations + e.logits) * me.FRAGMENTATION) + me.CPU_PROCESS_BYTES


def test_the_parts_follow_the_settings_they_depend_on():
    base = me.estimate(SHAPES, _config(adapter="lora"), "cpu")
    doubled = me.estimate(SHAPES, _config(adapter="lora", batch_size=8), "cpu")
    assert doubled.activations == 2 * base.activations and doubled.logits == 2 * base.logits
    assert doubled.weights == base.weights
    gpu = me.estimate(SHAPES, _config(adapter="lora"), "cuda")  # auto: a bfloat16 base on a GPU
    assert gpu.weights == SHAPES.parameters * 2 + base.trainable and gpu.process == me.CUDA_CONTEXT_BYTES
    checkpointed = me.estimate(SHAPES, _config(adapter="lora", gradient_checkpointing=True), "cpu")
    one_block = base.activations // SHAPES.num_layers
    assert checkpointed.activations == SHAPES.num_layers * 64 * 512 * 4 + one_block < base.activations
    full = me.estimate(SHAPES, _config(adapter="full"), "cuda")  # full fine-tuning: float32 weights and AdamW
    assert full.weights == full.trainable == SHAPES.parameters * 4 and full.optimizer == 2 * full.weights
    rope = me.estimate(SHAPES, _config(adapter="mora", variant="rope"), "cpu")
    sharing = me.estimate(SHAPES, _config(adapter="mora", variant="sharing", r=1), "cpu")
    assert rope.activations < sharing.activations  # rope's fused path keeps the input itself, sharing a compressed copy
    dropped = me.estimate(SHAPES, _config(adapter="mora", variant="rope", dropout=0.1), "cpu")
    assert dropped.activations > rope.activations  # a dropped-out input is a copy of all k inputs per layer


def test_the_refusal_names_the_numbers_and_what_to_lower():
    config = _config(adapter="mora", batch_size=64, max_length=4096)
    small = [{"name": "train-cpu0@a", "queues": ["train"], "memory_gb": 8.0, "kind": "cpu"}]
    report = me.fit_report(DEFAULT_MODEL_SHAPES, config, small)
    message = me.refusal_message(config, report)
    need = me.estimate(DEFAULT_MODEL_SHAPES, config, "cpu").total
    assert message.startswith(f"this run needs about {format_bytes(need)} of memory (64 × 4096 tokens a step) and the "
                              "largest training worker, train-cpu0@a, has 8 GiB")
    assert "lower batch_size or max_length, or enable gradient_checkpointing (about" in message
    assert me.refusal_message(config, me.fit_report(DEFAULT_MODEL_SHAPES, config, [])) is None  # nobody to fit yet
    big = small + [{"name": "train-gpu0@b", "queues": ["train"], "memory_gb": 1000.0, "kind": "cuda"},
                   {"name": "chat-gpu0@b", "queues": ["chat"], "memory_gb": 1.0, "kind": "cuda"}]
    report = me.fit_report(DEFAULT_MODEL_SHAPES, config, big)
    assert [w["name"] for w in report["fits"]] == ["train-gpu0@b"] and me.refusal_message(config, report) is None


def test_the_estimate_needs_no_torch():
    code = ("import sys; from workers import memory_estimate as me; from workers.model_shapes import "
            "DEFAULT_MODEL_SHAPES as s; from workers.train_config import TrainConfig; "
            "print(me.estimate(s, TrainConfig(data='x').resolved()).total > 0, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "False"], result.stderr


@pytest.fixture()
def redis_world(tmp_path, monkeypatch):
    redis = EmbeddedRedis().start()
    monkeypatch.setenv("REDIS_URL", redis.url)
    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    yield redis, store
    store.close()
    redis.stop()


def test_the_service_refuses_a_run_no_worker_can_hold_and_records_nothing(redis_world, tmp_path):
    redis, store = redis_world
    client = bus.connect(redis.url)
    bus.announce_worker(client, "train-cpu0@host", {"queues": ["train"], "memory_gb": 4.0, "kind": "cpu"})
    service = StudioService(store, runs_dir=tmp_path / "runs")
    with pytest.raises(ServiceError, match=r"this run needs about \d+(\.\d)? GiB of memory \(32 × 8192 tokens a step\) "
                                           r"and the largest training worker, train-cpu0@host, has 4 GiB"):
        service.submit({"data": str(tmp_path / "d.jsonl"), "batch_size": 32, "max_length": 8192})
    assert store.list_runs() == [] and not (tmp_path / "runs").exists()
    run = service.submit({"data": str(tmp_path / "d.jsonl"), "batch_size": 1, "max_length": 64})
    assert run.status == "queued"
    report = service.memory_report(TrainConfig.from_dict({"data": "d", "batch_size": 1, "max_length": 64}))
    assert [w["name"] for w in report["fits"]] == ["train-cpu0@host"]


@pytest.mark.slow
def test_the_estimate_is_within_its_margin_of_a_real_step_of_the_default_model(tmp_path):
    """One config per kind of term (adapter branches, logits, gradient checkpointing); the estimate may be high (it
    refuses a borderline run) but not low by more than the planning margin."""
    out = tmp_path / "mem.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_estimate.py"), "--steps", "2",
                             "--json", str(out), "--only", "0,3,4"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    for row in json.loads(out.read_text()):
        assert me.FITS_FRACTION <= row["ratio"] <= 1.6, row


def test_a_quantised_base_holds_its_linears_in_half_a_byte_or_one_and_the_rest_as_before():
    linears = sum(k * d for _, k, d in SHAPES.linear_layers())
    rest = SHAPES.parameters - linears
    plain = me.estimate(SHAPES, _config(adapter="lora", dtype="bfloat16"), "cuda")
    nf4 = me.estimate(SHAPES, _config(adapter="lora", dtype="bfloat16", quantization="nf4"), "cuda")
    int8 = me.estimate(SHAPES, _config(adapter="lora", dtype="bfloat16", quantization="int8"), "cuda")
    adapters = me.trainable_parameters(SHAPES, _config(adapter="lora")) * 4
    assert plain.weights == SHAPES.parameters * 2 + adapters
    assert nf4.weights == int(linears * (0.5 + 1 / 64 + 4 / 16384)) + rest * 2 + adapters
    assert int8.weights == linears + rest * 2 + adapters
    assert (nf4.activations, nf4.logits, nf4.optimizer) == (plain.activations, plain.logits, plain.optimizer)


def test_several_devices_each_hold_the_model_their_own_batch_and_the_gradient_buckets():
    one = me.estimate(SHAPES, _config(adapter="mora"), "cuda")
    two = me.estimate(SHAPES, _config(adapter="mora", devices=2), "cuda")
    assert two.weights == one.weights + one.trainable  # DDP's buckets: one more copy of the trainable gradients
    assert (two.activations, two.logits, two.tokens) == (one.activations, one.logits, one.tokens)  # batch per device


def test_a_run_is_refused_when_no_worker_has_its_devices_or_its_quantised_base():
    cpu = {"name": "train-cpu0@a", "queues": ["train"], "memory_gb": 64.0, "kind": "cpu", "gpus": 0,
           "quantization_problem": "no CUDA GPU here"}
    gpus = {"name": "train-gpu0-1@b", "queues": ["train"], "memory_gb": 80.0, "kind": "cuda", "gpus": 2,
            "quantization_problem": None}
    four = _config(adapter="mora", devices=4)
    message = me.refusal_message(four, me.fit_report(SHAPES, four, [cpu, gpus]))
    assert message == ("this run asks for 4 devices, which no connected training worker has (train-cpu0@a: 1 "
                       "device(s), no CUDA GPU here; train-gpu0-1@b: 2 device(s))")
    two = _config(adapter="mora", devices=2, dtype="bfloat16", quantization="nf4")
    assert [w["name"] for w in me.fit_report(SHAPES, two, [cpu, gpus])["fits"]] == ["train-gpu0-1@b"]
    assert "a nf4 base (bitsandbytes on a CUDA GPU)" in me.refusal_message(two, me.fit_report(SHAPES, two, [cpu]))


def test_the_train_tab_offers_devices_and_quantisation_only_where_a_worker_has_them(redis_world, tmp_path):
    redis, store = redis_world
    client = bus.connect(redis.url)
    service = StudioService(store, runs_dir=tmp_path / "runs")
    assert service.training_capabilities() == {"max_devices": 1, "quantization": []}  # nobody connected
    bus.announce_worker(client, "train-cpu0@a", {"queues": ["train"], "memory_gb": 16.0, "kind": "cpu", "gpus": 0,
                                                 "quantization_problem": "no CUDA GPU"})
    bus.announce_worker(client, "chat-gpu0@b", {"queues": ["chat"], "memory_gb": 80.0, "kind": "cuda", "gpus": 8})
    assert service.training_capabilities() == {"max_devices": 1, "quantization": []}  # a chat worker trains nothing
    bus.announce_worker(client, "train-gpu@c", {"queues": ["train"], "memory_gb": 80.0, "kind": "cuda", "gpus": 4,
                                                "quantization_problem": "bitsandbytes is not installed"})
    assert service.training_capabilities() == {"max_devices": 4, "quantization": []}
    bus.announce_worker(client, "train-gpu@d", {"queues": ["train"], "memory_gb": 80.0, "kind": "cuda", "gpus": 2,
                                                "quantization_problem": None})
    assert service.training_capabilities() == {"max_devices": 4, "quantization": ["nf4", "int8"]}
