"""``llmkit bench``: the same workloads on llmkit and on its peers, side by side, in one run.

Each engine runs in its own subprocess (so peak memory and load time are its own), one after
another (never two heavy jobs at once), with the same model file and thread count. Every timed
figure is the median of ``repeats`` runs after a warm-up.

Workloads: load to first token; peak resident memory; prefill of a 512-token prompt; one-stream
decode of 128 tokens (greedy, end-of-sequence ignored); aggregate decode with 4 and 16 concurrent
streams; time to first token and time per output token at 16 streams.

Memory bandwidth: one-stream decode reads every weight once per token, so the bytes of weights an
engine reads per token times its tokens/s is the read bandwidth it achieves; the run also measures
the machine's own read bandwidth (a sum over a large tensor, same thread count) to compare with.

The peers (transformers, llama.cpp) may run in another Python environment (``python=``), so that
llmkit's own environment stays a plain install. There this file runs as a script, by path: its
module level imports only the standard library, and the peer workers import only their engine;
llmkit need not be installed there.
"""

from __future__ import annotations

import functools
import json
import math
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
# what --compare may name: the peers, and llmkit's engine on the llama.cpp executor (an optional extra)
COMPARABLE = (*PEERS, "llmkit+llama.cpp")
# peer -> (module it imports, distribution it is installed as)
_PACKAGES = {"transformers": ("transformers", "transformers"), "llama.cpp": ("llama_cpp", "llama_cpp_python")}
RESULT_PREFIX = "BENCH-RESULT "
BANDWIDTH_TENSOR_BYTES = 512 * 2**20


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

