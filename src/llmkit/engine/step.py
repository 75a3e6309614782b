"""A pass in one native call, for Llama-family models on block-format weights.

At one token per sequence the matrix products of a small model take less time than the Python
dispatch of the twenty-odd small operations around them in every layer (norms, rotary embedding,
cache writes, residual adds). ``DecodeStep`` runs every layer of a pass in one call into
``step.c`` (with llmkit.engine.quant's matrix product): the same operations in the same order as
llmkit.model, without the dispatch. A prompt chunk is rows of one slot at consecutive positions,
so chunks and decode rows share one call, and the weights are read once for all of them; rows of
one slot attend together, walking its keys and values once (prompt chunks, speculative checks).

It covers what most local models are: RMS norms, rotary positions (default, linear or Llama 3
scaling), SwiGLU MLPs, grouped-query attention with or without per-head q/k norms and one sliding
window for all layers, float32 activations and cache, every matrix in a block format (q/k/v and
gate/up stacked or apart) and no biases. ``DecodeStep.build`` returns None for anything else, and
the executor keeps the module path for those models (and for prompt chunks on a LoRA adapter).
Decode rows on LoRA adapters get their low-rank updates inside the step.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

from llmkit.engine import native
from llmkit.model import RMSNorm, rope_kind

log = logging.getLogger(__name__)

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_FUNCTIONS = {"llmkit_decode_layers": ([_P, _P, _I64, _P, _P, _P, _P, _I64, _I64, ctypes.c_int, _P, _P], ctypes.c_int)}
_MAX_RANK = 256  # step.c's bound on a LoRA rank
_MATMUL = ctypes.CFUNCTYPE(None, _P, _P, _P, _I64, ctypes.c_int, ctypes.c_int)


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _P), ("o", _P), ("gate_up", _P), ("down", _P), ("q", _P), ("k", _P), ("v", _P),
                ("gate", _P), ("up", _P), ("attn_norm", _P), ("mlp_norm", _P), ("q_norm", _P), ("k_norm", _P)]


class _LoRA(ctypes.Structure):
    _fields_ = [("a", _P), ("b", _P), ("r", _I64)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", _I64), ("C", _I64), ("H", _I64), ("Hk", _I64), ("D", _I64), ("F", _I64), ("rot", _I64),
                ("window", _I64), ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("rope_factor", ctypes.c_float),
                ("inv_freq", _P), ("layer", _P), ("matmul", _P)]


_lib: list = []
_lock = threading.Lock()


def _library():
    with _lock:
        if not _lib:
            # -ffast-math: glibc's vector expf (libmvec) is declared only with it
            source = Path(__file__).with_name("step.c").read_text()
            _lib.append(native.load("decode-step", source, ("-march=native", "-ffast-math"), _FUNCTIONS))
    return _lib[0]


class DecodeStep:
    """Every layer of a pass in one call: hidden states in, hidden states out."""

    def __init__(self, model, ops, lib):
        c = model.config
        self.model, self.lib = model, lib
        self.hidden = c.hidden_size
        self._keep = []  # what the C structs point into, alive as long as this object
        layers = (_Layer * c.num_layers)()
        for i, block in enumerate(model.layers):
            attn, mlp = block.attn, block.mlp
            qkv, parts = _group(ops, (attn.q_proj, attn.k_proj, attn.v_proj))
            gate_up, halves = _group(ops, (mlp.gate_proj, mlp.up_proj))
            o, down = ops.matrices[id(attn.o_proj)], ops.matrices[id(mlp.down_proj)]
            norms = [self._f32(block.attn_norm.weight), self._f32(block.mlp_norm.weight)]
            if attn.qk_norm:
                norms += [self._f32(attn.q_norm.weight), self._f32(attn.k_norm.weight)]
            layers[i] = _Layer(*(_address(m) for m in (qkv, o, gate_up, down, *parts, *halves)),
                               *(n.data_ptr() for n in norms), *([None, None] if not attn.qk_norm else []))
        self._keep.append(layers)
        inv_freq = self._f32(model.inv_freq)
        matmul = ctypes.cast(ops_kernels(ops).matmul_m, _P).value
        scale = c.head_dim ** -0.5 * (model.layers[0].attn.q_scale or 1.0)
        window = c.sliding_window if model.kinds == ["sliding"] else None
        self.desc = _Model(c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                           c.rotary_dim, window or 0, c.norm_eps, scale, model.rope_factor, inv_freq.data_ptr(),
                           ctypes.addressof(layers), matmul)
        self._call = lib.llmkit_decode_layers
        self._ops = ops
        self._lora, self._lora_names = None, []  # the adapters' table for step.c, made when they change

    def refresh_adapters(self) -> list[str]:
        """The adapters in step.c's table order, the table rebuilt when they changed (add_adapter)."""
        names = list(self._ops.adapters)
        if names != self._lora_names:
            self._lora, self._lora_names = self._lora_table(names), names
        return names

    def _lora_table(self, names: list[str]):
        """(adapters x layers x modules) entries, in step.c's module order."""
        per_layer = 7
        table = (_LoRA * (len(names) * len(self.model.layers) * per_layer))()
        for n, name in enumerate(names):
            updates = self._ops.adapters[name]
            for i, block in enumerate(self.model.layers):
                modules = (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj,
                           block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)
                for j, module in enumerate(modules):
                    update = updates.get(id(module))
                    if update is None:
                        continue
                    a_t, b_t = (self._f32(t) for t in update)
                    if a_t.shape[1] > _MAX_RANK:
                        raise ValueError(f"LoRA rank {a_t.shape[1]} is past the decode step's {_MAX_RANK}")
                    table[(n * len(self.model.layers) + i) * per_layer + j] = _LoRA(a_t.data_ptr(), b_t.data_ptr(),
                                                                                   a_t.shape[1])
        self._keep.append(table)
        return table

    def _f32(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(torch.float32).contiguous()
        self._keep.append(t)
        return t

    @classmethod
    def build(cls, model, ops) -> "DecodeStep | None":
        """The step for ``model`` run on ``ops`` (a QuantOps), or None where it does not apply or
        the native code cannot be built here."""
        reason = unsupported(model, ops)
        if reason:
            log.info("decode steps go layer by layer: %s", reason)
            return None
        lib = _library()
        return cls(model, ops, lib) if lib is not None else None

    def __call__(self, embedded: torch.Tensor, slots: list[int], positions: list[int], cache,
                 adapters: list[str | None] | None = None) -> torch.Tensor:
        """``embedded`` [B, C] float32 (the rows' token embeddings) -> the hidden states after the
        last layer [B, C], the cache written at (slot, position) of each row. ``adapters``: each
        row's LoRA adapter name, or None for the base model."""
        if any(not 0 <= s < cache.slots for s in slots) or any(not 0 <= p < cache.max_len for p in positions):
            raise IndexError(f"slots or positions outside the cache ({cache.slots} slots x {cache.max_len} positions)")
        x = embedded.to(torch.float32).contiguous()
        rows = [slots, positions]
        if adapters is not None and any(a is not None for a in adapters):
            index = {name: i for i, name in enumerate(self.refresh_adapters())}
            rows.append([-1 if a is None else index[a] for a in adapters])
        where = torch.tensor(rows, dtype=torch.int64)
        lora = (ctypes.addressof(self._lora), where[2].data_ptr()) if len(rows) == 3 else (None, None)
        done = self._call(ctypes.byref(self.desc), x.data_ptr(), len(slots), where[0].data_ptr(), where[1].data_ptr(),
                          cache.k.data_ptr(), cache.v.data_ptr(), cache.slots, cache.max_len, torch.get_num_threads(),
                          *lora)
        if done != 0:
            raise MemoryError("the decode step could not allocate its scratch memory")
        return x


def _group(ops, modules) -> tuple[object, tuple]:
    """(the stacked matrix, (None,) * n) where the group was stacked, else (None, its parts)."""
    stacked = ops.fused.get(tuple(map(id, modules)))
    if stacked is not None:
        return stacked[0], (None,) * len(modules)
    return None, tuple(ops.matrices[id(m)] for m in modules)


def _address(matrix) -> int | None:
    return None if matrix is None else ctypes.addressof(matrix._desc)


def ops_kernels(ops):
    """The quant kernels the ops' matrices were made with (all share one build)."""
    first = next(iter(ops.matrices.values()), None) or next(iter(ops.fused.values()))[0]
    return first.kernels


def unsupported(model, ops) -> str:
    """Why ``DecodeStep`` cannot run this model on these ops ('' when it can)."""
    c = getattr(model, "config", None)
    if c is None or not hasattr(ops, "fused"):
        return "not a llmkit model on block-format weights"
    checks = [
        (c.norm == "rmsnorm" and all(type(b.attn_norm) is RMSNorm and type(b.mlp_norm) is RMSNorm for b in model.layers),
         "norms other than RMSNorm"),
        (c.mlp == "swiglu" and c.activation == "silu", f"MLP {c.mlp}/{c.activation}"),
        (c.position == "rope" and rope_kind(c) in ("default", "linear", "llama3") and c.rotary_dim % 2 == 0,
         "positions other than plain rotary"),
        (not c.sandwich_norm and not c.embed_scale, "Gemma-style norms or embedding scale"),
        (not c.attention_bias and not c.attention_out_bias and not c.mlp_bias, "biases"),
        (len(model.kinds) == 1 and c.rope_local_theta is None, "layers that attend differently"),
        (c.num_heads % c.num_kv_heads == 0, "query heads not a multiple of key heads"),
        (model.norm.weight.dtype == torch.float32 and model.norm.weight.device.type == "cpu", "not float32 on the CPU"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            if tuple(map(id, group)) not in ops.fused and not all(id(m) in ops.matrices for m in group):
                return "a layer whose matrices are not all in block formats"
        if id(attn.o_proj) not in ops.matrices or id(mlp.down_proj) not in ops.matrices:
            return "a layer whose matrices are not all in block formats"
        if attn.qk_norm and not (type(attn.q_norm) is RMSNorm and type(attn.k_norm) is RMSNorm):
            return "q/k norms other than RMSNorm"
    return ""
