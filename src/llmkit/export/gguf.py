"""GGUF export, readable by llama.cpp (and so Ollama and LM Studio) and by llmkit.

Written with the ``gguf`` package's ``GGUFWriter``. What llama.cpp expects, and how it is met:

* tensor names and metadata keys of llama.cpp's own converter (``blk.N.attn_q.weight``,
  ``llama.attention.head_count``, ...);
* Llama q/k rows permuted to the interleaved rotary layout llama.cpp's rope kernel uses (the
  inverse of ``formats.archs.unpermute_rope``); Qwen2/3, Phi-3 and Gemma 3 use the NEOX
  (half-split) rope and are not permuted; Mistral is written as ``llama``, as llama.cpp's converter
  does; Phi-3's q/k/v and gate/up are fused as llama.cpp holds them (``attn_qkv``, a double
  ``ffn_up``); Gemma's norm weights are written plus one (llama.cpp runs a plain RMSNorm);
* the tokenizer as ``tokenizer.ggml.*`` (vocabulary, token types, merges, pre-tokenizer name,
  special ids) with the chat template, so a runtime needs no other file;
* norms and biases kept in F32, and quantized tensors only where a row holds whole 32-value
  blocks (others fall back to F16), as llama.cpp's converter does.

Before writing anything, the export rebuilds the tokenizer from the metadata it is about to write
(the way llmkit and llama.cpp read it) and checks that it splits a set of probe texts exactly as
the model's tokenizer does; a vocabulary that GGUF cannot reproduce is refused rather than
written wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.export import ExportError
from llmkit.formats.archs import LLAMA_TO_GGUF, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT, rename
from llmkit.model import longrope_original_length, rope_attention_factor, rope_kind

# --quantize value -> (GGML type of 2-D weights, general.file_type)
QUANT_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
               "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3)}

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma3": "gemma3", "gpt2": "gpt2"}
_PERMUTED = {"llama"}  # GGUF architectures whose q/k rows llama.cpp expects interleaved
# Gemma 3 in llama.cpp: every sixth layer global, the others within the window with rope base 10000
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10000.0


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Half-split rotary rows (i, i + D/2) -> interleaved pairs (2i, 2i+1), per head, as llama.cpp's
    converter writes Llama q/k. Inverse of ``llmkit.formats.archs.unpermute_rope``."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


# ------------------------------------------------------------------------------------ checks

def _check_model(config) -> str:
    arch = _GGUF_ARCH.get(config.architecture)
    if arch is None:
        raise ExportError(
            f"the GGUF export knows {', '.join(sorted(_GGUF_ARCH))} models, not {config.architecture!r}; "
            "a plugin can add an exporter for it through the register_exporters hook"
        )
    if arch == "gemma3":
        _check_gemma3(config)  # its norms, windows, rope bases and scale
    elif config.qk_norm and arch != "qwen3" or config.sandwich_norm or config.embed_scale \
            or config.norm == "offset_rmsnorm" or config.attention_scale is not None:
        raise ExportError(f"this {config.architecture} model has parts (q/k norms, Gemma-style norms or scales) "
                          f"that GGUF's {arch} layout does not hold; export it as hf instead")
    elif config.sliding_window and config.sliding_window < config.max_position_embeddings:
        raise ExportError(
            f"this model attends within a sliding window of {config.sliding_window} tokens, which llama.cpp's "
            f"GGUF {arch} architecture cannot hold (it would attend to the whole context and answer differently "
            "past that length). Export it as hf instead."
        )
    if arch in ("qwen3", "phi3", "gemma3") and (config.attention_bias or config.attention_out_bias or config.mlp_bias):
        raise ExportError(f"this model has biases on its projections, which GGUF's {arch} layout does not hold; "
                          "export it as hf instead")
    if arch == "llama" and (config.attention_bias or config.attention_out_bias or config.mlp_bias):
        raise ExportError("this Llama-family model has biases on its projections, which the GGUF llama layout "
                          "does not carry in a way every reader loads; export it as hf or onnx instead")
    if arch == "qwen2" and (config.attention_out_bias or config.mlp_bias):
        raise ExportError("this Qwen2 model has biases GGUF's qwen2 layout does not hold; export it as hf instead")
    if config.partial_rotary_factor != 1.0 and arch not in ("gpt2", "phi3"):
        raise ExportError("partial rotary embeddings (partial_rotary_factor < 1) are not written to GGUF here; "
                          "export as hf or onnx")
    kind = rope_kind(config)
    if kind not in ("default", "linear") and not (kind == "longrope" and arch == "phi3"):
        raise ExportError(f"rope scaling {kind!r} is not written to GGUF here (linear is, and Phi-3's longrope); "
                          "export as hf or onnx")
    if arch == "gpt2" and config.activation != "gelu_tanh":
        raise ExportError(f"GGUF's gpt2 layout assumes the tanh GELU; this model uses {config.activation!r}")
    return arch


def _check_gemma3(config) -> None:
    expected = ["full_attention" if (i + 1) % _GEMMA3_PATTERN == 0 else "sliding_attention"
                for i in range(config.num_layers)]
    actual = ["sliding_attention" if config.is_sliding(i) else "full_attention" for i in range(config.num_layers)]
    if config.sliding_window and actual != expected:
        raise ExportError("llama.cpp runs Gemma 3 with every sixth layer global and the others within the sliding "
                          f"window; this model's layers are {actual}. Export it as hf instead")
    if config.sliding_window and config.rope_local_theta not in (None, _GEMMA3_LOCAL_THETA):
        raise ExportError(f"llama.cpp gives Gemma 3's sliding-window layers rope base {_GEMMA3_LOCAL_THETA:g}; this "
                          f"model uses {config.rope_local_theta:g}. Export it as hf instead")
    if config.attention_scale is not None and not math.isclose(config.attention_scale, config.head_dim ** -0.5):
        raise ExportError("llama.cpp scales Gemma 3's attention by head_dim ** -0.5; this model's "
                          "query_pre_attn_scalar differs from its head_dim. Export it as hf instead")


# ------------------------------------------------------------------------------------ metadata

def _model_metadata(config, arch: str) -> dict[str, Any]:
    c = config
    meta: dict[str, Any] = {
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_heads,
        f"{arch}.attention.head_count_kv": c.num_kv_heads,
        f"{arch}.vocab_size": c.vocab_size,
    }
    if c.head_dim != c.hidden_size // c.num_heads:
        meta[f"{arch}.attention.key_length"] = c.head_dim
        meta[f"{arch}.attention.value_length"] = c.head_dim
    if c.norm in ("rmsnorm", "offset_rmsnorm"):
        meta[f"{arch}.attention.layer_norm_rms_epsilon"] = float(c.norm_eps)
    else:
        meta[f"{arch}.attention.layer_norm_epsilon"] = float(c.norm_eps)
    if c.position == "rope":
        meta[f"{arch}.rope.freq_base"] = float(c.rope_theta)
        meta[f"{arch}.rope.dimension_count"] = c.rotary_dim
        if rope_kind(c) == "linear":
            meta[f"{arch}.rope.scaling.type"] = "linear"
            meta[f"{arch}.rope.scaling.factor"] = float(c.rope_scaling["factor"])
    if arch == "gemma3":  # its local layers' window (the whole context when there is none)
        meta["gemma3.attention.sliding_window"] = c.sliding_window or c.max_position_embeddings
    if arch == "phi3":  # what llama.cpp's converter writes
        meta["phi3.attention.sliding_window"] = 0
        meta["phi3.rope.scaling.original_context_length"] = longrope_original_length(c) \
            if rope_kind(c) == "longrope" else c.max_position_embeddings
        if rope_kind(c) == "longrope":
            meta["phi3.rope.scaling.attn_factor"] = float(rope_attention_factor(c))
    return meta


def _probe_texts(tokenizer) -> list[str]:
    texts = [
        "Hello world! The quick brown fox jumps over the lazy dog.",
        "  leading spaces, trailing spaces  \n\nnew lines\r\n\ttabs",
        "Numbers 1234567890 3.14159 and 12,345; dates 2024-06-01.",
        "I'm sure you'll see they've done it; we're here. It's DONE, isn't it?",
        "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n",
        "Café, naïve, résumé — Ünïcödé; 你好世界; こんにちは; Привет; 🙂🚀 ééé",
        "https://example.com/path?q=1&r=two#frag  user@example.org",
        "!!!??? ... ---- ____ $$$ %%% ^^^ ~~~ ``` <<< >>> |||",
    ]
    specials = [t for t in tokenizer.special_tokens.values() if t]
    if specials:
        texts.append(" ".join(f"{s}text {s}" for s in specials))
    if tokenizer.chat_template:
        try:
            texts.append(tokenizer.apply_chat_template(
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 2 you!"},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
                add_generation_prompt=True))
        except Exception:
            pass  # a template that needs other variables: the texts above still check the vocabulary
    return texts


def _byte_level_pre_candidates(state: dict) -> list[str]:
    """GGUF pre-tokenizer names to try, the likeliest first (each stands for a different split)."""
    text = json.dumps(state.get("pre_tokenizer"))
    first = []
    if "Digits" in text:
        first.append("smollm")
    if "p{N}{1,3}" in text:
        first.append("llama-bpe")
    if "\\\\p{N}|" in text or "p{N}| ?" in text:
        first.append("qwen2")
    if "Lu}\\\\p{Lt}" in text or "p{Lu}\\p{Lt}" in text:
        first.append("gpt-4o")
    # "gpt-2", not "gpt2": the spelling llama.cpp accepts for GPT-2's split (it refuses "gpt2")
    rest = ["gpt-2", "smollm", "llama-bpe", "qwen2", "gpt-4o"]
    return first + [n for n in rest if n not in first]


def _tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """The tokenizer.* keys; raises ExportError when GGUF cannot reproduce this tokenizer."""
    from llmkit.tokenizer import Tokenizer

    backend = tokenizer.backend
    state = json.loads(backend.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"the tokenizer is a {model.get('type')} model; GGUF here holds BPE vocabularies (byte-level, "
            "as GPT-2/Llama 3/SmolLM, or SentencePiece-style with byte fallback)"
        )
    byte_level = "ByteLevel" in json.dumps(state.get("pre_tokenizer")) or "ByteLevel" in json.dumps(state.get("decoder"))
    if not byte_level and not model.get("byte_fallback"):
        raise ExportError("the tokenizer is BPE without byte-level encoding or byte fallback, which GGUF cannot "
                          "describe; export as hf")
    added = backend.get_added_tokens_decoder()
    n = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
    tokens, types, scores = [], [], []
    for i in range(n):
        token = added[i].content if i in added else backend.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # unused
        elif i in added:
            tokens.append(token)
            types.append(3 if added[i].special else 4)  # control | user-defined
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            tokens.append(token)
            types.append(6)  # byte
        else:
            tokens.append(token)
            types.append(1)  # normal
        scores.append(-float(i))  # SentencePiece-style: earlier ids merge first
    merges = [" ".join(m) if isinstance(m, list) else str(m) for m in model.get("merges") or []]
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if merges:
        meta["tokenizer.ggml.merges"] = merges
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("unknown_token_id", tokenizer.unk_token_id), ("padding_token_id", tokenizer.pad_token_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = int(value)
    extra_eos = sorted(tokenizer.eos_token_ids - {tokenizer.eos_token_id})
    if tokenizer.eos_token_id is None and extra_eos:
        meta["tokenizer.ggml.eos_token_id"] = extra_eos.pop(0)
    for key, value in zip(("eot_token_id", "eom_token_id"), extra_eos):
        meta[f"tokenizer.ggml.{key}"] = int(value)
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos_token)
    meta["tokenizer.ggml.add_eos_token"] = bool(tokenizer.add_eos_token)
    templates = tokenizer.chat_templates
    if "default" in templates:
        meta["tokenizer.chat_template"] = templates["default"]
    named = sorted(k for k in templates if k != "default")
    for name in named:
        meta[f"tokenizer.chat_template.{name}"] = templates[name]
    if named:
        meta["tokenizer.chat_templates"] = named

    probes = _probe_texts(tokenizer)
    want = [(tokenizer.encode(t), tokenizer.encode(t, add_special_tokens=True)) for t in probes]

    def agrees(candidate: dict) -> str | None:
        try:
            rebuilt = Tokenizer.from_gguf_metadata(candidate)
        except Exception as exc:  # noqa: BLE001 - any failure means this layout does not fit
            return f"{type(exc).__name__}: {exc}"
        for text, (plain, special) in zip(probes, want):
            if rebuilt.encode(text) != plain or rebuilt.encode(text, add_special_tokens=True) != special:
                return f"it splits {text[:40]!r} differently"
        return None

    if byte_level:
        meta["tokenizer.ggml.model"] = "gpt2"
        reasons = []
        for pre in _byte_level_pre_candidates(state):
            candidate = {**meta, "tokenizer.ggml.pre": pre}
            reason = agrees(candidate)
            if reason is None:
                return candidate
            reasons.append(f"{pre}: {reason}")
    else:
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.scores"] = scores
        meta["tokenizer.ggml.add_space_prefix"] = "Prepend" in json.dumps(state.get("normalizer"))
        reason = agrees(meta)
        if reason is None:
            return meta
        reasons = [reason]
    raise ExportError(
        "GGUF cannot reproduce this tokenizer: rebuilt from GGUF metadata, " + "; ".join(reasons[:3])
        + ". A GGUF written anyway would tokenize differently; export as hf instead."
    )


# ------------------------------------------------------------------------------------ tensors

def _gguf_tensors(model, arch: str):
    """llmkit state dict -> (gguf name, float32 tensor) in llama.cpp's layout."""
    config = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if config.tie_embeddings or arch == "gpt2":  # gpt2 always ties: readers reuse token_embd
        state.pop("lm_head.weight", None)
    if arch == "phi3" and rope_kind(config) == "longrope":
        yield ROPE_FACTORS_LONG, torch.tensor(config.rope_scaling["long_factor"], dtype=torch.float32)
        yield ROPE_FACTORS_SHORT, torch.tensor(config.rope_scaling["short_factor"], dtype=torch.float32)
    for name in list(state):
        m = re.fullmatch(r"layers\.(\d+)\.attn\.q_proj\.(weight|bias)", name)
        if arch in ("gpt2", "phi3") and m:
            i, kind = m[1], m[2]
            fused = torch.cat([state.pop(f"layers.{i}.attn.{p}_proj.{kind}") for p in "qkv"], dim=0)
            yield f"blk.{i}.attn_qkv.{kind}", fused
            continue
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.gate_proj\.weight", name)
        if arch == "phi3" and m:  # gate rows, then up rows, in one ffn_up
            fused = torch.cat([state.pop(f"layers.{m[1]}.mlp.{p}_proj.weight") for p in ("gate", "up")], dim=0)
            yield f"blk.{m[1]}.ffn_up.weight", fused
            continue
        if name not in state:
            continue  # fused above
        t = state.pop(name)
        new = rename(LLAMA_TO_GGUF, name)
        if new is None:
            raise ExportError(f"weight {name} has no place in GGUF's {arch} layout")
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp runs Gemma's (1 + weight) norms as plain ones
        if arch in _PERMUTED and re.search(r"attn_q\.", new):
            t = permute_rope(t, config.num_heads)
        elif arch in _PERMUTED and re.search(r"attn_k\.", new):
            t = permute_rope(t, config.num_kv_heads)
        yield new, t


