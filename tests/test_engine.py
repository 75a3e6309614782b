"""The continuous-batching engine: requests join and leave, slots are freed, answers stay exact."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import llmkit
from llmkit.engine import Engine, QueueFullError, Request
from llmkit.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return llmkit.load(tiny_model_dir("llama"))


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def alone(llm, ids, params):
    return llm.generate_ids(ids, **{k: getattr(params, k) for k in
                                    ("max_tokens", "temperature", "ignore_eos", "seed", "top_k", "stop")})


def prompts(tiny):
    texts = ["The quick brown fox", "def add(a, b):\n    return", "Paris", "Numbers like 12345 and 3.14159 appear"]
    return [tiny.tokenizer.encode(t) for t in texts]


def test_requests_joining_mid_way_get_the_same_answers(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, max_batch=4)
    ids = prompts(tiny)
    first = engine.submit(Request(ids[0], greedy(40)))
    events = first.events()
    for _ in range(10):  # the first request is well under way ...
        next(events)
    later = [engine.submit(Request(p, greedy(20))) for p in ids[1:]]  # ... when the others join
    rest = list(events)
    assert rest[-1].finish_reason == "length"
    for h, p, n in zip([first, *later], ids, [40, 20, 20, 20]):
        if h is not first:
            list(h.events())
        assert h.tokens == alone(tiny, p, greedy(n))


def test_more_requests_than_slots_all_finish_correctly(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, max_batch=2)
    ids = prompts(tiny) * 2
    handles = [engine.submit(Request(p, greedy(8 + i))) for i, p in enumerate(ids)]
    for h, p, i in zip(handles, ids, range(len(ids))):
        list(h.events())
        assert h.tokens == alone(tiny, p, greedy(8 + i))
    assert engine.num_running == 0 and engine._free_slots == [0, 1]


def test_long_prompts_are_prefilled_in_chunks(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, prefill_chunk=7)
    p = sum(prompts(tiny), [])[:60]
    h = engine.submit(Request(p, greedy(12)))
    list(h.events())
    assert h.tokens == alone(tiny, p, greedy(12))


def _hold(engine, prompt):
    """Submit ``prompt`` and keep the engine inside its step until the returned event is set:
    requests submitted meanwhile all wait for the next step."""
    busy, release = threading.Event(), threading.Event()

    def hold(generated, logits):
        busy.set()
        release.wait(30)
        return logits

    first = engine.submit(Request(prompt, greedy(2, logits_processors=[hold])))
    assert busy.wait(30)
    return first, release


@pytest.mark.parametrize("per_step", [None, 1])
def test_prompts_share_a_step_up_to_the_chunk_budget(tiny, per_step):
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, max_batch=5, prefill_chunk=12)
    ids = prompts(tiny)
    calls = []
    forward = engine.executor.forward

    def recording(chunks, decodes):
        calls.append([len(c[1]) for c in chunks])
        return forward(chunks, decodes)

    engine.executor.forward = recording
    if per_step:
        engine.executor.prompts_per_step = per_step
    first, release = _hold(engine, ids[0])
    handles = [engine.submit(Request(p, greedy(6))) for p in ids]
    release.set()
    list(first.events())
    for h, p in zip(handles, ids):
        list(h.events())
        assert h.tokens == alone(tiny, p, greedy(6))
    calls = [c for c in calls[1:] if c]  # after the held request's own prompt: steps with prompts
    lengths = [len(p) for p in ids]
    chunked = [n for c in calls for n in c]
    assert sum(chunked) == sum(lengths)  # every prompt token prefilled once
    assert all(sum(c) <= 12 for c in calls)
    if per_step:
        assert max(len(c) for c in calls) == 1
    else:
        assert len(calls[0]) > 1  # several prompts in the step after they arrived


def test_cancel_frees_the_slot(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, max_batch=2)
    ids = prompts(tiny)
    h = engine.submit(Request(ids[0], greedy(100)))
    events = h.events()
    next(events), next(events)
    h.cancel()
    assert list(events)[-1].finish_reason == "cancelled"
    assert engine.num_running == 0 and engine._free_slots == [0, 1]
    assert len(h.tokens) < 100
    # a waiting request can be cancelled too, and the engine keeps serving
    blockers = [engine.submit(Request(p, greedy(30))) for p in ids[:2]]
    waiting = engine.submit(Request(ids[2], greedy(30)))
    waiting.cancel()
    assert list(waiting.events())[-1].finish_reason == "cancelled"
    for b, p in zip(blockers, ids):
        list(b.events())
        assert b.tokens == alone(tiny, p, greedy(30))


def test_closing_a_stream_early_cancels_it(tiny):
    stream = tiny.stream("The quick brown fox", max_tokens=100, temperature=0, ignore_eos=True)
    next(stream)
    stream.close()
    deadline = time.time() + 10
    while tiny.engine.num_running and time.time() < deadline:
        time.sleep(0.01)
    assert tiny.engine.num_running == 0


def test_per_request_settings_in_one_batch(tiny):
    """Stop strings, end of sequence, seeds and lengths apply to each request on its own."""
    ids = prompts(tiny)
    free = tiny.generate("The quick brown fox", max_tokens=30, temperature=0, ignore_eos=True)
    stop = free[10:13]
    settings = [
        dict(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]),
        dict(max_tokens=17, temperature=0.9, seed=5, ignore_eos=True),
        dict(max_tokens=25, temperature=0, stop_token_ids=[ids[2][0]]),
    ]
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length)
    texts = ["", "", ""]
    for e in engine.run([Request(tiny.tokenizer.encode("The quick brown fox"), SamplingParams(**settings[0])),
                         Request(ids[1], SamplingParams(**settings[1])),
                         Request(ids[2], SamplingParams(**settings[2]))]):
        texts[e.index] += e.text
    assert texts[0] == free[: free.index(stop)]
    assert texts[1] == tiny.generate(tiny.tokenizer.decode(ids[1]), **settings[1])
    assert texts[2] == tiny.generate(tiny.tokenizer.decode(ids[2]), **settings[2])


def test_logprobs_are_the_models(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length)
    p = prompts(tiny)[0]
    h = engine.submit(Request(p, greedy(5), logprobs=3))
    events = list(h.events())
    full = tiny.logits(p + h.tokens[:-1]).log_softmax(-1)
    for i, e in enumerate(events):
        row = full[len(p) - 1 + i]
        assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == row.topk(3).indices.tolist()


def test_queue_limit_and_shutdown(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, max_batch=1, max_queue=1)
    ids = prompts(tiny)
    release = threading.Event()

    def hold(generated, logits):  # keeps the running request busy until the queue was checked
        release.wait(30)
        return logits

    running = engine.submit(Request(ids[0], greedy(60, logits_processors=[hold])))
    deadline = time.time() + 10
    while engine.num_running == 0 and time.time() < deadline:
        time.sleep(0.001)
    waiting = engine.submit(Request(ids[1], greedy(5)))
    with pytest.raises(QueueFullError, match="retry"):
        engine.submit(Request(ids[2], greedy(5)))
    release.set()
    assert engine.shutdown(timeout=60)
    assert running.finish_reason == "length" and waiting.finish_reason == "length"
    with pytest.raises(QueueFullError, match="shutting down"):
        engine.submit(Request(ids[2], greedy(5)))


def test_close_cancels_what_runs_and_ends_the_thread(tiny):
    """What runs at interpreter exit: no engine thread may outlive it (a daemon thread freeing
    tensors during finalization aborts the process)."""
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, max_batch=1)
    ids = prompts(tiny)
    started = threading.Event()

    def slow(generated, logits):
        started.set()
        time.sleep(0.01)
        return logits

    running = engine.submit(Request(ids[0], greedy(100, logits_processors=[slow])))
    waiting = engine.submit(Request(ids[1], greedy(5)))
    assert started.wait(30)
    engine.close()
    assert not engine._thread.is_alive()
    assert running.finish_reason == "cancelled" and waiting.finish_reason == "cancelled"
    assert 0 < len(running.tokens) < 100 and waiting.tokens == []
    with pytest.raises(QueueFullError):
        engine.submit(Request(ids[2], greedy(5)))


def test_an_error_in_a_request_fails_it_not_the_engine(tiny):
    seen = []

    def broken(generated, logits):
        seen.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
        raise RuntimeError("processor exploded")

    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length)
    bad = engine.submit(Request(prompts(tiny)[0], greedy(5, logits_processors=[broken])))
    with pytest.raises(RuntimeError, match="exploded"):
        list(bad.events())
    good = engine.submit(Request(prompts(tiny)[1], greedy(5)))
    list(good.events())
    assert good.tokens == alone(tiny, prompts(tiny)[1], greedy(5))
    assert seen == [("llmkit-engine", True)]  # processors run on the engine's thread, in inference mode
    assert not torch.is_inference_mode_enabled()  # and the caller's thread is left as it was


def test_packed_bfloat16_linears_equal_plain_ones_and_leave_the_model_alone(tiny_model_dir):
    from llmkit.engine.executor import TorchOps

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 on this CPU")
    llm = llmkit.load(tiny_model_dir("llama"), dtype="bfloat16")
    model = llm.model
    ids = torch.tensor([llm.tokenizer.encode("packed weights give the same numbers")])
    keys = set(model.state_dict())
    classes = [type(m) for m in model.modules()]
    ops = llm.engine.executor.ops
    assert isinstance(ops, TorchOps) and ops.packed  # the executor packed them at load, for itself
    layer = model.layers[0].mlp.down_proj
    x = torch.randn(5, 3, layer.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(ops.linear((layer,), x)[0], layer(x))
        plain = model(ids)
        packed = model.forward_many([(ids, None, None)], ops=ops)[0]
    # the packed matmuls equal F.linear; only the fused rms_norm may round differently
    torch.testing.assert_close(packed, plain, rtol=2e-2, atol=2e-2)
    assert set(model.state_dict()) == keys  # the packed copies are not part of the checkpoint
    assert [type(m) for m in model.modules()] == classes  # no module was swapped
    assert not any(k in m.__dict__ for m in model.modules() for k in ("packed", "fused_qkv", "fused_gate_up"))
    # greedy generation through the engine (which packs) equals one request alone
    prompts = ["one two three", "the cat sat on", "a b c d e"]
    together = llm.generate(prompts, max_tokens=8, temperature=0)
    assert together == [llm.generate(p, max_tokens=8, temperature=0) for p in prompts]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_packed_linears_with_biases_equal_plain_ones(tiny_model_dir, arch):
    from llmkit.engine.executor import pack_linears

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 on this CPU")
    model = llmkit.load(tiny_model_dir(arch), dtype="bfloat16").model
    packed = pack_linears(model)
    by_id = {id(m): m for m in model.modules()}
    assert any(len(key) > 1 for key in packed)  # q/k/v (and gate/up where the MLP is gated) as one matmul each
    assert any(by_id[key[0]].bias is not None for key in packed)
    for key, matmul in packed.items():
        group = [by_id[i] for i in key]
        x = torch.randn(4, 2, group[0].in_features, dtype=torch.bfloat16)
        with torch.inference_mode():
            for got, want in zip(matmul(x), [g(x) for g in group]):
                assert torch.equal(got, want)


class _FailingOnStep:
    """The real torch executor, made to raise on its n-th forward pass (a cache that cannot grow,
    llama_decode out of cells): what the engine must survive."""

    def __init__(self, inner, fail_on: int, slots: int = 0):
        self.inner, self.fail_on, self.calls, self.released = inner, fail_on, 0, []
        self.slots = slots  # count only the passes with rows of this many slots (all the requests)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, chunks, decodes):
        if len({c[0] for c in chunks} | {d[0] for d in decodes}) >= self.slots:
            self.calls += 1
            if self.calls == self.fail_on:
                raise RuntimeError("the step failed")
        return self.inner.forward(chunks, decodes)

    def release(self, slot):
        self.released.append(slot)
        self.inner.release(slot)


def test_a_failed_step_fails_every_running_request_and_frees_every_slot(tiny):
    from llmkit.engine.executor import TorchExecutor

    # the third pass with all three requests in it fails, however their submissions meet the steps
    executor = _FailingOnStep(TorchExecutor(tiny.model, 4, tiny.context_length), fail_on=3, slots=3)
    engine = Engine(executor, tiny.tokenizer, tiny.context_length, max_batch=4)
    handles = [engine.submit(Request(p, greedy(20))) for p in prompts(tiny)[:3]]
    for h in handles:  # each request ends (none hangs), with the step's error
        with pytest.raises(RuntimeError, match="the step failed"):
            list(h.events())
        assert h.finish_reason == "error"
    assert sorted(executor.released) == [0, 1, 2]
    assert engine.num_running == 0 and engine._free_slots == [0, 1, 2, 3]
    after = engine.submit(Request(prompts(tiny)[3], greedy(6)))  # the engine keeps serving
    list(after.events())
    assert after.tokens == alone(tiny, prompts(tiny)[3], greedy(6))


class _SharedPool(_FailingOnStep):
    """The real executor with one cache pool of ``cells`` shared by all slots (as llama.cpp's)."""

    def __init__(self, inner, cells: int):
        super().__init__(inner, fail_on=0)
        self.token_budget, self.cells, self.peak = cells, cells, 0
        self.live: dict[int, int] = {}

    def forward(self, chunks, decodes):
        for slot, ids, start in chunks:
            self.live[slot] = start + len(ids)
        for slot, _, pos in decodes:
            self.live[slot] = pos + 1
        self.peak = max(self.peak, sum(self.live.values()))
        if sum(self.live.values()) > self.cells:
            raise RuntimeError("out of cache cells")
        return self.inner.forward(chunks, decodes)

    def release(self, slot):
        self.live.pop(slot, None)
        super().release(slot)


def test_requests_are_admitted_against_a_shared_cache_budget(tiny):
    from llmkit.engine.executor import TorchExecutor

    ids = prompts(tiny)
    need = max(len(p) for p in ids) + 24
    executor = _SharedPool(TorchExecutor(tiny.model, 4, tiny.context_length), cells=2 * need)
    engine = Engine(executor, tiny.tokenizer, tiny.context_length, max_batch=4)
    handles = [engine.submit(Request(p, greedy(24))) for p in ids]  # all four would need > 2 * need
    for h, p in zip(handles, ids):
        list(h.events())
        assert h.finish_reason == "length" and h.tokens == alone(tiny, p, greedy(24))
    assert 0 < executor.peak <= executor.cells


def test_the_events_of_a_step_reach_their_callbacks_together_after_it(tiny):
    # A caller that carries events to another thread (the server's event loop) can then wake it
    # once per step: every request's event of a step has been emitted before the first callback.
    engine = Engine(tiny.model, tiny.tokenizer, tiny.context_length, max_batch=5, speculative=False)
    ids = prompts(tiny)
    first, release = _hold(engine, ids[0])
    finished = threading.Event()
    handles, seen, got = [], [], {}

    def record(event):
        seen.append([len(h.tokens) for h in handles])  # every request's tokens, as this callback runs
        got.setdefault(event.index, []).append(event.token)
        if event.finish_reason is not None and all(h.done for h in handles):
            finished.set()

    handles.extend(engine.submit(Request(p, greedy(6)), on_event=record) for p in ids)
    release.set()
    list(first.events())
    assert finished.wait(60)
    assert len(seen) == 6 * len(ids)
    # the prompts were prefilled in one step, so the requests advance in lockstep: at each
    # callback, every request already has the token of that step
    assert all(len(set(counts)) == 1 for counts in seen), seen
    for h, p in zip(handles, ids):  # complete and in order
        assert got[h.id] == h.tokens == alone(tiny, p, greedy(6))
