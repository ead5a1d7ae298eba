"""Evaluation by generation, in-process with the chat engine and the tiny model: where the prompts come from, the
teacher-forced loss (batched equals alone equals by hand), every row's answers in one batched pass equal to each
row answering alone, the per-row summary. Shapes and equalities, never generated text."""
import json
import math

import pytest
import torch

import mora
from tests.workers.sample_data import FACTS, write_dataset
from tests.workers.test_chat import _save_random_adapter
from workers import evaluation
from workers.chat import ChatEngine
from workers.data import _held_out
from workers.evaluation import (Answer, EvalError, EvalExample, EvalRequest, EvalSource, answer_batches,
                                answer_losses, losses_and_prompt_cache, read_examples, run_evaluation,
                                shared_prefix_length, summarize)
from workers.generation import GenerationSettings, render_prompt, reply, stream_rows
from workers.model_loading import load_model


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORA_MODELS_DIR", str(tiny_model_dir.parent))
        patch.setenv("MORA_DATA_DIR", str(root / "data"))
        model, _ = load_model("tiny-llama")
        adapters = {"mora": _save_random_adapter(model, "m", mora.MoRAConfig(r=8), root / "mora", 1),
                    "lora": _save_random_adapter(model, "l", mora.LoRAConfig(r=4, init_weights=False),
                                                 root / "lora", 2)}
        yield {"root": root, "chat": write_dataset(root, "chat"), "adapters": adapters}


def test_the_eval_split_is_the_rows_training_held_out_and_train_is_the_rest(env):
    held = _held_out(len(FACTS), 0.25, 3, "chat.jsonl")
    evaluation = read_examples(EvalSource(str(env["chat"]), "eval", 0.25, 3))
    train = read_examples(EvalSource(str(env["chat"]), "train", 0.25, 3))
    assert [e.source_row - 1 for e in evaluation] == sorted(held)
    assert sorted(e.source_row for e in train + evaluation) == list(range(1, len(FACTS) + 1))
    first = evaluation[0]
    country, capital = FACTS[first.source_row - 1]
    assert first.prompt == [{"role": "user", "content": f"What is the capital of {country}?"}]
    assert first.reference == f"The capital of {country} is {capital}." and first.example == 0


def test_a_limit_takes_the_same_seeded_sample_in_file_order(env):
    one = read_examples(EvalSource(str(env["chat"]), limit=3, seed=5))
    assert [e.source_row for e in one] == [e.source_row for e in read_examples(EvalSource(str(env["chat"]), limit=3,
                                                                                          seed=5))]
    assert len(one) == 3 and [e.source_row for e in one] == sorted(e.source_row for e in one)
    assert [e.example for e in one] == [0, 1, 2]


def test_sources_that_cannot_be_evaluated_say_why(env, tmp_path):
    with pytest.raises(EvalError, match="raw text has no prompt and reference"):
        read_examples(EvalSource(str(write_dataset(tmp_path, "text"))))
    with pytest.raises(EvalError, match="does not exist"):
        read_examples(EvalSource(str(tmp_path / "missing.jsonl")))
    with pytest.raises(EvalError, match="limit: between 1 and 1000"):
        EvalSource(str(env["chat"]), limit=5000).validate()
    with pytest.raises(EvalError, match="split 'eval' needs the run's eval_fraction"):
        EvalSource(str(env["chat"]), split="eval").validate()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(EvalError, match="row 1: nothing comes before the assistant's answer"):
        read_examples(EvalSource(str(bad)))
    with pytest.raises(EvalError, match=r"rows: between 1 and 8"):
        EvalRequest.from_dict({"rows": [], "source": {"data": "x"}})
    with pytest.raises(EvalError, match="max_new_tokens: between 1 and 1024"):
        EvalRequest.from_dict({"rows": [{"label": "b"}], "source": {"data": "x"}, "max_new_tokens": 0})


def test_answer_loss_in_a_batch_equals_alone_and_the_loss_by_hand(env):
    model, tokenizer = load_model("tiny-llama")
    name = mora.load_adapter(model, env["adapters"]["mora"], activate=False)
    model.eval()
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("Hi?", "A longer question?")]
    references = [tokenizer("Paris is big.", add_special_tokens=False)["input_ids"],
                  tokenizer("No.", add_special_tokens=False)["input_ids"]]
    pad = tokenizer.pad_token_id
    batched = answer_losses(model, prompts, references, [name, None], pad)
    alone = [answer_losses(model, [p], [r], [a], pad)[0] for p, r, a in zip(prompts, references, [name, None])]
    assert batched == pytest.approx(alone, abs=1e-5)
    with torch.no_grad():  # by hand: the base alone, unpadded, mean NLL of the reference tokens
        ids = torch.tensor([prompts[1] + references[1]])
        logits = model(ids).logits[0]
        start = len(prompts[1])
        nll = -torch.log_softmax(logits[start - 1:-1], -1)[torch.arange(len(references[1])),
                                                            torch.tensor(references[1])].mean()
    assert batched[1] == pytest.approx(float(nll), abs=1e-5)
    assert batched[0] != pytest.approx(batched[1])


