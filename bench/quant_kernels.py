"""Per-matrix speed of llmkit's quantized matrix products (llmkit.engine.quant) against the
bfloat16 oneDNN packed matmul llmkit uses today, float32 torch (MKL), and two libraries with
prebuilt wheels: onnxruntime's MatMulNBits and torch's int4 CPU kernel (what torchao's int4
weight-only layout calls on x86).

    OMP_NUM_THREADS=2 python bench/quant_kernels.py --threads 2           # full table
    OMP_NUM_THREADS=1 python bench/quant_kernels.py --threads 1 --quick   # fewer shapes and types
    ... --out bench/quant-kernels-results-1thread.json                    # another results file
    OMP_NUM_THREADS=1 python bench/quant_kernels.py --threads 1 --against OLD.c  # this quant.c vs another

``--against OLD.c`` compares the working tree's quant.c with another version of it (for example
``git show HEAD:src/llmkit/engine/quant.c > /tmp/old.c``), both built here and run in one process in
alternating rounds, so that both see the same load: the products of one SmolLM2 layer at 1, 16
and 512 rows (one copy of the weights: this compares compute, not memory; results must be equal,
bit for bit, unless --allow-differences), and a 512-token
prefill of the default model through the engine's executor. With one thread, times are this
thread's CPU time (less distorted by other work on the machine than wall time); with more, wall
time. Writes bench/quant-kernels-ab-results.json unless --out is given.

Shapes are (out_features, in_features): SmolLM2-135M's attention, MLP and output head, and
Llama-3.2-1B's. Weights are random blocks with realistic scales. For 1-16 rows the weights are
cycled through enough copies to exceed the last-level cache several times, as in a real decode
step (every weight comes from memory); "GB/s" is weight bytes read per second at 1 row. 512 rows
(prefill) use one copy. Times are medians. Writes bench/quant-kernels-results.json. On a shared
machine, read "load_average" in the results first: other work on the same cores distorts every
figure, two-thread ones most (an OpenMP team waits for its slowest thread at every product).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from llmkit.engine import native, quant  # noqa: E402

OUT = Path(__file__).with_name("quant-kernels-results.json")
AB_OUT = Path(__file__).with_name("quant-kernels-ab-results.json")
# one SmolLM2 layer's products as the engine runs them: q/k/v stacked, o, gate/up stacked, down
LAYER_PRODUCTS = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
SHAPES = {
    "smollm2": [(576, 576), (1536, 576), (576, 1536), (49152, 576)],
    "llama-1b": [(2048, 2048), (8192, 2048), (2048, 8192), (512, 2048)],
}
TYPES = [2, 3, 8, 12, 13, 14]  # Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K
ROWS = [1, 4, 16, 512]
COLD_BYTES = 200 << 20  # cycle through this many bytes of weights: several times the last-level cache


def median_time(fn, reps: int, inner: int = 1) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def random_blocks(ggml_type: int, rows: int, cols: int, rng) -> np.ndarray:
    _, elems, size = quant.TYPES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // elems, size), dtype=np.uint8)
    for at in {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}[ggml_type]:
        raw[..., at:at + 2] = (rng.uniform(0.5, 1.5, (rows, cols // elems, 1)) * 1e-2).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def copies_for(nbytes: int, rows: int) -> int:
    return 1 if rows > 16 else max(1, -(-COLD_BYTES // nbytes))


def time_cycled(calls, x, reps) -> float:
    def run():
        for c in calls:
            c(x)
    return median_time(run, reps) / len(calls)


def bench_llmkit(ggml_type, out, inp, rows, rng, reps) -> dict:
    raw = random_blocks(ggml_type, out, inp, rng)
    first = quant.QuantMatrix.from_gguf(raw, ggml_type, (out, inp))
    mats = [first] + [quant.QuantMatrix.from_gguf(raw, ggml_type, (out, inp)) for _ in range(copies_for(first.nbytes, rows) - 1)]
    x = torch.randn(rows, inp)
    t = time_cycled(mats, x, reps)
    return {"ms": t * 1e3, "GBps": first.nbytes / t / 1e9, "weight_bytes": first.nbytes, "copies": len(mats)}


def bench_bf16_packed(out, inp, rows, reps) -> dict | None:
    """What llmkit's torch executor runs today: bfloat16 weights reordered once for oneDNN, or,
    where oneDNN lacks bfloat16 (AVX2 alone), plain F.linear in bfloat16."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        w = (torch.randn(out, inp) * 0.02).to(torch.bfloat16)
        ws = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2, rows) - 1)]
        x = torch.randn(rows, inp).to(torch.bfloat16)
        t = time_cycled([lambda x, w=w: F.linear(x, w) for w in ws], x, reps)
        return {"ms": t * 1e3, "GBps": w.numel() * 2 / t / 1e9, "how": "F.linear bfloat16 (oneDNN has no bfloat16 here)"}
    try:
        w = (torch.randn(out, inp) * 0.02).to(torch.bfloat16)
        first = torch.ops.mkldnn._reorder_linear_weight(w, None)
        packs = [first] + [torch.ops.mkldnn._reorder_linear_weight(w, None) for _ in range(copies_for(w.numel() * 2, rows) - 1)]
        x = torch.randn(rows, inp).to(torch.bfloat16)
        calls = [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packs]
        with torch.inference_mode():
            t = time_cycled(calls, x, reps)
        return {"ms": t * 1e3, "GBps": w.numel() * 2 / t / 1e9, "how": "oneDNN packed bfloat16"}
    except RuntimeError as exc:
        return {"error": str(exc)[:200]}


