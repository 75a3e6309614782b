"""Graph exports (ONNX, torch.export) of the model with its KV cache as inputs and outputs.

The exported step takes the new tokens and the keys/values of every earlier position and returns
the logits and the keys/values extended by the new tokens, so a runtime decodes step by step
without recomputing the prompt (the layout Hugging Face Optimum's decoder exports use:
``past_key_values.{i}.key`` in, ``present.{i}.key`` out, each (batch, kv_heads, length, head_dim)).

The step is written here, over the model's own submodules (projections, norms, rope, MLP), rather
than tracing ``Transformer.forward``: that one writes into a preallocated ``KVCache`` in place,
which graph exporters cannot express as an input/output pair. Attention is spelled out as
matmul + softmax so that every runtime has the ops; parity with llmkit's logits is tested.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from llmkit.export import ExportError


def _kv_step(model, input_ids: torch.Tensor, pasts: list[tuple[torch.Tensor, torch.Tensor]]):
    """input_ids (B, T), pasts [(k, v)] each (B, Hk, P, D) -> logits (B, T, V), presents (B, Hk, P+T, D)."""
    from llmkit.model import apply_rope

    c = model.config
    b, t = input_ids.shape
    p = pasts[0][0].shape[2]
    positions = torch.arange(t, device=input_ids.device) + p  # (T,)
    x = model.embed(input_ids)
    if c.position == "learned":
        x = x + model.pos_embed(positions)[None]
    cos = sin = None
    if c.position == "rope":
        freqs = positions[:, None].float() * model.inv_freq  # (T, rot/2)
        cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    # additive mask (T, P+T): a query sees keys at positions up to its own (and within the window)
    key_pos = torch.arange(p + t, device=input_ids.device)
    allowed = key_pos[None, :] <= positions[:, None]
    if c.sliding_window:
        allowed = allowed & (key_pos[None, :] > positions[:, None] - c.sliding_window)
    bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
    presents = []
    for block, (past_k, past_v) in zip(model.layers, pasts):
        a = block.attn
        h = block.attn_norm(x)
        q = a.q_proj(h).view(b, t, a.h, a.d)
        k = a.k_proj(h).view(b, t, a.hk, a.d)
        v = a.v_proj(h).view(b, t, a.hk, a.d)
        if a.rot:
            q, k = apply_rope(q, cos, sin, a.rot), apply_rope(k, cos, sin, a.rot)
        k = torch.cat((past_k, k.transpose(1, 2)), dim=2)  # (B, Hk, P+T, D)
        v = torch.cat((past_v, v.transpose(1, 2)), dim=2)
        presents.append((k, v))
        if a.h != a.hk:
            k = k.repeat_interleave(a.h // a.hk, dim=1)
            v = v.repeat_interleave(a.h // a.hk, dim=1)
        scores = q.transpose(1, 2) @ k.transpose(2, 3) * (1.0 / math.sqrt(a.d)) + bias  # (B, H, T, P+T)
        y = scores.softmax(-1) @ v  # (B, H, T, D)
        x = x + a.o_proj(y.transpose(1, 2).reshape(b, t, a.h * a.d))
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x)).float(), presents


class _FlatKV(nn.Module):
    """forward(input_ids, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...): one tensor per name, for ONNX."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *past):
        pasts = list(zip(past[0::2], past[1::2]))
        logits, presents = _kv_step(self.model, input_ids, pasts)
        return (logits, *[t for kv in presents for t in kv])