def test_answers_from_the_teacher_forced_prompt_cache_equal_the_two_passes(env, monkeypatch):
    """The generation continues from the teacher-forced pass's keys and values (its prefill reads one token a row):
    the same greedy answers as a generation of its own and the losses of each row alone by hand, with prompts of
    different lengths, three adapters per row and more rows than one loss pass takes. An empty reference (scoring
    refuses one) has no loss and leaves the others' as they were."""
    model, tokenizer = load_model("tiny-llama")
    names = [mora.load_adapter(model, env["adapters"]["mora"], activate=False), None,
             mora.load_adapter(model, env["adapters"]["lora"], activate=False)]
    model.eval()
    questions = [("Hi?", "Paris is big."), ("A much longer question about capitals, rivers and seas?", "No."),
                 ("Why?", "Because."), ("What is the capital of France, please?", "The capital of France is Paris.")]
    system = {"role": "system", "content": "You answer questions about geography in one short sentence."}
    examples = [EvalExample(i, i + 1, [system, {"role": "user", "content": q}], r)
                for i, (q, r) in enumerate(questions)]
    monkeypatch.setattr(evaluation, "LOSS_ROWS", 8)
    assert len(examples) * len(names) > evaluation.LOSS_ROWS  # the prompts' cache is gathered from several passes
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        answers = [a for batch in answer_batches(model, tokenizer, examples, [0, 1, 2], names, 6, batch_rows=12)
                   for a in batch]
    finally:
        hook.remove()
    prompts = [render_prompt(tokenizer, e.prompt) for e in examples]
    assert len(set(map(len, prompts))) == len(prompts) and max(map(len, prompts)) not in widths
    shared = shared_prefix_length(prompts)  # the system prompt, read once per adapter
    assert shared >= evaluation.MIN_SHARED_PREFIX and widths[0] == shared
    assert widths.count(1) == len(widths) - 3  # the prefix, two teacher-forced passes, then one token a step a row
    greedy = GenerationSettings(max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    pairs = [(i, k) for i in range(len(examples)) for k in range(len(names))]
    alone = list(stream_rows(model, tokenizer, [prompts[i] for i, _ in pairs], [names[k] for _, k in pairs],
                             [greedy] * len(pairs)))[-1]
    assert [(a.example, a.row) for a in answers] == pairs
    assert [a.answer for a in answers] == [o.text for o in alone]
    for answer in answers:
        reference = tokenizer(examples[answer.example].reference, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompts[answer.example] + reference])
        with torch.no_grad(), mora.adapters_per_row(model, [names[answer.row]]):
            logits = model(ids).logits[0, len(prompts[answer.example]) - 1:-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(reference))
        assert answer.scores["answer_loss"] == pytest.approx(float(nll), abs=1e-4)
    assert len({a.scores["answer_loss"] for a in answers if a.example == 0}) == 3
    references = [tokenizer(e.reference, add_special_tokens=False)["input_ids"] for e in examples]
    prompt_pass = losses_and_prompt_cache(model, prompts, references[:2] + [[]] + references[3:], [names[0]] * 4,
                                          tokenizer.pad_token_id)
    losses, cache = prompt_pass.losses, prompt_pass.cache
    assert math.isnan(losses[2]) and cache.get_seq_length() == max(map(len, prompts)) - 1
    assert prompt_pass.shared_prefix == shared
    monkeypatch.setattr(evaluation, "MIN_SHARED_PREFIX", shared + 1)  # too short a start to share: read in every row
    unshared = losses_and_prompt_cache(model, prompts, references, [names[0]] * 4, tokenizer.pad_token_id)
    assert unshared.shared_prefix == 0 and unshared.cache.get_seq_length() == max(map(len, prompts)) - 1
    assert unshared.losses == pytest.approx([answers[i * 3].scores["answer_loss"] for i in range(4)], abs=1e-4)
    assert [losses[i] for i in (0, 1, 3)] == pytest.approx([answers[i * 3].scores["answer_loss"] for i in (0, 1, 3)],
                                                           abs=1e-4)