def _encode(name: str, t: torch.Tensor, qtype: str):
    """(array, raw GGML type or None): 1-D tensors stay F32; 2-D ones take qtype where blocks fit."""
    from gguf import GGMLQuantizationType, quants

    arr = t.contiguous().numpy()
    if t.dim() < 2 or qtype == "F32":
        return arr.astype(np.float32), None
    if qtype == "F16" or (qtype not in ("BF16",) and name == "position_embd.weight"):
        return arr.astype(np.float16), None
    kind = GGMLQuantizationType[qtype]
    block = quants.GGML_QUANT_SIZES[kind][0]
    if arr.shape[-1] % block:
        return arr.astype(np.float16), None  # rows not made of whole blocks: F16, as llama.cpp falls back
    return quants.quantize(arr.astype(np.float32), kind), kind


def export_gguf(model, tokenizer, out: Path, quantize: str | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file at ``out``; return its path."""
    import gguf

    config = model.config
    arch = _check_model(config)
    qtype, file_type = QUANT_TYPES[quantize or "f32"]
    out = Path(out)
    if out.is_dir():
        out = out / f"{config.name or config.architecture}.{quantize or 'f32'}.gguf".replace("/", "_")
    meta = {**_model_metadata(config, arch), **_tokenizer_metadata(tokenizer, config.vocab_size)}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(config.name or config.architecture)
        writer.add_file_type(file_type)
        if qtype not in ("F32", "F16", "BF16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in meta.items():
            _add(writer, key, value)
        for name, t in _gguf_tensors(model, arch):
            arr, raw = _encode(name, t, qtype)
            writer.add_tensor(name, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _add(writer, key: str, value) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        if value and isinstance(value[0], float):
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
        else:
            writer.add_array(key, value)
    else:
        raise TypeError(f"{key}: cannot write {type(value).__name__} to GGUF")