class _StackedKV(nn.Module):
    """forward(input_ids, past_keys, past_values) with (layers, B, Hk, P, D) caches, for torch.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_keys, past_values):
        logits, presents = _kv_step(self.model, input_ids, list(zip(past_keys.unbind(0), past_values.unbind(0))))
        return logits, torch.stack([k for k, _ in presents]), torch.stack([v for _, v in presents])


def _plain_float_model(model, fmt: str):
    from llmkit.model import Transformer

    if type(model) is not Transformer:
        raise ExportError(
            f"the {fmt} export knows llmkit's Transformer; {type(model).__name__} (from a plugin's build_model) "
            "needs its own exporter, registered through the register_exporters hook"
        )
    c = model.config
    unusual = [what for what, on in (("q/k norms", c.qk_norm), ("norms after each sublayer", c.sandwich_norm),
                                     ("Gemma's norms and embedding scale", c.embed_scale or c.norm == "offset_rmsnorm"),
                                     ("its own attention scale", c.attention_scale is not None),
                                     ("layers with different attention windows", c.layer_types is not None),
                                     ("LongRoPE", (c.rope_scaling or {}).get("rope_type") == "longrope")) if on]
    if unusual:
        raise ExportError(f"the {fmt} export does not yet write {c.architecture}'s layer ({', '.join(unusual)}); "
                          "export it as hf or gguf instead")
    params = list(model.parameters())
    if all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
        return model
    return copy.deepcopy(model).float().cpu()  # export in float32 on the CPU; the caller's model is unchanged


def _example(model, batch=2, new=3, past=2):  # sizes > 1: exporters specialise 1
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, new))
    kv = torch.zeros(batch, c.num_kv_heads, past, c.head_dim)
    return ids, kv


def _write_folder(out: Path, write) -> Path:
    """Write into a temporary sibling folder, then move it into place: no half-written export."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            if not out.is_dir():
                raise ExportError(f"{out} exists and is a file; this export writes a folder")
            shutil.rmtree(out)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an export is an ordinary folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _describe(model, tokenizer, fmt: str, file: str, inputs, outputs, kv_layout: str) -> dict:
    c = model.config
    return {
        "format": fmt,
        "file": file,
        "inputs": inputs,
        "outputs": outputs,
        "kv_layout": kv_layout,
        "num_layers": c.num_layers,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": sorted(tokenizer.eos_token_ids),
        "add_bos_token": tokenizer.add_bos_token,
        "config": c.to_dict(),
    }


def export_onnx(model, tokenizer, out: Path, quantize=None) -> Path:
    """ONNX (opset 17) with per-layer cache inputs ``past_key_values.{i}.key|value`` and outputs
    ``present.{i}.key|value``; batch, new-token and past lengths are dynamic (past may be 0)."""
    import warnings

    model = _plain_float_model(model, "onnx")
    n = model.config.num_layers
    past_names = [f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "new_tokens"}, "logits": {0: "batch", 1: "new_tokens"}}
    axes.update({name: {0: "batch", 2: "past_length"} for name in past_names})
    axes.update({name: {0: "batch", 2: "total_length"} for name in present_names})
    ids, kv = _example(model)

    def write(folder: Path):
        # The TorchScript-based exporter (dynamo=False): it keeps an empty past (length 0, the first
        # step) dynamic and exports a small model in about a second; the dynamo exporter
        # specialises zero-sized dimensions.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _FlatKV(model).eval(), (ids, *[kv] * (2 * n)), str(folder / "model.onnx"), dynamo=False,
                input_names=["input_ids", *past_names], output_names=["logits", *present_names],
                dynamic_axes=axes, opset_version=17, do_constant_folding=True,
            )
        tokenizer.save(folder)
        info = _describe(model, tokenizer, "onnx", "model.onnx", ["input_ids", *past_names],
                         ["logits", *present_names], "(batch, kv_heads, length, head_dim) per layer")
        (folder / "export.json").write_text(json.dumps(info, indent=2) + "\n")

    return _write_folder(out, write)


def export_pt2(model, tokenizer, out: Path, quantize=None) -> Path:
    """A ``torch.export`` program (``model.pt2``): ``torch.export.load(path).module()(input_ids,
    past_keys, past_values)`` with caches (layers, batch, kv_heads, length, head_dim) returns
    (logits, present_keys, present_values). Needs torch only, not llmkit."""
    from torch.export import Dim

    model = _plain_float_model(model, "pt2")
    c = model.config
    ids, kv = _example(model)
    past = torch.zeros(c.num_layers, *kv.shape)
    batch = Dim("batch", min=1, max=1024)
    new = Dim("new_tokens", min=1, max=c.max_position_embeddings)
    plen = Dim("past_length", min=0, max=c.max_position_embeddings)
    shapes = {"input_ids": {0: batch, 1: new}, "past_keys": {1: batch, 3: plen}, "past_values": {1: batch, 3: plen}}
    with torch.no_grad():
        program = torch.export.export(_StackedKV(model).eval(), (ids, past, past.clone()), dynamic_shapes=shapes)

    def write(folder: Path):
        torch.export.save(program, str(folder / "model.pt2"))
        tokenizer.save(folder)
        info = _describe(model, tokenizer, "pt2", "model.pt2", ["input_ids", "past_keys", "past_values"],
                         ["logits", "present_keys", "present_values"],
                         "(layers, batch, kv_heads, length, head_dim)")
        (folder / "export.json").write_text(json.dumps(info, indent=2) + "\n")

    return _write_folder(out, write)