def test_every_row_answers_every_prompt_in_one_pass_as_it_would_alone(env):
    engine = ChatEngine(device="cpu")
    request = EvalRequest.from_dict({
        "base_model": "tiny-llama", "max_new_tokens": 8, "batch_rows": 6,
        "rows": [{"label": "base"}, {"label": "mora", "run_id": "r1", "adapter_path": env["adapters"]["mora"],
                                     "step": 20},
                 {"label": "lora", "adapter_path": env["adapters"]["lora"]}],
        "source": {"data": str(env["chat"]), "limit": 5}})
    seen, progress = [], []
    result = run_evaluation(engine, request, seen.append, lambda answers, done: progress.append((len(answers), done)))
    assert len(seen[0]) == 5 and progress == [(6, 2), (6, 4), (3, 5)]  # 6 rows a batch: 2 prompts × 3 rows
    assert sorted((a.example, a.row) for a in result.answers) == [(e, r) for e in range(5) for r in range(3)]
    model, tokenizer = load_model("tiny-llama")
    greedy = GenerationSettings(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    for answer in result.answers[:6]:
        path = [None, env["adapters"]["mora"], env["adapters"]["lora"]][answer.row]
        name = mora.load_adapter(model, path, activate=False) if path else None
        assert answer.answer == reply(model.eval(), tokenizer, result.examples[answer.example].prompt, name, greedy)
        if name:
            mora.remove_adapter(model, name)
        assert set(answer.scores) == {"exact_match", "char_accuracy", "token_f1", "rouge_l", "answer_loss",
                                      "perplexity"}
        assert all(0 <= answer.scores[m] <= 1 for m in ("exact_match", "char_accuracy", "token_f1", "rouge_l"))
        assert answer.scores["perplexity"] == pytest.approx(math.exp(answer.scores["answer_loss"]))
    losses = {row: result.scores[row]["answer_loss"] for row in range(3)}
    assert len(set(losses.values())) == 3  # each adapter changes the model
    assert len(engine.models) == 1  # one base for all three rows


def test_loss_passes_bound_rows_and_logits(monkeypatch):
    monkeypatch.setattr(evaluation, "LOSS_ROWS", 3)
    monkeypatch.setattr(evaluation, "LOSS_LOGITS", 100)
    references = [[0]] * 4 + [[0] * 20, [0]]  # a vocabulary of 10: a short row keeps 2 × 10 logits, the long one 210
    assert list(evaluation._loss_passes(references, 10)) == [range(0, 3), range(3, 4), range(4, 5), range(5, 6)]
    monkeypatch.setattr(evaluation, "LOSS_LOGITS", 1000)
    assert list(evaluation._loss_passes(references, 10)) == [range(0, 3), range(3, 6)]  # 3 rows × 21 × 10 = 630


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # [1, 2] keeps its last token to be read by generate
    assert shared_prefix_length([[7, 8, 9]]) == 2
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_summary_means_and_perplexity_by_hand():
    answers = [Answer(0, 0, "a", {"exact_match": 1.0, "answer_loss": 1.0}),
               Answer(1, 0, "b", {"exact_match": 0.0, "answer_loss": 3.0}),
               Answer(0, 1, "c", {"exact_match": 0.0, "answer_loss": None})]
    summary = summarize(answers)
    assert summary[0]["exact_match"] == 0.5 and summary[0]["answer_loss"] == 2.0
    assert summary[0]["perplexity"] == pytest.approx(math.exp(2.0))  # geometric mean of e^1 and e^3
    assert summary[1]["answer_loss"] is None and summary[1]["perplexity"] is None


def test_training_with_eval_generate_steps_draws_the_scores_beside_the_loss(env, tiny_model_dir, tmp_path):
    from storage.repo import Store
    from workers.collector import Collector
    from workers.eval_metrics import curve_name
    from workers.events import read_events
    from workers.train_config import TrainConfig
    from workers.training import run_training

    config = TrainConfig(data=str(env["chat"]), model=str(tiny_model_dir), adapter="mora", r=8, max_steps=20,
                         batch_size=4, max_length=64, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                         eval_generate_steps=5, eval_generate_samples=4)
    config.validate()
    result = run_training(config, tmp_path / "run", run_id="gen1")
    assert result.status == "succeeded", result.message
    evals = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [5, 10, 15, 20] and all(e["prompts"] == 4 for e in evals)
    for event in evals:
        assert all(0 <= event[curve_name(m)] <= 1 for m in ("exact_match", "char_accuracy", "token_f1", "rouge_l"))
    # the prompts are training rows: the model learns their answers, so their loss falls
    assert evals[-1][curve_name("answer_loss")] < evals[0][curve_name("answer_loss")] - 0.3
    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    run = store.create_run(config.to_dict(), name="gen", model="tiny", adapter="mora", r=8)
    Collector(store, None).apply([{**e, "run_id": run.id} for e in read_events(tmp_path / "run" / "metrics.jsonl")])
    series = store.metric_series([run.id], [curve_name("token_f1")])[run.id][curve_name("token_f1")]
    assert [p.step for p in series] == [5, 10, 15, 20]
    store.close()


def test_eval_generate_settings_are_bounded(env):
    from workers.train_config import ConfigError, TrainConfig

    base = dict(data=str(env["chat"]), max_steps=10_000)
    with pytest.raises(ConfigError, match="eval_generate_steps: at most 100 generation evals a run .* at least 100"):
        TrainConfig(**base, eval_generate_steps=50).validate()
    with pytest.raises(ConfigError, match="eval_generate_samples: must be at least 1 and at most 1000"):
        TrainConfig(**base, eval_generate_steps=500, eval_generate_samples=0).validate()
    TrainConfig(**base, eval_generate_steps=100).validate()
