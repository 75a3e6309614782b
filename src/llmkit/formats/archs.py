"""Per-architecture knowledge: how a checkpoint's config and tensor names map onto llmkit's model.

An ``Architecture`` is registered through the ``register_architectures`` plugin hook under each
name checkpoints use for it (HF ``model_type``, GGUF ``general.architecture``). A plugin adds an
architecture by registering one; if its block differs from what ``ModelConfig`` can switch, it
can also supply ``build_model``.
"""

from __future__ import annotations

import math
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
    # the family's own chat template and end-of-turn tokens, for GGUF files that lack them
    chat_template: str | None = None
    end_of_turn: tuple[str, ...] = ()


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


_HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _activation(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise UnsupportedArchitectureError(f"activation {name!r} is not supported; llmkit runs "
                                           f"{', '.join(sorted(_HF_ACTIVATIONS))}")
    return _HF_ACTIVATIONS[name]


def _windows_from_hf(cfg: dict[str, Any]) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types): the window, and which layers use it when not all do."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if cfg.get("model_type") in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if types is None and window and cfg.get("model_type") in ("qwen2", "qwen3") and "max_window_layers" in cfg:
        types = ["sliding_attention" if i >= cfg["max_window_layers"] else "full_attention"
                 for i in range(cfg["num_hidden_layers"])]
    if not window or types is None or set(types) == {"sliding_attention"}:
        return window or None, None
    if "sliding_attention" not in types:
        return None, None
    return window, list(types)


