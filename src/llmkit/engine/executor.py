"""Executors: what runs the model's forward passes for the engine.

The engine keeps scheduling, sampling, stop strings and text; an executor only turns token ids
at positions in cache slots into next-token logits. ``TorchExecutor`` runs llmkit's own model
(CPU or CUDA, quantized or not); ``llmkit.engine.llamacpp.LlamaCppExecutor`` runs GGUF files on
llama.cpp. Both give the engine the same calls (``Executor``).
"""

from __future__ import annotations

import itertools
import logging
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmkit import cpu_attention
from llmkit.engine.cuda_graphs import DecodeGraphs, GraphCaptureError
from llmkit.engine.step import DecodeStep
from llmkit.model import OffsetRMSNorm, Ops, RMSNorm
from llmkit.threads import in_fresh_thread

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the engine calls. Optional attributes: ``prompts_per_step`` (prompts that may share a
    step; no limit when absent), ``token_budget`` (cache cells shared by all slots: the engine
    admits requests while their prompt + max_tokens fit), ``fixed_slots`` (the slots the executor
    was built for; the engine never hands out more)."""

    vocab_size: int
    context_length: int

    def fit(self, length: int, slots: int = 1) -> None:
        """Size the cache for the running requests: ``length`` positions (the longest one's need)
        in slots 0..``slots``-1. Grow when needed; shrink when the long ones are gone."""

    def forward(self, chunks: list[tuple[int, list[int], int]], decodes: list[tuple[int, int, int]]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Prompt chunks (slot, ids, start) and decode tokens (slot, token, position) in one pass:
        return each chunk's last-position logits [V] and the decode rows' logits [B, V]. Several
        decode rows may share a slot at consecutive positions (speculative decoding checks its
        proposals so): each sees its slot's keys up to its own position."""

    def release(self, slot: int) -> None:
        """Forget the slot's cached keys and values."""


class PackedMatmul:
    """``x @ W.T + b`` for one or several bfloat16 ``nn.Linear`` side by side (q/k/v, gate/up), with
    W reordered once for oneDNN (``F.linear`` reorders it on every call). One call for q, k and v
    (and for gate and up) instead of three (two). Results equal F.linear's."""

    def __init__(self, linears: list[nn.Linear]):
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            biases = [m.bias for m in linears]
            self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.sizes = [m.out_features for m in linears]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        y = y.view(*x.shape[:-1], y.shape[-1])
        return (y,) if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)


def pack_linears(model: nn.Module) -> dict[tuple[int, ...], PackedMatmul]:
    """oneDNN-packed copies of the plain bfloat16 nn.Linear weights on CPU: attention q/k/v and MLP
    gate/up as one matmul each, every other linear alone. Keyed by the ids of the modules, in the
    order the model passes them to ``Ops.linear``. Empty where oneDNN lacks bfloat16 or where the
    copies would take more than a quarter of the memory available. The model is not changed."""
    def plain(m) -> bool:
        return type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"

    linears = [m for m in model.modules() if plain(m)]
    if not linears or not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return {}
    if sum(m.weight.numel() * 2 for m in linears) > _available_memory() // 4:
        return {}
    packed: dict[tuple[int, ...], PackedMatmul] = {}
    grouped: set[int] = set()
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            group = [getattr(module, n, None) for n in names]
            if all(g is not None and plain(g) for g in group) and len({g.bias is None for g in group}) == 1:
                packed[tuple(id(g) for g in group)] = PackedMatmul(group)
                grouped.update(id(g) for g in group)
    for m in linears:
        if id(m) not in grouped:
            packed[(id(m),)] = PackedMatmul([m])
    return packed


