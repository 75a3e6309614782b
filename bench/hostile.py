"""Hostile input against a real ``llmkit serve`` process.

Two sources of requests:
- schemathesis: requests generated from the server's own /openapi.json, valid and invalid
  (``--generated``, at least 1,000);
- a corpus of hand-made malformed requests (over 200), grouped by what they try: work that escapes
  the queue, the deadline or the client's departure (embeddings, echo scoring), large
  conversations, bodies that crash a parser (deep nesting, odd numbers, odd keys), cross-site
  requests (media types, Host, Origin), slow bodies, empty prompts, and requests for unbounded work.

Asserted throughout: no 5xx, no request past the server's time limit, and /health, asked every
50 ms from a process of its own, answering within 100 ms. The figures go to
``bench/hostile-results.json`` with the command that made them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/hostile.py [--model PATH] [--generated 1000]

Without ``--model`` it builds a tiny random Llama-shaped model (vocabulary 400, context 128) in a
temporary folder, so that the run measures the server, not the model. Needs ``schemathesis``
(``.venv/bin/pip install schemathesis``) beside the test extras.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REQUEST_TIMEOUT = 20.0  # the server's --request-timeout in this run
BODY_TIMEOUT = 3.0  # its --body-timeout
GRACE = 3.0  # beyond the time limit, for the answer to travel back
HEALTH_LIMIT_MS = 100.0


# ------------------------------------------------------------------------------------------ the model


def tiny_model(folder: Path) -> Path:
    """A random Llama-shaped model with a byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
              "def add(a, b):\n    return a + b\n", "Write to jane.doe@example.com or call +1 415 555 0100.",
              "Caf\u00e9, na\u00efve \u2014 accents. \u4f60\u597d \U0001f600", "Numbers 12345 and 3.14159."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ recording


