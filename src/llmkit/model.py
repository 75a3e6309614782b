"""The transformer: one readable nn.Module for the Llama family (Llama, Mistral, Qwen2/3, Phi-3),
Gemma 3 and GPT-2, switched by config fields: each family's difference is a field and a small branch.

Pure PyTorch: no file I/O, no transformers import. Checkpoint name maps live in ``llmkit.formats``.
The heavy operations (linears, norms, embeddings, one-query attention) go through an ``Ops`` object:
the default is plain PyTorch, the arithmetic training, export and reference logits use; the
engine's executor passes its own (packed or quantized weights, native kernels) and keeps whatever
it derives from the model in that object, so the module itself never changes behaviour.
Shapes in comments: B batch, T new tokens, L cached length, H heads, Hk kv heads, D head dim, C hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import ModelConfig


class KVCache(nn.Module):
    """Keys and values for ``slots`` sequences, allocated once and written at positions.

    Layout per layer: (slots, Hk, max_len, D): writing T new tokens of B sequences is one indexed
    assignment, and a run of slots read up to a length is a view, not a gather (CPU bmm is a
    little slower on such a view than on a compact batch, but attending over the whole row,
    masked, is slower still: bench/NOTES.md). Positions are written from 0 upwards per slot;
    stale entries past a sequence's current position are never read because the attention
    mask hides key positions greater than the query's.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype=torch.float32, device=None):
        super().__init__()
        shape = (config.num_layers, slots, config.num_kv_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len
        self.slots = slots

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write k, v (B, T, Hk, D) at (slots, positions)."""
        self.k[layer][slots[:, None], :, positions] = k
        self.v[layer][slots[:, None], :, positions] = v

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, length: int, span: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, Hk, D) at (slots, positions); return (B, Hk, length, D) to attend to.

        ``span`` (first, last + 1) says the slots are consecutive: the result is then a view of
        the cache, not a gathered copy (the engine hands out the lowest free slots to keep it so).
        """
        self.write(layer, slots, positions, k, v)
        if span is not None:
            return self.k[layer, span[0] : span[1], :, :length], self.v[layer, span[0] : span[1], :, :length]
        return self.k[layer][slots, :, :length], self.v[layer][slots, :, :length]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # HF's exact steps, float32 inside
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight), its weights stored around 0, and multiplies in
    float32 before casting back (HF's order). A class of its own so that nothing mistakes it for
    RMSNorm (an executor's fused rms_norm would scale by the weight alone)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class Ops:
    """How the model runs its heavy operations; this default is plain PyTorch.

    An executor subclasses it and passes an instance to ``Transformer.forward_many``: its own
    matmuls for a group of linears that read the same input (q/k/v, gate/up), its own norm and
    embedding lookup, and a kernel for one-query-per-sequence attention over the cache.
    """

    def linear(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each module applied to x (modules that read the same input come together)."""
        return tuple(m(x) for m in modules)

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def embed(self, module: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        return module(tokens)

    def decode_plan(self, slots: torch.Tensor, positions: torch.Tensor, cache: "KVCache",
                    config: ModelConfig, dtype: torch.dtype):
        """For rows of one new token per sequence: whatever ``decode_attention`` needs, or None
        to attend with the masked torch path."""
        return None

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        """q (B, H, D) against the cache's k/v (slots, Hk, L, D) of one layer -> (B, H, D)."""
        raise NotImplementedError


PLAIN = Ops()


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "offset_rmsnorm":
        return OffsetRMSNorm(dim, config.norm_eps)
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    raise ValueError(f"unknown norm {config.norm!r}")


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rope_kind(config: ModelConfig) -> str:
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    return "longrope" if kind == "su" else kind  # "su": Phi-3's first name for it


def rope_inv_freq(config: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with the checkpoint's rope scaling applied.
    ``local``: those of the sliding-window layers where they have their own base (Gemma 3:
    unscaled). ``long``: LongRoPE's factors for sequences past the original context."""
    dim = config.rotary_dim
    theta = config.rope_local_theta if local else config.rope_theta
    # on the CPU whatever the default device: under torch.device("meta") (building a model before
    # its weights are read) arange takes a reference path that imports torch's compiler, seconds
    # of load time
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = {} if local else (config.rope_scaling or {})
    kind = "default" if local else rope_kind(config)
    if kind == "default":
        pass
    elif kind == "longrope":
        # Phi-3 (LongRoPE, arXiv:2402.13753): a factor per frequency, the short set up to the
        # original context and the long set past it
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64, device="cpu")
        inv_freq = inv_freq / factors
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, blended, inv_freq)
    else:
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear, llama3, longrope)")
    return inv_freq.float()


def longrope_original_length(config: ModelConfig) -> int:
    scaling = config.rope_scaling or {}
    return int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: 1, except LongRoPE's attention factor (given, or from
    how far the context was extended)."""
    if rope_kind(config) != "longrope":
        return 1.0
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = longrope_original_length(config)
    factor = scaling.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    """Rotate the first ``rot`` dims of x (B, T, H, D) in the half-split layout HF checkpoints use.

    cos, sin (B, T, 1, rot/2); or, when every dim rotates, the whole-width form (B, T, 1, D) that
    ``rope_tables`` makes: cat(cos, cos) and cat(-sin, sin). Then one roll replaces the split,
    the two products per half and the cat: 4 ops instead of 8, the same numbers."""
    if cos.shape[-1] == x.shape[-1]:
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, xp), dim=-1) if xp.shape[-1] else rotated


# Decode steps (a query or a few per sequence) on CPU: two batched matmuls and a float32 softmax.
# PyTorch's CPU flash-attention kernel is built for long queries: for a few queries per sequence
# it cost more than all of a layer's matmuls together (bench/NOTES.md); this path takes a fraction.
SMALL_QUERY = 16


def small_query_attention(q, k, v, mask):
    """q (B, H, T, D), k/v (B, Hk, L, D), mask (B or 1, 1, T, L) bool, or float to add (0 or -inf),
    or None -> (B, H, T, D). Grouped-query heads are folded into the query rows, so k and v are
    never repeated."""
    b, h, t, d = q.shape
    hk = k.shape[1]
    g = h // hk
    qg = q.reshape(b, hk, g * t, d)  # the g query heads that share a kv head, T rows each
    # k (a view of the cache, rows of D) as the left operand: no copy of the keys (q @ k^T
    # copies them)
    scores = torch.matmul(k, qg.transpose(-1, -2)).transpose(-1, -2).float() * (d ** -0.5)  # (B, Hk, G*T, L)
    if mask is not None and t > 1:  # the query rows are (g, t): repeat the mask over g
        mask = mask.expand(b, 1, t, mask.shape[-1])[:, :, None].expand(b, 1, g, t, mask.shape[-1])
        mask = mask.reshape(b, 1, g * t, -1)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # an additive mask: one add, against two ops for a bool one
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, t, d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c, h, hk, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(c, h * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(c, hk * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(c, hk * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(h * d, c, bias=config.attention_out_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # over each head's D values (Qwen3, Gemma 3)
            self.q_norm = make_norm(config, d)
            self.k_norm = make_norm(config, d)
        self.h, self.hk, self.d = h, hk, d
        self.rot = config.rotary_dim if config.position == "rope" else 0
        # A scale other than 1/sqrt(D) (Gemma's query_pre_attn_scalar) is folded into q, so that
        # every attention path (SDPA, the small-query path, executors' kernels) keeps its default.
        scale = config.attention_scale
        self.q_scale = None if scale is None or math.isclose(scale, d ** -0.5) else scale * math.sqrt(d)

    def project(self, x, rope, ops: Ops = PLAIN):
        """q (B, T, H, D), k and v (B, T, Hk, D) for x (B, T, C): normed, scaled and rotated."""
        b, t, _ = x.shape
        q, k, v = ops.linear((self.q_proj, self.k_proj, self.v_proj), x)
        q, k, v = q.view(b, t, self.h, self.d), k.view(b, t, self.hk, self.d), v.view(b, t, self.hk, self.d)
        if self.qk_norm:
            q, k = ops.norm(self.q_norm, q), ops.norm(self.k_norm, k)
        if self.q_scale is not None:
            q = q * self.q_scale
        if self.rot:  # q and k rotated together: half the small ops of one decode step
            q, k = apply_rope(torch.cat((q, k), dim=2), *rope, self.rot).split((self.h, self.hk), dim=2)
        return q, k, v

    def forward(self, x, rope, groups: list["Rows"], cache: KVCache | None, layer: int, ops: Ops):
        """x (B, T, C) for one group of rows, or (1, N, C) for several (see Transformer.forward_many)."""
        q, k, v = self.project(x, rope, ops)
        if len(groups) == 1:
            y = self._attend(q, k, v, groups[0], cache, layer, ops)
        else:  # each group's rows attend within their own sequences
            def rows(z, g):
                return z[0, g.start : g.start + g.b * g.t].reshape(g.b, g.t, *z.shape[2:])
            y = torch.cat([self._attend(rows(q, g), rows(k, g), rows(v, g), g, cache, layer, ops)
                           .reshape(-1, self.h * self.d) for g in groups])[None]
        return ops.linear((self.o_proj,), y)[0]

    def _attend(self, q, k, v, g: "Rows", cache: KVCache | None, layer: int, ops: Ops) -> torch.Tensor:
        """q (b, t, H, D), k/v (b, t, Hk, D) of one group -> (b, t, H * D)."""
        b, t = q.shape[:2]
        if g.decode is not None:  # one query per sequence: the executor's kernel (Ops.decode_plan)
            cache.write(layer, g.slots, g.positions, k, v)
            y = ops.decode_attention(q[:, 0], cache.k[layer], cache.v[layer], g.decode)
            return y.reshape(b, 1, self.h * self.d)
        if cache is not None:  # (b, Hk, L, D)
            k, v = cache.update(layer, g.slots, g.positions, k.to(cache.k.dtype), v.to(cache.v.dtype), g.length, g.span)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q, k, v = q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype)
        if t <= SMALL_QUERY and (not q.is_cuda or g.fixed):  # on CUDA too for a fixed shape: no SDPA dispatch
            y = small_query_attention(q, k, v, g.mask)
        else:  # (B, H, T, D) x (B, Hk, L, D): grouped-query attention without copying k/v per head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, is_causal=g.causal,
                                               enable_gqa=self.h != self.hk)
        return y.transpose(1, 2).reshape(b, t, self.h * self.d)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(c, f, bias=bias)
        self.up_proj = nn.Linear(c, f, bias=bias)
        self.down_proj = nn.Linear(f, c, bias=bias)
        self.act = _ACTIVATIONS[config.activation]

    def forward(self, x, ops: Ops = PLAIN):
        if self.gated:
            gate, up = ops.linear((self.gate_proj, self.up_proj), x)
            h = self.act(gate) * up
        else:
            h = self.act(ops.linear((self.up_proj,), x)[0])
        return ops.linear((self.down_proj,), h)[0]


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.sandwich = config.sandwich_norm
        if self.sandwich:  # Gemma 3: each sublayer's output is normed before the residual add
            self.attn_out_norm = make_norm(config)
            self.mlp_out_norm = make_norm(config)

    def forward(self, x, rope, groups, cache, layer, ops: Ops = PLAIN):
        h = self.attn(ops.norm(self.attn_norm, x), rope, groups, cache, layer, ops)
        x = x + (ops.norm(self.attn_out_norm, h) if self.sandwich else h)
        h = self.mlp(ops.norm(self.mlp_norm, x), ops)
        return x + (ops.norm(self.mlp_out_norm, h) if self.sandwich else h)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Embeddings start uninitialised (``_weight``): loaders overwrite them, and normal_ on the
        # meta device costs a second of one-time imports. Training from scratch calls init_weights().
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size,
                                  _weight=torch.empty(config.vocab_size, config.hidden_size))
        if config.position == "learned":
            self.pos_embed = nn.Embedding(
                config.max_position_embeddings, config.hidden_size,
                _weight=torch.empty(config.max_position_embeddings, config.hidden_size))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Layers differ at most in how they attend: within the sliding window or not (Gemma 3's
        # local and global layers, each kind with its own rope). One mask and rope table per kind.
        self.layer_kinds = ["sliding" if config.is_sliding(i) else "full" for i in range(config.num_layers)]
        self.kinds = sorted(set(self.layer_kinds))
        self.tie_weights()
        self.init_buffers()

    def init_weights(self, std: float = 0.02) -> None:
        """Random initial weights for training from scratch (GPT-2 style: normal(0, std), zero biases,
        unit norms)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, OffsetRMSNorm):  # scales by 1 + weight
                nn.init.zeros_(module.weight)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_buffers(self, device=None) -> None:
        """(Re)compute non-persistent buffers, e.g. after building on the meta device."""
        c = self.config
        if c.position == "rope":
            self.rope_factor = rope_attention_factor(c)
            self.register_buffer("inv_freq", rope_inv_freq(c).to(device), persistent=False)
            if rope_kind(c) == "longrope":
                self.register_buffer("inv_freq_long", rope_inv_freq(c, long=True).to(device), persistent=False)
            if c.rope_local_theta is not None and "sliding" in self.kinds:
                self.register_buffer("inv_freq_local", rope_inv_freq(c, local=True).to(device), persistent=False)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype, kind: str = "full"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for apply_rope at positions (B, T) for the layers of ``kind``: (B, T, 1, D)
        whole-width when every head dim rotates, else (B, T, 1, rot/2)."""
        c = self.config
        inv_freq, factor = self.inv_freq, self.rope_factor
        if kind == "sliding" and c.rope_local_theta is not None:
            inv_freq, factor = self.inv_freq_local, 1.0
        elif hasattr(self, "inv_freq_long"):
            # LongRoPE: the long factors for a sequence whose furthest position in this pass is past
            # the original context (as transformers decides for one sequence), else the short ones
            long = positions.amax(dim=-1, keepdim=True)[..., None] >= longrope_original_length(c)  # (B, 1, 1)
            inv_freq = torch.where(long, self.inv_freq_long, self.inv_freq)
        freqs = positions[..., None].float() * inv_freq  # (B, T, rot/2)
        cos, sin = freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        if c.rotary_dim == c.head_dim:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype), sin.to(dtype)

    def new_cache(self, slots: int = 1, max_len: int | None = None, dtype=None) -> KVCache:
        """A cache in the model's own dtype unless ``dtype`` says otherwise."""
        device, dtype = self.norm.weight.device, dtype or self.norm.weight.dtype  # the embedding may be held elsewhere (quantized)
        return KVCache(self.config, slots, max_len or self.config.max_position_embeddings, dtype, device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with ``last_only``.

        positions (B, T): each token's index in its sequence (default 0..T-1). With a cache, the new
        keys and values are written at those positions of the given cache slots (default 0..B-1)
        and each token attends to its slot's positions up to its own.
        """
        return self.forward_many([(tokens, positions, slots)], cache, last_only)[0]

    def forward_many(self, batches: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
                     cache: KVCache | None = None, last_only: bool = False, ops: Ops = PLAIN,
                     logits: bool = True, fixed_length: int | None = None) -> list[torch.Tensor]:
        """Several batches, each (tokens (b, t), positions or None, slots or None) as ``forward``
        takes them, in one pass: the matmuls run once over all their rows (the weights are read
        once), attention per batch. How a prompt chunk (1, T) rides along with decode steps (B, 1).
        Returns each batch's logits as ``forward`` would. ``ops``: how the heavy operations run
        (see Ops; an executor passes its own). ``logits=False``: the final hidden states after the
        last norm instead, without the vocabulary projection. ``fixed_length``: every row attends
        to that many cache positions of its slot, masked by position, and nothing is read back to
        the host: the same kernels whatever the positions, so a captured CUDA graph can replay the
        pass (see engine.cuda_graphs)."""
        rope_on = self.config.position == "rope"
        groups = {kind: [] for kind in self.kinds}  # per layer kind: each batch's Rows
        ropes = {kind: [] for kind in self.kinds}
        xs, start = [], 0
        for tokens, positions, slots in batches:
            b, t = tokens.shape
            if positions is None:
                positions = torch.arange(t, device=tokens.device).expand(b, t)
            x = ops.embed(self.embed, tokens)
            if self.config.embed_scale:  # Gemma: sqrt(C), rounded to the activations' dtype as HF does
                x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
            for kind in self.kinds:
                groups[kind].append(self._rows(start, positions, slots, cache, x.dtype, ops, kind, fixed_length))
                if rope_on:
                    ropes[kind].append(self.rope_tables(positions, x.dtype, kind))
            start += b * t
            if self.config.position == "learned":
                x = x + self.pos_embed(positions)
            xs.append(x)
        if len(xs) == 1:
            x = xs[0]
            rope = {kind: (r[0] if r else None) for kind, r in ropes.items()}
        else:  # all rows side by side: (1, N, C), and the rope tables likewise
            def flat(parts):
                return torch.cat([p.reshape(-1, *p.shape[2:]) for p in parts])[None]
            x = flat(xs)
            rope = {kind: (flat([t[0] for t in r]), flat([t[1] for t in r])) if r else None
                    for kind, r in ropes.items()}
        for i, layer in enumerate(self.layers):
            kind = self.layer_kinds[i]
            x = layer(x, rope[kind], groups[kind], cache, i, ops)

        def head(h: torch.Tensor) -> torch.Tensor:
            h = ops.norm(self.norm, h)
            return ops.linear((self.lm_head,), h)[0].float() if logits else h

        if len(xs) == 1:
            return [head(x[:, -1:] if last_only else x)]
        rows = groups[self.kinds[0]]
        outs = [x[0, g.start : g.start + g.b * g.t].view(g.b, g.t, -1) for g in rows]
        outs = [o[:, -1:] if last_only else o for o in outs]
        logits = head(torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]))
        return [part.view(o.shape[0], o.shape[1], -1)
                for part, o in zip(logits.split([o.shape[0] * o.shape[1] for o in outs]), outs)]

    def _rows(self, start: int, positions: torch.Tensor, slots: torch.Tensor | None,
              cache: KVCache | None, dtype: torch.dtype, ops: Ops, kind: str,
              fixed_length: int | None = None) -> "Rows":
        """How one batch's rows attend in the layers of ``kind``: its cache slots, the key length,
        and the mask or, for one new token per sequence where the executor has a kernel for it,
        that kernel's plan (Ops.decode_plan). ``fixed_length``: see forward_many."""
        b, t = positions.shape
        device = positions.device
        span = None
        fixed = cache is not None and fixed_length is not None
        if cache is not None:
            if slots is None:
                slots = torch.arange(b, device=device)
            if fixed:  # the shape decided by the caller: no value read back from the device
                length = fixed_length
            else:
                first = int(slots[0])
                if b == 1 or torch.equal(slots, torch.arange(first, first + b, device=device)):
                    span = (first, first + b)
                length = int(positions.max()) + 1
            key_pos = torch.arange(length, device=device)
        else:
            length = t
            key_pos = positions  # (B, T): the keys are the new tokens themselves
        window = self.config.sliding_window if kind == "sliding" else None
        if cache is not None and t == 1 and not fixed:
            decode = ops.decode_plan(slots, positions, cache, self._kind_config(kind), dtype)
            if decode is not None:
                return Rows(start, b, t, slots, positions, length, span, None, decode)
        # mask (B, 1, T, L): a query sees keys at positions up to its own (and within the window)
        kp = key_pos.view(1, 1, -1) if key_pos.dim() == 1 else key_pos[:, None, :]
        qp = positions[:, :, None]
        causal = False
        if b == 1 and t == 1 and (not window or length <= window) and not fixed:
            mask = None  # one new token that sees every cached key: no mask, SDPA's fastest path
        elif self._from_start(positions, length, window) and (t > SMALL_QUERY or device.type == "cuda"):
            mask, causal = None, True  # SDPA's causal form: it skips the masked half (flash on CUDA)
        else:
            mask = kp <= qp
            if window:
                mask = mask & (kp > qp - window)
            mask = mask[:, None]
            if t <= SMALL_QUERY and (positions.device.type != "cuda" or fixed):  # small_query_attention adds it
                mask = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
        return Rows(start, b, t, slots, positions, length, span, mask, fixed=fixed, causal=causal)

    @staticmethod
    def _from_start(positions: torch.Tensor, length: int, window: int | None) -> bool:
        """Whether every sequence's new tokens are all it has, at positions 0..t-1, and see each
        other without a window cutting in: the plain causal mask."""
        t = positions.shape[1]
        return t > 1 and length == t and (not window or t <= window) and \
            torch.equal(positions, torch.arange(t, device=positions.device).expand_as(positions))

    def _kind_config(self, kind: str) -> ModelConfig:
        """The config an executor's decode kernel reads for the layers of ``kind``: the model's
        own, or, where layers differ, a copy whose sliding_window is that kind's."""
        if len(self.kinds) == 1:
            return self.config
        if not hasattr(self, "_kind_configs"):
            self._kind_configs = {k: replace(self.config, layer_types=None,
                                             sliding_window=self.config.sliding_window if k == "sliding" else None)
                                  for k in self.kinds}
        return self._kind_configs[kind]

    @torch.no_grad()
    def attention_probs(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention weights (B, H, T, T), in float32, of layer ``layer`` for its
        attention input x (B, T, C) at positions 0..T-1: what its forward attends with (which never
        materialises them), for inspection (llmkit.explain)."""
        attn = self.layers[layer].attn
        kind = self.layer_kinds[layer]
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device)
        rope = self.rope_tables(pos.expand(b, t), x.dtype, kind) if attn.rot else None
        q, k, _ = attn.project(x, rope)
        q, k = q.float().transpose(1, 2), k.float().transpose(1, 2)  # (B, H, T, D), (B, Hk, T, D)
        k = k.repeat_interleave(attn.h // attn.hk, dim=1)  # grouped-query: each kv head serves h/hk heads
        scores = q @ k.transpose(-1, -2) / math.sqrt(attn.d)  # any other scale is folded into q
        allowed = pos[None, :] <= pos[:, None]
        if kind == "sliding":
            allowed = allowed & (pos[None, :] > pos[:, None] - self.config.sliding_window)
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@dataclass
class Rows:
    """One batch inside a pass (Transformer.forward_many): b sequences of t new tokens each, from
    row ``start`` of the pass; where their keys go in the cache and which keys each query sees."""

    start: int
    b: int
    t: int
    slots: torch.Tensor | None
    positions: torch.Tensor
    length: int  # keys to attend to, per sequence
    span: tuple[int, int] | None  # the slots as a range (first, last + 1), when consecutive
    mask: torch.Tensor | None
    decode: object = None  # the executor's Ops.decode_plan, when its kernel attends (one query each)
    fixed: bool = False  # attends to a fixed number of positions (forward_many's fixed_length)
    causal: bool = False  # no mask: the plain causal one, from position 0 (SDPA's is_causal)