def _longrope_from_hf(cfg: dict[str, Any], scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Phi-3's rope scaling with the original context it needs (4.x configs keep that at the top)."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
        return scaling
    keep = ("short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings")
    out = {"rope_type": "longrope", **{k: scaling[k] for k in keep if scaling.get(k) is not None}}
    out.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings"))
    return out


def _llama_family_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    theta, scaling = _rope_from_hf(cfg)
    model_type = cfg.get("model_type", "llama")
    heads = cfg["num_attention_heads"]
    window, layer_types = _windows_from_hf(cfg)
    partial = cfg.get("partial_rotary_factor") or (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")
    if model_type == "phi3":
        scaling = _longrope_from_hf(cfg, scaling)
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
        activation=_activation(cfg.get("hidden_act", "silu")),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial or 1.0,
        attention_bias=True if model_type == "qwen2" else cfg.get("attention_bias", False),
        attention_out_bias=False if model_type == "qwen2" else cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
        qk_norm=model_type == "qwen3",
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def _gemma3_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    if "text_config" in cfg:
        raise UnsupportedArchitectureError(
            "this is Gemma 3's multimodal checkpoint (Gemma3ForConditionalGeneration); llmkit runs the text "
            "model: a Gemma3ForCausalLM checkpoint (model_type gemma3_text), or the model's GGUF file")
    for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(key):
            raise UnsupportedArchitectureError(f"this Gemma 3 checkpoint sets {key}, which llmkit does not run")
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: rope settings per kind of layer
        full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
        theta, local_theta = full.pop("rope_theta", 1_000_000.0), local.get("rope_theta", 10_000.0)
        scaling = full if full.get("rope_type", "default") != "default" else None
        if local.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError("rope scaling on Gemma 3's sliding-window layers is not supported")
    else:  # transformers 4.x
        theta, local_theta = cfg.get("rope_theta", 1_000_000.0), cfg.get("rope_local_base_freq", 10_000.0)
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
    layers = cfg["num_hidden_layers"]
    pattern = cfg.get("sliding_window_pattern", 6)
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                       for i in range(layers)]
    window, layer_types = _windows_from_hf({**cfg, "layer_types": types})
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return ModelConfig(
        architecture="gemma3",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        norm="offset_rmsnorm",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        sandwich_norm=True,
        qk_norm=True,
        embed_scale=True,
        activation=_activation(cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rope_local_theta=float(local_theta),
        attention_bias=cfg.get("attention_bias", False),
        attention_out_bias=cfg.get("attention_bias", False),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        sliding_window=window,
        layer_types=layer_types,
        attention_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
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
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight"),  # Qwen3
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
]
# Gemma 3: "post_attention_layernorm" norms the attention's output (Llama's name for the norm
# before the MLP); the MLP has a norm before and after.
_GEMMA3_HF_NAMES = [
    *[pair for pair in _LLAMA_HF_NAMES if "layernorm" not in pair[0]],
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_out_norm.weight"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_out_norm.weight"),
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
_GEMMA3_HF = _name_rules(_GEMMA3_HF_NAMES)
_GPT2_HF = _name_rules(_GPT2_HF_NAMES)
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias)$")


def rename(rules: list[tuple[str, str]], name: str) -> str | None:
    """``name`` under the first rule whose pattern matches it whole; None if none does."""
    for pattern, target in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def _llama_weights_from_hf(config: ModelConfig, tensors: Tensors, rules=_LLAMA_HF) -> Tensors:
    for name, t in tensors:
        if _IGNORED.match(name):
            continue
        new = rename(rules, name)
        if new is None:
            raise KeyError(name)
        if new == "lm_head.weight" and config.tie_embeddings:
            continue
        yield new, t


def _gemma3_weights_from_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    return _llama_weights_from_hf(config, tensors, _GEMMA3_HF)


def _qkv_sizes(config: ModelConfig) -> list[int]:
    d = config.head_dim
    return [config.num_heads * d, config.num_kv_heads * d, config.num_kv_heads * d]


def _phi3_weights_from_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    """Phi-3 keeps q, k, v in one qkv_proj and gate, up in one gate_up_proj: split by rows."""
    def split(tensors):
        for name, t in tensors:
            if m := re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", name):
                for proj, part in zip("qkv", t.split(_qkv_sizes(config))):
                    yield f"model.layers.{m[1]}.self_attn.{proj}_proj.weight", part
            elif m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", name):
                for proj, part in zip(("gate", "up"), t.chunk(2)):
                    yield f"model.layers.{m[1]}.mlp.{proj}_proj.weight", part
            else:
                yield name, t
    return _llama_weights_from_hf(config, split(tensors))


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


def _qwen3_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    config = _llama_family_from_gguf(meta, "qwen3")
    config.qk_norm = True
    return config


def _phi3_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    # The file's phi3.attention.sliding_window is not applied, as llama.cpp and transformers do not
    # apply it to Phi-3 GGUF files: llmkit reads a file as they run it.
    config = _llama_family_from_gguf(meta, "phi3")
    long, short = meta.get(ROPE_FACTORS_LONG), meta.get(ROPE_FACTORS_SHORT)
    if long is not None and short is not None:  # LongRoPE (the 128k-context models)
        config.rope_scaling = {
            "rope_type": "longrope", "long_factor": list(long), "short_factor": list(short),
            "original_max_position_embeddings": int(meta.get("phi3.rope.scaling.original_context_length")
                                                    or config.max_position_embeddings),
        }
        if meta.get("phi3.rope.scaling.attn_factor") is not None:
            config.rope_scaling["attention_factor"] = float(meta["phi3.rope.scaling.attn_factor"])
    return config


def _gemma3_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    common = _gguf_common(meta, "gemma3")
    layers, heads = common["num_layers"], common["num_heads"]
    # llama.cpp's defaults where the file is silent: every sixth layer global, the local layers'
    # rope base 10000, and attention scaled by head_dim ** -0.5 (by (hidden / heads) ** -0.5 in
    # the 62-layer 27B model, whose query_pre_attn_scalar is that)
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    sliding = [bool(x) for x in pattern] if isinstance(pattern, list) else \
        [(i + 1) % int(pattern) != 0 for i in range(layers)]
    types = ["sliding_attention" if x else "full_attention" for x in sliding]
    window = meta.get("gemma3.attention.sliding_window")
    if not window or all(sliding):
        types = None
    window = int(window) if window and any(sliding) else None
    scale = meta.get("gemma3.attention.scale")
    if scale is None:
        scale = (common["hidden_size"] / heads if layers == 62 else common["head_dim"]) ** -0.5
    scaling = None
    if meta.get("gemma3.rope.scaling.type") == "linear" and float(meta.get("gemma3.rope.scaling.factor", 1.0)) != 1.0:
        scaling = {"rope_type": "linear", "factor": float(meta["gemma3.rope.scaling.factor"])}
    return ModelConfig(
        architecture="gemma3",
        norm="offset_rmsnorm",
        norm_eps=float(meta.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        sandwich_norm=True,
        qk_norm=True,
        embed_scale=True,
        activation="gelu_tanh",
        rope_theta=float(meta.get("gemma3.rope.freq_base", 1_000_000.0)),
        rope_scaling=scaling,
        rope_local_theta=float(meta.get("gemma3.rope.freq_base_swa", 10_000.0)),
        sliding_window=window,
        layer_types=types,
        attention_scale=float(scale),
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
    ("blk.{i}.attn_q_norm.{p}", "layers.{i}.attn.q_norm.{p}"),  # Qwen3, Gemma 3
    ("blk.{i}.attn_k_norm.{p}", "layers.{i}.attn.k_norm.{p}"),
    ("blk.{i}.post_attention_norm.{p}", "layers.{i}.attn_out_norm.{p}"),  # Gemma 3
    ("blk.{i}.post_ffw_norm.{p}", "layers.{i}.mlp_out_norm.{p}"),
]
# Tensors that hold settings, not weights: LongRoPE's factors (Phi-3). The GGUF reader puts them
# into the metadata the config is derived from.
ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
SETTING_TENSORS = (ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)


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
            # llama3 scaling factors: recomputed from the config; LongRoPE's: read into it
            if name.startswith("rope_freqs") or name in SETTING_TENSORS:
                continue
            raise KeyError(name)
        if permuted and new.endswith(("q_proj.weight", "q_proj.bias")):
            t = unpermute_rope(t, config.num_heads)
        elif permuted and new.endswith(("k_proj.weight", "k_proj.bias")):
            t = unpermute_rope(t, config.num_kv_heads)
        yield new, t


def _phi3_weights_from_gguf(config: ModelConfig, tensors: Tensors) -> Tensors:
    """llama.cpp keeps Phi-3's fused attn_qkv, and its fused gate/up as ffn_up: split by rows
    (whole rows: quantized blocks split the same way)."""
    def split(tensors):
        for name, t in tensors:
            if m := re.fullmatch(r"blk\.(\d+)\.attn_qkv\.weight", name):
                for proj, part in zip("qkv", t.split(_qkv_sizes(config))):
                    yield f"blk.{m[1]}.attn_{proj}.weight", part
            elif (m := re.fullmatch(r"blk\.(\d+)\.ffn_up\.weight", name)) and t.shape[0] == 2 * config.intermediate_size:
                gate, up = t.chunk(2)
                yield f"blk.{m[1]}.ffn_gate.weight", gate
                yield f"blk.{m[1]}.ffn_up.weight", up
            else:
                yield name, t
    return _llama_weights_from_gguf(config, split(tensors), permuted=False)


def _gemma3_weights_from_gguf(config: ModelConfig, tensors: Tensors) -> Tensors:
    """llama.cpp's converter stores Gemma's norm weights plus one (it runs a plain RMSNorm)."""
    for name, t in _llama_weights_from_gguf(config, tensors, permuted=False):
        yield name, (t - 1 if name.endswith("norm.weight") else t)


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

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}
_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _hf_shape(c: ModelConfig) -> dict[str, Any]:
    """The fields every family's HF config.json spells the same way: sizes and the norm's epsilon."""
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
    }


