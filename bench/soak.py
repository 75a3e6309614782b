"""Soak: a real ``llmkit serve`` under many concurrent clients for a long time.

The server runs with its default options (the key set through LLMKIT_API_KEY) on a free port.
``--clients`` asyncio clients (httpx) send a mixed workload until ``--minutes`` have passed:
chat completions whole and streamed, completions, JSON-schema ``response_format`` (some with a
schema never seen before, so that the grammar caches must stay bounded), forced tool calls,
embeddings, streams the client leaves after a few chunks, and the newer routes the server's
``/openapi.json`` lists (``/v1/messages``, ``/v1/responses``, ``/v1/rerank``). Prompts vary, a
share of them behind a shared system prompt (prefix-cache hits and misses both).

Recorded: every request's route, status, latency and whether it finished; a request past its
client-side deadline counts as hung. ``/health`` is asked every second, the resident memory of the
server and its children (VmRSS) and the sizes of its caches (``/metrics``) read every 10 s.

At the end: wait until the server is idle, check that nothing runs or waits (``/metrics`` gauges)
and that every engine slot can take a request again (as many concurrent requests as the server's
batch, all seen running at once), stop the server with SIGINT and write the figures.

Targets (exit code 1 when one is missed): no 5xx, no hung request, no transport error, no 4xx to
these well-formed requests, idle at the end with every slot usable, a clean shutdown, and resident
memory growth after the first 5 minutes under 5%, net of the caches' own growth, both reported by
``/metrics``: the prefix cache (bounded by ``--prefix-cache-mb``) and the running requests'
key/value cache (sized to the longest batch met so far, at most every slot's whole context, and
kept while idle). The raw growth is reported too.
Growth is measured at idle: the clients pause after the warm-up until the server is idle (a few
seconds), memory is read, and the load goes on; at the end it is read the same way. What requests
in flight hold moves resident memory under load by tens of MB from one read to the next, so the
growth under load (minute medians) is reported beside it, not judged.

    .venv/bin/python bench/soak.py --minutes 30 --json bench/soak-results.json
    .venv/bin/python bench/soak.py --minutes 1 --clients 4          # a quick try
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile import _free_port  # noqa: E402  (a sibling script, not a package)

REQUEST_DEADLINE = 120.0  # client-side: a request not answered in full by then is hung
HEALTH_EVERY = 1.0
RSS_EVERY = 10.0
WARMUP_S = 300.0  # memory growth is measured from here (or a fifth of a shorter run)
GROWTH_TARGET_PERCENT = 5.0
SERVER_MAX_BATCH = 16  # `llmkit serve`'s default --max-batch: the slots checked at the end


# ------------------------------------------------------------------------------------------ the server


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants."""
    total = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def read_metrics(base: str, headers: dict) -> dict[str, float]:
    """The samples of /metrics as {name{labels}: value}."""
    text = httpx.get(base + "/metrics", headers=headers, timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def start_server(model: str, port: int, key: str, log_path: Path, options: list[str]) -> subprocess.Popen:
    env = {**os.environ, "LLMKIT_API_KEY": key, "LLMKIT_PLUGINS": ""}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "llmkit.cli", "serve", "-m", model, "--port", str(port),
                                 *options], stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(proc: subprocess.Popen, base: str, headers: dict, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become ready")
        try:
            if httpx.get(base + "/ready", headers=headers, timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------ monitors


@dataclass
class Samples:
    health: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, ms)
    health_failures: list[str] = field(default_factory=list)
    rss: list[dict] = field(default_factory=list)  # {"t", "rss_mb", "prefix_cache_mb", "load"}


def monitor(base: str, headers: dict, pid: int, t0: float, stop: threading.Event, out: Samples) -> list:
    """Two threads: /health every second; memory, prefix cache and load average every 10 s."""

    def health():
        with httpx.Client(timeout=30) as h:
            while not stop.wait(HEALTH_EVERY):
                t = time.monotonic()
                try:
                    status = h.get(base + "/health").status_code
                    if status != 200:
                        out.health_failures.append(f"{t - t0:.0f}s: {status}")
                except httpx.HTTPError as exc:
                    out.health_failures.append(f"{t - t0:.0f}s: {type(exc).__name__}")
                out.health.append((t - t0, (time.monotonic() - t) * 1000))

    def memory():
        while True:
            try:
                gauges = read_metrics(base, headers)
                cache, kv = gauges.get("llmkit:prefix_cache_bytes", 0.0), gauges.get("llmkit:kv_cache_bytes", 0.0)
            except httpx.HTTPError:
                cache = kv = float("nan")
            out.rss.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss_bytes(pid) / 2**20, 1),
                            "prefix_cache_mb": round(cache / 2**20, 1), "kv_cache_mb": round(kv / 2**20, 1),
                            "load": round(os.getloadavg()[0], 2)})
            if stop.wait(RSS_EVERY):
                return

    threads = [threading.Thread(target=f, daemon=True) for f in (health, memory)]
    for t in threads:
        t.start()
    return threads


