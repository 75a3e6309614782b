"""``llmkit bench``: the same workloads on llmkit and on its peers, side by side, in one run.

Each engine runs in its own subprocess (so peak memory and load time are its own), one after
another (never two heavy jobs at once), with the same model file and thread count. Every timed
figure is the median of ``repeats`` runs after a warm-up.

Workloads: load to first token; peak resident memory; prefill of a 512-token prompt; one-stream
decode of 128 tokens (greedy, end-of-sequence ignored); aggregate decode with 4 and 16 concurrent
streams; time to first token and time per output token at 16 streams.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PROMPT_WORDS = (
    "The history of computing is a story of people who wanted machines to do arithmetic for them, "
    "and then found that arithmetic could stand for almost anything: letters, pictures, music and "
    "the movements of planets. "
)
PEERS = ("transformers", "llama.cpp")


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _prompt_ids(tokenize: Callable[[str], list[int]], n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenize(PROMPT_WORDS)
    return ids[:n]


# ---------------------------------------------------------------------- workers (in subprocesses)

def _llmkit_worker(model: str, threads: int, repeats: int, quantize: str | None,
                   executor: str = "torch", dtype: str | None = None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    import llmkit
    from llmkit.sampling import SamplingParams

    llm = llmkit.load(model, quantize=quantize, executor=executor, dtype=dtype if executor == "torch" else None,
                      progress=False)
    short = llm.tokenizer.encode("Hello")
    llm.generate_ids(short, max_tokens=1, temperature=0)
    load = time.perf_counter() - start
    prompt = _prompt_ids(llm.tokenizer.encode, 512)
    prefill = _median_time(lambda: llm.generate_ids(prompt, max_tokens=1, temperature=0), repeats)

    def decode_one() -> float:
        stream = llm.run(llm.requests([short], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)))
        first = None
        for e in stream:
            if first is None:
                first = time.perf_counter()
        return 127 / (time.perf_counter() - first)

    decode_one()
    decode = statistics.median(decode_one() for _ in range(repeats))

    def streams(n: int) -> dict[str, float]:
        prompts = [llm.tokenizer.encode(f"Story number {i}: once upon a time") for i in range(n)]
        params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        handles = [llm.submit(r) for r in llm.requests(prompts, params)]
        for h in handles:
            for _ in h.events():
                pass
        wall = time.perf_counter() - t0
        ttft = [h.first_token_at - t0 for h in handles]
        tpot = [(wall - (h.first_token_at - t0)) / 127 for h in handles]
        return {"tokens_per_s": n * 128 / wall, "ttft_s": statistics.median(ttft), "tpot_s": statistics.median(tpot)}

    streams(4)
    s4 = [streams(4) for _ in range(repeats)]
    s16 = [streams(16) for _ in range(repeats)]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    dt = str(llm.model.embed.weight.dtype).replace("torch.", "") if executor == "torch" else ""
    precision = "gguf as stored" if executor == "llama.cpp" else (f"{quantize}, {dt} activations" if quantize else dt)
    return {
        "engine": "llmkit" if executor == "torch" else f"llmkit+{executor}", "precision": precision,
        "threads": torch.get_num_threads(), "load_to_first_token_s": load, "peak_rss_mb": _peak_rss_mb(),
        "prefill_512_tokens_per_s": 512 / prefill, "decode_tokens_per_s": decode,
        "decode_4_streams_tokens_per_s": med(s4, "tokens_per_s"),
        "decode_16_streams_tokens_per_s": med(s16, "tokens_per_s"),
        "ttft_16_streams_s": med(s16, "ttft_s"), "tpot_16_streams_s": med(s16, "tpot_s"),
    }


def _transformers_worker(model: str, threads: int, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = str(path.parent) if path.suffix == ".gguf" else str(path)
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    short = torch.tensor([tok.encode("Hello")])

    def gen(ids, n):
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.eos_token_id, attention_mask=torch.ones_like(ids))

    gen(short, 1)
    load = time.perf_counter() - start
    prompt = torch.tensor([_prompt_ids(lambda s: tok.encode(s, add_special_tokens=False), 512)])
    prefill = _median_time(lambda: gen(prompt, 1), repeats)
    first = _median_time(lambda: gen(short, 1), repeats)
    full = _median_time(lambda: gen(short, 32), max(1, repeats // 2))
    decode = 31 / (full - first)

    def batch(n):  # static batching: all prompts the same length, decoded together
        ids = short.repeat(n, 1)
        t1 = _median_time(lambda: gen(ids, 1), 1)
        t = _median_time(lambda: gen(ids, 16), 1)
        return n * 16 / t, t1, (t - t1) / 15

    b4, b16 = batch(4), batch(16)
    return {
        "engine": "transformers", "precision": "float32", "threads": torch.get_num_threads(),
        "load_to_first_token_s": load, "peak_rss_mb": _peak_rss_mb(),
        "prefill_512_tokens_per_s": 512 / prefill, "decode_tokens_per_s": decode,
        "decode_4_streams_tokens_per_s": b4[0], "decode_16_streams_tokens_per_s": b16[0],
        "ttft_16_streams_s": b16[1], "tpot_16_streams_s": b16[2],
        "note": "static batching with generate(); 32 and 16 new tokens per run to keep it short",
    }


def _llamacpp_worker(model: str, threads: int, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    from llama_cpp import Llama

    if not model.endswith(".gguf"):
        raise SystemExit("llama.cpp needs a .gguf model")
    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False, logits_all=False)
    eos = llm.token_eos()
    short = llm.tokenize(b"Hello", add_bos=False)

    def gen(ids, n):
        llm.reset()
        out = llm.create_completion(ids, max_tokens=n, temperature=0, logit_bias={eos: -1e9})
        return out

    gen(short, 1)
    load = time.perf_counter() - start
    prompt = _prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False), 512)
    prefill = _median_time(lambda: gen(prompt, 1), repeats)
    first = _median_time(lambda: gen(short, 1), repeats)
    full = _median_time(lambda: gen(short, 128), repeats)
    decode = 127 / (full - first)
    # one context serves one sequence through this API: concurrent streams run one after another
    return {
        "engine": "llama.cpp", "precision": "gguf as stored", "threads": threads,
        "load_to_first_token_s": load, "peak_rss_mb": _peak_rss_mb(),
        "prefill_512_tokens_per_s": 512 / prefill, "decode_tokens_per_s": decode,
        "decode_4_streams_tokens_per_s": decode, "decode_16_streams_tokens_per_s": decode,
        "ttft_16_streams_s": 15 / 2 * full, "tpot_16_streams_s": full / 128,
        "note": "llama-cpp-python's Llama serves one sequence at a time; streams are sequential",
    }


def worker_main(argv: list[str]) -> None:
    engine, model, threads, repeats, quantize, dtype = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5]
    if engine == "llmkit":
        result = _llmkit_worker(model, threads, repeats, None if quantize == "none" else quantize, dtype=dtype)
    elif engine == "llmkit+llama.cpp":
        result = _llmkit_worker(model, threads, repeats, None, executor="llama.cpp")
    elif engine == "transformers":
        result = _transformers_worker(model, threads, repeats)
    else:
        result = _llamacpp_worker(model, threads, repeats)
    print("BENCH-RESULT " + json.dumps(result))


# ---------------------------------------------------------------------- orchestration

def available(peer: str) -> bool:
    from importlib.util import find_spec

    return find_spec({"transformers": "transformers", "llama.cpp": "llama_cpp"}[peer]) is not None


def run_engine(engine: str, model: str, threads: int, repeats: int, quantize: str | None,
               timeout: float = 900, dtype: str = "auto") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmkit.bench", engine, model, str(threads), str(repeats), quantize or "none", dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"engine": engine, "error": " | ".join(tail) or f"exit {proc.returncode}"}


METRICS = [
    ("load_to_first_token_s", "load to first token (s)", False),
    ("peak_rss_mb", "peak memory (MB)", False),
    ("prefill_512_tokens_per_s", "prefill 512 (tok/s)", True),
    ("decode_tokens_per_s", "decode 1 stream (tok/s)", True),
    ("decode_4_streams_tokens_per_s", "decode 4 streams (tok/s)", True),
    ("decode_16_streams_tokens_per_s", "decode 16 streams (tok/s)", True),
    ("ttft_16_streams_s", "TTFT at 16 streams (s)", False),
    ("tpot_16_streams_s", "TPOT at 16 streams (s)", False),
]


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each llmkit configuration's advantage over each peer per metric, keyed "ours vs peer"
    (>1 is better for llmkit, whichever way the metric points)."""
    ok = [r for r in results if "error" not in r]
    ours = [r for r in ok if r["engine"].startswith("llmkit")]
    peers = [r for r in ok if not r["engine"].startswith("llmkit")]
    out: dict[str, dict[str, float]] = {}
    for a in ours:
        for b in peers:
            row = {}
            for key, _, higher_is_better in METRICS:
                x, y = a.get(key), b.get(key)
                if x and y:
                    row[key] = x / y if higher_is_better else y / x
            out[f"{a['engine']} vs {b['engine']}"] = row
    return out


if __name__ == "__main__":
    worker_main(sys.argv[1:])
