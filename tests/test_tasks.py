"""Task APIs on a tiny random Llama (exact numbers) and, briefly, on the real default model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import llmkit
from llmkit import plugins, tasks
from llmkit.tasks import Classification, TaskError, TaskMixin


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return llmkit.load(tiny_model_dir("llama"))


def test_classify_scores_are_length_normalised_likelihoods(tiny):
    labels = ["the quick brown fox", "dog", "Paris is"]  # multi-token labels
    result = tasks.classify(tiny, "Numbers like 12345 appear in text too.", labels)
    assert isinstance(result, Classification) and result.label in labels
    assert sum(result.scores.values()) == pytest.approx(1.0)
    prompt = tasks.render(tiny, tasks._classify_prompt("Numbers like 12345 appear in text too.", labels))
    means = []
    for label in labels:
        cont = tiny.tokenizer.encode(label)
        logp = torch.log_softmax(tiny.logits(prompt + cont), -1)
        means.append(float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(cont)) / len(cont)))
    expected = torch.softmax(torch.tensor(means, dtype=torch.float64), 0)
    assert [result.scores[x] for x in labels] == pytest.approx(expected.tolist(), abs=1e-5)
    assert result.label == labels[int(np.argmax(means))]


def test_continuation_logprobs_batched_equal_one_by_one(tiny):
    tok = tiny.tokenizer
    pairs = [(tok.encode("The quick brown"), tok.encode(" fox jumps")), (tok.encode("def add(a, b):"), tok.encode(" return")),
             (tok.encode("Paris"), tok.encode(" is the capital of France"))]
    batched = tasks.continuation_logprobs(tiny, pairs, token_budget=64)
    for (ctx, cont), got in zip(pairs, batched):
        logp = torch.log_softmax(tiny.logits(ctx + cont), -1)
        want = [float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)]
        assert got == pytest.approx(want, abs=1e-4)


def test_classify_refuses_bad_label_sets(tiny):
    with pytest.raises(TaskError, match="two labels"):
        tasks.classify(tiny, "x", ["only"])
    with pytest.raises(TaskError, match="distinct"):
        tasks.classify(tiny, "x", ["a", "a"])


def test_embed_is_mean_of_final_hidden_states_like_transformers(tiny, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    texts = ["The quick brown fox jumps over the lazy dog.", "Paris", "def add(a, b):\n    return a + b\n"]
    got = tasks.embed(tiny, texts)
    assert got.shape == (3, tiny.config.hidden_size) and got.dtype == np.float32
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    for text, vec in zip(texts, got):
        ids = tiny.tokenizer.encode(text, add_special_tokens=True)
        with torch.no_grad():
            h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        want = torch.nn.functional.normalize(h.mean(0), dim=0).numpy()
        assert vec == pytest.approx(want, abs=1e-4)
    # batching does not change a text's vector
    assert tasks.embed(tiny, texts[1:2]) == pytest.approx(got[1:2], abs=1e-5)
    last = tasks.embed(tiny, texts, pooling="last")
    assert not np.allclose(last, got)


def test_extract_always_validates_even_from_a_random_model(tiny):
    from pydantic import BaseModel, Field

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "kind": {"enum": ["a", "b"]}}, "required": ["name", "n", "kind"]}
    # the tiny model's 128-token window has no room for the schema in the prompt: the rule alone
    short = [{"role": "user", "content": "Tom is 3."}]
    value = tasks._extract_json(tiny, short, schema, max_tokens=100)
    import jsonschema

    jsonschema.validate(value, schema)

    class Thing(BaseModel):
        label: str = Field(max_length=5)
        ok: bool

    thing = tasks._extract_json(tiny, short, Thing, max_tokens=100)
    assert isinstance(thing, Thing)


def test_extract_refuses_an_unenforceable_schema_before_generating(tiny):
    from llmkit.constrain import UnsupportedSchemaError

    with pytest.raises(UnsupportedSchemaError, match="uniqueItems"):
        tasks.extract(tiny, "x", {"type": "array", "uniqueItems": True})


def test_generation_tasks_return_text(tiny):
    summary = tasks.summarize(tiny, "The fox.", max_words=5, max_tokens=10)
    assert isinstance(summary, str) and len(summary.split()) <= 5
    assert isinstance(tasks.translate(tiny, "Paris", to="fr", max_tokens=8), str)
    assert isinstance(tasks.answer(tiny, "What?", context="Paris.", max_tokens=8), str)
    assert tasks.language_name("fr") == "French" and tasks.language_name("Klingon") == "Klingon"
    with pytest.raises(TaskError, match="summarize"):
        tasks.summarize(tiny, "x", words=3)  # an option the task does not have


def test_mixin_gives_llm_the_task_methods(tiny):
    llm = tiny
    assert isinstance(llm, TaskMixin)
    assert llm.classify("text", ["a", "b"]).label in ("a", "b")
    assert llm.embed(["x", "y"]).shape == (2, tiny.config.hidden_size)


class _ShoutPlugin:
    @plugins.hookimpl
    def register_tasks(self, register):
        register("shout", tasks.Task("shout", "Say it loudly.", lambda text: [{"role": "user", "content": text}],
                                     finish=lambda out, inputs: inputs["text"].upper()))
        register("summarize", tasks.Task("summarize", "Replaced.", lambda text, max_words=50: [],
                                         run=lambda llm, text, **kw: "replaced"))


def test_plugins_add_and_replace_tasks(tiny):
    plugins.reset()
    try:
        plugins.manager().register(_ShoutPlugin(), name="shout-plugin")
        assert tasks.run_task(tiny, "shout", "hey", max_tokens=2) == "HEY"
        assert tasks.summarize(tiny, "anything") == "replaced"
        assert "translate" in tasks.list_tasks()
        with pytest.raises(TaskError, match="no task named 'nope'"):
            tasks.get_task("nope")
    finally:
        plugins.reset()


def test_cli_tasks_and_run(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from llmkit.cli import main

    runner = CliRunner()
    listed = runner.invoke(main, ["tasks"])
    assert listed.exit_code == 0 and "classify" in listed.output and "perplexity" in listed.output
    f = tmp_path / "review.txt"
    f.write_text("The quick brown fox.")
    res = runner.invoke(main, ["run", "classify", str(f), "-m", str(tiny_model_dir("llama")), "--labels", "yes,no"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] in ("yes", "no")
    res = runner.invoke(main, ["run", "embed", str(f), "-m", str(tiny_model_dir("llama"))])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output.splitlines()[0])) == 64
    res = runner.invoke(main, ["run", "translate", str(f), "-m", str(tiny_model_dir("llama"))])
    assert res.exit_code != 0 and "--to" in res.output
    res = runner.invoke(main, ["run", "nope", str(f)])
    assert res.exit_code == 1 and "no task named" in res.output


@pytest.mark.slow
def test_real_model_classifies_and_extracts(smollm2):
    from pydantic import BaseModel

    assert tasks.classify(smollm2, "I loved this film, the acting was wonderful.", ["positive", "negative"]).label == "positive"
    assert tasks.classify(smollm2, "The soup was cold and the waiter was rude.", ["positive", "negative"]).label == "negative"

    class Person(BaseModel):
        name: str
        age: int

    person = tasks.extract(smollm2, "Maria Lopez is 34 years old.", Person)
    assert person.age == 34 and "Maria" in person.name