def bench_f32(out, inp, rows, reps) -> dict:
    w = torch.randn(out, inp) * 0.02
    ws = [w] + [w.clone() for _ in range(copies_for(w.numel() * 4, rows) - 1)]
    x = torch.randn(rows, inp)
    t = time_cycled([lambda x, w=w: F.linear(x, w) for w in ws], x, reps)
    return {"ms": t * 1e3, "GBps": w.numel() * 4 / t / 1e9}


def bench_prefill_paths(ggml_type, out, inp, rows, rng, reps) -> dict:
    """The integer kernel against "dequantize a tile, then torch's matmul", same matrix, with the
    activations the tiled path would get: bfloat16 where oneDNN has it natively, else float32."""
    m = quant.QuantMatrix.from_gguf(random_blocks(ggml_type, out, inp, rng), ggml_type, (out, inp))
    dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    x = torch.randn(rows, inp).to(dtype)
    y = torch.empty(rows, out, dtype=dtype)
    flags = 3 if dtype == torch.bfloat16 else 0
    direct = median_time(lambda: m._call(x.data_ptr(), y.data_ptr(), rows, flags, torch.get_num_threads()), reps)
    tiled = median_time(lambda: m._prefill(x), reps)
    return {"type": quant.TYPES[ggml_type][0], "shape": [out, inp], "rows": rows, "dtype": str(dtype),
            "int8_kernel_ms": direct * 1e3, "dequantize_then_matmul_ms": tiled * 1e3}