# ------------------------------------------------------------------------------------------ the workload

WORDS = ("model data token river mountain city garden music window paper orange engine light ocean "
         "forest silver winter market letter bridge planet yellow doctor kitchen story science travel "
         "history number energy animal coffee summer island camera rocket friend school").split()
TOPICS = ["the moon", "a red bicycle", "coffee", "the ocean", "Paris", "a friendly robot", "winter",
          "volcanoes", "a lost key", "the number seven", "bread", "a tiny dragon", "rain", "chess"]
SYSTEM = ("You are a careful assistant for a small library. Answer in one or two short sentences, "
          "stay polite, never invent book titles, and say so when you do not know the answer. "
          "Prefer plain words over jargon.")
PET_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
              "required": ["name", "legs"]}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def user_text(rng: random.Random) -> str:
    if rng.random() < 0.25:  # a longer request: new prefix-cache blocks
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
        return f"Summarize in one sentence: {filler}"
    return rng.choice(["Write a short poem about {}.", "Tell me one fact about {}.", "Describe {} in a few words.",
                       "What rhymes with {}?", "Give a title for a story about {}."]).format(rng.choice(TOPICS))


def messages(rng: random.Random) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    return msgs + [{"role": "user", "content": user_text(rng)}]


def fresh_schema(rng: random.Random) -> dict:
    """A schema never sent before (a random property name): each compiles a new grammar."""
    name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return {"type": "object", "properties": {name: {"type": "string"}, "count": {"type": "integer"}},
            "required": [name, "count"]}


@dataclass
class Call:
    """One request to make: route, body, whether it streams, and after how many chunks to leave."""

    kind: str
    route: str
    body: dict
    stream: bool = False
    leave_after: int | None = None
    headers: dict = field(default_factory=dict)
    check: str | None = None  # what a whole answer must hold: "json", "tool"