def _llmkit_worker(model: str, threads: int, repeats: int, options: dict[str, Any]) -> dict[str, Any]:
    """llmkit as ``llmkit.load(model, **options)`` gives it: with no options, the default."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    import llmkit
    from llmkit.sampling import SamplingParams

    llm = llmkit.load(model, progress=False, **options)
    short = llm.tokenizer.encode("Hello")
    llm.generate_ids(short, max_tokens=1, temperature=0)
    load = time.perf_counter() - start
    prompt = _prompt_ids(llm.tokenizer.encode, 512)
    fresh = iter(range(10**6))  # each timed prefill begins with another token: the prefix cache never helps it
    prefill = _median_time(lambda: llm.generate_ids([next(fresh) % 1000 + 100] + prompt[1:], max_tokens=1,
                                                    temperature=0), repeats)

    def decode_one(speculative: bool) -> float:
        stream = llm.run(llm.requests([short], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True),
                                      speculative=speculative))
        first = None
        for _ in stream:
            if first is None:
                first = time.perf_counter()
        return 127 / (time.perf_counter() - first)

    decode_one(False)
    decode = statistics.median(decode_one(False) for _ in range(repeats))  # one token per pass, as peers decode
    speculative = statistics.median(decode_one(True) for _ in range(repeats))  # the default: prompt lookup on
    one_stream_peak = _peak_rss_mb()  # weights, runtime and one sequence's cache, before the streams

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
    return {
        "engine": "llmkit" if llm.executor_name != "llama.cpp" else "llmkit+llama.cpp",
        **_llmkit_configuration(llm, options.get("quantize")),
        "version": llmkit.__version__,
        "threads": torch.get_num_threads(), "load_to_first_token_s": load, "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_one_stream_mb": one_stream_peak,
        "prefill_512_tokens_per_s": 512 / prefill, "decode_tokens_per_s": decode,
        "decode_speculative_tokens_per_s": speculative,
        "decode_4_streams_tokens_per_s": med(s4, "tokens_per_s"),
        "decode_16_streams_tokens_per_s": med(s16, "tokens_per_s"),
        "ttft_16_streams_s": med(s16, "ttft_s"), "tpot_16_streams_s": med(s16, "tpot_s"),
    }


def _llmkit_configuration(llm, quantize: str | None) -> dict[str, Any]:
    """What ran: the executor, the activations' dtype, and the form its weights are read in
    (``weights``, for the bandwidth accounting: see ``weight_bytes``). Read from the loaded
    engine, never from llm.model (that would read the float model a GGUF run does without)."""
    executor = llm.executor_name
    model = getattr(llm.engine.executor, "model", None)
    norm = getattr(model, "norm", None)
    dtype = str(norm.weight.dtype).replace("torch.", "") if norm is not None else None
    if executor == "llama.cpp":
        weights, precision = "stored", "llama.cpp executor: GGUF blocks as stored"
    elif executor == "torch+gguf-kernels":
        weights = quantize or "gguf-kernels"
        step = getattr(llm.engine.executor, "step", None) is not None
        precision = (f"{executor}: {quantize or 'GGUF'} blocks, {dtype} activations, "
                     f"{'decode steps in one native call' if step else 'decode steps layer by layer'}")
    elif quantize:
        weights, precision = None, f"{executor}: {quantize} weights, {dtype} activations"
    else:
        weights, precision = dtype, f"{executor}, {dtype}"
    return {"precision": precision, "executor": executor, "dtype": dtype, "quantize": quantize, "weights": weights}


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
        "engine": "transformers", "precision": f"float32, {getattr(hf.config, '_attn_implementation', None)} attention",
        "dtype": "float32", "weights": "float32",
        "version": _version("transformers"), "threads": torch.get_num_threads(),
        "load_to_first_token_s": load, "peak_rss_mb": _peak_rss_mb(),
        "prefill_512_tokens_per_s": 512 / prefill, "decode_tokens_per_s": decode,
        "decode_4_streams_tokens_per_s": b4[0], "decode_16_streams_tokens_per_s": b16[0],
        "ttft_16_streams_s": b16[1], "tpot_16_streams_s": b16[2],
        "note": "static batching with generate(); 32 and 16 new tokens per run to keep it short",
    }


def _llamacpp_worker(model: str, threads: int, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False, logits_all=False)
    eos = llm.token_eos()
    short = llm.tokenize(b"Hello", add_bos=False)

    def gen(ids, n):
        llm.reset()
        return llm.create_completion(ids, max_tokens=n, temperature=0, logit_bias={eos: -1e9})

    gen(short, 1)
    load = time.perf_counter() - start
    prompt = _prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False), 512)
    prefill = _median_time(lambda: gen(prompt, 1), repeats)
    first = _median_time(lambda: gen(short, 1), repeats)
    full = _median_time(lambda: gen(short, 128), repeats)
    decode = 127 / (full - first)
    peak = _peak_rss_mb()  # its only sequence: the peak through one stream is the whole run's
    # one context serves one sequence through this API: concurrent streams run one after another
    return {
        "engine": "llama.cpp", "precision": "GGUF blocks as stored", "weights": "stored",
        "version": _version("llama_cpp_python"), "threads": threads,
        "load_to_first_token_s": load, "peak_rss_mb": peak, "peak_rss_one_stream_mb": peak,
        "prefill_512_tokens_per_s": 512 / prefill, "decode_tokens_per_s": decode,
        "decode_4_streams_tokens_per_s": decode, "decode_16_streams_tokens_per_s": decode,
        "ttft_16_streams_s": 15 / 2 * full, "tpot_16_streams_s": full / 128,
        "note": "llama-cpp-python's Llama serves one sequence at a time; streams are sequential",
    }


def _read_bandwidth_worker(threads: int, nbytes: int, repeats: int = 5) -> dict[str, Any]:
    """The machine's read bandwidth: the best of a few sums over a tensor far larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # warm-up: pages touched, threads started
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return {"engine": "memory", "threads": torch.get_num_threads(), "bytes": x.numel() * 4,
            "read_bandwidth_gb_s": x.numel() * 4 / best / 1e9}


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _probe() -> dict[str, Any]:
    """Which peers this interpreter can run, with their versions (None: not installed)."""
    from importlib.util import find_spec

    found = {peer: (_version(dist) or "unknown") if find_spec(module) else None
             for peer, (module, dist) in _PACKAGES.items()}
    return {"python": sys.executable, "python_version": sys.version.split()[0], "peers": found}


def worker_main(argv: list[str]) -> None:
    """One job, described by a JSON object: {"engine", "model", "threads", "repeats", "options"}."""
    job = json.loads(argv[0])
    engine = job["engine"]
    if engine == "probe":
        result = _probe()
    elif engine == "memory":
        result = _read_bandwidth_worker(job["threads"], job.get("bytes", BANDWIDTH_TENSOR_BYTES))
    elif engine in ("llmkit", "llmkit+llama.cpp"):
        result = _llmkit_worker(job["model"], job["threads"], job["repeats"], job.get("options", {}))
    elif engine == "transformers":
        result = _transformers_worker(job["model"], job["threads"], job["repeats"])
    elif engine == "llama.cpp":
        result = _llamacpp_worker(job["model"], job["threads"], job["repeats"])
    else:
        raise SystemExit(f"unknown bench job {engine!r}")
    if engine not in ("probe", "memory"):
        result["python"] = sys.executable
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------- bandwidth accounting

