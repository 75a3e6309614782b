"""Prefix cache, speculative decoding by prompt lookup, and several LoRA adapters in one batch:
each measured against the same engine with the feature off, side by side in one run.

    python bench/engine_features.py [--model smollm2-135m-instruct] [--json bench/engine-features-results.json]

Workloads (the default model, its default configuration, greedy decoding):
- chat: 4 conversations of 8 turns run concurrently, the history growing to about 1,500 tokens;
  median time to first token of turns 2-8, with and without the prefix cache.
- shared system prompt: 16 clients, one 200-token system prompt, short questions; requests per
  minute with and without the prefix cache.
- extractive work (prompt lookup): extract fields to JSON from a 300-token report, answer with a
  quoted span, summarize by selection, a code edit that returns the file; one stream, tokens/s
  with and without speculation over each answer (up to the model's end of message, at most 256
  tokens: what a user waits for), and whether the text is identical. Free-form generation too (the
  cost of speculating where little repeats). With each, what the proposer did (deterministic under
  greedy decoding): passes, tokens proposed and kept, tokens per checking pass.
- row cost (``--only rowcost``): a decode pass of k rows of one sequence (how proposals are checked)
  against a pass of one row, at a 500-token context; what ``llmkit.engine.lookup.ROW_COST`` models.
- adapters: 16 streams spread over 4 random LoRA adapters and the base, against 16 streams on
  the base alone; aggregate tokens/s.
Every figure is the median of ``--repeats`` runs; on and off alternate within each repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import llmkit
from llmkit.sampling import SamplingParams

WORDS = ("river mountain signal copper lantern harbor orchard meadow canyon ember falcon granite "
         "quartz thistle willow glacier beacon cobalt delta fjord").split()


# A plain report for the extractive tasks: sentences a small model can read and copy, one of them
# (and only one) about the ferry. How much a task gains depends on how much of its answer the model
# copies: SmolLM2-135M quotes the ferry sentence word for word, and copies more when asked to
# summarize "by copying" than "by selecting" (which it paraphrases).
REPORT = (
    "The harbor board of Westmere met on Tuesday evening to review the spring season. "
    "Fishing boats landed more cod than in any April of the past ten years. "
    "The ice plant on the north pier was repaired in March and now runs through the night. "
    "Two new moorings were added near the ferry ramp, and both were rented within a week. "
    "The old customs house will open as a small museum of the town's whaling history in June. "
    "A pair of peregrine falcons has nested on the lighthouse gallery, so the stairs will stay closed until the chicks fly. "
    "Volunteers counted forty-one seals on the outer rocks during the low tide survey. "
    "Repairs to the breakwater will cost about twice the amount that was set aside last autumn. "
    "The board asked the town council for a loan to cover the difference before the winter storms. "
    "A ferry to the island will run twice a day from May to September, weather permitting. "
    "Parking on the quay will be limited to two hours while the new fish market is built. "
    "The harbor master reminded every skipper to log departures on the board by the office door. "
    "Night fishing inside the breakwater stays forbidden after a near collision in February. "
    "The school will bring three classes to see the museum and the lighthouse in the autumn. "
    "The board will meet again on the first Tuesday of July, in the hall above the bakery."
)


def _document(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    sentences, words = [], [WORDS[i] for i in idx]
    for i in range(0, len(words), 12):
        sentences.append(" ".join(words[i:i + 12]).capitalize() + ".")
    return " ".join(sentences)


def _ttft(llm, ids, max_tokens: int = 32, speculative: bool = False):
    (request,) = llm.requests([ids], SamplingParams(max_tokens=max_tokens, temperature=0), speculative=speculative)
    start = time.perf_counter()
    handle = llm.submit(request)
    first = None
    for _ in handle.events():
        if first is None:
            first = time.perf_counter() - start
    return first, handle.tokens


def chat(llm, turns: int = 8, conversations: int = 4) -> float:
    """Median time to first token of turns 2.. of concurrent conversations."""
    tok = llm.tokenizer
    ttfts: list[float] = []
    lock = threading.Lock()

    def converse(c: int) -> None:
        messages = [{"role": "system", "content": f"You are assistant number {c}. " + _document(60, c)}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Question {turn}: " + _document(90, 100 * c + turn)})
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
            ttft, answer = _ttft(llm, ids, max_tokens=48)
            if turn:
                with lock:
                    ttfts.append(ttft)
            messages.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)})

    threads = [threading.Thread(target=converse, args=(c,)) for c in range(conversations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.median(ttfts)


def shared_system(llm, clients: int = 16, requests_each: int = 2) -> float:
    """Requests per minute for clients that share one long system prompt."""
    tok = llm.tokenizer
    system = "You answer questions about the following notes. " + _document(150, 7)

    def client(c: int) -> None:
        for r in range(requests_each):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {c}.{r}?"}]
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
            _ttft(llm, ids, max_tokens=16)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * requests_each / (time.perf_counter() - start) * 60


def extractive_prompts(tok) -> dict[str, list[int]]:
    doc = REPORT
    code = "\n".join(f"def step_{i}(x):\n    y = x * {i} + {i * 3}\n    return y - {i}\n" for i in range(12))
    chats = {
        "extract": f"Document:\n{doc}\n\nCopy the first three sentences of the document exactly, as JSON: "
                   '{"sentences": [...]}',
        "quote": f"Document:\n{doc}\n\nQuote the sentence that mentions the ferry, exactly as written.",
        "select": f"{doc}\n\nSummarize the report above by copying its two most important sentences exactly.",
        "code": f"Here is a file:\n```python\n{code}```\nRename step_3 to triple_step and return the whole file.",
        "free": "Write a short story about a lighthouse keeper who finds a strange map.",
    }
    return {k: tok.encode(tok.apply_chat_template([{"role": "user", "content": v}], add_generation_prompt=True))
            for k, v in chats.items()}


ANSWER_TOKENS = 256  # at most, per answer in the prompt-lookup workloads


def one_stream(llm, ids, speculative: bool, n: int = ANSWER_TOKENS) -> tuple[float, list[int]]:
    """Tokens/s after the first token of one greedy answer, which ends where the model ends it (or
    after ``n`` tokens), and the answer's tokens."""
    (request,) = llm.requests([ids], SamplingParams(max_tokens=n, temperature=0),
                              speculative=speculative)
    handle = llm.submit(request)
    first = None
    for _ in handle.events():
        if first is None:
            first = time.perf_counter()
    return (len(handle.tokens) - 1) / (time.perf_counter() - first), handle.tokens