class Record:
    """Every request's outcome, and /health's latency over the whole run."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.health_ms: list[float] = []
        self.health: list[tuple[float, float]] = []  # (start, ms)
        self.health_failures: list[str] = []

    def add(self, source: str, group: str, name: str, status: int | str, seconds: float, sent=None) -> None:
        row = {"source": source, "group": group, "name": name, "status": status, "seconds": round(seconds, 4),
               "end": time.monotonic()}
        if sent is not None and isinstance(status, int) and status >= 500:
            row["sent"] = repr(sent)[:500]  # what to replay
        with self.lock:
            self.requests.append(row)

    def slow_probes(self, count: int = 10) -> list[dict]:
        """The slowest /health answers over the limit, with the requests in flight meanwhile."""
        slow = sorted((p for p in self.health if p[1] > HEALTH_LIMIT_MS), key=lambda p: -p[1])[:count]
        out = []
        for start, ms in slow:
            end = start + ms / 1000
            during = [f"{r['group']}: {r['name']}" for r in self.requests
                      if r["end"] - r["seconds"] <= end and r["end"] >= start]
            out.append({"ms": round(ms, 1), "in_flight": during[:8]})
        return out

    def five_xx(self) -> list[dict]:
        return [r for r in self.requests if isinstance(r["status"], int) and r["status"] >= 500
                and r["status"] != 503]  # 503: the connection limit or shutdown, an answer by design

    def over_deadline(self) -> list[dict]:
        return [r for r in self.requests if r["seconds"] > REQUEST_TIMEOUT + GRACE]


def _probe(base: str, stop, out) -> None:
    """/health every 50 ms, in a process of its own (so that this script's own work, generating
    requests, does not delay the measurement): (monotonic start, milliseconds, failure)."""
    samples = []
    with httpx.Client(timeout=10) as h:
        while not stop.wait(0.05):
            t = time.monotonic()
            try:
                r = h.get(base + "/health")
                samples.append((t, (time.monotonic() - t) * 1000, None if r.status_code == 200 else r.status_code))
            except httpx.HTTPError as exc:
                samples.append((t, (time.monotonic() - t) * 1000, f"{type(exc).__name__}: {exc}"))
    out.send(samples)


class HealthProbe:
    def __init__(self, base: str, record: Record):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.record = record
        self.stop = ctx.Event()
        self.receive, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_probe, args=(base, self.stop, send), daemon=True)

    def start(self) -> None:
        self.process.start()

    def finish(self) -> None:
        self.stop.set()
        samples = self.receive.recv() if self.receive.poll(60) else []
        self.process.join(10)
        for t, ms, failure in samples:
            self.record.health.append((t, ms))
            self.record.health_ms.append(ms)
            if failure is not None:
                self.record.health_failures.append(str(failure))


# ------------------------------------------------------------------------------------------ the corpus


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def corpus(texts_100: str) -> list[tuple[str, str, dict]]:
    """(group, name, request) triples; a request is kwargs for httpx plus "route" and "method"."""
    user = [{"role": "user", "content": "hi"}]
    out: list[tuple[str, str, dict]] = []

    def add(group: str, name: str, route: str, body=None, method: str = "POST", raw: bytes | None = None,
            headers: dict | None = None):
        merged = {"content-type": "application/json", **(headers or {})}
        req = {"route": route, "method": method, "headers": {k: v for k, v in merged.items() if v is not None}}
        if raw is not None:
            req["content"] = raw
        elif body is not None:
            req["content"] = json.dumps(body).encode()
        out.append((group, name, req))

    # work beside the engine: embeddings and echo scoring, bounded in tokens, queue and time
    add("3-offload", "embeddings over the token bound", "/v1/embeddings", {"input": [texts_100] * 200})
    for n in (1, 10, 50, 150):
        add("3-offload", f"embeddings of {n} texts of 100 tokens", "/v1/embeddings", {"input": [texts_100] * n})
    add("3-offload", "embeddings past the context", "/v1/embeddings", {"input": texts_100 * 3})
    add("3-offload", "embeddings of an empty string", "/v1/embeddings", {"input": ""})
    add("3-offload", "embeddings of an empty list", "/v1/embeddings", {"input": []})
    add("3-offload", "embeddings of numbers", "/v1/embeddings", {"input": [1, 2, 3]})
    add("3-offload", "embeddings base64", "/v1/embeddings", {"input": "fox", "encoding_format": "base64"})
    add("3-offload", "embeddings bad encoding", "/v1/embeddings", {"input": "fox", "encoding_format": "hex"})
    for k in (0, 5, 20):
        add("3-offload", f"echo with logprobs {k}", "/v1/completions",
            {"prompt": [texts_100] * 8, "max_tokens": 0, "echo": True, "logprobs": k})
    add("3-offload", "echo past the context", "/v1/completions",
        {"prompt": texts_100 * 3, "max_tokens": 0, "echo": True, "logprobs": 1})
    add("3-offload", "echo of many prompts with top 20", "/v1/completions",
        {"prompt": [texts_100] * 100, "max_tokens": 1, "echo": True, "logprobs": 20})

    # conversations: count and size
    add("4-messages", "one message of 1 MB", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * 1_000_000}]})
    add("4-messages", "2000 messages", "/v1/chat/completions", {"messages": user * 2000})
    add("4-messages", "1000 messages", "/v1/chat/completions", {"messages": user * 1000, "max_tokens": 2})
    add("4-messages", "200 KB message", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "word " * 40_000}], "max_tokens": 2})
    add("4-messages", "1 MB in content parts", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 200_000}] * 5}]})
    add("4-messages", "tokenize 1 MB", "/tokenize", {"prompt": "z" * 1_000_000})
    add("4-messages", "tokenize 2000 messages", "/tokenize", {"messages": user * 2000})
    add("4-messages", "completion prompt of 1 MB", "/v1/completions", {"prompt": "w" * 1_000_000})
    add("4-messages", "tool arguments of 1 MB", "/v1/chat/completions", {"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "a" * 1_000_000}}]}]})

    # bodies that crash a parser or a sampler
    for depth in (129, 500, 999, 1000, 2000, 10_000, 100_000):
        add("5-values", f"nesting {depth} at the top", "/v1/chat/completions",
            raw=f'{{"messages": {_deep(depth)}}}'.encode())
        add("5-values", f"nesting {depth} in a message", "/v1/chat/completions",
            raw=f'{{"messages": [{{"role": "user", "content": "hi", "x": {_deep(depth)}}}]}}'.encode())
        add("5-values", f"nesting {depth} in a schema", "/v1/chat/completions",
            raw=('{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", '
                 f'"json_schema": {{"name": "x", "schema": {{"properties": {_deep(depth)}}}}}}}}}').encode())
        add("5-values", f"nesting {depth} in a tool", "/v1/chat/completions",
            raw=('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
                 f'{{"name": "f", "parameters": {{"type": "object", "x": {_deep(depth)}}}}}}}]}}').encode())
        add("5-values", f"nesting {depth} of objects", "/tokenize",
            raw=('{"prompt": "x", "y": ' + '{"a": ' * depth + "1" + "}" * depth + "}").encode())
    for seed in (2**64, 2**63, -(2**63) - 1, 10**30, -(10**30), 1.5, "7", True, None, [1]):
        add("5-values", f"seed {seed!r}"[:40], "/v1/chat/completions", {"messages": user, "seed": seed, "max_tokens": 2})
    for key in ("\u00b2", "\u0663", "1e3", "-1", " ", "", "0x10", "99999", "3.0", "\uff11", "1" * 50):
        add("5-values", f"logit_bias key {key!r}"[:40], "/v1/chat/completions",
            {"messages": user, "logit_bias": {key: 1}, "max_tokens": 2})
    for value in ("1", None, [1], 1e300, -1e300):
        add("5-values", f"logit_bias value {value!r}"[:40], "/v1/completions",
            {"prompt": "x", "logit_bias": {"5": value}, "max_tokens": 2})
    for literal in ("NaN", "Infinity", "-Infinity", "1e999", "1" * 5000, "-0", "1E400"):
        for field in ("temperature", "top_p", "max_tokens", "seed", "presence_penalty"):
            add("5-values", f"{field} = {literal[:12]}", "/v1/completions",
                raw=f'{{"prompt": "x", "max_tokens": 2, "{field}": {literal}}}'.encode())
    bad_schemas = [{"allOf": 5}, {"anyOf": 5}, {"oneOf": "x"}, {"properties": [1]}, {"format": ["x"]},
                   {"type": 5}, {"enum": 5}, {"items": 5}, {"required": "a"}, {"pattern": "("},
                   {"pattern": "^a{20000}$"}, {"minLength": -1}, {"maxItems": "3"}, {"$ref": "#/nowhere"},
                   {"type": "string", "maxLength": 10**12}]
    for i, schema in enumerate(bad_schemas):
        add("5-values", f"response schema {json.dumps(schema)[:30]}", "/v1/chat/completions",
            {"messages": user, "max_tokens": 4, "response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "x", "schema": schema}}})
        add("5-values", f"tool parameters {json.dumps(schema)[:30]}", "/v1/chat/completions",
            {"messages": user, "max_tokens": 4, "tool_choice": "required",
             "tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": schema}}]})
    add("5-values", "models (the model is loaded by then)", "/v1/models", method="GET")

    # cross-site: media types, Host, Origin
    routes = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"]
    body = {"prompt": "x", "messages": user, "input": "x", "tokens": [5], "max_tokens": 2}
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
                  "application/xml", None):
        for route in routes:
            add("6-cross-site", f"{media or 'no content type'} to {route}", route, body,
                headers={"content-type": media})
    for host in ("rebind.example", "rebind.example:8000", "127.0.0.1.nip.example", "localhost.evil.example"):
        for route in routes[:3]:
            add("6-cross-site", f"Host {host} to {route}", route, body, headers={"host": host})
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example", "file://"):
        for route in routes[:3]:
            add("6-cross-site", f"Origin {origin} to {route}", route, body, headers={"origin": origin})

    # smaller ones: keys, empty prompts, oversized bodies
    for prompt in ("", [], [[]], [[5], []], [""]):
        add("10-smaller", f"empty prompt {prompt!r}", "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    add("10-smaller", "non-ASCII bearer without a key", "/v1/models", method="GET",
        headers={"authorization": "Bearer cl\u00e9".encode()})
    add("10-smaller", "body of 9 MB", "/v1/completions", raw=b"x" * (9 * 1024 * 1024))
    add("10-smaller", "invalid UTF-8", "/v1/completions", raw=b'{"prompt": "\xff\xfe"}')
    add("10-smaller", "not JSON", "/v1/completions", raw=b"{not json")
    add("10-smaller", "a JSON list", "/v1/completions", raw=b"[1, 2]")
    add("10-smaller", "an empty body", "/v1/completions", raw=b"")
    add("10-smaller", "unknown route", "/v1/nothing", {"a": 1})
    add("10-smaller", "GET on a POST route", "/v1/chat/completions", method="GET")
    add("10-smaller", "token ids outside the vocabulary", "/detokenize", {"tokens": [10**9, -1]})
    add("10-smaller", "token ids of 10**30", "/v1/completions", {"prompt": [10**30], "max_tokens": 2})

    # unbounded work
    for n in (16, 32, 64):
        add("12-work", f"n={n} with the default max_tokens", "/v1/chat/completions", {"messages": user, "n": n})
        add("12-work", f"n={n} x 20 logprobs", "/v1/chat/completions",
            {"messages": user, "n": n, "max_tokens": 100, "logprobs": True, "top_logprobs": 20})
        add("12-work", f"{n} prompts x n=64", "/v1/completions", {"prompt": ["x"] * n, "n": 64, "max_tokens": 100})
    add("12-work", "max_tokens 10**12", "/v1/completions", {"prompt": "x", "max_tokens": 10**12})
    add("12-work", "n=1000", "/v1/chat/completions", {"messages": user, "n": 1000})
    return out


def send(base: str, request: dict) -> httpx.Response:
    request = dict(request)
    url = base + request.pop("route")
    return httpx.request(request.pop("method"), url, timeout=REQUEST_TIMEOUT + 30, **request)


def slow_body(port: int) -> int:
    """A client that trickles its body a byte at a time: the server answers 408 and closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        reply = b""
        sock.settimeout(0.3)
        deadline = time.monotonic() + REQUEST_TIMEOUT + 30
        while b"\r\n" not in reply and time.monotonic() < deadline:
            try:
                chunk = sock.recv(100)
                if not chunk:
                    break
                reply += chunk
            except socket.timeout:
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
        return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def leave_mid_embedding(base: str, port: int, texts: list[str]) -> int:
    """Ask for a long embedding and leave at once; the next request must not wait for it."""
    body = json.dumps({"input": texts}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.1)
    return httpx.post(base + "/v1/embeddings", json={"input": "fox"}, timeout=REQUEST_TIMEOUT + 30).status_code


