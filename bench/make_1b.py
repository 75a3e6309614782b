"""Make a 1B-class benchmark file: random weights in Llama-3.2-1B's shape, as Q4_K_M.

    python bench/make_1b.py --peer-python /work/peer/bin/python
    llmkit bench -m "$(python bench/make_1b.py --peer-python /work/peer/bin/python)" \\
        --peer-python /work/peer/bin/python

No model hub is reachable here, and decode speed depends on the shapes and the quantization, not
on what the weights say. So: float16 tensors of Llama-3.2-1B's shapes (hidden 2048, 16 layers, MLP
8192, 32 query and 8 key-value heads of 64, rope theta 500000, tied embeddings), normal with std
0.02 (norm weights 1), written with the ``gguf`` package's writer, with the tokenizer of the
default model's GGUF (SmolLM2: a 49,152-token vocabulary, so the embedding has that many rows);
then llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``, Q4_K_M) makes the file. The
text it generates is garbage; its speed is a 1B model's. The context is set to 4096 (the real model
says 131072; llama3 rope scaling is left out: neither changes the cost of a token at short lengths).

The quantizer needs llama-cpp-python, which only the peer environment has (bench/peer-env.sh):
``--peer-python`` runs that step there. The result is cached (``--force`` makes it again), and its
path is printed as the last line. The float16 file (about 2.5 GB) is kept beside it until the
quantizer has succeeded, so a retry does not write it again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

HIDDEN, LAYERS, MLP, HEADS, KV_HEADS, HEAD_DIM = 2048, 16, 8192, 32, 8, 64
ROPE_THETA, CONTEXT, RMS_EPS, STD = 500000.0, 4096, 1e-5, 0.02
NAME = "llama-1b-shape-q4_k_m.gguf"

QUANTIZE = """
import ctypes, sys
import llama_cpp

llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def default_output() -> Path:
    from llmkit import store

    return store.home() / "bench" / NAME


def default_tokenizer_source() -> Path:
    from llmkit import store

    return store.pull("smollm2-135m-instruct", progress=False)


def tensor_shapes(vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, shape in numpy order: [out, in] for matrices) of every tensor, in file order.
    No output.weight: the token embedding doubles as the head, as in Llama-3.2-1B."""
    kv = KV_HEADS * HEAD_DIM
    shapes = [("token_embd.weight", (vocab, HIDDEN))]
    for i in range(LAYERS):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (HIDDEN,)),
            (f"blk.{i}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (f"blk.{i}.attn_k.weight", (kv, HIDDEN)),
            (f"blk.{i}.attn_v.weight", (kv, HIDDEN)),
            (f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (f"blk.{i}.ffn_norm.weight", (HIDDEN,)),
            (f"blk.{i}.ffn_gate.weight", (MLP, HIDDEN)),
            (f"blk.{i}.ffn_up.weight", (MLP, HIDDEN)),
            (f"blk.{i}.ffn_down.weight", (HIDDEN, MLP)),
        ]
    return shapes + [("output_norm.weight", (HIDDEN,))]


def copy_tokenizer(source: Path, writer: GGUFWriter) -> int:
    """Copy every tokenizer.* key of ``source`` into ``writer``, with its own value types; the
    vocabulary size."""
    reader = GGUFReader(str(source))
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    if not vocab:
        raise SystemExit(f"{source} has no tokenizer.ggml.tokens: give a GGUF with a tokenizer (--tokenizer-from)")
    return vocab


def write_f16(path: Path, tokenizer_source: Path, seed: int = 0) -> None:
    """The float16 file, written tensor by tensor (never all of it in memory at once)."""
    writer = GGUFWriter(str(path), "llama")
    vocab = copy_tokenizer(tokenizer_source, writer)
    writer.add_name("random weights in Llama-3.2-1B's shape")
    writer.add_vocab_size(vocab)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    shapes = tensor_shapes(vocab)
    for name, shape in shapes:
        dtype = np.float16 if len(shape) == 2 else np.float32  # norms stay float32, as converters write them
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in shapes:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= STD
            writer.write_tensor_data(w.astype(np.float16))
    writer.close()


def quantize(peer_python: str, src: Path, dst: Path, threads: int) -> None:
    proc = subprocess.run([peer_python, "-c", QUANTIZE, str(src), str(dst), str(threads)])
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp's quantizer failed (exit {proc.returncode}); it needs llama-cpp-python in "
                         f"{peer_python} (bench/peer-env.sh sets that up); the float16 file {src} is kept for the next try")


def write_whole(path: Path, write) -> None:
    """``write(tmp)`` then rename: ``path`` is whole or absent, never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", default=sys.executable,
                    help="Python with llama-cpp-python, for the quantize step (default: this one)")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="GGUF whose tokenizer to copy (default: the default model's)")
    ap.add_argument("--out", type=Path, default=None, help=f"output file (default: <llmkit home>/bench/{NAME})")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="quantizer threads")
    ap.add_argument("--force", action="store_true", help="make it again even if it is there")
    args = ap.parse_args()
    out = args.out or default_output()
    if out.exists() and not args.force:
        print(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    f16 = out.with_name(out.stem + ".f16.gguf")  # kept until the quantizer has run, so a retry skips it
    if args.force or not f16.exists():
        print(f"writing random float16 weights to {f16} ...", file=sys.stderr)
        write_whole(f16, lambda tmp: write_f16(tmp, args.tokenizer_from or default_tokenizer_source()))
    print(f"quantizing to Q4_K_M with llama.cpp ({args.peer_python}) ...", file=sys.stderr)
    write_whole(out, lambda tmp: quantize(args.peer_python, f16, tmp, args.threads))
    f16.unlink()
    print(f"{out.stat().st_size / 2**20:.0f} MiB", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
