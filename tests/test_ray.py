"""Serving and batch jobs on Ray, on a local Ray instance of two CPUs: two replicas of one thread
each behind Serve's proxy, and Ray Data batch jobs compared with the same job in process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import llmkit  # noqa: E402
from llmkit.server.config import ServerConfig  # noqa: E402
from llmkit.server.ray_app import (PROXY_CALLBACK, PROXY_CALLBACK_VAR, PUSH_EVERY, SERVER, ProxyErrors,  # noqa: E402
                                   merge_metrics, ray_app)  # noqa: E402

# the tests on a Ray instance are slow (replicas and actors load the model in their own processes);
# the others run in seconds
slow = pytest.mark.slow

APP = "llmkit"
DEADLINE = 180.0  # generous: a replica restarts by loading the model in a new process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, check, deadline: float = DEADLINE, every: float = 0.25):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def local_ray():
    # the proxy's middleware is named in the environment that Ray's processes inherit
    previous = os.environ.get(PROXY_CALLBACK_VAR)
    os.environ[PROXY_CALLBACK_VAR] = PROXY_CALLBACK
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop(PROXY_CALLBACK_VAR, None)
    else:
        os.environ[PROXY_CALLBACK_VAR] = previous


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The tiny random Llama with a context long enough for streams that last seconds."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096)
    out = tmp_path_factory.mktemp("tiny-long")
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def served(local_ray, long_model_dir):
    """Two replicas of one thread each, behind Serve's proxy; the batch tests run after it is gone."""
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_app(str(long_model_dir), replicas=2, threads_per_replica=1,
                      config=ServerConfig(model_name="tiny", max_batch=8)), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _replica_figures(base: str, metric: str) -> dict[str, float]:
    """A metric's value per replica, summed over its other labels, from /metrics through the proxy."""
    text = httpx.get(base + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'{re.escape(metric)}\{{(.*)\}} (\S+)$', line)
        if m:
            replica = re.search(r'replica="([^"]+)"', m.group(1)).group(1)
            out[replica] = out.get(replica, 0.0) + float(m.group(2))
    return out


def _running_replicas() -> int:
    status = serve.status().applications[APP].deployments[SERVER]
    return status.replica_states.get("RUNNING", 0)


def test_plain_serve_does_not_import_ray():
    code = ("import sys\nfrom llmkit.server.app import create_app\n"
            "import llmkit.cli, llmkit.commands.serve, llmkit.commands.tasks, llmkit.batch_job\n"
            "create_app()\nprint('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_merge_metrics_labels_each_sample_with_its_replica():
    a = '# HELP llmkit:x_total X.\n# TYPE llmkit:x_total counter\nllmkit:x_total{k="v"} 3.0\n'
    b = '# HELP llmkit:x_total X.\n# TYPE llmkit:x_total counter\nllmkit:x_total{k="v"} 5.0\n'
    text = merge_metrics({"r1": a, "r2": b}).decode()
    assert 'llmkit:x_total{k="v",replica="r1"} 3.0' in text
    assert 'llmkit:x_total{k="v",replica="r2"} 5.0' in text
    assert text.count("# TYPE") == 1


def _through(inner, path: str = "/v1/chat/completions") -> tuple[int, dict, bytes]:
    """What a client gets from ``inner`` (an ASGI app standing for Serve's proxy) through ProxyErrors."""
    import asyncio

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(ProxyErrors(inner)({"type": "http", "path": path, "method": "POST"}, receive, send))
    start = sent[0]
    assert start["type"] == "http.response.start" and not sent[-1].get("more_body", False)
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(
        m.get("body", b"") for m in sent[1:])


def test_proxy_errors_give_llmkits_error_shape():
    async def nothing(scope, receive, send):  # a replica that died before answering
        pass

    status, headers, body = _through(nothing)
    assert status == 500 and json.loads(body)["error"]["code"] == "replica_failed"

    async def busy(scope, receive, send):  # the proxy's own plain-text refusal
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"3")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": False})

    status, headers, body = _through(busy)
    assert status == 503 and headers["retry-after"] == "3" and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == {"message": "Request dropped due to backpressure",
                                         "type": "service_unavailable_error", "param": None, "code": None}

    async def cut(scope, receive, send):  # a stream whose replica died half-way
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    status, _, body = _through(cut)
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "replica_failed"

    async def fine(scope, receive, send):  # the app's own answers pass untouched, its errors included
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {"code": "model_not_found"}}'})

    assert _through(fine) == (404, {"content-type": "application/json"}, b'{"error": {"code": "model_not_found"}}')