def onnxruntime_calls(out, inp, threads, accuracy_level):
    """onnxruntime's MatMulNBits, 4 bits, blocks of 32, one row; accuracy_level 4 quantizes the
    activations to int8 (as llmkit does), 0 keeps them float32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    blocks = inp // 32
    qweight = rng.integers(0, 256, size=(out, blocks, 16), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.5, out * blocks) * 1e-2).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=inp, N=out, bits=4,
                            block_size=32, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, inp])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, out])],
        [helper.make_tensor("B", TensorProto.UINT8, qweight.shape, qweight.tobytes(), raw=True),
         helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    nbytes = qweight.nbytes + scales.nbytes
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, str(path))
        sessions = [ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                    for _ in range(max(1, -(-COLD_BYTES // nbytes)))]
    x = rng.standard_normal((1, inp)).astype(np.float32)
    label = f"onnxruntime {ort.__version__} MatMulNBits accuracy_level={accuracy_level}"
    return label, nbytes, [lambda s=s: s.run(None, {"A": x}) for s in sessions]


def torch_int4_calls(out, inp):
    """torch's int4 CPU kernel (group 32), the kernel torchao's int4 weight-only layout uses on x86."""
    w = torch.randint(0, 16, (out, inp), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)
    sz = torch.ones(inp // 32, out, 2, dtype=torch.bfloat16) * 0.01
    nbytes = packed.numel() * packed.element_size() + sz.numel() * 2
    packs = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(max(1, -(-COLD_BYTES // nbytes)) - 1)]
    x = torch.randn(1, inp).to(torch.bfloat16)
    label = f"torch {torch.__version__} _weight_int4pack_mm_for_cpu (group 32, bfloat16 activations)"
    return label, nbytes, [lambda p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], 32, p[1]) for p in packs]


def llmkit_calls(ggml_type, out, inp):
    raw = random_blocks(ggml_type, out, inp, np.random.default_rng(0))
    first = quant.QuantMatrix.from_gguf(raw, ggml_type, (out, inp))
    mats = [first] + [quant.QuantMatrix.from_gguf(raw, ggml_type, (out, inp)) for _ in range(copies_for(first.nbytes, 1) - 1)]
    x = torch.randn(1, inp)
    return f"llmkit {quant.TYPES[ggml_type][0]}", first.nbytes, [lambda m=m: m(x) for m in mats]


def peers(out, inp, threads, reps) -> list[dict]:
    """One row through each, in interleaved rounds (the machine's load shifts over time: each
    round measures all of them under the same conditions); medians."""
    candidates = []
    for build in (lambda: llmkit_calls(2, out, inp), lambda: llmkit_calls(3, out, inp),
                  lambda: onnxruntime_calls(out, inp, threads, 4), lambda: onnxruntime_calls(out, inp, threads, 0),
                  lambda: torch_int4_calls(out, inp)):
        try:
            candidates.append(build())
        except (ImportError, RuntimeError) as exc:
            candidates.append((f"unavailable: {str(exc)[:150]}", 0, []))
    times: dict[str, list[float]] = {label: [] for label, _, calls in candidates if calls}
    for _ in range(reps):
        for label, _, calls in candidates:
            if calls:
                t = time.perf_counter()
                for c in calls:
                    c()
                times[label].append((time.perf_counter() - t) / len(calls))
    return [{"library": label, "ms": statistics.median(times[label]) * 1e3, "weight_bytes": nbytes,
             "GBps": nbytes / statistics.median(times[label]) / 1e9} if calls else {"library": label}
            for label, nbytes, calls in candidates]


def compute_rate(types) -> list[dict]:
    """How fast each 1-row kernel consumes weights that are already in cache (2048x2048, one
    thread, CPU time of this thread): the rate it could stream from memory if memory were never
    the limit. Memory-bound decode needs this above the memory's rate per thread."""
    out = []
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in types:
            m = quant.QuantMatrix.from_gguf(random_blocks(t, 2048, 2048, np.random.default_rng(0)), t, (2048, 2048))
            x = torch.randn(1, 2048)
            for _ in range(20):
                m(x)
            times = []
            for _ in range(21):
                c = time.thread_time()
                for _ in range(20):
                    m(x)
                times.append((time.thread_time() - c) / 20)
            out.append({"type": quant.TYPES[t][0], "GBps": m.nbytes / statistics.median(times) / 1e9})
    finally:
        torch.set_num_threads(old)
    return out


def read_bandwidth(reps: int) -> float:
    a = torch.ones(64 << 20)  # 256 MB
    return a.numel() * 4 / median_time(lambda: a.sum(), reps) / 1e9


def call_overhead(reps: int) -> dict:
    m = quant.QuantMatrix.from_gguf(random_blocks(3, 8, 64, np.random.default_rng(0)), 3, (8, 64))
    w = torch.randn(8, 64)
    x = torch.randn(1, 64)
    return {"quant_matrix_us": median_time(lambda: m(x), reps, 200) * 1e6,
            "f_linear_us": median_time(lambda: F.linear(x, w), reps, 200) * 1e6}


def first_build_seconds() -> float:
    """Compile the kernels into an empty store, as a first run on a new machine does."""
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("LLMKIT_HOME")
        os.environ["LLMKIT_HOME"] = tmp
        try:
            t = time.perf_counter()
            lib = native.load("quant-native", quant._SOURCE, quant.VARIANTS["native"], quant._FUNCTIONS)
            assert lib is not None
            return time.perf_counter() - t
        finally:
            if old is None:
                del os.environ["LLMKIT_HOME"]
            else:
                os.environ["LLMKIT_HOME"] = old


def pack_model_seconds() -> dict | None:
    """from_gguf over every quantized tensor of the default model (repacking into groups of 8)."""
    try:
        from llmkit import store
        from llmkit.formats.gguf_file import GGUFFile

        f = GGUFFile(store.pull("smollm2-135m-instruct", progress=False))
    except Exception as exc:  # no network, no store: skip this figure
        return {"error": str(exc)[:200]}
    infos = [i for i in f.tensors if quant.supported(i.type)]
    for i in infos:  # page the file in first: this measures packing, not the disk
        np.asarray(f.raw(i)).sum()
    t = time.perf_counter()
    total = sum(quant.QuantMatrix.from_gguf(f.raw(i), i.type, i.shape).nbytes for i in infos)
    return {"seconds": time.perf_counter() - t, "tensors": len(infos), "bytes": total}


