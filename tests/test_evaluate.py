"""Evaluation: perplexity against transformers, metrics, data checks, reports and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import llmkit
from llmkit import evaluate as ev
from llmkit.evaluate import DataError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return llmkit.load(tiny_model_dir("llama"))


TEXT = " ".join([
    "The quick brown fox jumps over the lazy dog.", "Language models predict the next token.",
    "Paris is the capital of France; Berlin is the capital of Germany.", "Numbers like 12345 appear too.",
] * 12)  # several hundred tokens: far more than the tiny model's 128-token window


def _transformers_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """transformers' sliding-window recipe: labels before the new tokens masked with -100."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            logits = model(x).logits[0, :-1].float()
        target = labels[0, 1:]
        keep = target != -100
        nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("window,stride", [(128, 64), (64, 16), (32, 32)])
def test_perplexity_agrees_with_transformers(tiny, tiny_model_dir, window, stride):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    ids = tiny.tokenizer.encode(TEXT, add_special_tokens=True)
    assert len(ids) > 3 * 128
    got = ev.perplexity(tiny, TEXT, window=window, stride=stride)
    want = _transformers_perplexity(hf, ids, window, stride)
    assert got["perplexity"] == pytest.approx(want, rel=5e-3)
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)  # in fact far closer than required


def test_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 2), (300, 128, 64), (5, 8, 4), (100, 32, 32), (2, 4, 1)]:
        scored = [p for _, end, first in ev._windows(n, window, stride) for p in range(first, end)]
        if stride < window:
            assert scored == list(range(1, n))
        assert len(scored) == len(set(scored))
        assert all(end - begin <= window for begin, end, _ in ev._windows(n, window, stride))


def test_macro_f1_and_recall():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    # a: tp1 fp1 fn1 -> .5 ; b: tp2 fp1 fn0 -> .8 ; c: tp0 fn1 -> 0
    assert ev.macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    v = ev.bow_vectors(["red apple", "green pear", "red apple pie", "pear tree"])
    r1, mrr = ev.recall_at_1(v[:2], v[2:], [0, 1])
    assert r1 == 1.0 and mrr == 1.0


def test_bad_records_name_the_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: missing field 'label'"):
        ev.load_records(f, ("text", "label"))
    f.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        ev.load_records(f, ("text",))
    with pytest.raises(DataError, match="shipped sets"):
        ev.load_records(tmp_path / "missing.jsonl")


def test_labels_outside_the_label_set_are_reported(tiny, tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: label 'neutral' is not one of the labels given"):
        ev.evaluate([tiny], ["accuracy"], f, options={"labels": "pos,neg"})


def test_evaluate_report_is_complete_and_deterministic(tiny, tiny_model_dir, tmp_path):
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": t, "label": l}) + "\n"
                           for t, l in [("fox", "animal"), ("Paris", "city"), ("dog", "animal"), ("Berlin", "city")]))
    report = ev.evaluate([tiny], ["accuracy"], cls, seed=3, limit=3)
    again = ev.evaluate([tiny], ["accuracy"], cls, seed=3, limit=3)
    assert report["results"][0]["metrics"] == again["results"][0]["metrics"]
    assert report["data"]["records"] == 3 and report["data"]["sha256"] == ev.file_sha256(cls)
    r = report["results"][0]
    assert r["sha256"] and len(r["sha256"]) == 64 and r["path"] == str(tiny_model_dir("llama"))
    assert set(r["metrics"]["accuracy"]) == {"accuracy", "macro_f1"}
    assert report["settings"]["seed"] == 3


def test_generation_metrics_multiple_choice_and_side_by_side(tiny, tiny_model_dir, tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"input": i, "reference": r}) + "\n"
                           for i, r in [("fox", "the quick brown fox"), ("Paris", "Paris is the capital")]))
    other = llmkit.load(tiny_model_dir("qwen2"))
    report = ev.evaluate([tiny, other], ["bleu", "chrf", "rouge"], gen,
                         options={"template": "Say: {input}", "max_tokens": 6})
    for r in report["results"]:
        assert set(r["metrics"]) == {"bleu", "chrf", "rouge"}
        assert set(r["metrics"]["rouge"]) == {"rouge1", "rouge2", "rougeL"}
        assert all(0 <= v <= 100 for m in r["metrics"].values() for v in m.values())
    header, rows = ev.format_table(report)
    assert len(header) == 4 and len(rows) == 5
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "Capital of France?", "choices": ["Paris", "Berlin"], "answer": "Paris"}) + "\n"
                  + json.dumps({"question": "Fox?", "choices": ["quick", "slow", "lazy"], "answer": 0}) + "\n")
    scores = ev.evaluate([tiny], ["multiple_choice"], mc)["results"][0]["metrics"]["multiple_choice"]
    assert set(scores) == {"acc", "acc_norm"} and 0 <= scores["acc"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: answer index 5"):
        ev.evaluate([tiny], ["multiple_choice"], bad)


def test_shipped_sets_load():
    for name, metric in ev.BUILTIN_METRICS.items():
        records = ev.load_records(metric.data, metric.fields)
        assert len(records) >= (1 if name == "perplexity" else 20), name


def test_cli_eval_writes_a_report(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from llmkit.cli import main

    out = tmp_path / "report.json"
    model = str(tiny_model_dir("llama"))
    res = CliRunner().invoke(main, ["eval", "-m", f"{model},{model}", "--task", "perplexity,", "--limit", "3",
                                    "--window", "64", "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["tasks"] == ["perplexity"] and len(report["results"]) == 2
    assert report["data"]["path"].endswith("text.txt") and report["settings"]["window"] == 64
    assert report["results"][0]["metrics"] == report["results"][1]["metrics"]
    res = CliRunner().invoke(main, ["eval", "--task", "nonsense"])
    assert res.exit_code == 1 and "no evaluation task named" in res.output
