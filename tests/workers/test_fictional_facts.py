"""The fictional-facts data of benchmarks/fictional_facts.py: the same facts for a seed, unique devices, paraphrased
questions that never occur in the training file, and files the evaluation reads."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from fictional_facts import make_facts, write_facts  # noqa: E402
from workers.evaluation import EvalSource, read_examples  # noqa: E402


def test_facts_are_reproducible_unique_and_paraphrases_are_held_out(tmp_path):
    facts = make_facts(30, seed=1)
    assert facts == make_facts(30, seed=1) and facts != make_facts(30, seed=2)
    assert len({name for name, _ in facts}) == 30
    paths = write_facts(facts, tmp_path)
    trained = {tuple(e.prompt[-1].values()) for e in read_examples(EvalSource(str(paths["trained"]), limit=30))}
    train = read_examples(EvalSource(str(paths["train"]), limit=60))
    paraphrases = read_examples(EvalSource(str(paths["paraphrases"]), limit=30))
    assert len(train) == 60 and len(paraphrases) == 30
    train_questions = {e.prompt[-1]["content"] for e in train}
    assert trained and all(q[1] in train_questions for q in trained)
    assert not train_questions & {e.prompt[-1]["content"] for e in paraphrases}
    assert {e.reference for e in paraphrases} == {e.reference for e in train}
