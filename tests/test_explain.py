"""llmkit explain: per-token probabilities, ranks, alternatives, entropy, attention; HTML, PNG, CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

from llmkit.cli import main
from llmkit.explain import explain

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


def test_token_statistics_follow_from_the_logits(tiny_llm_for):
    llm = tiny_llm_for("llama")
    e = explain(llm, TEXT, top_k=4)
    ids = llm.tokenizer.encode(TEXT, add_special_tokens=True)
    assert [t.id for t in e.tokens] == ids
    assert "".join(t.text for t in e.tokens) == llm.tokenizer.decode(ids) == e.text
    probs = llm.logits(ids).softmax(-1)
    assert e.tokens[0].prob is None and e.tokens[0].top == []
    for t in e.tokens[1:]:
        row = probs[t.index - 1]
        assert t.prob == pytest.approx(float(row[t.id]), rel=1e-5)
        assert t.rank == int((row > row[t.id]).sum()) + 1
        assert t.entropy == pytest.approx(float(-(row * row.log()).sum() / math.log(2)), rel=1e-4)
        assert [a.id for a in t.top] == row.topk(4).indices.tolist()
        assert t.top[0].prob >= t.top[-1].prob
        assert (t.rank == 1) == (t.top[0].id == t.id)
    nll = -sum(math.log(t.prob) for t in e.tokens[1:]) / (len(ids) - 1)
    assert e.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    json.dumps(e.to_dict())  # the data structure is JSON-able


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_attention_equals_transformers_eager_attention(tiny_llm_for, tiny_model_dir, arch):
    from transformers import AutoModelForCausalLM

    e = explain(tiny_llm_for(arch), TEXT)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(torch.tensor([[t.id for t in e.tokens]]), output_attentions=True)
    for layer, weights in enumerate(out.attentions):
        assert (e.attention[layer] - weights[0]).abs().max() < 1e-5
    a = e.attention_map(layer=-1, head=1)
    assert torch.allclose(a.sum(-1), torch.ones(len(e.tokens)), atol=1e-5)
    assert torch.triu(a, diagonal=1).abs().max() == 0  # causal: nothing from the future


def test_explaining_a_generated_answer(tiny_llm_for):
    llm = tiny_llm_for("qwen2")
    e = explain(llm, "Paris is", max_tokens=5, layers=[0])
    prompt = llm.tokenizer.encode("Paris is", add_special_tokens=True)
    new = llm.generate_ids(prompt, max_tokens=5, temperature=0)
    assert [t.id for t in e.tokens] == prompt + new
    assert [t.generated for t in e.tokens] == [False] * len(prompt) + [True] * len(new)
    assert all(t.rank == 1 for t in e.tokens if t.generated)  # greedy picks the top token
    assert set(e.attention) == {0}


def test_html_page_and_heatmap(tiny_llm_for, tmp_path):
    e = explain(tiny_llm_for("llama"), "Caf\u00e9 <b>bold</b> & done", top_k=2)
    page = e.to_html(tmp_path / "e.html")
    assert (tmp_path / "e.html").read_text(encoding="utf-8") == page
    spans = re.findall(r'<span class="tok[^"]*" style="background:([^"]+)" title="([^"]*)"', page)
    assert len(spans) == len(e.tokens)
    assert "&lt;" in page and "<b>" not in page  # the text is escaped, not rendered
    second = e.tokens[1]
    assert f"p = {second.prob:.4f} (rank {second.rank})" in spans[1][1]
    assert "top alternatives" in spans[1][1] and repr(second.top[0].text).replace("'", "&#x27;") in spans[1][1]
    assert len({colour for colour, _ in spans}) > 1  # coloured by probability
    png = e.plot_attention(tmp_path / "a.png", layer=1, head=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="head 9 does not exist"):
        e.attention_map(layer=0, head=9)


def test_real_model_predicts_the_obvious(smollm2):
    e = explain(smollm2, "The capital of France is Paris", attention=False)
    last = e.tokens[-1]
    assert last.text == " Paris" and last.rank == 1 and last.prob > 0.3


def test_cli_explain(tiny_model_dir, tmp_path):
    runner = CliRunner()
    model = str(tiny_model_dir("llama"))
    html, png = tmp_path / "x.html", tmp_path / "x.png"
    result = runner.invoke(main, ["explain", "-m", model, TEXT, "--html", str(html), "--png", str(png),
                                  "--layer", "0", "--head", "1", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "prob" in result.output and "perplexity" in result.output and "wrote heatmap" in result.output
    assert html.exists() and png.read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(main, ["explain", "-m", model, "--json", "--generate", "2"], input="Hello there\n")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert sum(t["generated"] for t in data["tokens"]) == 2
    result = runner.invoke(main, ["explain", "-m", model, "hi", "--layer", "7"])
    assert result.exit_code == 2 and "layers 0..1" in result.output