class TorchOps(Ops):
    """The torch executor's way of running the model (see model.Ops): bfloat16 linears through
    oneDNN-packed weights, the fused rms_norm, and decode attention in llmkit's C kernel
    (llmkit.cpu_attention) on CPU. What it derives from the model lives here, not in the model."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.packed = in_fresh_thread(lambda: pack_linears(model))  # see llmkit.threads
        self.kernel = device.type == "cpu" and cpu_attention.available()  # built on first use, once
        # LoRA adapters served beside the base: name -> {id(linear): (A^T [in, r], scaling * B^T [r, out])}
        self.adapters: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.row_groups: list[tuple[str, torch.Tensor]] = []  # this pass: (adapter, its rows), set per pass

    def linear(self, modules, x):
        packed = self.packed.get(tuple(map(id, modules))) if x.dtype == torch.bfloat16 else None
        outs = packed(x) if packed is not None else tuple(m(x) for m in modules)
        return self._lora(modules, x, outs) if self.row_groups else outs

    def _lora(self, modules, x, outs):
        """Each row's own adapter update on top of the base matmul, which ran once for all rows:
        y[rows] += (x[rows] @ A^T) @ (scaling * B^T), per adapter present in this pass."""
        flat = x.reshape(-1, x.shape[-1])
        outs = list(outs)
        for j, m in enumerate(modules):
            target = None
            for name, rows in self.row_groups:
                update = self.adapters[name].get(id(m))
                if update is None:
                    continue
                if target is None:  # a split of a fused matmul is a view: give it its own storage
                    outs[j] = outs[j].contiguous()
                    target = outs[j].view(-1, outs[j].shape[-1])
                a_t, b_t = update
                target.index_add_(0, rows, ((flat.index_select(0, rows) @ a_t) @ b_t).to(target.dtype))
        return tuple(outs)

    def add_adapter(self, name: str, model: nn.Module, updates: dict, dtype: torch.dtype) -> None:
        """Serve a LoRA adapter: ``updates`` from train.lora.peft_updates (module name -> A, B, scaling)."""
        self.adapters[name] = {id(model.get_submodule(module)): (a.t().to(dtype).contiguous(),
                                                                  (scaling * b).t().to(dtype).contiguous())
                               for module, (a, b, scaling) in updates.items()}

    def norm(self, module, x):
        if isinstance(module, RMSNorm):  # one fused kernel instead of eight ops
            return F.rms_norm(x, module.weight.shape, module.weight, module.eps)
        if isinstance(module, OffsetRMSNorm):  # Gemma's: by (1 + weight), in float32 as the module does
            return F.rms_norm(x.float(), module.weight.shape, 1.0 + module.weight.float(), module.eps).to(x.dtype)
        return module(x)

    def decode_plan(self, slots, positions, cache, config, dtype):
        if not self.kernel or cache.k.dtype != dtype or dtype not in (torch.bfloat16, torch.float32):
            return None
        return cpu_attention.prepare(slots, positions, config.sliding_window, cache.slots, cache.max_len,
                                     config.num_heads, config.num_kv_heads, config.head_dim)

    def decode_attention(self, q, k, v, plan):
        return cpu_attention.decode_attention(q, k, v, plan)


class QuantOps(TorchOps):
    """Runs a model whose weight matrices stayed in their GGUF block formats: each linear (and
    the embedding table, and a tied output head) multiplies by its blocks directly with llmkit's
    native kernels (llmkit.engine.quant), reading 4-8 bits per weight instead of 16 or 32. The
    model's own parameters for those matrices are never allocated."""

    def __init__(self, model: nn.Module, device: torch.device, quantized: dict | None = None,
                 quantize: str | None = None):
        from llmkit.engine.quant import QuantMatrix

        super().__init__(model, device)
        quantized = quantized or {}
        # q/k/v and gate/up stored in one block type: one matrix (their rows stacked) and one call each
        self.fused: dict[tuple[int, ...], tuple[object, list[int]]] = {}
        stacked_names: set[str] = set()
        for name, module in model.named_modules():
            for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                keys = [f"{name}.{n}.weight" for n in names]
                group = [getattr(module, n, None) for n in names]
                if not all(g is not None and g.bias is None for g in group):
                    continue
                if quantize is not None and all(type(g) is nn.Linear for g in group):
                    # a float model: the group's weights quantized as one matrix
                    matrix = QuantMatrix.quantize(torch.cat([g.weight.detach() for g in group]), quantize)
                    self.fused[tuple(id(g) for g in group)] = (matrix, [g.out_features for g in group])
                    stacked_names.update(keys)
                    continue
                parts = [quantized.get(k) for k in keys]
                if all(parts) and len({q.ggml_type for q in parts}) == 1 and len({q.shape[1] for q in parts}) == 1:
                    stacked = torch.cat([q.data.reshape(q.shape[0], -1) for q in parts])
                    matrix = QuantMatrix.from_gguf(stacked, parts[0].ggml_type, (stacked.shape[0], parts[0].shape[1]))
                    self.fused[tuple(id(g) for g in group)] = (matrix, [q.shape[0] for q in parts])
                    stacked_names.update(keys)
                    _release(parts)
        by_name = {}
        for name, q in quantized.items():
            if name not in stacked_names:
                by_name[name] = QuantMatrix.from_gguf(q.data, q.ggml_type, q.shape)
                _release([q])
        if quantize is not None:  # a float model: its other linears quantized to ``quantize`` blocks, here
            by_name.update({f"{name}.weight": QuantMatrix.quantize(m.weight, quantize)
                            for name, m in model.named_modules()
                            if type(m) is nn.Linear and f"{name}.weight" not in stacked_names})
        self.matrices: dict[int, object] = {}  # id(module) -> QuantMatrix (members of fused groups excepted)
        for name, module in model.named_modules():
            matrix = by_name.get(f"{name}.weight")
            if matrix is not None:
                self.matrices[id(module)] = matrix
        tied = getattr(model, "lm_head", None)
        if tied is not None and id(tied) not in self.matrices and "embed.weight" in by_name \
                and tied.weight is model.embed.weight:
            self.matrices[id(tied)] = by_name["embed.weight"]

    @property
    def modules_on_blocks(self) -> int:
        """How many of the model's modules multiply by block-format weights (fused ones included)."""
        return len(self.matrices) + sum(len(sizes) for _, sizes in self.fused.values())

    def linear(self, modules, x):
        fused = self.fused.get(tuple(map(id, modules))) if len(modules) > 1 else None
        if fused is not None:
            outs = fused[0](x).split(fused[1], dim=-1)
            return self._lora(modules, x, outs) if self.row_groups else outs
        out = []
        for m in modules:
            matrix = self.matrices.get(id(m))
            if matrix is None:
                out.extend(TorchOps.linear(self, (m,), x))
                continue
            y = matrix(x)
            out.append(y if m.bias is None else y + m.bias)
        return self._lora(modules, x, tuple(out)) if self.row_groups else tuple(out)

    def embed(self, module, tokens):
        matrix = self.matrices.get(id(module))
        return module(tokens) if matrix is None else matrix.rows(tokens)