def model_sweep(rows_list, reps) -> dict:
    """Every matrix product of one SmolLM2 decode step (7 per layer x 30 layers and the Q8_0
    output head, the default GGUF's own tensors), in order, each on rows_list rows: the time the
    weights alone take per step, Python calls included, against the bytes read."""
    try:
        from llmkit import store
        from llmkit.formats.gguf_file import GGUFFile

        f = GGUFFile(store.pull("smollm2-135m-instruct", progress=False))
    except Exception as exc:
        return {"error": str(exc)[:200]}
    names = [f"blk.{i}.{n}.weight" for i in range(30)
             for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    infos = {i.name: i for i in f.tensors}
    mats = [quant.QuantMatrix.from_gguf(f.raw(infos[n]), infos[n].type, infos[n].shape)
            for n in names + ["token_embd.weight"]]
    nbytes = sum(m.nbytes for m in mats)
    out = {"matrices": len(mats), "weight_bytes": nbytes}
    for rows in rows_list:
        xs = {m.shape[1]: torch.randn(rows, m.shape[1]) for m in mats}

        def step():
            for m in mats:
                m(xs[m.shape[1]])
        t = median_time(step, reps)
        out[f"rows_{rows}"] = {"ms": t * 1e3, "GBps": nbytes / t / 1e9, "steps_per_s": 1 / t}
    return out


def _clock():
    """This thread's CPU time where one thread does all the work, else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def ab_products(kernels: dict, types, rows_list, reps: int, exact: bool) -> list[dict]:
    """Each build's product on the same random blocks, alternating calls; medians."""
    clock, out = _clock(), []
    for t in types:
        for n, k in LAYER_PRODUCTS:
            k = k if k % quant.TYPES[t][1] == 0 else 4 * quant.TYPES[t][1]  # K formats: whole blocks of 256
            raw = random_blocks(t, n, k, np.random.default_rng(0))
            mats = {name: quant.QuantMatrix.from_gguf(raw, t, (n, k), kernels=kern) for name, kern in kernels.items()}
            for rows in rows_list:
                x = torch.randn(rows, k)
                ys = [m(x) for m in mats.values()]
                same = all(torch.equal(ys[0], y) for y in ys[1:])
                if exact and not same:
                    sys.exit(f"{quant.TYPES[t][0]} {n}x{k} at {rows} rows: the builds' results differ")
                times = {name: [] for name in mats}
                for _ in range(reps):
                    for name, m in mats.items():
                        c = clock()
                        m(x)
                        times[name].append(clock() - c)
                row = {"type": quant.TYPES[t][0], "shape": [n, k], "rows": rows, "equal": same,
                       **{f"{name}_ms": statistics.median(ts) * 1e3 for name, ts in times.items()}}
                out.append(row)
                print("  ", row, flush=True)
    return out


def ab_prefill(kernels: dict, rounds: int) -> dict:
    """A 512-token prompt through the default model's executor (one pass, as the engine runs a
    prompt chunk), the model loaded once per build; alternating rounds; medians."""
    import llmkit

    clock, llms = _clock(), {}
    saved = quant._kernels.get("native")
    try:
        for name, kern in kernels.items():
            quant._kernels["native"] = kern  # what the model's matrices are packed for and call
            llms[name] = llmkit.load("smollm2", progress=False)
    finally:
        quant._kernels["native"] = saved
    words = "The quick brown fox jumps over the lazy dog while the cat watches from the window. "
    ids: list[int] = []
    while len(ids) < 512:
        ids += next(iter(llms.values())).tokenizer.encode(words)
    prompt = ids[:512]

    def one(llm) -> tuple[float, torch.Tensor]:
        executor = llm.engine.executor
        executor.fit(512, 1)
        with torch.inference_mode():
            c = clock()
            logits = executor.forward([(0, prompt, 0)], [])[0][0]
            return clock() - c, logits

    first = {name: one(llm)[1] for name, llm in llms.items()}
    times: dict[str, list[float]] = {name: [] for name in llms}
    for r in range(rounds):
        for name in (list(llms) if r % 2 == 0 else list(reversed(llms))):
            times[name].append(one(llms[name])[0])
    logits = list(first.values())
    return {"prompt_tokens": 512, "rounds": rounds,
            "logits_equal": all(torch.equal(logits[0], x) for x in logits[1:]),
            **{f"{name}_s": statistics.median(ts) for name, ts in times.items()},
            **{f"{name}_tokens_per_s": 512 / statistics.median(ts) for name, ts in times.items()}}


def against(args) -> None:
    # the build's file name carries a hash of its source: one build per version compared
    old_lib = native.load("quant-against", args.against.read_text(), quant.VARIANTS["native"], quant._FUNCTIONS)
    if old_lib is None:
        sys.exit(f"{args.against} does not build")
    kernels = {"this": quant.kernels(), "against": quant.Kernels(old_lib, "against")}
    result = {"command": " ".join(["python", "bench/quant_kernels.py", *sys.argv[1:]]),
              "against": str(args.against), "threads": torch.get_num_threads(),
              "clock": "thread CPU time" if torch.get_num_threads() == 1 else "wall",
              "kernels": kernels["this"].simd, "load_average_before": os.getloadavg()}
    print(json.dumps(result, indent=1), flush=True)
    print("products (ms, medians):")
    result["products"] = ab_products(kernels, [3, 8, 12, 14] if args.quick else TYPES, [1, 16, 512], args.reps * 2,
                                     not args.allow_differences)
    print("prefill of 512 tokens:")
    result["prefill"] = ab_prefill(kernels, args.reps)
    print("  ", result["prefill"], flush=True)
    result["load_average_after"] = os.getloadavg()
    out = args.out or AB_OUT
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="Q4_1, Q8_0, Q4_K, Q6_K on four shapes")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where to write the results (default {OUT.name}, or {AB_OUT.name} with --against)")
    ap.add_argument("--against", type=Path, help="another quant.c to compare this one with (see above)")
    ap.add_argument("--allow-differences", action="store_true", help="with --against: results may differ")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kern = quant.kernels()
    if kern is None:
        sys.exit("the native kernels do not build here (no C compiler?)")
    if args.against:
        return against(args)
    args.out = args.out or OUT
    rng = np.random.default_rng(0)
    types = [3, 8, 12, 14] if args.quick else TYPES
    shapes = [(m, s) for m, ss in SHAPES.items() for s in ss]
    if args.quick:
        shapes = [("smollm2", (1536, 576)), ("smollm2", (49152, 576)), ("llama-1b", (2048, 8192)), ("llama-1b", (8192, 2048))]
    flags = set(native.cpu_flags().split())
    result = {
        "command": " ".join(["python", "bench/quant_kernels.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "flags": sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16"}),
                    "kernels": kern.simd, "torch": torch.__version__,
                    "onednn_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    "read_GBps": read_bandwidth(args.reps),
                    "load_average": os.getloadavg()},
        "first_build_seconds": first_build_seconds(),
        "pack_default_model": pack_model_seconds(),
        "call_overhead": call_overhead(args.reps),
        "cache_resident_1_row": compute_rate(types),
        "smollm2_step": model_sweep([1, 16], args.reps),
        "matmul": [], "prefill_paths": [], "peers": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("matmul", "prefill_paths", "peers")}, indent=1), flush=True)
    print("\n| model | shape (out x in) | rows | type | llmkit ms | GB/s | bf16 today ms | float32 ms |\n|---|---|---|---|---|---|---|---|")
    for model, (out, inp) in shapes:
        for rows in ROWS:
            reps = max(3, args.reps // (2 if rows == 512 else 1))
            bf16 = bench_bf16_packed(out, inp, rows, reps)
            f32 = bench_f32(out, inp, rows, reps)
            for t in types:
                if inp % quant.TYPES[t][1]:
                    continue
                r = bench_llmkit(t, out, inp, rows, rng, reps)
                row = {"model": model, "shape": [out, inp], "rows": rows, "type": quant.TYPES[t][0], "llmkit": r,
                       "bf16_packed": bf16, "float32": f32}
                result["matmul"].append(row)
                print(f"| {model} | {out}x{inp} | {rows} | {quant.TYPES[t][0]} | {r['ms']:.3f} | {r['GBps']:.1f} | "
                      f"{bf16.get('ms', float('nan')):.3f} | {f32['ms']:.3f} |", flush=True)
    print("\nprefill: integer kernel vs dequantize-then-matmul (ms)")
    for t in ([3, 12] if args.quick else [3, 8, 12, 14]):
        for out, inp in [(1536, 576), (2048, 8192)]:
            if inp % quant.TYPES[t][1]:
                continue
            for rows in (32, 64, 128, 256, 512):
                r = bench_prefill_paths(t, out, inp, rows, rng, 3)
                result["prefill_paths"].append(r)
                print(f"  {r['type']} {out}x{inp} rows {rows}: kernel {r['int8_kernel_ms']:.2f}  dequantize+matmul {r['dequantize_then_matmul_ms']:.2f}", flush=True)
    print("\npeers at 1 row, 2048x8192 (out x in), 4-bit blocks of 32, interleaved rounds")
    for r in peers(2048, 8192, args.threads, max(9, args.reps)):
        result["peers"].append(r)
        print("  ", r, flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