def lookup_counts(llm, ids, n: int = ANSWER_TOKENS) -> dict:
    """One speculative run's decode passes and proposals (greedy: the same every run), counted
    from the passes themselves: each pass yields its kept tokens and one of the model's own."""
    engine, passes = llm.engine, []
    forward = engine.executor.forward

    def counting(chunks, decodes):
        if decodes and not chunks:
            passes.append(len(decodes))
        return forward(chunks, decodes)

    engine.executor.forward = counting
    try:
        _, tokens = one_stream(llm, ids, True, n)
    finally:
        del engine.executor.forward
    checks = sum(1 for rows in passes if rows > 1)
    kept = len(tokens) - 1 - len(passes)  # the first token came from the prompt's pass
    return {"decode_passes": len(passes), "checking_passes": checks,
            "proposed": sum(rows - 1 for rows in passes if rows > 1), "kept": kept,
            "kept_per_check": kept / checks if checks else 0.0}


def row_cost(llm, context: int = 500, rows=(1, 2, 3, 4, 6, 8, 12, 16), repeats: int = 9) -> dict:
    """Time of a decode pass of k rows of one sequence over a pass of one row (medians; the
    one-row pass is timed next to each)."""
    executor = llm.engine.executor
    executor.fit(context + max(rows) + 1, 1)
    ratios: dict[int, list[float]] = {k: [] for k in rows}
    with torch.inference_mode():
        executor.forward([(0, [1 + i % 100 for i in range(context)], 0)], [])
        for _ in range(repeats):
            for k in rows:
                start = time.perf_counter()
                executor.forward([], [(0, 5, context)])
                one = time.perf_counter() - start
                start = time.perf_counter()
                executor.forward([], [(0, 5 + i, context + i) for i in range(k)])
                ratios[k].append((time.perf_counter() - start) / one)
    return {str(k): statistics.median(v) for k, v in ratios.items()}


