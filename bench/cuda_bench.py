"""llmkit on a CUDA GPU, side by side with transformers on the same GPU and with llmkit's own CPU
path on the same machine, in one run.

    python bench/cuda_bench.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --json bench/cuda-results.json

Sections, each written to the JSON file as soon as it is measured:
  parity      greedy tokens of CUDA bfloat16 and CUDA float32 against the float32 CPU reference
  llmkit      llmkit.load(gguf, device=DEVICE): prefill of 512 tokens, one stream, 16 and 64 streams,
              with CUDA graphs (the default) and launched op by op
  cpu         llmkit's default CPU path (GGUF blocks, native kernels) on the same machine
  hf          transformers bfloat16 on the same GPU, the same weights (exported by llmkit to a
              Hugging Face folder): prefill, generate() for one stream and batched
  hf_static   the same with transformers' static cache (compiled by generate where it does so)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llmkit  # noqa: E402
from llmkit.sampling import SamplingParams  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain photosynthesis in one sentence.", "List three prime numbers."]
STREAMS = (16, 64)  # --streams
DEVICE = "cuda"  # --device: a dry run of the script's logic elsewhere
WORDS = ("The history of computing is a long story of people building machines that help them think. "
         "Early devices counted and sorted; later ones stored programs and ran them at great speed. ")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def chat_ids(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                                  add_generation_prompt=True))


def long_ids(tokenize, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenize(WORDS)
    return ids[:n]


# ------------------------------------------------------------------------------------ parity

def parity(gguf: str, tokens: int) -> dict:
    ref = llmkit.load(gguf, device="cpu", dtype="float32", speculative=False, progress=False)
    prompts = [chat_ids(ref, p) for p in PROMPTS]
    want = [ref.generate_ids(p, max_tokens=tokens, temperature=0, ignore_eos=True) for p in prompts]
    out: dict = {"tokens": tokens, "prompts": len(prompts)}
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in ("bfloat16", "float32"):
        gpu = llmkit.load(gguf, device=DEVICE, dtype=dtype, speculative=False, progress=False)
        got = [gpu.generate_ids(p, max_tokens=tokens, temperature=0, ignore_eos=True) for p in prompts]
        rows = []
        for p, a, b in zip(prompts, want, got):
            split = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            row = {"equal": a == b, "first_difference": split}
            if split is not None:  # how close the reference's top two were where they parted
                with torch.inference_mode():
                    top = ref.logits(p + a[:split])[-1].float().topk(2).values
                row["reference_top2_gap"] = float(top[0] - top[1])
            rows.append(row)
        out[dtype] = {"equal": sum(r["equal"] for r in rows), "rows": rows}
        del gpu
    out["hf_folder"] = str(export_hf(ref))
    return out


def random_like(meta: str) -> Path:
    """A Hugging Face folder with ``meta``'s config and tokenizer and random weights: the model's
    exact shape, for speed figures where its weights cannot be had."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(meta), dtype=torch.bfloat16)
    folder = Path(tempfile.mkdtemp(prefix="random-hf-"))
    model.save_pretrained(folder)
    for f in Path(meta).iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    return folder


def export_hf(ref) -> Path:
    from llmkit.export import export

    folder = Path(tempfile.mkdtemp(prefix="smollm2-hf-"))
    return export(ref, "hf", folder)


# ------------------------------------------------------------------------------------ llmkit