@functools.lru_cache(maxsize=4)
def _weight_tensors(path: Path) -> list[tuple[str, tuple[int, ...], int, int | None, str]]:
    """(name, shape in torch order, stored bytes, GGUF type or None, role) of every tensor in a
    GGUF file or an HF-format folder of safetensors. role: "embedding" for the token embedding,
    "lookup" for other tables read one row per token (position embeddings), "head" for the
    output head, else "weight"."""
    if path.is_dir() and not list(path.glob("*.safetensors")):
        ggufs = list(path.glob("*.gguf"))
        path = ggufs[0] if len(ggufs) == 1 else path
    if path.suffix == ".gguf":
        from llmkit.formats.gguf_file import GGUFFile

        names = {"token_embd.weight": "embedding", "position_embd.weight": "lookup", "output.weight": "head"}
        return [(t.name, t.shape, t.nbytes, t.type, names.get(t.name, "weight")) for t in GGUFFile(path).tensors]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no GGUF file and no safetensors files to count weights in")
    suffixes = {"embed_tokens.weight": "embedding", "wte.weight": "embedding", "wpe.weight": "lookup",
                "lm_head.weight": "head"}
    out = []
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                start, end = t["data_offsets"]
                role = next((r for s, r in suffixes.items() if name == s or name.endswith("." + s)), "weight")
                out.append((name, tuple(t["shape"]), end - start, None, role))
    return out


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_bytes(path: str | Path, weights: str | None) -> int | None:
    """Bytes of weights read per decoded token by an engine that holds ``path``'s weights in the
    form ``weights``: "stored" (as in the file), "gguf-kernels" (llmkit's default for a GGUF:
    the block types its kernels multiply kept as stored, any other type dequantized to float32),
    a dtype name (every weight in that type), or a block kind llmkit quantizes to ("q8_0", "q4_0",
    "q4_k": matrices in that format, vectors in float32). Every tensor counts once, except the
    tables read one row per token: the token embedding counts only where it doubles as the output
    head (the file has no head of its own), when it is read whole. None: a form this accounting
    does not know (torch's int8/int4)."""
    if weights is None:
        return None
    tensors = _weight_tensors(Path(path))
    tied = not any(role == "head" for *_, role in tensors)
    read = [t for t in tensors if t[4] in ("weight", "head") or (t[4] == "embedding" and tied)]
    if weights == "stored":
        return sum(t[2] for t in read)
    if weights in _ITEMSIZE:
        return sum(_ITEMSIZE[weights] * math.prod(t[1]) for t in read)
    from llmkit.engine import quant

    if weights == "gguf-kernels":
        return sum(t[2] if t[3] is not None and quant.supported(t[3]) else 4 * math.prod(t[1]) for t in read)
    if weights in quant.KINDS:
        return sum(_quantized_bytes(t[1], weights) for t in read)
    return None


def _quantized_bytes(shape: tuple[int, ...], kind: str) -> int:
    """A tensor's bytes once llmkit quantizes it to ``kind`` (QuantMatrix.quantize: rows that are
    not whole blocks of the kind's type take its fallback type); vectors stay float32."""
    from llmkit.engine import quant

    if len(shape) != 2:
        return 4 * math.prod(shape)
    rows, cols = shape
    ggml_type = quant.KINDS[kind]
    if cols % quant.TYPES[ggml_type][1]:
        ggml_type = quant.FALLBACK.get(ggml_type, ggml_type)
    return rows * quant.row_bytes(ggml_type, cols)


def add_bandwidth(result: dict[str, Any], path: str | Path, machine_gb_s: float | None) -> None:
    """Add the weights read per token, the read bandwidth that one-stream decode achieved, and its
    share of the machine's, to an engine's result (where the form of its weights is known)."""
    nbytes = weight_bytes(path, result.get("weights")) if "error" not in result else None
    if nbytes is None:
        return
    result["weights_read_per_token_mb"] = nbytes / 1e6
    result["decode_read_bandwidth_gb_s"] = nbytes * result["decode_tokens_per_s"] / 1e9
    if machine_gb_s:
        result["decode_bandwidth_share"] = result["decode_read_bandwidth_gb_s"] / machine_gb_s


# ---------------------------------------------------------------------- orchestration

_THIS_FILE = str(Path(__file__).resolve())


def _worker_command(job: dict[str, Any], python: str | None) -> list[str]:
    """llmkit's own jobs run as a module of the installed package, in this interpreter; a peer's
    job runs this file by path in ``python`` (default: this interpreter), where llmkit need not be
    importable."""
    if job["engine"] in ("llmkit", "llmkit+llama.cpp", "memory"):
        return [sys.executable, "-m", "llmkit.bench", json.dumps(job)]
    return [python or sys.executable, _THIS_FILE, json.dumps(job)]


