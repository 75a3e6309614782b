"""Reasoning kept apart from the answer: the marker splitter, the thinking budget, and the chat
APIs (Python, chat completions) on a tiny real model whose chat template thinks."""

from __future__ import annotations

import json
import random

import pytest

from llmkit import reasoning
from llmkit.errors import InvalidSamplingError
from llmkit.reasoning import ReasoningSplitter, ThinkingTracker, split

START, END = "<think>", "</think>"


def stream(text: str, cuts: list[int], *, open: bool) -> tuple[str, str, bool]:
    """Feed `text` cut at `cuts` through a splitter; the joined reasoning and content deltas."""
    s = ReasoningSplitter(START, END, open=open)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    reasoning_out, content_out = [], []
    for piece in pieces:
        r, c = s.feed(piece)
        reasoning_out.append(r)
        content_out.append(c)
    r, c = s.finish()
    return "".join(reasoning_out) + r, "".join(content_out) + c, s.thinking


TEXTS = [
    ("<think>\nI should add.\n</think>\n\nThe answer is 4.", False, ("I should add.", "The answer is 4.")),
    ("  <think>a < b and </thin is not the end</think>Yes", False, ("a < b and </thin is not the end", "Yes")),
    ("plain answer with <think> inside", False, (None, "plain answer with <think> inside")),
    ("Let me think.\n\n</think>\n\nParis.", True, ("Let me think.", "Paris.")),
    ("still thinking when cut off </thi", True, ("still thinking when cut off </thi", "")),
    ("</think>answer only", True, ("", "answer only")),
    ("<thi", False, (None, "<thi")),
    ("   ", False, (None, "   ")),
    ("<think>x</think>  \n", False, ("x", "")),
    ("a \n b\n</think>c </think> d", True, ("a \n b", "c </think> d")),
]


@pytest.mark.parametrize("text,open,expected", TEXTS)
def test_split_whole_text(text, open, expected):
    assert split(text, START, END, open=open) == expected


@pytest.mark.parametrize("text,open,expected", TEXTS)
def test_streamed_pieces_join_to_the_whole_split(text, open, expected):
    # every way of cutting the text into two or three pieces (markers split across pieces
    # included) and one piece per character give what the whole text gives
    n = len(text)
    cuttings = [[i] for i in range(1, n)] + [[i, j] for i in range(1, n) for j in range(i + 1, n)]
    cuttings.append(list(range(1, n)))
    for cuts in cuttings:
        r, c, thinking = stream(text, cuts, open=open)
        assert (r if thinking else None, c) == expected, (text, cuts)


def test_random_texts_stream_as_they_split():
    rng = random.Random(0)
    alphabet = ["<think>", "</think>", "<", "</", "th", "ink", ">", " ", "\n", "a", "b"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        open = rng.random() < 0.5
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 4)))) if len(text) > 1 else []
        r, c, thinking = stream(text, cuts, open=open)
        expected = split(text, START, END, open=open)
        assert (r if thinking else None, c) == expected, (text, cuts, open)


def test_marker_held_back_until_the_next_piece_tells():
    s = ReasoningSplitter(START, END, open=True)
    assert s.feed("step one </th") == ("step one", "")
    assert s.in_reasoning
    assert s.feed("ink>\n") == ("", "")
    assert not s.in_reasoning
    assert s.feed("Done") == ("", "Done")
    assert s.finish() == ("", "")


def test_markers_read_from_the_chat_template():
    class Tok:
        def __init__(self, templates):
            self.chat_templates = templates

    assert reasoning.markers(Tok({"default": "{{ '<think>\\n' }}...{{ '</think>' }}"})) == (START, END)
    assert reasoning.markers(Tok({"default": "{% for m in messages %}{{ m.content }}{% endfor %}"})) is None
    assert reasoning.markers(Tok({})) is None


def test_effort_maps_to_growing_budgets():
    budgets = [reasoning.budget_for_effort(e) for e in ("none", "minimal", "low", "medium", "high")]
    assert budgets == sorted(budgets) and budgets[0] == 0
    assert reasoning.budget_for_effort(None) is None
    with pytest.raises(InvalidSamplingError, match="reasoning_effort"):
        reasoning.budget_for_effort("extreme")


def test_tracker_forces_a_multi_token_end_marker_after_the_budget():
    t = ThinkingTracker([7], [8, 9], open=True, budget=3)
    forced = []
    for token in [1, 2, 3, None, None, 5]:
        f = t.forced()
        if token is None:
            assert f is not None
            token = f
            forced.append(f)
        else:
            assert f is None
        t.accept(token)
    assert forced == [8, 9] and t.closed and t.tokens == 3 and t.forced() is None


