"""ModelConfig: one serializable dataclass that drives every architecture llmkit runs.

Formats derive it from a checkpoint's own metadata (HF ``config.json``, GGUF keys), never from a
file name. It round-trips through JSON: only plain values, names rather than classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    # identity
    architecture: str = "llama"  # registry key: llama, mistral, qwen2, qwen3, phi3, gemma3, gpt2, ...
    name: str = ""
    # sizes
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_position_embeddings: int = 2048
    # switches that select the block's parts
    norm: str = "rmsnorm"  # rmsnorm | offset_rmsnorm (scales by 1 + weight: Gemma) | layernorm
    norm_eps: float = 1e-5
    sandwich_norm: bool = False  # each sublayer's output normed too, before the residual add (Gemma 3)
    qk_norm: bool = False  # q and k normed per head before rope (Qwen3, Gemma 3)
    embed_scale: bool = False  # token embeddings times sqrt(hidden_size) (Gemma)
    mlp: str = "swiglu"  # swiglu (gate/up/down) | gelu (fc/proj)
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict (linear, llama3, longrope)
    rope_local_theta: float | None = None  # rope base of the sliding-window layers, unscaled (Gemma 3)
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False  # bias on q, k, v (Qwen2: True)
    attention_out_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None  # attention window (Mistral); None: full causal
    # per layer "sliding_attention" (within sliding_window) or "full_attention" (Gemma 3's local
    # and global layers); None: every layer alike
    layer_types: list[str] | None = None
    attention_scale: float | None = None  # scores multiplier; None: head_dim ** -0.5
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys kept for round-trips

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            kinds = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if kinds or len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types must name one of sliding_attention, full_attention for each of the "
                                 f"{self.num_layers} layers; got {self.layer_types}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends within ``sliding_window`` only."""
        if self.layer_types is None:
            return bool(self.sliding_window)
        return bool(self.sliding_window) and self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:
            kwargs["extra"] = {**kwargs.get("extra", {}), **extra}
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
