"""Serving benchmark: replay N streamed requests at a fixed concurrency against OpenAI-compatible
servers and report, with vLLM's definitions (benchmarks/benchmark_serving.py):

- request throughput: completed requests / wall time of the run;
- output token throughput: generated tokens / wall time;
- TTFT (time to first token): request sent -> first streamed token;
- TPOT (time per output token): (latency - TTFT) / (output tokens - 1), per request;
- ITL (inter-token latency): every gap between two consecutive streamed chunks;
- E2E latency: request sent -> last byte;
each as mean, median and p99, plus failures (HTTP errors, broken streams, and empty answers).

Several ``--target NAME=URL`` run one after another in one invocation; the first is the reference
and the table ends with its ratios to each other target. Example, llmkit against llama-cpp-python's
own server on the same GGUF:

    llmkit serve -m smollm2-135m-instruct --port 8000 &
    python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8001 &
    python bench/serve_bench.py --target llmkit=http://127.0.0.1:8000 \\
        --target llama-cpp-python=http://127.0.0.1:8001 --num-requests 64 --concurrency 16 --max-tokens 128

Output tokens are the server's own count (``stream_options.include_usage``) when it gives one, else
the number of streamed chunks that carried text (one token each on llmkit and llama.cpp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

# Varied, deterministic prompts: the same list in the same order for every target.
TOPICS = ["the water cycle", "how a bicycle stays upright", "why the sky is blue", "the history of the printing press",
          "how vaccines work", "the rules of chess", "photosynthesis", "how a compiler works", "the French Revolution",
          "black holes", "how to bake bread", "the immune system", "plate tectonics", "how the internet routes packets",
          "the life of bees", "renewable energy"]


def prompt_for(i: int) -> str:
    return f"Explain {TOPICS[i % len(TOPICS)]} in a few paragraphs, for a curious twelve-year-old. (#{i})"


@dataclass
class Result:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, i: int, args) -> Result:
    body: dict = {"max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt_for(i)}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt_for(i)
    start = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    result = Result(ok=False)
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                result.error = f"HTTP {r.status_code}: {text}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"stream error: {chunk['error']}"
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                text = ""
                for choice in chunk.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if text:
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if chunks == 0:
        result.error = "empty answer"
        return result
    result.ok = True
    return result


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]

    def stats(name, xs):
        return {f"mean_{name}_ms": 1000 * statistics.fmean(xs) if xs else float("nan"),
                f"median_{name}_ms": 1000 * pct(xs, 0.5), f"p99_{name}_ms": 1000 * pct(xs, 0.99)}

    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[(r.error or "?")[:80]] = errors.get((r.error or "?")[:80], 0) + 1
    return {"completed": len(ok), "failed": len(results) - len(ok), "errors": errors, "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_throughput": tokens / duration,
            "total_output_tokens": tokens, "mean_output_tokens": tokens / len(ok) if ok else 0,
            **stats("ttft", ttft), **stats("tpot", tpot), **stats("itl", itl), **stats("e2e", e2e)}


async def discover_model(client: httpx.AsyncClient, url: str) -> str | None:
    try:
        r = await client.get(url + "/v1/models")
        return r.json()["data"][0]["id"]
    except Exception:
        return None


async def run_target(name: str, url: str, args) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:
        model = args.model or await discover_model(client, url)
        for i in range(args.warmup):
            await one_request(client, url, model, 10_000 + i, args)
        semaphore = asyncio.Semaphore(args.concurrency)

        async def limited(i):
            async with semaphore:
                return await one_request(client, url, model, i, args)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.num_requests)))
        duration = time.perf_counter() - start
    summary = summarize(list(results), duration)
    summary.update(target=name, url=url, model=model, concurrency=args.concurrency, num_requests=args.num_requests)
    return summary


ROWS = [("completed", "completed", "{:.0f}"), ("failed", "failed", "{:.0f}"), ("duration (s)", "duration_s", "{:.1f}"),
        ("request throughput (req/s)", "request_throughput", "{:.2f}"),
        ("output throughput (tok/s)", "output_throughput", "{:.1f}"), ("mean output tokens", "mean_output_tokens", "{:.1f}"),
        ("median TTFT (ms)", "median_ttft_ms", "{:.0f}"), ("p99 TTFT (ms)", "p99_ttft_ms", "{:.0f}"),
        ("median TPOT (ms)", "median_tpot_ms", "{:.1f}"), ("p99 TPOT (ms)", "p99_tpot_ms", "{:.1f}"),
        ("median ITL (ms)", "median_itl_ms", "{:.1f}"), ("p99 ITL (ms)", "p99_itl_ms", "{:.1f}"),
        ("median E2E (ms)", "median_e2e_ms", "{:.0f}"), ("p99 E2E (ms)", "p99_e2e_ms", "{:.0f}")]


def table(summaries: list[dict]) -> str:
    names = [s["target"] for s in summaries]
    ref = summaries[0]
    ratio_cols = [f"{ref['target']}/{s['target']}" for s in summaries[1:]]
    header = ["metric", *names, *ratio_cols]
    lines = []
    for label, key, fmt in ROWS:
        row = [label, *(fmt.format(s[key]) for s in summaries)]
        for s in summaries[1:]:
            other = s[key]
            row.append(f"{ref[key] / other:.2f}x" if other and key not in ("completed", "failed") else "")
        lines.append(row)
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in lines]
    for s in summaries:
        for error, count in s["errors"].items():
            out.append(f"{s['target']}: {count} x {error}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, metavar="NAME=URL",
                   help="A server to measure (repeatable; the first is the reference for the ratios).")
    p.add_argument("--model", default=None, help="The model id to send (default: the server's first in /v1/models).")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16, help="Requests in flight at once.")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--ignore-eos", action="store_true",
                   help="Ask for exactly max_tokens (servers that do not know the field ignore it).")
    p.add_argument("--warmup", type=int, default=1, help="Unmeasured requests per target first.")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="Also write the results as JSON.")
    args = p.parse_args(argv)
    targets = []
    for t in args.target:
        name, sep, url = t.partition("=")
        if not sep:
            name, url = t, t
        targets.append((name, url.rstrip("/")))
    summaries = []
    for name, url in targets:
        print(f"{name}: {args.num_requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens} ...",
              file=sys.stderr, flush=True)
        summaries.append(asyncio.run(run_target(name, url, args)))
    print(table(summaries))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summaries, f, indent=2)
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