def run_corpus(base: str, port: int, record: Record, texts_100: str) -> None:
    items = corpus(texts_100)
    # one at a time, then the heavy ones again all at once
    for group, name, request in items:
        t = time.perf_counter()
        try:
            status: int | str = send(base, request).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        record.add("corpus", group, name, status, time.perf_counter() - t)
    heavy = [x for x in items if x[0] in ("3-offload", "4-messages", "12-work")]

    def one(item):
        group, name, request = item
        t = time.perf_counter()
        try:
            status = send(base, request).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        record.add("corpus-concurrent", group, name, status, time.perf_counter() - t)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, heavy))
    for name, fn in (("slow body", lambda: slow_body(port)),
                     ("client leaves mid-embedding", lambda: leave_mid_embedding(base, port, [texts_100] * 150))):
        t = time.perf_counter()
        status = fn()
        record.add("corpus", "10-smaller" if name == "slow body" else "3-offload", name, status,
                   time.perf_counter() - t)


# ------------------------------------------------------------------------------------------ schemathesis


def run_generated(base: str, record: Record, target: int) -> None:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    session = requests.Session()
    count = 0
    per_round = max(10, target // (2 * len(operations)) + 1)
    while count < target:
        before = count
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @settings(max_examples=per_round, deadline=None, database=None, derandomize=False,
                          suppress_health_check=list(HealthCheck), phases=[Phase.generate])
                @given(case=op.as_strategy(generation_mode=mode))
                def call(case):
                    nonlocal count
                    t = time.perf_counter()
                    try:
                        status: int | str = case.call(base_url=base, session=session,
                                                      timeout=REQUEST_TIMEOUT + 30).status_code
                    except requests.RequestException as exc:
                        status = type(exc).__name__
                    count += 1
                    record.add("schemathesis", mode.value, op.label, status, time.perf_counter() - t,
                               sent={"body": case.body, "query": case.query, "headers": case.headers})

                try:
                    call()
                except Unsatisfiable:  # nothing invalid to send (a route without parameters)
                    pass
        if count == before:
            break


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder, file or store name (default: a tiny random model built here)")
    ap.add_argument("--generated", type=int, default=1000, help="schemathesis requests, at least")
    ap.add_argument("--out", default=str(HERE / "hostile-results.json"))
    args = ap.parse_args()

    load_at_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="llmkit-hostile-")
    model = args.model or str(tiny_model(Path(tmp.name) / "tiny"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tmp.name) / "serve.log"
    flags = ["--request-timeout", str(REQUEST_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT), "--max-queue", "8",
             "--log-level", "warning"]
    env = {**os.environ, "LLMKIT_PLUGINS": ""}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmkit.cli", "serve", "-m", model, "--port", str(port),
                                 *flags], stdout=log, stderr=subprocess.STDOUT, env=env)
    record = Record()
    probe = HealthProbe(base, record)
    started = time.perf_counter()
    try:
        early = None
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if early is None:  # the first answer, likely while the model still loads
                    t = time.perf_counter()
                    early = httpx.get(base + "/v1/models").status_code
                    record.add("corpus", "5-values", "models while loading", early, time.perf_counter() - t)
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        probe.start()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model) if Path(model).is_dir() else None
        texts_100 = tok.decode(tok.encode(("The quick brown fox jumps over the lazy dog. " * 40))[:100]) \
            if tok is not None else "The quick brown fox jumps over the lazy dog. " * 10
        run_corpus(base, port, record, texts_100)
        run_generated(base, record, args.generated)
    finally:
        if probe.process.is_alive():
            probe.finish()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    elapsed = time.perf_counter() - started
    server_log = log_path.read_text()
    summary = summarize(record, server_log, elapsed, flags, args, load_at_start)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("five_xx", "over_deadline")}, indent=2))
    if summary["five_xx"]:
        print("5xx answers:", json.dumps(summary["five_xx"][:20], indent=1))
    tmp.cleanup()
    return 0 if summary["passed"] else 1