def make_call(kind: str, rng: random.Random, model: str) -> Call:
    n = rng.randint(16, 64)
    chat = {"model": model, "messages": messages(rng), "max_tokens": n}
    if kind == "chat":
        return Call(kind, "/v1/chat/completions", chat)
    if kind == "chat_stream":
        return Call(kind, "/v1/chat/completions", {**chat, "stream": True}, stream=True)
    if kind == "disconnect":
        return Call(kind, "/v1/chat/completions", {**chat, "max_tokens": 64, "stream": True}, stream=True,
                    leave_after=rng.randint(1, 5))
    if kind == "completion":
        stream = rng.random() < 0.4
        return Call(kind, "/v1/completions", {"model": model, "prompt": user_text(rng), "max_tokens": n,
                                              "stream": stream}, stream=stream)
    if kind == "json_schema":
        schema = fresh_schema(rng) if rng.random() < 0.25 else PET_SCHEMA
        body = {"model": model, "max_tokens": 64,
                "messages": [{"role": "user", "content": f"Describe {rng.choice(TOPICS)} as JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}}
        return Call(kind, "/v1/chat/completions", body, check="json")
    if kind == "tool_call":
        body = {"model": model, "max_tokens": 64, "tools": [WEATHER_TOOL], "tool_choice": "required",
                "messages": [{"role": "user", "content": f"What is the weather in {rng.choice(CITIES)}?"}]}
        return Call(kind, "/v1/chat/completions", body, check="tool")
    if kind == "embeddings":
        texts = [user_text(rng) for _ in range(rng.randint(1, 8))]
        return Call(kind, "/v1/embeddings", {"model": model, "input": texts})
    if kind == "messages":
        stream = rng.random() < 0.5
        body = {"model": model, "max_tokens": n, "messages": [{"role": "user", "content": user_text(rng)}],
                "stream": stream}
        if rng.random() < 0.3:
            body["system"] = SYSTEM
        # Anthropic's clients send the key this way
        return Call(kind, "/v1/messages", body, stream=stream, headers={"anthropic-version": "2023-06-01"})
    if kind == "responses":
        stream = rng.random() < 0.5
        return Call(kind, "/v1/responses", {"model": model, "input": user_text(rng), "max_output_tokens": n,
                                            "stream": stream}, stream=stream)
    if kind == "rerank":
        docs = [user_text(rng) for _ in range(rng.randint(2, 6))]
        return Call(kind, "/v1/rerank", {"model": model, "query": f"Something about {rng.choice(TOPICS)}",
                                         "documents": docs})
    raise ValueError(kind)


CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Nairobi", "Denver", "Hanoi", "Porto"]
# kind -> (weight, route that must exist for it)
KINDS = {"chat": (14, "/v1/chat/completions"), "chat_stream": (14, "/v1/chat/completions"),
         "completion": (8, "/v1/completions"), "json_schema": (10, "/v1/chat/completions"),
         "tool_call": (8, "/v1/chat/completions"), "embeddings": (8, "/v1/embeddings"),
         "disconnect": (8, "/v1/chat/completions"), "messages": (6, "/v1/messages"),
         "responses": (6, "/v1/responses"), "rerank": (4, "/v1/rerank")}
TERMINAL = ("data: [DONE]", "event: message_stop", "event: response.completed", "event: response.incomplete")


async def send(client: httpx.AsyncClient, call: Call) -> dict:
    """Make one request; its outcome as a row."""
    row = {"kind": call.kind, "route": call.route, "stream": call.stream, "status": None, "finished": False,
           "hung": False, "valid": None, "error": None}
    t = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_DEADLINE):
            if call.stream:
                async with client.stream("POST", call.route, json=call.body, headers=call.headers) as r:
                    row["status"] = r.status_code
                    if r.status_code == 200:
                        chunks, ended = 0, False
                        async for line in r.aiter_lines():
                            if line.startswith("data:") and line != "data: [DONE]":
                                chunks += 1
                            if line.startswith(TERMINAL):
                                ended = True
                            if call.leave_after is not None and chunks >= call.leave_after:
                                break  # leaving the block closes the connection mid-stream
                        row["finished"] = ended or call.leave_after is not None and chunks >= call.leave_after
                    else:
                        await r.aread()
                        row["error"] = r.text[:300]
            else:
                r = await client.post(call.route, json=call.body, headers=call.headers)
                row["status"] = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    row["finished"] = True
                    row["valid"] = valid(call.check, body)
                    if row["valid"] is False:
                        row["answer"] = json.dumps(body["choices"][0])[:400]
                else:
                    row["error"] = r.text[:300]
    except TimeoutError:
        row["hung"] = True
    except httpx.HTTPError as exc:
        row["status"] = type(exc).__name__
        row["error"] = str(exc)[:300]
    row["seconds"] = round(time.perf_counter() - t, 3)
    return row


def valid(check: str | None, body: dict) -> bool | None:
    """Whether a whole answer holds what its request asked for (JSON text; a tool call)."""
    if check is None:
        return None
    message = body["choices"][0]["message"]
    if check == "tool":
        calls = message.get("tool_calls") or []
        try:
            return bool(calls) and all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in calls)
        except (ValueError, KeyError):
            return False
    try:
        return isinstance(json.loads(message.get("content") or ""), dict)
    except ValueError:
        return False


async def client_loop(i: int, base: str, key: str, model: str, kinds: dict, until: float, seed: str,
                      t0: float, rows: list) -> None:
    rng = random.Random(f"{seed}-{i}")
    names, weights = list(kinds), [kinds[k][0] for k in kinds]
    headers = {"authorization": f"Bearer {key}", "x-api-key": key}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=REQUEST_DEADLINE + 30) as client:
        while time.monotonic() < until:
            call = make_call(rng.choices(names, weights)[0], rng, model)
            row = await send(client, call)
            row["t"] = round(time.monotonic() - t0, 1)
            rows.append(row)


async def run_clients(base: str, key: str, model: str, kinds: dict, clients: int, seconds: float, seed: str,
                      t0: float) -> list[dict]:
    rows: list[dict] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(i, base, key, model, kinds, until, seed, t0, rows) for i in range(clients)))
    return rows