def run_job(job: dict[str, Any], python: str | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run one job in its own subprocess; its result, or {"engine", "error"} saying what went wrong."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job.get("threads", 1))}
    try:
        proc = subprocess.run(_worker_command(job, python), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": job["engine"], "error": f"timed out after {timeout:g} s"}
    except OSError as exc:
        return {"engine": job["engine"], "error": f"cannot run {python or sys.executable}: {exc}"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"engine": job["engine"], "error": " | ".join(tail) or f"exit {proc.returncode}"}


def probe(python: str | None = None) -> dict[str, Any]:
    """What ``python`` (default: this interpreter) has: {"python", "python_version", "peers":
    {peer: version or None}}; {"error": ...} where it does not run."""
    return run_job({"engine": "probe"}, python, timeout=120)


def run_engine(engine: str, model: str, threads: int, repeats: int, options: dict[str, Any] | None = None,
               python: str | None = None, timeout: float = 900) -> dict[str, Any]:
    """One engine's figures. ``options``: llmkit.load's keyword arguments (llmkit engines only)."""
    job = {"engine": engine, "model": model, "threads": threads, "repeats": repeats}
    if engine == "llmkit+llama.cpp":
        options = {**(options or {}), "executor": "llama.cpp"}
    if engine.startswith("llmkit"):
        job["options"] = options or {}
    return run_job(job, python, timeout)


def machine_read_bandwidth(threads: int, nbytes: int = BANDWIDTH_TENSOR_BYTES) -> float | None:
    """GB/s this machine reads with ``threads`` threads (None where the measurement failed)."""
    return run_job({"engine": "memory", "threads": threads, "bytes": nbytes}, timeout=300).get("read_bandwidth_gb_s")


def run_bench(model: str, threads: int, repeats: int, options: dict[str, Any], compare: list[str],
              peer_python: str | None = None, timeout: float = 900,
              say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The whole comparison: the machine's read bandwidth, llmkit (with ``options``, none for its
    default), then each engine in ``compare`` that can run here (the others are skipped with a
    note through ``say``). Returns the report: model, threads, results, ratios."""
    unknown = [c for c in compare if c not in COMPARABLE]
    if unknown:
        raise ValueError(f"unknown engine(s) to compare: {', '.join(unknown)}; choose from {', '.join(COMPARABLE)}")
    where = peer_python or sys.executable
    found = probe(peer_python).get("peers", {}) if any(c in PEERS for c in compare) else {}
    here = probe().get("peers", {}) if "llmkit+llama.cpp" in compare else {}
    say(f"measuring this machine's read bandwidth ({threads} threads) ...")
    machine = machine_read_bandwidth(threads)
    results = []
    for engine in ["llmkit", *compare]:
        if engine in PEERS and not found.get(engine):
            say(f"skipping {engine}: not installed for {where} (bench/peer-env.sh sets up a peer "
                "environment; pass it with --peer-python)")
            continue
        if engine == "llmkit+llama.cpp" and not here.get("llama.cpp"):
            say(f"skipping {engine}: llama-cpp-python is not installed in llmkit's environment ({sys.executable})")
            continue
        if "llama.cpp" in engine and not model.endswith(".gguf"):
            say(f"skipping {engine}: llama.cpp runs GGUF files only")
            continue
        say(f"running {engine} ({threads} threads) ...")
        result = run_engine(engine, model, threads, repeats, options if engine == "llmkit" else None,
                            python=peer_python if engine in PEERS else None, timeout=timeout)
        add_bandwidth(result, model, machine)
        results.append(result)
    return {"model": model, "threads": threads, "repeats": repeats, "peer_python": where,
            "machine_read_bandwidth_gb_s": machine, "results": results, "ratios": ratios(results)}


METRICS = [
    ("load_to_first_token_s", "load to first token (s)", False),
    ("peak_rss_mb", "peak memory (MB)", False),
    ("peak_rss_one_stream_mb", "peak memory, one stream (MB)", False),
    ("prefill_512_tokens_per_s", "prefill 512 (tok/s)", True),
    ("decode_tokens_per_s", "decode 1 stream (tok/s)", True),
    ("decode_speculative_tokens_per_s", "decode 1 stream, prompt lookup on (tok/s)", True),
    ("decode_4_streams_tokens_per_s", "decode 4 streams (tok/s)", True),
    ("decode_16_streams_tokens_per_s", "decode 16 streams (tok/s)", True),
    ("ttft_16_streams_s", "TTFT at 16 streams (s)", False),
    ("tpot_16_streams_s", "TPOT at 16 streams (s)", False),
]
# shown beside the metrics, without ratios: how close to the machine's bandwidth each engine runs
BANDWIDTH_METRICS = [
    ("weights_read_per_token_mb", "weights read per token (MB)"),
    ("decode_read_bandwidth_gb_s", "decode 1 stream, read bandwidth (GB/s)"),
    ("decode_bandwidth_share", "share of machine's read bandwidth"),
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
    # Run by path, Python puts this file's folder (llmkit's package folder) first on sys.path, where
    # its modules would shadow top-level packages of the same name (evaluate, tokenizer, ...).
    here = os.path.dirname(_THIS_FILE)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]
    worker_main(sys.argv[1:])