def summarize(record: Record, server_log: str, elapsed: float, flags: list[str], args,
              load_at_start: float) -> dict:
    def statuses(rows):
        out: dict[str, int] = {}
        for r in rows:
            out[str(r["status"])] = out.get(str(r["status"]), 0) + 1
        return dict(sorted(out.items()))

    generated = [r for r in record.requests if r["source"] == "schemathesis"]
    hand = [r for r in record.requests if r["source"].startswith("corpus")]
    groups = sorted({r["group"] for r in hand})
    health = sorted(record.health_ms)
    health_stats = {
        "probes": len(health), "median_ms": round(statistics.median(health), 1) if health else None,
        "p99_ms": round(health[int(0.99 * (len(health) - 1))], 1) if health else None,
        "max_ms": round(health[-1], 1) if health else None,
        "over_100ms": sum(ms > HEALTH_LIMIT_MS for ms in health), "failures": record.health_failures[:10],
        "slowest": record.slow_probes(),
    }
    five_xx, late = record.five_xx(), record.over_deadline()
    for r in record.requests:
        r.pop("end", None)
    transport = [r for r in record.requests if isinstance(r["status"], str)]
    tracebacks = server_log.count("Traceback")
    return {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/hostile.py"
                   + (f" --model {args.model}" if args.model else "")
                   + (f" --generated {args.generated}" if args.generated != 1000 else ""),
        "model": args.model or "tiny random Llama (vocabulary 400, context 128), built by the script",
        "server_flags": flags,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    # other work on the machine meanwhile (1-minute load average, at the start and the end)
                    "load_average": [round(load_at_start, 2), round(os.getloadavg()[0], 2)]},
        "seconds": round(elapsed, 1),
        "generated": {"requests": len(generated), "by_status": statuses(generated)},
        "corpus": {"requests": len(hand), "by_status": statuses(hand),
                   "by_group": {g: {"requests": sum(r["group"] == g for r in hand),
                                    "by_status": statuses([r for r in hand if r["group"] == g])} for g in groups}},
        "health": health_stats,
        "slowest_request_s": max((r["seconds"] for r in record.requests), default=0),
        "server_tracebacks": tracebacks,
        "first_traceback": server_log[server_log.find("Traceback"):][:3000] if tracebacks else None,
        "transport_errors": transport[:20],
        "five_xx": five_xx,
        "over_deadline": late,
        "passed": bool(len(generated) >= args.generated and len(hand) >= 200 and not five_xx and not late
                       and not transport and not tracebacks and not record.health_failures
                       and health_stats["over_100ms"] == 0),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