def _llama_family_to_hf(c: ModelConfig) -> dict[str, Any]:
    cfg = {
        "architectures": [_HF_CLASSES.get(c.architecture, "LlamaForCausalLM")],
        "model_type": c.architecture,
        **_hf_shape(c),
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
    if c.layer_types is not None and c.architecture not in ("qwen2", "qwen3"):
        raise UnsupportedArchitectureError(f"{c.architecture} in HF format has no per-layer attention windows")
    if c.architecture in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = c.sliding_window is not None
        cfg["sliding_window"] = c.sliding_window
        if c.sliding_window is not None:  # which layers: explicitly (transformers' default is by max_window_layers)
            cfg["layer_types"] = _layer_types(c)
            cfg["max_window_layers"] = cfg["layer_types"].index("sliding_attention")
        if c.architecture == "qwen3":
            cfg["attention_bias"] = c.attention_bias
    elif c.architecture == "phi3":
        if c.attention_bias or c.mlp_bias:
            raise UnsupportedArchitectureError("Phi-3 in HF format has no biases on its projections")
        cfg["sliding_window"] = c.sliding_window
        if (c.rope_scaling or {}).get("rope_type") == "longrope":
            cfg["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
    else:
        cfg["attention_bias"] = c.attention_bias
        cfg["mlp_bias"] = c.mlp_bias
        if c.architecture == "mistral":
            cfg["sliding_window"] = c.sliding_window
    return cfg


def _layer_types(c: ModelConfig) -> list[str]:
    return ["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.num_layers)]


def _gemma3_to_hf(c: ModelConfig) -> dict[str, Any]:
    full = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    local = {"rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}
    scalar = c.head_dim if c.attention_scale is None else c.attention_scale ** -2
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **_hf_shape(c),
        "hidden_activation": _HF_ACT[c.activation],
        "query_pre_attn_scalar": round(scalar) if math.isclose(scalar, round(scalar)) else scalar,
        "sliding_window": c.sliding_window or c.max_position_embeddings,
        "layer_types": _layer_types(c),
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
        "attention_bias": c.attention_bias,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32",
    }


_LLAMA_TO_HF = _name_rules(_LLAMA_HF_NAMES, reverse=True)
_GEMMA3_TO_HF = _name_rules(_GEMMA3_HF_NAMES, reverse=True)
_GPT2_TO_HF = _name_rules(_GPT2_HF_NAMES, reverse=True)


def _llama_weights_to_hf(config: ModelConfig, tensors: Tensors, rules=_LLAMA_TO_HF) -> Tensors:
    for name, t in tensors:
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        new = rename(rules, name)
        if new is None:
            raise KeyError(name)
        yield new, t


def _gemma3_weights_to_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    return _llama_weights_to_hf(config, tensors, _GEMMA3_TO_HF)


def _phi3_weights_to_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    """q, k, v joined into qkv_proj and gate, up into gate_up_proj, as Phi-3 checkpoints hold them
    (a KeyError for a part without its partners: such a layer alone has no HF counterpart)."""
    state = dict(tensors)
    for name in list(state):
        if name not in state:
            continue  # joined with its partners already
        if m := re.fullmatch(r"layers\.(\d+)\.attn\.([qkv])_proj\.weight", name):
            parts = [state.pop(f"layers.{m[1]}.attn.{p}_proj.weight") for p in "qkv"]
            yield f"model.layers.{m[1]}.self_attn.qkv_proj.weight", torch.cat(parts)
        elif m := re.fullmatch(r"layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", name):
            parts = [state.pop(f"layers.{m[1]}.mlp.{p}_proj.weight") for p in ("gate", "up")]
            yield f"model.layers.{m[1]}.mlp.gate_up_proj.weight", torch.cat(parts)
        else:
            yield from _llama_weights_to_hf(config, [(name, state.pop(name))])


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


# Gemma's chat format (the template its tokenizer ships): no system role (a system message
# prefixes the first user turn), "model" for the assistant, turns closed by <end_of_turn>.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

_PHI3 = Architecture(
    name="phi3",
    config_from_hf=_llama_family_from_hf,
    config_from_gguf=_phi3_from_gguf,
    weights_from_hf=_phi3_weights_from_hf,
    weights_from_gguf=_phi3_weights_from_gguf,
    config_to_hf=_llama_family_to_hf,
    weights_to_hf=_phi3_weights_to_hf,
)
_GEMMA3 = Architecture(
    name="gemma3",
    config_from_hf=_gemma3_from_hf,
    config_from_gguf=_gemma3_from_gguf,
    weights_from_hf=_gemma3_weights_from_hf,
    weights_from_gguf=_gemma3_weights_from_gguf,
    config_to_hf=_gemma3_to_hf,
    weights_to_hf=_gemma3_weights_to_hf,
    chat_template=GEMMA3_CHAT_TEMPLATE,
    end_of_turn=("<end_of_turn>",),
)
_QWEN3 = _llama_family("qwen3", permuted=False)
_QWEN3.config_from_gguf = _qwen3_from_gguf

BUILTIN_ARCHITECTURES: dict[str, Architecture] = {
    # llama.cpp's converter permutes q/k rows for Llama and Mistral, not for the NEOX-rope families
    # (Qwen2/3, Phi-3, Gemma 3)
    "llama": _llama_family("llama", permuted=True),
    "mistral": _llama_family("mistral", permuted=True),
    "qwen2": _llama_family("qwen2", permuted=False),
    "qwen3": _QWEN3,
    "phi3": _PHI3,
    "gemma3": _GEMMA3,  # HF's model_type for the text model is gemma3_text; "gemma3" is multimodal
    "gemma3_text": _GEMMA3,
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
