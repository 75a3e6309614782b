"""Per-architecture knowledge: how a checkpoint's config and tensor names map onto llmkit's model.

An ``Architecture`` is registered through the ``register_architectures`` plugin hook under each
name checkpoints use for it (HF ``model_type``, GGUF ``general.architecture``). A plugin adds an
architecture by registering one; if its block differs from what ``ModelConfig`` can switch, it
can also supply ``build_model``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from llmkit.config import ModelConfig
from llmkit.errors import UnsupportedArchitectureError

Tensors = Iterator[tuple[str, torch.Tensor]]


@dataclass
class Architecture:
    name: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig] | None = None
    config_from_gguf: Callable[[dict[str, Any]], ModelConfig] | None = None
    # (config, iterator of checkpoint (name, tensor)) -> iterator of llmkit (name, tensor)
    weights_from_hf: Callable[[ModelConfig, Tensors], Tensors] | None = None
    weights_from_gguf: Callable[[ModelConfig, Tensors], Tensors] | None = None
    build_model: Callable[[ModelConfig], torch.nn.Module] | None = None
    # the way back, for saving in HF format: ModelConfig -> config.json, llmkit names -> HF names
    config_to_hf: Callable[[ModelConfig], dict[str, Any]] | None = None
    weights_to_hf: Callable[[ModelConfig, Tensors], Tensors] | None = None


def get_architecture(name: str) -> Architecture:
    from llmkit.plugins import registry

    archs = registry("architectures")
    if name not in archs:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(archs))}. "
            "A plugin can add one through the register_architectures hook."
        )
    return archs[name]


# ---------------------------------------------------------------- HF config.json -> ModelConfig

def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 nests rope settings in `rope_parameters`; 4.x keeps rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params or None
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(theta), scaling


def _llama_family_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    theta, scaling = _rope_from_hf(cfg)
    model_type = cfg.get("model_type", "llama")
    heads = cfg["num_attention_heads"]
    window = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    return ModelConfig(
        architecture=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation={"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}[
            cfg.get("hidden_act", "silu")
        ],
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=cfg.get("partial_rotary_factor", 1.0),
        attention_bias=True if model_type == "qwen2" else cfg.get("attention_bias", False),
        attention_out_bias=False if model_type == "qwen2" else cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        sliding_window=window,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def _gpt2_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    hidden = cfg["n_embd"]
    return ModelConfig(
        architecture="gpt2",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg.get("n_inner") or 4 * hidden,
        num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"],
        num_kv_heads=cfg["n_head"],
        max_position_embeddings=cfg["n_positions"],
        norm="layernorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        activation={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                    "relu": "relu"}[cfg.get("activation_function", "gelu_new")],
        position="learned",
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


# ---------------------------------------------------------------- HF tensor names -> llmkit

# One table per family, read both ways: (HF name, llmkit name); {i} is a block number, {p} weight
# or bias (see _name_rules).
_LLAMA_HF_NAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    *[(f"model.layers.{{i}}.self_attn.{x}_proj.{{p}}", f"layers.{{i}}.attn.{x}_proj.{{p}}") for x in "qkvo"],
    *[(f"model.layers.{{i}}.mlp.{x}_proj.{{p}}", f"layers.{{i}}.mlp.{x}_proj.{{p}}") for x in ("gate", "up", "down")],
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
]
# GPT-2 without the "transformer." prefix; its fused c_attn is split and joined by hand
_GPT2_HF_NAMES = [
    ("wte.weight", "embed.weight"),
    ("wpe.weight", "pos_embed.weight"),
    ("ln_f.{p}", "norm.{p}"),
    ("h.{i}.ln_1.{p}", "layers.{i}.attn_norm.{p}"),
    ("h.{i}.ln_2.{p}", "layers.{i}.mlp_norm.{p}"),
    ("h.{i}.attn.c_proj.{p}", "layers.{i}.attn.o_proj.{p}"),
    ("h.{i}.mlp.c_fc.{p}", "layers.{i}.mlp.up_proj.{p}"),
    ("h.{i}.mlp.c_proj.{p}", "layers.{i}.mlp.down_proj.{p}"),
]


def _name_rules(pairs: list[tuple[str, str]], reverse: bool = False) -> list[tuple[str, str]]:
    """(pattern, target) rules for ``rename`` from a table of name templates, left to right or,
    with ``reverse``, right to left."""
    rules = []
    for source, target in ((b, a) if reverse else (a, b) for a, b in pairs):
        pattern = re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        rules.append((pattern, target.replace("{i}", r"\g<i>").replace("{p}", r"\g<p>")))
    return rules


_LLAMA_HF = _name_rules(_LLAMA_HF_NAMES)
_GPT2_HF = _name_rules(_GPT2_HF_NAMES)
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias)$")


def rename(rules: list[tuple[str, str]], name: str) -> str | None:
    """``name`` under the first rule whose pattern matches it whole; None if none does."""
    for pattern, target in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def _llama_weights_from_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    for name, t in tensors:
        if _IGNORED.match(name):
            continue
        new = rename(_LLAMA_HF, name)
        if new is None:
            raise KeyError(name)
        if new == "lm_head.weight" and config.tie_embeddings:
            continue
        yield new, t


def _gpt2_weights_from_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    for name, t in tensors:
        name = name.removeprefix("transformer.")
        if _IGNORED.match(name) or name == "lm_head.weight":  # GPT-2 always ties the head
            continue
        # GPT-2's Conv1D stores weights as (in, out): transpose to nn.Linear's (out, in)
        if m := re.fullmatch(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", name):
            parts = (t.t() if m[2] == "weight" else t).chunk(3, dim=0)
            for proj, part in zip("qkv", parts):
                yield f"layers.{m[1]}.attn.{proj}_proj.{m[2]}", part.contiguous()
            continue
        new = rename(_GPT2_HF, name)
        if new is None:
            raise KeyError(name)
        if t.dim() == 2 and (".attn." in new or ".mlp." in new):
            t = t.t().contiguous()
        yield new, t


# ---------------------------------------------------------------- GGUF metadata -> ModelConfig

def _gguf_common(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    def key(k, default=None):
        return meta.get(f"{arch}.{k}", default)

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    return dict(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(key("attention.head_count_kv") or heads),
        head_dim=int(key("attention.key_length") or hidden // heads),
        max_position_embeddings=int(key("context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def _llama_family_from_gguf(meta: dict[str, Any], arch: str) -> ModelConfig:
    common = _gguf_common(meta, arch)
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": float(meta[f"{arch}.rope.scaling.factor"])}
        if orig := meta.get(f"{arch}.rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = int(orig)
    rot = meta.get(f"{arch}.rope.dimension_count")
    return ModelConfig(
        architecture=arch,
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        partial_rotary_factor=(int(rot) / common["head_dim"]) if rot else 1.0,
        attention_bias=arch == "qwen2",
        **common,
    )


def _gpt2_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        architecture="gpt2",
        norm="layernorm",
        norm_eps=float(meta.get("gpt2.attention.layer_norm_epsilon", 1e-5)),
        mlp="gelu",
        activation="gelu_tanh",
        position="learned",
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        **_gguf_common(meta, "gpt2"),
    )


# ---------------------------------------------------------------- GGUF tensor names -> llmkit

# One table, read both ways: (GGUF name, llmkit name); {i} is a block number, {p} weight or bias.
_LLAMA_GGUF_NAMES = [
    ("token_embd.weight", "embed.weight"),
    ("output_norm.{p}", "norm.{p}"),
    ("output.weight", "lm_head.weight"),
    ("position_embd.weight", "pos_embed.weight"),
    ("blk.{i}.attn_q.{p}", "layers.{i}.attn.q_proj.{p}"),
    ("blk.{i}.attn_k.{p}", "layers.{i}.attn.k_proj.{p}"),
    ("blk.{i}.attn_v.{p}", "layers.{i}.attn.v_proj.{p}"),
    ("blk.{i}.attn_output.{p}", "layers.{i}.attn.o_proj.{p}"),
    ("blk.{i}.attn_norm.{p}", "layers.{i}.attn_norm.{p}"),
    ("blk.{i}.ffn_norm.{p}", "layers.{i}.mlp_norm.{p}"),
    ("blk.{i}.ffn_gate.{p}", "layers.{i}.mlp.gate_proj.{p}"),
    ("blk.{i}.ffn_up.{p}", "layers.{i}.mlp.up_proj.{p}"),
    ("blk.{i}.ffn_down.{p}", "layers.{i}.mlp.down_proj.{p}"),
]


_LLAMA_GGUF = _name_rules(_LLAMA_GGUF_NAMES)  # GGUF -> llmkit (reading)
LLAMA_TO_GGUF = _name_rules(_LLAMA_GGUF_NAMES, reverse=True)  # llmkit -> GGUF (export)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo the row permutation llama.cpp's converter applies to Llama q/k weights.

    GGUF stores q/k rows in the interleaved rotary layout (pairs 2i, 2i+1); HF checkpoints and
    llmkit's model use the half-split layout (i, i + D/2). Works for weights and biases.
    """
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _llama_weights_from_gguf(config: ModelConfig, tensors: Tensors, permuted: bool) -> Tensors:
    for name, t in tensors:
        new = rename(_LLAMA_GGUF, name)
        if new is None:
            if name.startswith("rope_freqs"):  # llama3 scaling factors: we recompute from config
                continue
            raise KeyError(name)
        if permuted and new.endswith(("q_proj.weight", "q_proj.bias")):
            t = unpermute_rope(t, config.num_heads)
        elif permuted and new.endswith(("k_proj.weight", "k_proj.bias")):
            t = unpermute_rope(t, config.num_kv_heads)
        yield new, t