# ------------------------------------------------------------------------------------------ the end


def wait_idle(base: str, headers: dict, timeout: float = 300) -> dict:
    """Poll /metrics until nothing runs or waits three reads in a row; the last read."""
    deadline, calm = time.monotonic() + timeout, 0
    while True:
        m = read_metrics(base, headers)
        busy = m.get("llmkit:num_requests_running", 0) + m.get("llmkit:num_requests_waiting", 0)
        calm = calm + 1 if busy == 0 else 0
        if calm >= 3 or time.monotonic() > deadline:
            return m
        time.sleep(1)


def idle_memory(base: str, headers: dict, pid: int, t0: float) -> dict:
    """Resident memory once the server is idle: wait until nothing runs or waits, give the server's
    idle trim time to run, then the median of five reads a second apart. Comparing two such reads
    measures what the server keeps, free of what the requests in flight happen to hold."""
    wait_idle(base, headers)
    time.sleep(5)
    reads = []
    for _ in range(5):
        reads.append(rss_bytes(pid) / 2**20)
        time.sleep(1)
    gauges = read_metrics(base, headers)
    return {"t": round(time.monotonic() - t0, 1), "rss_mb": round(statistics.median(reads), 1),
            "prefix_cache_mb": round(gauges.get("llmkit:prefix_cache_bytes", 0.0) / 2**20, 1),
            "kv_cache_mb": round(gauges.get("llmkit:kv_cache_bytes", 0.0) / 2**20, 1)}


async def slot_check(base: str, key: str, model: str, slots: int) -> dict:
    """``slots`` concurrent requests that each decode 48 tokens: if every slot was freed, all of
    them run at once (the running gauge reaches ``slots``) and nothing waits."""
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": model, "max_tokens": 48, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count slowly from one to fifty."}]}
    seen = {"running_max": 0.0, "waiting_max": 0.0}
    done = asyncio.Event()

    async def watch():
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c:
            while not done.is_set():
                text = (await c.get("/metrics")).text
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name == "llmkit:num_requests_running":
                            seen["running_max"] = max(seen["running_max"], s.value)
                await asyncio.sleep(0.1)

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=REQUEST_DEADLINE + 30,
                                 limits=httpx.Limits(max_connections=slots + 4)) as client:
        watcher = asyncio.create_task(watch())
        rows = await asyncio.gather(*(send(client, Call("slot_check", "/v1/chat/completions", body, stream=True))
                                      for _ in range(slots)))
        done.set()
        await watcher
    return {"requests": slots, "answered_200": sum(r["status"] == 200 and r["finished"] for r in rows),
            "running_max_seen": int(seen["running_max"]), "every_slot_usable": seen["running_max"] >= slots}


def stop_server(proc: subprocess.Popen) -> dict:
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(90)
        how = "SIGINT"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            code, how = proc.wait(30), "SIGTERM after SIGINT"
        except subprocess.TimeoutExpired:
            proc.kill()
            code, how = proc.wait(), "SIGKILL (did not stop)"
    return {"signal": how, "exit_code": code, "seconds": round(time.monotonic() - t, 1)}


# ------------------------------------------------------------------------------------------ figures


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))], 3)


def window_median(samples: list[dict], key: str, start: float, end: float) -> float | None:
    vals = [s[key] for s in samples if start <= s["t"] <= end]
    return round(statistics.median(vals), 1) if vals else None


