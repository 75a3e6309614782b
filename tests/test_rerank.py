"""Rerank and score (``/v1/rerank``, ``/v1/score``) from the model's own query likelihood: the
order on a clear set with the real default model, and the API's shapes, key, metrics and errors
against a real server over a tiny random model."""

from __future__ import annotations

import httpx
import pytest
from test_server import assert_error, running_server

from llmkit import relevance
from llmkit.server import ServerConfig, create_app

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are long curved fruits with a yellow peel.",
    "Paris is the capital and largest city of France.",
    "A car engine burns fuel in cylinders to push pistons.",
]


@pytest.fixture(scope="module")
def real_url(smollm2_fast):
    app = create_app(smollm2_fast, config=ServerConfig(model_name="smollm2"))
    with running_server(app) as base:
        yield base


def test_rerank_puts_the_document_that_answers_first(real_url, smollm2_fast):
    r = httpx.post(real_url + "/v1/rerank", json={"model": "smollm2", "query": QUERY, "documents": DOCUMENTS},
                   timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["index"] for x in results][0] == 1  # Paris
    assert results[0]["document"] == {"text": DOCUMENTS[1]}
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert body["usage"]["total_tokens"] > 0 and body["id"].startswith("rerank-")
    # the library gives the same scores as the server
    direct = relevance.rerank(smollm2_fast, QUERY, DOCUMENTS)
    assert {x["index"]: x["relevance_score"] for x in results} == pytest.approx(dict(enumerate(direct)), rel=1e-4)
    # another query over the same documents: another winner, so the order comes from the query
    engine = httpx.post(real_url + "/v1/rerank", timeout=300, json={
        "query": "How does a car engine work?", "documents": [{"text": d} for d in DOCUMENTS],
        "top_n": 1, "return_documents": False}).json()
    assert engine["results"] == [{"index": 2, "relevance_score": pytest.approx(engine["results"][0]["relevance_score"])}]


def test_score_gives_one_score_per_pair(real_url):
    one_to_many = httpx.post(real_url + "/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS}, timeout=300).json()
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2]
    assert all(d["object"] == "score" for d in one_to_many["data"])
    scores = [d["score"] for d in one_to_many["data"]]
    assert max(range(3), key=scores.__getitem__) == 1
    pairwise = httpx.post(real_url + "/v1/score", timeout=300, json={
        "text_1": [QUERY, "Which fruit is yellow and curved?"], "text_2": [DOCUMENTS[1], DOCUMENTS[0]]}).json()
    assert len(pairwise["data"]) == 2
    assert pairwise["data"][0]["score"] == pytest.approx(scores[1], rel=1e-4)
    assert pairwise["usage"]["total_tokens"] == pairwise["usage"]["prompt_tokens"] > 0


# ------------------------------------------------------------------------------------------ the API, on a tiny model

@pytest.fixture(scope="module")
def url(tiny_llm):
    app = create_app(tiny_llm, config=ServerConfig(model_name="tiny", api_key="k3y"))
    with running_server(app) as base:
        yield base


KEY = {"Authorization": "Bearer k3y"}


def test_rerank_and_score_are_behind_the_key_documented_and_counted(url):
    body = {"query": "The quick brown fox", "documents": ["jumps over the lazy dog", "Paris is the capital"]}
    assert_error(httpx.post(url + "/v1/rerank", json=body, timeout=60), 401)
    assert_error(httpx.post(url + "/v1/score", json={"text_1": "a", "text_2": "b"}, timeout=60), 401)
    before = metric_with_key(url, "llmkit:request_success_total", finished_reason="length")
    r = httpx.post(url + "/v1/rerank", json=body, headers=KEY, timeout=60)
    assert r.status_code == 200, r.text
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1]
    assert metric_with_key(url, "llmkit:request_success_total", finished_reason="length") == before + 2
    paths = httpx.get(url + "/openapi.json", headers=KEY).json()["paths"]
    assert "/v1/rerank" in paths and "/v1/score" in paths
    assert "RerankRequest" in httpx.get(url + "/openapi.json", headers=KEY).text


def metric_with_key(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics", headers=KEY).text
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " "))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/rerank", {"documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "no text"}]}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    ("/v1/rerank", {"query": "q " * 200, "documents": ["a"]}, "documents"),  # past the context window
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
    ("/v1/score", {"text_1": [], "text_2": ["c"]}, "text_1"),
    ("/v1/score", {"text_1": "a"}, "text_2"),
])
def test_bad_input_is_a_400_that_names_the_field(url, path, body, param):
    r = httpx.post(url + path, json=body, headers=KEY, timeout=60)
    error = assert_error(r, 400)
    assert error["param"] is not None and param in error["param"], error