def test_tracker_counts_a_block_the_model_opens_and_closes_itself():
    t = ThinkingTracker([7], [8], budget=None)
    for token in [7, 1, 2, 8, 3, 4]:
        t.accept(token)
    assert t.closed and t.tokens == 2
    never = ThinkingTracker([7], [8], budget=1)
    for token in [1, 2, 3, 4]:
        never.accept(token)
        assert never.forced() is None
    assert never.closed and never.tokens == 0


# ------------------------------------------------------------------------------------------ a model that thinks

USER = [{"role": "user", "content": "The quick brown fox"}]
# random weights never close the block: the budget does, and ignore_eos leaves room for an answer
ASK = dict(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def thinker(thinking_model):
    import llmkit

    return llmkit.load(thinking_model)


def prompt_ids(llm, messages=USER, **template):
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template))


def test_the_budget_closes_the_block_after_that_many_tokens(thinker):
    tok = thinker.tokenizer
    (end,) = tok.encode(END)
    ids = prompt_ids(thinker)
    assert reasoning.markers(tok) == (START, END) and reasoning.prompt_is_open(tok, ids, START)
    for budget in (0, 1, 5):
        out = thinker.generate_ids(ids, max_thinking_tokens=budget, **ASK)
        assert out.index(end) == budget, out  # exactly the budget inside, then the end marker
        assert len(out) == ASK["max_tokens"]
    # without a budget the random model thinks until max_tokens: the block never closes
    assert end not in thinker.generate_ids(ids, **ASK)
    # sampled (not greedy) and speculation allowed: the budget holds all the same
    out = thinker.generate_ids(ids, max_thinking_tokens=3, max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    assert out.index(end) == 3


def test_chat_with_reasoning_returns_both_apart(thinker):
    reply = thinker.chat(USER, reasoning=True, max_thinking_tokens=6, **ASK)
    raw = thinker.tokenizer.decode(thinker.generate_ids(prompt_ids(thinker), max_thinking_tokens=6, **ASK),
                                   skip_special_tokens=True)
    assert END in raw
    assert (reply.reasoning, reply.content) == split(raw, START, END, open=True)
    assert reply.content and END not in reply.content and END not in reply.reasoning
    assert str(reply) == reply.content
    # without reasoning=True: the answer alone; streamed pieces say which part they are
    assert thinker.chat(USER, max_thinking_tokens=6, **ASK) == reply.content
    pieces = list(thinker.chat_stream(USER, reasoning=True, max_thinking_tokens=6, **ASK))
    assert {p.kind for p in pieces} == {"reasoning", "content"}
    assert "".join(p.text for p in pieces if p.kind == "reasoning") == reply.reasoning
    assert "".join(str(p) for p in pieces if p.kind == "content") == reply.content
    assert "".join(thinker.chat_stream(USER, max_thinking_tokens=6, **ASK)) == reply.content


def test_thinking_turned_off_through_the_template(thinker):
    ids = prompt_ids(thinker, enable_thinking=False)
    assert not reasoning.prompt_is_open(thinker.tokenizer, ids, START)
    reply = thinker.chat(USER, reasoning=True, template_kwargs={"enable_thinking": False}, **ASK)
    assert reply.reasoning is None
    assert reply.content == thinker.tokenizer.decode(thinker.generate_ids(ids, **ASK), skip_special_tokens=True)


def test_a_model_that_does_not_think_chats_as_before(tiny_llm):
    ids = prompt_ids(tiny_llm)
    plain = tiny_llm.tokenizer.decode(tiny_llm.generate_ids(ids, max_tokens=12, temperature=0),
                                      skip_special_tokens=True)
    assert reasoning.markers(tiny_llm.tokenizer) is None
    assert tiny_llm.chat(USER, max_tokens=12, temperature=0) == plain
    assert tiny_llm.chat(USER, reasoning=True, max_tokens=12, temperature=0) == (plain, None)
    # a budget on a model that does not think changes nothing
    assert tiny_llm.chat(USER, max_tokens=12, temperature=0, max_thinking_tokens=0) == plain


# ------------------------------------------------------------------------------------------ the server

@pytest.fixture(scope="module")
def thinking_url(thinker):
    from test_server import running_server

    from llmkit.server import ServerConfig, create_app

    app = create_app(thinker, config=ServerConfig(model_name="thinker", default_max_tokens=16))
    with running_server(app) as base:
        yield base


BODY = {"model": "thinker", "messages": USER, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
SDK = {k: v for k, v in BODY.items() if k != "ignore_eos"}  # the openai SDK takes ignore_eos in extra_body


def test_chat_completion_keeps_reasoning_apart(thinking_url, thinker):
    from test_server import client

    oai = client(thinking_url)
    r = oai.chat.completions.create(**SDK, extra_body={"max_thinking_tokens": 6, "ignore_eos": True})
    message = r.choices[0].message
    expected = thinker.chat(USER, reasoning=True, max_thinking_tokens=6, **ASK)
    assert (message.reasoning_content, message.content) == (expected.reasoning, expected.content)
    assert r.usage.completion_tokens_details.reasoning_tokens == 6
    # reasoning_effort picks a budget by level: "none" closes the block at once
    r = oai.chat.completions.create(**SDK, reasoning_effort="none", extra_body={"ignore_eos": True})
    assert r.choices[0].message.reasoning_content == ""
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert r.choices[0].message.content == thinker.chat(USER, max_thinking_tokens=0, **ASK)


def test_chat_completion_stream_keeps_reasoning_apart(thinking_url, thinker):
    from test_server import client

    oai = client(thinking_url)
    chunks = list(oai.chat.completions.create(**SDK, stream=True, stream_options={"include_usage": True},
                                              extra_body={"max_thinking_tokens": 6, "ignore_eos": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    expected = thinker.chat(USER, reasoning=True, max_thinking_tokens=6, **ASK)
    assert (thought, content) == (expected.reasoning, expected.content)
    # every reasoning delta comes before the first piece of the answer
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas if d.content or
             getattr(d, "reasoning_content", None)]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 6


def test_a_json_schema_holds_for_the_answer_after_the_reasoning(thinking_url):
    import httpx
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"type": "integer", "minimum": 0,
              "maximum": 99}}, "required": ["ok", "size"], "additionalProperties": False}
    body = httpx.post(thinking_url + "/v1/chat/completions", timeout=60, json={
        **BODY, "ignore_eos": False, "max_tokens": 60, "max_thinking_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert choice["message"]["reasoning_content"]  # the constraint did not hold the reasoning back
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4


def test_without_a_budget_a_cut_off_answer_is_all_reasoning(thinking_url):
    import httpx

    body = httpx.post(thinking_url + "/v1/chat/completions", json=BODY, timeout=60).json()
    message = body["choices"][0]["message"]
    assert message["content"] == "" and message["reasoning_content"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 24


def test_chat_template_kwargs_turn_thinking_off_and_bad_ones_are_400(thinking_url, thinker):
    import httpx

    body = httpx.post(thinking_url + "/v1/chat/completions", timeout=60,
                      json={**BODY, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert "reasoning_content" not in body["choices"][0]["message"]
    assert body["choices"][0]["message"]["content"] == thinker.chat(
        USER, template_kwargs={"enable_thinking": False}, **ASK)
    for bad, param in (({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
                       ({"reasoning_effort": "extreme"}, "reasoning_effort"),
                       ({"max_thinking_tokens": -1}, "max_thinking_tokens")):
        r = httpx.post(thinking_url + "/v1/chat/completions", json={**BODY, **bad}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_a_model_that_does_not_think_has_no_reasoning_fields(tiny_llm):
    import httpx
    from test_server import running_server

    from llmkit.server import ServerConfig, create_app

    app = create_app(tiny_llm, config=ServerConfig(model_name="tiny", default_max_tokens=8))
    with running_server(app) as base:
        body = {**BODY, "model": "tiny", "max_tokens": 8, "reasoning_effort": "low"}
        whole = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
        assert set(whole["choices"][0]["message"]) == {"role", "content"}
        assert "completion_tokens_details" not in whole["usage"]
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert not any("reasoning_content" in c["delta"] for e in events for c in e["choices"])
        assert "completion_tokens_details" not in events[-1]["usage"]


# ------------------------------------------------------------------------------------------ the command line

def test_cli_chat_shows_the_reasoning_before_the_answer_or_hides_it(thinking_model, thinker, home):
    from cli_helpers import run_llmkit

    expected = thinker.chat(USER, reasoning=True, max_thinking_tokens=4, max_tokens=16, temperature=0, ignore_eos=True)
    assert expected.reasoning and expected.content
    args = ("chat", "-m", thinking_model, "--temperature", "0", "--max-tokens", "16", "--ignore-eos",
            "--max-thinking-tokens", "4")
    shown = run_llmkit(*args, home=home, input=USER[0]["content"] + "\n")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"{expected.reasoning}\n\n{expected.content}\n"
    hidden = run_llmkit(*args, "--hide-thinking", home=home, input=USER[0]["content"] + "\n")
    assert hidden.returncode == 0, hidden.stderr
    assert hidden.stdout == f"{expected.content}\n"