def _release(parts) -> None:
    """Once their blocks are packed, the file pages under these tensors leave resident memory, so
    loading never holds the file and its packed copy in full at once."""
    for q in parts:
        if q.release is not None:
            q.release()


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _bucket(n: int, limit: int) -> int:
    """Round a cache length up to a power of two (at least 256), never past the context."""
    size = 256
    while size < n:
        size *= 2
    return min(size, limit)


class TorchExecutor:
    """Runs llmkit's own model. ``quantized``: weight matrices kept in GGUF block formats, by
    parameter name (``Checkpoint.quantized``); those run on the native quantized kernels."""

    def __init__(self, model: torch.nn.Module, max_batch: int, context_length: int, quantized: dict | None = None,
                 quantize: str | None = None):
        self.model = model
        self.max_batch = max_batch
        self.context_length = context_length
        self.vocab_size = model.config.vocab_size
        self.device = model.norm.weight.device if hasattr(model, "norm") else next(model.parameters()).device
        self.cache = None
        blocks = bool(quantized) or quantize is not None
        self.ops = QuantOps(model, self.device, quantized, quantize) if blocks else TorchOps(model, self.device)
        self.name = "torch+gguf-kernels" if blocks else "torch"
        # decode-only passes of Llama-family models in one native call (None: layer by layer)
        self.step = DecodeStep.build(model, self.ops) if blocks and self.device.type == "cpu" else None
        # decode passes on CUDA replayed from captured graphs (None: launched op by op)
        self.graphs = DecodeGraphs(model, self.ops, self.device) if self.device.type == "cuda" else None
        self.slot_adapters: dict[int, str] = {}  # slots whose request runs on a LoRA adapter

    @property
    def cache_bytes(self) -> int:
        """Memory the key/value cache of the running requests holds: sized to the longest batch
        met so far (in powers of two) and kept while idle, see fit."""
        cache = self.cache
        return 0 if cache is None else 2 * cache.k.numel() * cache.k.element_size()

    @property
    def adapters(self) -> list[str]:
        return list(self.ops.adapters)

    def add_adapter(self, name: str, updates: dict) -> None:
        """Serve a LoRA adapter beside the base model (train.lora.peft_updates's form)."""
        dtype = self.model.norm.weight.dtype if hasattr(self.model, "norm") else torch.float32
        self.ops.add_adapter(name, self.model, updates, dtype)
        if self.step is not None:
            try:
                self.step.refresh_adapters()  # its table made now, not in the middle of a step
            except ValueError as exc:
                log.info("decode steps go layer by layer from now on: %s", exc)
                self.step = None

    def use_adapter(self, slot: int, name: str | None) -> None:
        """The adapter the request in ``slot`` runs on (None: the base model)."""
        if name is None:
            self.slot_adapters.pop(slot, None)
        else:
            self.slot_adapters[slot] = name

    def fit(self, length: int, slots: int = 1) -> None:
        old = self.cache
        if length == 0:
            return  # idle: keep the cache for the next request (reading is sliced to what is used)
        # Buckets: powers of two in length (a cache sized to what requests need, not the whole
        # context) and in slots (the engine hands out the lowest free slots first), so that one
        # short request does not allocate 16 x the context (hundreds of MB of zeros).
        size = _bucket(length, self.context_length)
        count = min(self.max_batch, 1 << max(slots - 1, 0).bit_length())
        if old is not None and old.max_len >= size and old.slots >= count:
            if not (size < old.max_len // 2 or count < old.slots // 2):
                return  # shrink only by at least half, so sizes do not flap
        new = self.model.new_cache(count, size)
        if old is not None:  # keep what running requests already have in their slots
            keep, n = min(size, old.max_len), min(count, old.slots)
            new.k[:, :n, :, :keep] = old.k[:, :n, :, :keep]
            new.v[:, :n, :, :keep] = old.v[:, :n, :, :keep]
        self.cache = new

    def forward(self, chunks: list[tuple[int, list[int], int]], decodes: list[tuple[int, int, int]]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Prompt chunks (slot, ids, start) and decode tokens (slot, token, position) in one pass
        (Transformer.forward_many): the weights are read once for all of them, so a new request's
        prompt costs the running ones little. Returns each chunk's last logits [V] and the decode
        logits [B, V].

        With a DecodeStep, every row goes through it in one call (a prompt chunk is rows of one
        slot at consecutive positions), except chunks of slots on a LoRA adapter, which take the
        modules' batched products beside it. A row's arithmetic in the step never depends on what
        else shares its pass, so batched and lone outputs agree. On CUDA, decode rows without an
        adapter replay a captured graph (engine.cuda_graphs) beside the chunks' pass."""
        if self.step is not None and (decodes or chunks) and self.cache.k.dtype == torch.float32:
            if any(self.slot_adapters.get(slot) is not None for slot, _, _ in chunks):
                chunk_logits, none = self._modules(chunks, [])
                return chunk_logits, (self._step([], decodes)[1] if decodes else none)
            return self._step(chunks, decodes)
        if self.graphs is not None and decodes and not self.slot_adapters:
            logits = self._graphed(decodes)
            if logits is not None:
                return (self._modules(chunks, [])[0] if chunks else []), logits
        return self._modules(chunks, decodes)

    def _graphed(self, decodes) -> torch.Tensor | None:
        """Decode logits from a captured CUDA graph; None, and op by op from now on, where this
        torch or driver refuses to record one."""
        try:
            return self.graphs(self.cache, decodes)
        except GraphCaptureError as exc:
            log.warning("decode passes launch op by op: a CUDA graph could not be recorded (%s)", exc)
            self.graphs = None
            return None

    def _modules(self, chunks, decodes) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The pass through the model's modules (Transformer.forward_many)."""
        d = self.device
        batches = [(torch.tensor([ids], device=d), torch.arange(start, start + len(ids), device=d)[None],
                    torch.tensor([slot], device=d)) for slot, ids, start in chunks]
        if decodes:
            slots, tokens, positions = zip(*decodes)
            batches.append((torch.tensor(tokens, device=d)[:, None], torch.tensor(positions, device=d)[:, None],
                            torch.tensor(slots, device=d)))
        self.ops.row_groups = self._row_groups(chunks, decodes) if self.slot_adapters else []
        out = self.model.forward_many(batches, cache=self.cache, last_only=True, ops=self.ops)
        return [o[0, -1] for o in out[: len(chunks)]], (out[-1][:, -1] if decodes else out[:0])

    def _step(self, chunks, decodes) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Chunks' and decode rows through DecodeStep: the embedding, every layer in one call, the
        head on each chunk's last row and on the decode rows."""
        rows = [(slot, token, start + i) for slot, ids, start in chunks for i, token in enumerate(ids)]
        rows += [(slot, token, position) for slot, token, position in decodes]
        slots, tokens, positions = zip(*rows)
        self.ops.row_groups = []
        model = self.model
        adapters = [self.slot_adapters.get(slot) for slot in slots] if self.slot_adapters else None
        x = self.step(self.ops.embed(model.embed, torch.tensor(tokens)), slots, positions, self.cache, adapters)
        ends = list(itertools.accumulate(len(ids) for _, ids, _ in chunks))
        keep = [end - 1 for end in ends] + list(range(len(rows) - len(decodes), len(rows)))
        if len(keep) < len(rows):
            x = x[keep]
        logits = self.ops.linear((model.lm_head,), self.ops.norm(model.norm, x))[0].float()
        return list(logits[: len(chunks)]), logits[len(chunks):]

    def _row_groups(self, chunks, decodes) -> list[tuple[str, torch.Tensor]]:
        """The pass's rows (chunks' tokens, then decode rows, in order) grouped by adapter."""
        rows: dict[str, list[int]] = {}
        at = 0
        for slot, ids, _ in chunks:
            name = self.slot_adapters.get(slot)
            if name is not None:
                rows.setdefault(name, []).extend(range(at, at + len(ids)))
            at += len(ids)
        for slot, _, _ in decodes:
            name = self.slot_adapters.get(slot)
            if name is not None:
                rows.setdefault(name, []).append(at)
            at += 1
        return [(name, torch.tensor(r, device=self.device)) for name, r in rows.items()]

    def release(self, slot: int) -> None:
        self.slot_adapters.pop(slot, None)  # stale cache entries are masked: never read

    def read_kv(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions start..end-1 of a slot: (layers, Hk, end - start, D) views."""
        return self.cache.k[:, slot, :, start:end], self.cache.v[:, slot, :, start:end]

    def write_kv(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put keys and values (layers, Hk, n, D) at positions start.. of a slot (the cache was
        sized for the request already)."""
        n = k.shape[2]
        self.cache.k[:, slot, :, start : start + n] = k
        self.cache.v[:, slot, :, start : start + n] = v
