"""Ray Serve against one process, on the same cores: is splitting the machine into replicas worth it?

Three servers of the same model are started one after another, each on its own port, and stopped
before the next:

- ``plain-1x2``: ``llmkit serve`` (one process, one engine, 2 torch threads);
- ``ray-2x1``: ``llmkit serve --ray --replicas 2 --threads-per-replica 1`` (two engines of one
  thread, behind Ray Serve's proxy: the same total cores);
- ``ray-1x2``: ``llmkit serve --ray --replicas 1 --threads-per-replica 2`` (one engine of two
  threads behind the proxy: the same engine as plain-1x2, so any difference is Ray's own cost).

Under load (``--concurrency`` streaming clients, ``--num-requests`` requests): output tokens/s and
time to first token, plain-1x2 against ray-2x1, with ``bench/serve_bench.py``'s definitions.
Overhead per request: ``--overhead-requests`` one-at-a-time requests for a single token, and as
many ``GET /health`` (no model work at all), plain-1x2 against ray-1x2; the difference of the
medians is what the proxy and the replica hop add.

    python bench/ray_serve.py -m smollm2-135m-instruct --json bench/ray-serve-results.json

The figures belong in the JSON file and the README with this command, whichever side wins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench  # noqa: E402  (the client side: requests, percentiles, table)

LLMKIT = Path(sys.executable).parent / "llmkit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``llmkit serve`` process (Ray's included), started with ``args``, stopped on exit."""

    def __init__(self, name: str, model: str, extra: list[str], threads: int, startup: float):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llmkit-bench-{name}.log", "w")
        self.proc = subprocess.Popen([str(LLMKIT), "serve", "-m", model, "--port", str(self.port), *extra],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.startup = startup

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + self.startup
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} was not ready after {self.startup:.0f} s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a --ray server deletes its app and stops its Ray
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def overhead(url: str, n: int, model: str | None) -> dict:
    """Medians of one-token completions and of GET /health, one request at a time."""
    async with httpx.AsyncClient(timeout=120) as client:
        model = model or await serve_bench.discover_model(client, url)

        async def timed(send) -> float:
            start = time.perf_counter()
            r = await send()
            r.raise_for_status()
            return time.perf_counter() - start

        one_token = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        await timed(lambda: client.post(url + "/v1/completions", json=one_token))  # warm-up
        tokens = [await timed(lambda: client.post(url + "/v1/completions", json=one_token)) for _ in range(n)]
        health = [await timed(lambda: client.get(url + "/health")) for _ in range(n)]
    return {"median_one_token_ms": 1000 * statistics.median(tokens), "median_health_ms": 1000 * statistics.median(health)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--overhead-requests", type=int, default=50)
    p.add_argument("--startup", type=float, default=600.0, help="Seconds a server may take to be ready.")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE")
    args = p.parse_args(argv)
    load_args = argparse.Namespace(concurrency=args.concurrency, num_requests=args.num_requests,
                                   max_tokens=args.max_tokens, temperature=0.0, endpoint="chat", ignore_eos=True,
                                   warmup=2, timeout=600.0, api_key=None, model=None)
    loads, costs = [], {}
    for name, extra, threads, measure in (
            ("plain-1x2", [], 2, ("load", "overhead")),
            ("ray-2x1", ["--ray", "--replicas", "2", "--threads-per-replica", "1"], 1, ("load",)),
            ("ray-1x2", ["--ray", "--replicas", "1", "--threads-per-replica", "2"], 2, ("overhead",))):
        print(f"{name}: starting ...", file=sys.stderr, flush=True)
        with Server(name, args.model, extra, threads, args.startup) as server:
            if "load" in measure:
                print(f"{name}: {args.num_requests} requests at concurrency {args.concurrency} ...", file=sys.stderr,
                      flush=True)
                loads.append(asyncio.run(serve_bench.run_target(name, server.url, load_args)))
            if "overhead" in measure:
                costs[name] = asyncio.run(overhead(server.url, args.overhead_requests, None))
    print(serve_bench.table(loads))
    added = {key: costs["ray-1x2"][key] - costs["plain-1x2"][key] for key in costs["plain-1x2"]}
    print(f"\nper-request overhead of Ray (ray-1x2 minus plain-1x2, medians over {args.overhead_requests} requests): "
          f"one-token completion {added['median_one_token_ms']:+.1f} ms, GET /health {added['median_health_ms']:+.1f} ms")
    if args.json_out:
        report = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                  "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
                  "load": loads, "overhead": costs, "ray_added_ms": added}
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(s["failed"] == 0 for s in loads) else 1


if __name__ == "__main__":
    sys.exit(main())
