"""Quality and speed of weight-only quantization: perplexity of float32 / int8 / int4 on a held-out
text the project wrote itself (src/llmkit/data/heldout.txt), and one-stream decode tokens/s.

    OMP_NUM_THREADS=1 python bench/quant_quality.py            # table, 1 thread
    OMP_NUM_THREADS=2 python bench/quant_quality.py --threads 2
    python bench/quant_quality.py --head float                  # or int8 / int4 (default: int8)
    python bench/quant_quality.py --kernels                     # per-matrix kernel vs float32 timings

Perplexity: sliding windows of --window tokens with stride --stride over ``LLM.logits``; each
token is scored once, with at least window - stride tokens of context (except in the first window).
Decode: greedy, end-of-sequence ignored, 64 new tokens after a short prompt; the rate is
64 / (time(prompt + 65 tokens) - time(prompt + 1 token)), so prefill is excluded; one warm-up, the
median of --repeats runs.

Measured (SmolLM2-135M-Instruct Q4_1 GGUF, 2417 tokens, window 512 / stride 256; the
machine was shared, load average 2-5 on 2 cores, so speeds are rough):

    mode                  perplexity  vs f32  top-1 agree  decode tok/s 1 thread  2 threads
    none (float32)            26.855   +0.00%     100.0%          9.3               14.3
    int8 (kernel)             27.016   +0.60%      96.5%
    int8 (float prefill)      26.991   +0.51%      96.1%         29.1               25.6
    int4 (g32, head int8)     26.891   +0.13%      96.9%         42.1               32.4

int4 is this close because the GGUF's block weights already are Q4_1 (groups of 32, scale and
minimum): int4 group 32 re-expresses them almost exactly, and the loss is the int8 head's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

import llmkit
from llmkit import store
from llmkit.quantize import FLOAT_PATH_ROWS, Int8Linear, quantize_model

HELDOUT = Path(__file__).resolve().parents[1] / "src" / "llmkit" / "data" / "heldout.txt"
PROMPT = "The history of the small harbour town begins"


def perplexity(llm, ids: list[int], window: int, stride: int) -> float:
    nll, count, scored_to = 0.0, 0, 1  # token 0 has no context: never scored
    start = 0
    while scored_to < len(ids):
        end = min(start + window, len(ids))
        logp = torch.log_softmax(llm.logits(ids[start:end]), dim=-1)  # row i predicts ids[start+i+1]
        for pos in range(scored_to, end):
            nll -= logp[pos - start - 1, ids[pos]].item()
            count += 1
        scored_to = end
        start += stride
    return math.exp(nll / count)


def decode_rate(llm, repeats: int) -> float:
    ids = llm.tokenizer.encode(PROMPT, add_special_tokens=True)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate_ids(ids, max_tokens=n, temperature=0, ignore_eos=True)
        return time.perf_counter() - t0

    timed(65)  # warm-up
    rates = []
    for _ in range(repeats):
        t1, t65 = timed(1), timed(65)
        rates.append(64 / (t65 - t1))
    return statistics.median(rates)


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def kernels() -> None:
    """Per-matrix timing: float32 F.linear vs the int8 / int4 kernels (bf16 activations), by rows."""
    from torch.nn import Linear

    from llmkit.quantize import Int4Linear

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    for k, n in [(576, 1536), (1536, 576), (576, 49152)]:
        lin = Linear(k, n, bias=False)
        q8, q4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 32)
        q8.float_path_rows = 1 << 30
        print(f"{k}x{n}: rows  float32 ms  int8 ms  int8-float-path ms  int4 ms")
        with torch.inference_mode():
            for rows in (1, 4, 16, 32, 64, 128, 256, 512):
                x = torch.randn(rows, k)
                f = best(lambda: lin(x))
                i8 = best(lambda: q8(x))
                q8.float_path_rows = 0
                i8f = best(lambda: q8(x))
                q8.float_path_rows = 1 << 30
                i4 = best(lambda: q4(x))
                print(f"  {rows:5d} {f:10.2f} {i8:8.2f} {i8f:10.2f} {i4:18.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="none,int8,int4")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head", choices=["default", "float", "int8", "int4"], default="default",
                    help="lm_head: the library's default (int8), float, int8 or int4")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="only the per-matrix kernel timings")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        kernels()
        return

    path = store.pull("smollm2-135m-instruct", progress=False)
    text = HELDOUT.read_text()
    rows, ref_logits = [], None
    for mode in args.modes.split(","):
        llm = llmkit.load(path)
        ids = llm.tokenizer.encode(text, add_special_tokens=True)
        head = {"default": True, "float": False}.get(args.head, args.head)
        quantize_model(llm.model, mode, head=head)
        # int8 from FLOAT_PATH_ROWS rows on runs prefill as float32 x dequantized weights; score
        # with the kernel too (bf16 activations), which is what decode runs
        variants = [("", None)]
        if mode == "int8":
            variants = [(" (kernel)", 1 << 30), (" (float prefill)", None)]
        for suffix, rows_limit in variants:
            if rows_limit is not None:
                for m in llm.model.modules():
                    if isinstance(m, Int8Linear):
                        m.float_path_rows = rows_limit
            t0 = time.perf_counter()
            ppl = perplexity(llm, ids, args.window, args.stride)
            ppl_s = time.perf_counter() - t0
            first = llm.logits(ids[:256])
            if ref_logits is None:
                ref_logits = first
            agree = top1_agreement(first, ref_logits)
            if rows_limit is not None:
                for m in llm.model.modules():
                    if isinstance(m, Int8Linear):
                        m.float_path_rows = FLOAT_PATH_ROWS
            rows.append([mode + suffix, ppl, agree, ppl_s])
            print(*rows[-1], flush=True)
        speed = None if args.no_speed else decode_rate(llm, args.repeats)
        rows[-1].append(speed)
        del llm
    base = rows[0][1]
    print(f"held-out text: {len(ids)} tokens; window {args.window}, stride {args.stride}; "
          f"threads {torch.get_num_threads()}; lm_head {args.head}")
    print(f"{'mode':22s} {'perplexity':>10s} {'vs f32':>8s} {'top1 agree':>10s} {'ppl time s':>10s} {'decode tok/s':>12s}")
    for r in rows:
        mode, ppl, agree, ppl_s = r[:4]
        speed = r[4] if len(r) > 4 and r[4] is not None else float("nan")
        print(f"{mode:22s} {ppl:10.3f} {100 * (ppl / base - 1):+7.2f}% {100 * agree:9.1f}% {ppl_s:10.1f} {speed:12.1f}")


if __name__ == "__main__":
    main()