def _growth(warm: dict, end: dict) -> tuple[float, float]:
    """Growth in percent from ``warm`` to ``end`` ({"rss_mb", "prefix_cache_mb", "kv_cache_mb"}): raw,
    and net of the caches' own growth (the prefix cache filling to its bound; the running requests'
    key/value cache, sized to the longest batch met so far and kept while idle)."""
    def rest(m: dict) -> float:
        return m["rss_mb"] - m["prefix_cache_mb"] - m.get("kv_cache_mb", 0.0)
    raw = 100 * (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"]
    net = 100 * (rest(end) - rest(warm)) / rest(warm)
    return round(raw, 2), round(net, 2)


def memory_figures(samples: list[dict], warm_end: float, load_end: float, idle_warm: dict, idle_end: dict) -> dict:
    """Growth from the end of the warm-up to the end of the load, two ways: resident memory at idle
    (the server paused between them; the target) and under load (medians over the minute before
    each mark: what requests in flight hold moves these by tens of MB)."""
    span = min(60.0, warm_end / 2)
    loaded = {}
    for name, t in (("warm", warm_end), ("end", load_end)):
        rss = window_median(samples, "rss_mb", t - span, t)
        cache = window_median(samples, "prefix_cache_mb", t - span, t)
        kv = window_median(samples, "kv_cache_mb", t - span, t)
        if rss is None or cache is None or kv is None:
            return {"error": "too few memory samples"}
        loaded[name] = {"rss_mb": rss, "prefix_cache_mb": cache, "kv_cache_mb": kv}
    raw, net = _growth(idle_warm, idle_end)
    loaded_raw, loaded_net = _growth(loaded["warm"], loaded["end"])
    after = [s["rss_mb"] for s in samples if s["t"] >= warm_end]
    return {"warmup_ends_s": round(warm_end, 1),
            "idle_after_warmup": idle_warm, "idle_at_end": idle_end,
            "growth_percent_raw": raw, "growth_percent_net_of_caches": net,
            "under_load": {"rss_mb_at_warmup_end": loaded["warm"]["rss_mb"], "rss_mb_at_end": loaded["end"]["rss_mb"],
                           "rss_mb_max_after_warmup": max(after) if after else None,
                           "prefix_cache_mb_at_warmup_end": loaded["warm"]["prefix_cache_mb"],
                           "prefix_cache_mb_at_end": loaded["end"]["prefix_cache_mb"],
                           "growth_percent_raw": loaded_raw, "growth_percent_net_of_caches": loaded_net}}


def _gauges(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("llmkit:num_requests", "llmkit:prefix_cache_bytes"))}


def summarize(rows: list[dict], samples: Samples, load_s: float, memory: dict, idle_metrics: dict,
              end_metrics: dict, start_metrics: dict, slots: dict, shutdown: dict, server_log: str) -> dict:
    by_route: dict[str, dict] = {}
    for r in rows:
        d = by_route.setdefault(r["route"], {"requests": 0, "by_status": {}, "by_kind": {}, "latencies": []})
        d["requests"] += 1
        s = "hung" if r["hung"] else str(r["status"])
        d["by_status"][s] = d["by_status"].get(s, 0) + 1
        d["by_kind"][r["kind"]] = d["by_kind"].get(r["kind"], 0) + 1
        if r["status"] == 200 and r["kind"] != "disconnect":
            d["latencies"].append(r["seconds"])
    for d in by_route.values():
        lat = d.pop("latencies")
        d["latency_s"] = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat, default=None)}
    five_xx = [r for r in rows if isinstance(r["status"], int) and r["status"] >= 500]
    four_xx = [r for r in rows if isinstance(r["status"], int) and 400 <= r["status"] < 500]
    transport = [r for r in rows if isinstance(r["status"], str)]
    hung = [r for r in rows if r["hung"]]
    unfinished = [r for r in rows if r["status"] == 200 and not r["finished"]]
    checked = [r for r in rows if r["valid"] is not None]
    health = [ms for _, ms in samples.health]
    generated = end_metrics.get("llmkit:generation_tokens_total", 0) - start_metrics.get(
        "llmkit:generation_tokens_total", 0)
    gauges, idle = _gauges(end_metrics), _gauges(idle_metrics)
    tracebacks = server_log.count("Traceback")
    loads = [s["load"] for s in samples.rss]
    targets = {
        "no_5xx": len(five_xx) == 0,
        "no_hung_request": len(hung) == 0,
        "no_transport_error": len(transport) == 0,
        "no_4xx": len(four_xx) == 0,
        "every_200_finished": len(unfinished) == 0,
        "idle_at_end": all(g.get(name, 1) == 0 for g in (idle, gauges)
                           for name in ("llmkit:num_requests_running", "llmkit:num_requests_waiting")),
        "every_slot_usable": slots["every_slot_usable"] and slots["answered_200"] == slots["requests"],
        "memory_growth_under_5_percent": memory.get("growth_percent_net_of_caches", 1e9) < GROWTH_TARGET_PERCENT,
        # 130: the CLI's exit code for Ctrl-C (SIGINT), after the drain
        "clean_shutdown": shutdown["exit_code"] in (0, 130) and shutdown["signal"] == "SIGINT",
        "no_server_traceback": tracebacks == 0,
    }
    aborted = end_metrics.get('llmkit:request_success_total{finished_reason="abort"}', 0)
    return {
        "requests": len(rows),
        "by_route": dict(sorted(by_route.items())),
        "five_xx": len(five_xx), "hung": len(hung), "transport_errors": len(transport), "four_xx": len(four_xx),
        "unfinished_200": len(unfinished),
        "answers_checked": {"json_schema_and_tool_calls": len(checked), "valid": sum(bool(r["valid"]) for r in checked)},
        "disconnects": sum(r["kind"] == "disconnect" for r in rows),
        "server_aborted_generations": int(aborted),
        "health": {"probes": len(health), "p50_ms": pct(health, 0.5), "p99_ms": pct(health, 0.99),
                   "max_ms": round(max(health), 1) if health else None, "failures": samples.health_failures[:20]},
        "memory": memory,
        "throughput": {"load_seconds": round(load_s, 1), "requests_per_s": round(len(rows) / load_s, 3),
                       "generated_tokens": int(generated), "generated_tokens_per_s": round(generated / load_s, 2)},
        "end_state": {"gauges_once_idle_after_load": idle, "slot_check": slots, "metrics_gauges": gauges,
                      "note": "/metrics has no gauge of free slots: the slot check fills every slot at once instead"},
        "shutdown": shutdown,
        "server_tracebacks": tracebacks,
        "first_traceback": server_log[server_log.find("Traceback"):][:3000] if tracebacks else None,
        "server_log_tail": server_log.splitlines()[-15:],
        "load_average": {"start": loads[0] if loads else None, "mean": round(statistics.mean(loads), 2) if loads else None,
                         "max": max(loads, default=None), "end": round(os.getloadavg()[0], 2)},
        "rss_samples": samples.rss,
        "invalid_answers": [r["answer"] for r in checked if not r["valid"]][:20],
        "problems": [{k: r[k] for k in ("t", "kind", "route", "status", "hung", "seconds", "error")}
                     for r in (five_xx + hung + transport + four_xx + unfinished)][:50],
        "targets": targets,
        "passed": all(targets.values()),
    }