def _gpt2_weights_from_gguf(config: ModelConfig, tensors: Tensors) -> Tensors:
    for name, t in tensors:
        if m := re.fullmatch(r"blk\.(\d+)\.attn_qkv\.(weight|bias)", name):
            for proj, part in zip("qkv", t.chunk(3, dim=0)):
                yield f"layers.{m[1]}.attn.{proj}_proj.{m[2]}", part.contiguous()
            continue
        new = rename(_LLAMA_GGUF, name)
        if new is None:
            raise KeyError(name)
        if new == "lm_head.weight":
            continue  # tied to the embedding
        yield new, t


# ---------------------------------------------------------------- llmkit -> HF (saving)

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _llama_family_to_hf(c: ModelConfig) -> dict[str, Any]:
    cfg = {
        "architectures": [_HF_CLASSES.get(c.architecture, "LlamaForCausalLM")],
        "model_type": c.architecture,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
        "hidden_act": _HF_ACT[c.activation],
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32",
    }
    if c.partial_rotary_factor != 1.0:
        cfg["partial_rotary_factor"] = c.partial_rotary_factor
    if c.architecture == "qwen2":
        cfg["use_sliding_window"] = c.sliding_window is not None
        cfg["sliding_window"] = c.sliding_window
    else:
        cfg["attention_bias"] = c.attention_bias
        cfg["mlp_bias"] = c.mlp_bias
        if c.architecture == "mistral":
            cfg["sliding_window"] = c.sliding_window
    return cfg