@slow
def test_openai_client_and_page_through_the_proxy(served):
    from openai import OpenAI

    assert httpx.get(served + "/health", timeout=30).status_code == 200
    ready = httpx.get(served + "/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["model"] == "tiny"
    client = OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "The quick brown fox"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: the same text, whichever replica answered
    page = httpx.get(served + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    wrong = httpx.post(served + "/v1/chat/completions", json={"model": "other", "messages": messages}, timeout=30)
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"


@slow
def test_requests_spread_over_both_replicas(served):
    time.sleep(3 * PUSH_EVERY)  # the replicas' pushes of earlier tests' counts have landed
    before = _replica_figures(served, "llmkit:request_success_total")

    def ask(_):
        r = httpx.post(served + "/v1/completions", json={"model": "tiny", "prompt": "Paris is", "max_tokens": 64,
                                                         "temperature": 0, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def spread():
        now = _replica_figures(served, "llmkit:request_success_total")
        gained = {r: now.get(r, 0) - before.get(r, 0) for r in now}
        return gained if sum(gained.values()) >= 16 and len([g for g in gained.values() if g > 0]) == 2 else None

    gained = _until("both replicas' counts in /metrics", spread)
    assert sum(gained.values()) == 16


@slow
def test_a_killed_replica_fails_only_its_streams_and_comes_back(served):
    from openai import APIError, OpenAI

    client = OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=120)
    outcomes: dict[int, str] = {}
    started = [threading.Event() for _ in range(4)]

    def stream(i: int) -> None:
        try:
            chunks = client.completions.create(model="tiny", prompt=f"Stream {i}", max_tokens=3500, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            finish = None
            for chunk in chunks:
                started[i].set()
                finish = chunk.choices[0].finish_reason or finish if chunk.choices else finish
            outcomes[i] = f"finished:{finish}"
        except APIError as exc:  # a stream's error event (or an error answer); a cut connection has no code
            outcomes[i] = f"error:{exc.code}"
        except Exception as exc:  # noqa: BLE001 - anything else (a cut connection) fails the test below
            outcomes[i] = f"broken:{type(exc).__name__}: {exc}"
        finally:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for event in started:
        assert event.wait(DEADLINE)
    busy = _until("a replica with streams running",
                  lambda: {r: n for r, n in _replica_figures(served, "llmkit:num_requests_running").items() if n})
    victim, held = max(busy.items(), key=lambda kv: kv[1])
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{SERVER}#{victim}", namespace="serve"), no_restart=True)
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert not [o for o in outcomes.values() if o.startswith("broken")], outcomes
    failed = [o for o in outcomes.values() if o.startswith("error")]
    assert 1 <= len(failed) <= held and set(failed) == {"error:replica_failed"}, outcomes
    assert all(o == "finished:length" for o in outcomes.values() if not o.startswith("error")), outcomes

    def replaced():
        if _running_replicas() != 2:
            return False
        return victim not in _replica_figures(served, "llmkit:request_success_total")

    _until("Serve to replace the killed replica", replaced)
    r = httpx.post(served + "/v1/completions", json={"model": "tiny", "prompt": "again", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


# ------------------------------------------------------------------------------------------ batch jobs

ROWS = 1000


ANSWER = {"max_tokens": 6}  # greedy (the task's rule), a few tokens


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """Questions of 1 to 12 words drawn from the tiny model's corpus: varied enough that the tiny
    model's answers differ, so that an answer given to the wrong row shows."""
    import random

    from conftest import CORPUS

    words = " ".join(CORPUS[:6]).split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("batch") / "rows.jsonl"
    with path.open("w") as f:
        for i in range(ROWS):
            question = " ".join(rng.choice(words) for _ in range(1 + i % 12))
            f.write(json.dumps({"id": f"doc-{i}", "text": question}) + "\n")
    return path


@pytest.fixture(scope="module")
def in_process(rows_file, tiny_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    report = llmkit.batch("answer", rows_file, out, model=str(tiny_dir), progress=False, **ANSWER)
    assert report.ran == ROWS and not report.failed
    assert not Path(f"{out}.progress.jsonl").exists()  # removed once every row succeeded
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["result"] for r in rows}) > 50
    return rows


@pytest.fixture
def cpus_free(local_ray):
    """Serve's replicas hold both CPUs: batch jobs on Ray run after they are gone."""
    serve.shutdown()


@slow
def test_batch_on_ray_gives_the_in_process_outputs_in_order(cpus_free, rows_file, tiny_dir, in_process, tmp_path):
    inputs = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["id"] for r in in_process] == [r["id"] for r in inputs]
    assert all(r["text"] == i["text"] and isinstance(r["result"], str) for r, i in zip(in_process, inputs))
    out = tmp_path / "out.parquet"
    report = llmkit.batch("answer", rows_file, out, model=str(tiny_dir), ray=True, replicas=2, progress=False,
                          **ANSWER)
    assert (report.rows, report.skipped, report.ran, report.failed) == (ROWS, 0, ROWS, [])
    import pyarrow.parquet as pq

    assert pq.read_table(out).to_pylist() == in_process


@slow
def test_batch_resumes_after_a_kill_without_redoing_rows(cpus_free, rows_file, tiny_dir, in_process, tmp_path):
    out = tmp_path / "out.jsonl"
    progress = Path(f"{out}.progress.jsonl")
    cli = Path(sys.executable).parent / "llmkit"
    job = subprocess.Popen([str(cli), "run", "answer", str(rows_file), "--out", str(out), "-m", str(tiny_dir),
                            "-o", f"max_tokens={ANSWER['max_tokens']}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until("a third of the rows recorded",
               lambda: progress.exists() and progress.read_text().count("\n") > ROWS // 3, every=0.02)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert not out.exists()  # nothing half-written where the output goes
    recorded = [json.loads(line) for line in progress.read_text().splitlines()[1:] if line.endswith("}")]
    done = {e["i"] for e in recorded if "result" in e}
    assert 0 < len(done) < ROWS
    report = llmkit.batch("answer", rows_file, out, model=str(tiny_dir), ray=True, replicas=2, progress=False,
                          **ANSWER)
    assert report.skipped == len(done) and report.ran == ROWS - len(done) and not report.failed
    assert [json.loads(line) for line in out.read_text().splitlines()] == in_process
    assert not progress.exists()


def test_a_failed_row_is_reported_with_its_id_and_the_job_goes_on(tiny_dir, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "text": "Paris is"}, {"id": "b", "body": "no text field"}, {"id": "c", "text": "The fox"}]))
    out = tmp_path / "out.jsonl"
    report = llmkit.batch("summarize", source, out, model=str(tiny_dir), max_tokens=3, progress=False)
    assert [row_id for row_id, _ in report.failed] == ["b"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["result"] is None and "text" in rows[1]["error"]
    assert isinstance(rows[0]["result"], str) and "error" not in rows[0]
    # the progress file stays, so that a second run retries only the failed row
    again = llmkit.batch("summarize", source, out, model=str(tiny_dir), max_tokens=3, progress=False)
    assert again.skipped == 2 and again.ran == 1
    # another job's progress file is refused, not mixed in
    with pytest.raises(llmkit.LLMKitError, match="another job"):
        llmkit.batch("summarize", source, out, model=str(tiny_dir), max_tokens=5, progress=False)


def test_cli_refuses_ray_flags_that_do_not_fit(tmp_path):
    from click.testing import CliRunner

    from llmkit.cli import main

    def run(*args):
        return CliRunner().invoke(main, list(args))

    out = run("serve", "-m", "x", "--replicas", "2")
    assert out.exit_code == 2 and "go with --ray" in out.output
    out = run("serve", "-m", "x", "--ray", "--replicas", "2", "--max-replicas", "3")
    assert out.exit_code == 2 and "--min-replicas/--max-replicas" in out.output
    out = run("run", "answer", "rows.jsonl", "--ray")
    assert out.exit_code == 2 and "--out" in out.output
    rows = tmp_path / "rows.csv"
    rows.write_text("text\nhello\n")
    out = run("run", "answer", str(rows), "--out", str(tmp_path / "out.jsonl"))
    assert out.exit_code == 1 and ".jsonl or .parquet" in out.output and not (tmp_path / "out.jsonl").exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "body": "hello"}\n')
    out = run("run", "answer", str(rows), "--out", str(tmp_path / "out.jsonl"))
    assert out.exit_code == 1 and "--field" in out.output and not (tmp_path / "out.jsonl").exists()


@slow
def test_cli_serves_on_a_cluster_it_joins_and_leaves_it_running(cpus_free, tiny_dir, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, LLMKIT_API_KEY="secret", LLMKIT_HOME=str(tmp_path / "home"))
    server = subprocess.Popen([str(Path(sys.executable).parent / "llmkit"), "serve", "-m", str(tiny_dir), "--ray",
                               "--address", address, "--port", str(port), "--replicas", "1",
                               "--served-model-name", "t", "--max-queue", "3"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = {"Authorization": "Bearer secret"}
    try:
        def ready():
            try:
                return httpx.get(base + "/ready", headers=key, timeout=10).status_code == 200
            except httpx.HTTPError:
                assert server.poll() is None, "llmkit serve --ray exited"
                return False

        _until("the served app", ready)
        assert httpx.get(base + "/v1/models", timeout=30).status_code == 401  # the key reached the replica
        r = httpx.post(base + "/v1/completions", headers=key, timeout=60,
                       json={"model": "t", "prompt": "Paris", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "t"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(DEADLINE)
    assert code == 0
    assert APP not in serve.status().applications  # its app is deleted ...
    assert ray.cluster_resources().get("CPU") == 2  # ... and the cluster it joined still runs