def human(result: dict) -> str:
    m, h, tp = result["memory"], result["health"], result["throughput"]
    lines = [f"soak: {result['minutes']} min, {result['clients']} clients, model {result['model']}, "
             f"{result['requests']} requests ({tp['requests_per_s']}/s, {tp['generated_tokens_per_s']} tokens/s); "
             f"load average mean {result['load_average']['mean']} on {result['machine']['cpus']} CPUs"]
    for route, d in result["by_route"].items():
        lines.append(f"  {route:22} {d['requests']:6}  {d['by_status']}  p50 {d['latency_s']['p50']}s "
                     f"p99 {d['latency_s']['p99']}s max {d['latency_s']['max']}s")
    lines.append(f"5xx {result['five_xx']}, hung {result['hung']}, transport errors {result['transport_errors']}, "
                 f"4xx {result['four_xx']}, unfinished 200s {result['unfinished_200']}; "
                 f"valid JSON/tool answers {result['answers_checked']['valid']}/"
                 f"{result['answers_checked']['json_schema_and_tool_calls']}; disconnects {result['disconnects']} "
                 f"(server aborted {result['server_aborted_generations']})")
    lines.append(f"/health: {h['probes']} probes, p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms, "
                 f"failures {len(h['failures'])}")
    if "error" in m:
        lines.append(f"memory: {m['error']}")
    else:
        w, e, u = m["idle_after_warmup"], m["idle_at_end"], m["under_load"]
        lines.append(f"RSS at idle: {w['rss_mb']} MB after the warm-up ({m['warmup_ends_s']:.0f} s), {e['rss_mb']} MB "
                     f"at the end: {m['growth_percent_raw']:+.2f}% raw, {m['growth_percent_net_of_caches']:+.2f}% "
                     f"net of the caches (prefix {w['prefix_cache_mb']} -> {e['prefix_cache_mb']} MB, "
                     f"key/value {w.get('kv_cache_mb')} -> {e.get('kv_cache_mb')} MB)")
        lines.append(f"RSS under load (minute medians): {u['rss_mb_at_warmup_end']} -> {u['rss_mb_at_end']} MB "
                     f"(max {u['rss_mb_max_after_warmup']}): {u['growth_percent_raw']:+.2f}% raw, "
                     f"{u['growth_percent_net_of_caches']:+.2f}% net")
    e = result["end_state"]
    lines.append(f"end: gauges once idle {e['gauges_once_idle_after_load']}; slot check {e['slot_check']}; shutdown {result['shutdown']}; "
                 f"server tracebacks {result['server_tracebacks']}")
    missed = [k for k, ok in result["targets"].items() if not ok]
    lines.append("PASSED" if result["passed"] else f"FAILED: {', '.join(missed)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a store name, .gguf file or model folder")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here (e.g. bench/soak-results.json)")
    ap.add_argument("--serve-option", action="append", default=[], metavar="FLAG",
                    help="a flag for `llmkit serve` beyond its defaults, repeatable (to look into a finding: "
                         "--serve-option=--no-prefix-cache)")
    args = ap.parse_args()

    key = secrets.token_urlsafe(16)
    headers = {"authorization": f"Bearer {key}"}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    tmp = tempfile.TemporaryDirectory(prefix="llmkit-soak-")
    log_path = Path(tmp.name) / "serve.log"
    load_at_start = os.getloadavg()[0]
    proc = start_server(args.model, port, key, log_path, args.serve_option)
    stop = threading.Event()
    samples = Samples()
    try:
        t_ready = time.monotonic()
        wait_ready(proc, base, headers, log_path)
        ready_s = time.monotonic() - t_ready
        paths = httpx.get(base + "/openapi.json", headers=headers, timeout=30).json()["paths"]
        model = httpx.get(base + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        kinds = {k: v for k, v in KINDS.items() if v[1] in paths}
        t0 = time.monotonic()
        threads = monitor(base, headers, proc.pid, t0, stop, samples)
        start_metrics = read_metrics(base, headers)
        print(f"soak: server ready in {ready_s:.0f} s on port {port}; {args.clients} clients for {args.minutes} min; "
              f"kinds {', '.join(kinds)}", flush=True)
        total = args.minutes * 60
        warm_s = min(WARMUP_S, total / 5)
        # the load runs in two parts with an idle pause between them, where memory is read
        rows = asyncio.run(run_clients(base, key, model, kinds, args.clients, warm_s, f"{args.seed}-warm", t0))
        warm_end = time.monotonic() - t0
        idle_warm = idle_memory(base, headers, proc.pid, t0)
        paused = time.monotonic() - t0 - warm_end
        print(f"soak: warm-up done at {warm_end:.0f} s; idle RSS {idle_warm['rss_mb']} MB", flush=True)
        rows += asyncio.run(run_clients(base, key, model, kinds, args.clients, total - warm_s, f"{args.seed}-load", t0))
        load_end = time.monotonic() - t0
        load_s = load_end - paused
        idle = wait_idle(base, headers)
        idle_end = idle_memory(base, headers, proc.pid, t0)
        slots = asyncio.run(slot_check(base, key, model, SERVER_MAX_BATCH))
        end_metrics = wait_idle(base, headers)
        stop.set()
        for t in threads:
            t.join(RSS_EVERY + 30)
    finally:
        stop.set()
        shutdown = stop_server(proc) if proc.poll() is None else {"signal": None, "exit_code": proc.returncode,
                                                                  "seconds": 0}
    server_log = log_path.read_text()
    result = {"command": " ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "model": args.model,
              "server_options": " ".join(args.serve_option) or "defaults (llmkit serve -m MODEL --port PORT; "
                                                                 "key in LLMKIT_API_KEY)",
              "clients": args.clients, "minutes": args.minutes, "seed": args.seed, "workload": kinds,
              "request_deadline_s": REQUEST_DEADLINE,
              "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version(),
                          "load_average_at_start": round(load_at_start, 2)},
              "server_ready_s": round(ready_s, 1),
              **summarize(rows, samples, load_s, memory_figures(samples.rss, warm_end, load_end, idle_warm, idle_end), idle, end_metrics, start_metrics, slots, shutdown, server_log)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(human(result))
    if result["problems"]:
        print("problems:", json.dumps(result["problems"][:10], indent=1))
    tmp.cleanup()
    return 0 if result["passed"] else 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