_LLAMA_TO_HF = _name_rules(_LLAMA_HF_NAMES, reverse=True)
_GPT2_TO_HF = _name_rules(_GPT2_HF_NAMES, reverse=True)


def _llama_weights_to_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    for name, t in tensors:
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        new = rename(_LLAMA_TO_HF, name)
        if new is None:
            raise KeyError(name)
        yield new, t


def _gpt2_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "n_inner": c.intermediate_size,
        "n_positions": c.max_position_embeddings,
        "layer_norm_epsilon": c.norm_eps,
        "activation_function": {"gelu_tanh": "gelu_new"}.get(c.activation, c.activation),
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _gpt2_weights_to_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    state = dict(tensors)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        if (m := re.fullmatch(r"layers\.(\d+)\.attn\.q_proj\.(weight|bias)", name)):
            i, kind = m[1], m[2]
            fused = torch.cat([state[f"layers.{i}.attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
            continue
        if re.fullmatch(r"layers\.(\d+)\.attn\.[kv]_proj\.(weight|bias)", name):
            continue  # fused with q above
        new = rename(_GPT2_TO_HF, name)
        if new is None:
            raise KeyError(name)
        # nn.Linear's (out, in) back to Conv1D's (in, out)
        out["transformer." + new] = t.t().contiguous() if t.dim() == 2 and (".attn." in name or ".mlp." in name) else t
    yield from out.items()


def _llama_family(name: str, permuted: bool) -> Architecture:
    return Architecture(
        name=name,
        config_from_hf=_llama_family_from_hf,
        config_from_gguf=lambda meta: _llama_family_from_gguf(meta, name),
        weights_from_hf=_llama_weights_from_hf,
        weights_from_gguf=lambda config, tensors: _llama_weights_from_gguf(config, tensors, permuted),
        config_to_hf=_llama_family_to_hf,
        weights_to_hf=_llama_weights_to_hf,
    )


BUILTIN_ARCHITECTURES: dict[str, Architecture] = {
    # llama.cpp's converter permutes q/k rows for Llama and Mistral, not for Qwen2 (NEOX rope)
    "llama": _llama_family("llama", permuted=True),
    "mistral": _llama_family("mistral", permuted=True),
    "qwen2": _llama_family("qwen2", permuted=False),
    "gpt2": Architecture(
        name="gpt2",
        config_from_hf=_gpt2_from_hf,
        config_from_gguf=_gpt2_from_gguf,
        weights_from_hf=_gpt2_weights_from_hf,
        weights_from_gguf=_gpt2_weights_from_gguf,
        config_to_hf=_gpt2_to_hf,
        weights_to_hf=_gpt2_weights_to_hf,
    ),
}