def llmkit_engine(llm, repeats: int, stream_counts=None, new_tokens: int = 128) -> dict:
    short = llm.tokenizer.encode("Hello")
    prompt = long_ids(llm.tokenizer.encode, 512)
    fresh = iter(range(10**6))  # each prefill starts with another token: the prefix cache never serves it
    llm.generate_ids(short, max_tokens=2, temperature=0)
    prefill = median_time(lambda: llm.generate_ids([next(fresh) % 1000 + 100] + prompt[1:], max_tokens=1,
                                                   temperature=0), repeats)

    def one(speculative: bool, n: int = 256) -> float:
        stream = llm.run(llm.requests([short], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                                      speculative=speculative))
        first = None
        for _ in stream:
            if first is None:
                first = time.perf_counter()
        return (n - 1) / (time.perf_counter() - first)

    def streams(n: int) -> dict:
        prompts = [llm.tokenizer.encode(f"Story number {i}: once upon a time") for i in range(n)]
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        handles = [llm.submit(r) for r in llm.requests(prompts, params, speculative=False)]
        for h in handles:
            for _ in h.events():
                pass
        wall = time.perf_counter() - t0
        return {"tokens_per_s": n * new_tokens / wall,
                "ttft_s": statistics.median(h.first_token_at - t0 for h in handles)}

    out: dict = {"prefill_512_tokens_per_s": 512 / prefill}
    one(False, 32)
    out["decode_tokens_per_s"] = statistics.median(one(False) for _ in range(repeats))
    out["decode_speculative_tokens_per_s"] = statistics.median(one(True) for _ in range(repeats))
    for n in stream_counts or STREAMS:
        streams(n)  # first run: graphs of each shape captured
        runs = [streams(n) for _ in range(repeats)]
        out[f"decode_{n}_streams_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
        out[f"ttft_{n}_streams_s"] = statistics.median(r["ttft_s"] for r in runs)
    return out


def llmkit_cuda(gguf: str, repeats: int) -> dict:
    t0 = time.perf_counter()
    llm = llmkit.load(gguf, device=DEVICE, max_batch=64, progress=False)
    llm.generate("Hello", max_tokens=1)
    load = time.perf_counter() - t0
    executor = llm.engine.executor
    dtype = str(executor.model.norm.weight.dtype).replace("torch.", "")
    graphed = llmkit_engine(llm, repeats)
    graphed["graphs_captured"] = executor.graphs.captured if executor.graphs is not None else 0
    graphs, executor.graphs = executor.graphs, None
    eager = llmkit_engine(llm, repeats, stream_counts=STREAMS[-1:])
    executor.graphs = graphs
    return {"dtype": dtype, "load_to_first_token_s": load, "cuda_graphs": graphed, "eager": eager,
            "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE.startswith("cuda") else None}


def llmkit_cpu(gguf: str, repeats: int) -> dict:
    llm = llmkit.load(gguf, device="cpu", max_batch=64, progress=False)
    return {"threads": torch.get_num_threads(), "executor": llm.executor_name,
            **llmkit_engine(llm, repeats, new_tokens=64)}


# ------------------------------------------------------------------------------------ transformers

def transformers_cuda(folder: str, repeats: int, static: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE).eval()
    extra = {"cache_implementation": "static"} if static else {}

    def gen(batch, n):
        with torch.inference_mode():
            return hf.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id, **extra)

    short = tok(["Hello"], return_tensors="pt").to(DEVICE)
    gen(short, 2)
    out: dict = {"version": __import__("transformers").__version__, "static_cache": static,
                 "attention": getattr(hf.config, "_attn_implementation", None),
                 "load_to_first_token_s": time.perf_counter() - t0}
    ids = torch.tensor([long_ids(lambda s: tok.encode(s, add_special_tokens=False), 512)], device=DEVICE)
    with torch.inference_mode():
        hf(ids)
        out["prefill_512_tokens_per_s"] = 512 / median_time(lambda: hf(ids), repeats)
    gen(short, 256)
    first = median_time(lambda: gen(short, 1), repeats)
    full = median_time(lambda: gen(short, 256), repeats)
    out["decode_tokens_per_s"] = 255 / (full - first)
    for n in STREAMS:
        batch = tok([f"Story number {i}: once upon a time" for i in range(n)], return_tensors="pt",
                    padding=True).to(DEVICE)
        gen(batch, 128)
        out[f"decode_{n}_streams_tokens_per_s"] = n * 128 / median_time(lambda: gen(batch, 128), repeats)
    return out


# ------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="the model file (parity needs it)")
    ap.add_argument("--random-from", help="a folder with config.json and tokenizer files: random weights of that "
                                          "shape stand in for the GGUF in the speed sections")
    ap.add_argument("--hf", help="a Hugging Face folder of the same weights (else exported from the GGUF)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=["parity", "llmkit", "hf", "cpu", "hf_static"])
    ap.add_argument("--parity-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--streams", type=int, nargs="*", default=[16, 64])
    args = ap.parse_args()
    global DEVICE, STREAMS
    DEVICE, STREAMS = args.device, tuple(args.streams)
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     "torch": torch.__version__, "sections": {}}
    folder = args.hf
    if args.random_from:
        folder = str(random_like(args.random_from))
        args.gguf = args.gguf or folder
        results["random_weights"] = True
    results["model"] = Path(args.gguf).name

    def save() -> None:
        Path(args.json).write_text(json.dumps(results, indent=2))

    for name in args.only:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            if name == "parity":
                got = parity(args.gguf, args.parity_tokens)
                folder = folder or got["hf_folder"]
            elif name == "llmkit":
                got = llmkit_cuda(args.gguf, args.repeats)
            elif name == "cpu":
                got = llmkit_cpu(args.gguf, args.repeats)
            elif name in ("hf", "hf_static"):
                if folder is None:
                    folder = str(export_hf(llmkit.load(args.gguf, device="cpu", dtype="float32", progress=False)))
                got = transformers_cuda(folder, args.repeats, static=name == "hf_static")
            else:
                raise SystemExit(f"unknown section {name}")
        except Exception as exc:  # a broken section is reported; the others still run
            traceback.print_exc()
            got = {"error": f"{type(exc).__name__}: {exc}"}
        got["seconds"] = time.perf_counter() - t0
        results["sections"][name] = got
        save()
        print(json.dumps(got, indent=1), flush=True)
    os._exit(0)  # the engines' threads need no orderly shutdown here


if __name__ == "__main__":
    main()
