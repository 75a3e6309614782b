"""Weight-only int8 / int4 quantization: a transform on a loaded model that swaps ``nn.Linear``
modules for quantized ones, in place (gpt-fast style), so ``Transformer.forward``, the KV cache and
``llmkit.api.LLM`` run unchanged.

- ``"int8"``: per-output-channel symmetric scales, ``torch.ops.aten._weight_int8pack_mm``.
- ``"int4"``: group-wise asymmetric (min/max) scales and zero points, group 32 by default,
  ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``.
- ``"none"``: returns the model unchanged.

These kernels are many times faster with bfloat16 activations than with float32 ones
(bench/NOTES.md), so each module casts its input to bfloat16 at the op and casts the result back
to the input dtype; the residual stream, norms, attention and the KV cache stay float32.

The kernels are CPU kernels: a model with parameters on another device raises ``QuantizationError``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LLMKitError

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
DEFAULT_INT4_GROUP = 32

# Prefill (many rows per call): the bf16-activation kernels beat float32 MKL for a few rows, and
# float32 wins from several dozen rows on (bench/NOTES.md). For int8 a float32 path needs only a
# transient cast of the int8 weight (freed after the call; a cached float copy would undo the
# memory saving), so Int8Linear switches to "cast the weight, use MKL, scale the output" from
# FLOAT_PATH_ROWS rows per call on (a prompt chunk, not decode: even 16 streams decode with 16
# rows). The int4 packed layout is opaque (a kernel-private nibble order), so a float path would
# need a second, unpacked copy of the weights; the int4 kernel stays close to float32 at prompt
# sizes, so int4 always uses its kernel.
FLOAT_PATH_ROWS = 128
# int4 range search (shrink each group's [min, max] when that lowers its squared error) made
# perplexity worse (bench/NOTES.md): the clipped outliers matter more than the finer steps. So the
# plain min/max grid (ratio 1.0) only.
CLIP_RATIOS = (1.0,)
HEAD_MODE = "int8"  # what head=True means, in both modes: see quantize_model


class QuantizationError(LLMKitError, ValueError):
    """A quantization request that cannot be carried out (unknown mode, group size, device)."""


def _bf16_round(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bfloat16, back in float32: quantize against the scales the kernel will see."""
    return t.to(torch.bfloat16).float()


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, q int8 (N, K), one bfloat16 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.float_path_rows = FLOAT_PATH_ROWS

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        scale = _bf16_round(w.abs().amax(dim=1).clamp(min=1e-8) / 127.0)
        m.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        m.scales.copy_(scale.to(torch.bfloat16))
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= self.float_path_rows:  # prefill: float32 MKL beats the kernel here
            y = F.linear(x2.float(), self.weight.float()) * self.scales.float()
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """Group-wise asymmetric 4-bit weights: w = (q - 8) * scale + zero per group of ``group_size``
    input columns (the kernel's convention, checked by experiment in torch 2.13), q in 0..15."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # packed (N, K/2) uint8 in the kernel's own (blocked) nibble order
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        # (K/group, N, 2): scale and zero point per group, bfloat16, as the kernel takes them
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @staticmethod
    def quantize_weight(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """w (N, K) float -> (q int32 (N, K) in 0..15, scales_and_zeros (K/g, N, 2) bfloat16)."""
        n, k = w.shape
        g = w.float().reshape(n, k // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        best_err = best_q = best_scale = best_zero = None
        # Range search: per group, shrink [lo, hi] towards its middle when that lowers the squared
        # reconstruction error (an outlier then saturates instead of coarsening the other 31 steps).
        # CLIP_RATIOS is set from measurement; ratio 1.0 alone is the plain min/max grid.
        for ratio in CLIP_RATIOS:
            mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
            scale = _bf16_round((2 * half / 15.0).clamp(min=1e-8))
            zero = _bf16_round(mid - half + 8.0 * scale)
            # quantize against the bf16-rounded scale and zero, so their rounding is partly absorbed
            q = torch.round((g - zero[..., None]) / scale[..., None] + 8.0).clamp(0, 15)
            err = ((q - 8.0) * scale[..., None] + zero[..., None] - g).pow(2).sum(-1)
            if best_err is None:
                best_err, best_q, best_scale, best_zero = err, q, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_q = torch.where(better[..., None], q, best_q)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        sz = torch.stack([best_scale, best_zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return best_q.to(torch.int32).reshape(n, k), sz

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        m = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None)
        q, sz = cls.quantize_weight(linear.weight.detach(), group_size)
        m.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        m.scales_and_zeros = sz
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


def int4_group_for(linear: nn.Linear, group_size: int) -> tuple[int | None, str]:
    """The group size to use for this layer (the asked one, else the largest smaller valid one that
    divides in_features), or (None, reason) when the layer must stay float."""
    k, n = linear.in_features, linear.out_features
    if n % 16:
        return None, f"out_features {n} is not a multiple of 16 (the int4 kernel's tile)"
    for g in [group_size] + [s for s in sorted(INT4_GROUP_SIZES, reverse=True) if s < group_size]:
        if k % g == 0:
            return g, "" if g == group_size else f"group {group_size} does not divide in_features {k}: used {g}"
    return None, f"no int4 group size in {INT4_GROUP_SIZES} up to {group_size} divides in_features {k}"


def _is_block_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("layers.")


def quantize_model(model: nn.Module, mode: str, group_size: int | None = None, *,
                   head: bool | str = True,
                   predicate: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Quantize the model's linear layers in place and return the model.

    mode: "int8" (per-channel), "int4" (group-wise, ``group_size`` 32 by default; one of
    32/64/128/256), or "none". ``predicate(name, module)`` picks the layers (default: every
    ``nn.Linear`` of the transformer blocks); ``head`` also quantizes ``lm_head``.

    ``head``: True (the default) makes ``lm_head`` int8 in both modes; "int8" / "int4" choose,
    False leaves it float. Why: in SmolLM2-135M the tied 49152x576 head is a fifth of all weights,
    all read for every decoded token. As its own quantized module (the embedding stays float: a
    lookup reads one row per token) it speeds decode up; an int4 head is faster still but costs
    far more perplexity than an int8 one (the GGUF's embedding is Q8_0, so 4 bits lose real
    information there). Figures: bench/NOTES.md.

    Layers that cannot be quantized (int4: out_features not a multiple of 16, or no valid group
    size dividing in_features) stay float; ``model.quantization["skipped"]`` says which and why.
    """
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    if mode == "int8" and group_size is not None:
        raise QuantizationError("int8 quantization is per output channel: it takes no group_size")
    if mode == "int4":
        group_size = DEFAULT_INT4_GROUP if group_size is None else group_size
        if group_size not in INT4_GROUP_SIZES:
            raise QuantizationError(
                f"int4 group size {group_size} is not supported: choose one of {INT4_GROUP_SIZES}")
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"}:
        raise QuantizationError(
            f"int8/int4 weight-only quantization uses torch's CPU kernels, but the model is on "
            f"{', '.join(sorted(devices - {'cpu'}))}: load it on the CPU (device='cpu') to quantize it, "
            f"or run it unquantized (bfloat16) on the GPU")
    if getattr(model, "quantization", None):
        raise QuantizationError(f"the model is already quantized ({model.quantization['mode']})")

    pick = predicate or _is_block_linear
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pick(name, m)]
    head_mode = HEAD_MODE if head is True else (head or None)
    if head_mode not in (None, "int8", "int4"):
        raise QuantizationError(f"head must be True, False, 'int8' or 'int4', not {head!r}")
    targets = [(n, m) for n, m in targets if n != "lm_head"]
    if head_mode and isinstance(getattr(model, "lm_head", None), nn.Linear):
        targets.append(("lm_head", model.lm_head))

    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name, linear in targets:
        layer_mode = head_mode if name == "lm_head" else mode
        if layer_mode == "int8":
            new = Int8Linear.from_linear(linear)
        else:
            g, reason = int4_group_for(linear, group_size or DEFAULT_INT4_GROUP)
            if g is None:
                skipped[name] = reason
                log.info("int4: %s stays float: %s", name, reason)
                continue
            if reason:
                notes[name] = reason
            new = Int4Linear.from_linear(linear, g)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # replacing lm_head unties it from the embedding: the embedding keeps its float weight
        setattr(parent, attr, new)
    model.quantization = {"mode": mode, "group_size": group_size, "head": head_mode,
                          "skipped": skipped, "notes": notes}
    return model