def make_adapters(llm, root: Path, count: int) -> dict[str, Path]:
    """Random rank-8 PEFT adapters on q/v/down of every layer of the model."""
    from safetensors.torch import save_file

    from llmkit.train.lora import hf_layer_names

    model = llm.engine.executor.model
    targets = [n for n, m in model.named_modules() if n.endswith(("attn.q_proj", "attn.v_proj", "mlp.down_proj"))]
    names = hf_layer_names(model.config, targets)
    out = {}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for module in targets:
            layer = model.get_submodule(module)
            tensors[f"base_model.model.{names[module]}.lora_A.weight"] = torch.randn(8, layer.in_features, generator=g) * 0.01
            tensors[f"base_model.model.{names[module]}.lora_B.weight"] = torch.randn(layer.out_features, 8, generator=g) * 0.01
        folder = root / f"adapter{i}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(llm.path), "r": 8, "lora_alpha": 16}))
        out[f"adapter{i}"] = folder
    return out


def streams(llm, adapters: list[str | None], n: int = 64) -> float:
    prompts = [llm.tokenizer.encode(f"Story number {i}: once upon a time") for i in range(len(adapters))]
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    requests = [r for p, a in zip(prompts, adapters) for r in llm.requests([p], params, speculative=False, adapter=a)]
    start = time.perf_counter()
    handles = [llm.submit(r) for r in requests]
    for h in handles:
        for _ in h.events():
            pass
    return len(adapters) * n / (time.perf_counter() - start)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--only", default="chat,shared,lookup,adapters")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    on = llmkit.load(args.model, progress=False)
    off = llmkit.load(args.model, progress=False, prefix_cache=False)
    out: dict = {"model": args.model, "executor": on.executor_name, "threads": torch.get_num_threads(), "results": {}}
    res = out["results"]

    def med(fn, repeats=args.repeats):
        return statistics.median(fn() for _ in range(repeats))

    if "chat" in only:
        rows = [(chat(off), chat(on)) for _ in range(args.repeats)]
        on.engine.prefix_cache.clear()
        res["chat_ttft_turns_2_8_s"] = {"no_cache": statistics.median(r[0] for r in rows),
                                        "cache": statistics.median(r[1] for r in rows)}
        res["chat_ttft_turns_2_8_s"]["ratio"] = res["chat_ttft_turns_2_8_s"]["no_cache"] / res["chat_ttft_turns_2_8_s"]["cache"]
        print("chat", res["chat_ttft_turns_2_8_s"], flush=True)
    if "shared" in only:
        rows = []
        for _ in range(args.repeats):
            on.engine.prefix_cache.clear()
            rows.append((shared_system(off), shared_system(on)))
        r = {"no_cache": statistics.median(x[0] for x in rows), "cache": statistics.median(x[1] for x in rows)}
        r["ratio"] = r["cache"] / r["no_cache"]
        res["shared_system_requests_per_min"] = r
        print("shared", r, flush=True)
    if "lookup" in only:
        look = {}
        for name, ids in extractive_prompts(on.tokenizer).items():
            one_stream(off, ids, False, 8)  # warm
            pairs = []
            for _ in range(args.repeats):
                plain_rate, plain_tokens = one_stream(off, ids, False)
                spec_rate, spec_tokens = one_stream(off, ids, True)
                pairs.append((plain_rate, spec_rate, plain_tokens == spec_tokens, plain_tokens))
            look[name] = {"plain_tok_s": statistics.median(p[0] for p in pairs),
                          "speculative_tok_s": statistics.median(p[1] for p in pairs),
                          "identical": all(p[2] for p in pairs), "answer_tokens": len(pairs[0][3])}
            look[name]["ratio"] = look[name]["speculative_tok_s"] / look[name]["plain_tok_s"]
            look[name]["proposer"] = lookup_counts(off, ids)
            print("lookup", name, look[name], flush=True)
        res["prompt_lookup"] = look
    if "rowcost" in only:
        res["check_pass_cost_vs_one_row"] = row_cost(off)
        print("row cost", res["check_pass_cost_vs_one_row"], flush=True)
    if "adapters" in only:
        with tempfile.TemporaryDirectory() as tmp:
            for name, folder in make_adapters(off, Path(tmp), 4).items():
                off.add_adapter(name, folder)
            mixed = [None if i % 5 == 4 else f"adapter{i % 5}" for i in range(16)]
            rows = [(streams(off, [None] * 16), streams(off, mixed)) for _ in range(args.repeats)]
        r = {"base_only_tok_s": statistics.median(x[0] for x in rows),
             "four_adapters_and_base_tok_s": statistics.median(x[1] for x in rows)}
        r["ratio"] = r["four_adapters_and_base_tok_s"] / r["base_only_tok_s"]
        res["sixteen_streams_adapters"] = r
        print("adapters", r, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
