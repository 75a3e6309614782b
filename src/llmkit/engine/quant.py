"""Weight matrices kept in GGUF block formats and multiplied directly, by llmkit's C kernels.

Decoding is bound by memory bandwidth: every token reads every weight once, so a 4-bit block
format read as it is stored moves 4-7x fewer bytes than the same weights dequantized to bfloat16 or
float32. ``QuantMatrix`` holds a [out_features, in_features] matrix in one of the block formats
below (a GGUF tensor's bytes, or a float tensor quantized here), repacked once without changing a
bit of it (rows in groups of 8, blocks side by side: one SIMD lane per output row; Q4_K and Q5_K
store their 6-bit scales unpacked, 2-3% more bytes), and multiplies by it without unpacking it to
memory:

- a few rows (decode, continuous batching): the activations are quantized per block of 32 to int8
  with one scale (as llama.cpp does), each weight block is unpacked in registers and multiplied in
  integers (AVX2 ``maddubs``, or VNNI dot products where the compiler targets them), scaled once
  per block; OpenMP threads each stream a contiguous range of weight rows;
- many rows (prefill): the same kernel, 4 activation rows per pass over each unpacked weight;
  where oneDNN multiplies bfloat16 natively (AVX512-BF16, AMX), bfloat16 activations of
  ``PREFILL_ROWS`` rows or more go instead through tiles of the weights dequantized to bfloat16
  and oneDNN's matmul. On AVX2 alone the integer kernel is the faster of the two at every row
  count measured (bench/quant_kernels.py, "prefill_paths"), float32 MKL included.

The C source (quant.c, next to this file) is compiled on first use by ``llmkit.engine.native``;
where that fails ``available()`` is False and callers keep their torch path. Dequantization agrees
bit for bit with ``gguf.quants.dequantize``; the products agree with "dequantize, then multiply"
to float rounding on the int8-quantized activations.

Formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (``supported``). ``QuantMatrix.quantize``
writes Q8_0, Q4_0, Q5_0 and Q4_K from float weights.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import numpy as np
import torch

from llmkit.engine import native
from llmkit.errors import LLMKitError, ModelFormatError

# ggml type id -> (name, values per block, bytes per block)
TYPES = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
# what QuantMatrix.quantize writes: kind -> ggml type id
KINDS = {"q8_0": 8, "q4_0": 2, "q5_0": 6, "q4_k": 12}
# Q4_K needs rows that are whole blocks of 256; other rows get Q5_0, as llama.cpp's quantizer does
FALLBACK = {12: 6}

# From this many bfloat16 rows per call on, where oneDNN has native bfloat16, dequantize tiles and
# use its matmul (bench/quant_kernels.py measures both paths).
PREFILL_ROWS = 128
_TILE_BYTES = 32 << 20  # the dequantized tile's size bound in the prefill path

_SOURCE = (Path(__file__).with_name("quant.c")).read_text()
_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_FUNCTIONS = {
    "llmkit_matmul": ([_I, _P, _I64, _I64, _P, _I, _P, _I, _I64, _I], None),
    "llmkit_matmul_m": ([_P, _P, _P, _I64, _I, _I], None),
    "llmkit_dequantize": ([_I, _P, _I64, _P, _I64, _P, _I, _I], None),
    "llmkit_pack": ([_I, _P, _I64, _I64, _P, _I], None),
    "llmkit_group_bytes": ([_I], _I),
    "llmkit_quantize": ([_I, _P, _I64, _I64, _P, _I], ctypes.c_int),
    "llmkit_quantize_activations": ([_P, _I, _I64, _I64, _P, _P, _P, _P], None),
    "llmkit_simd_level": ([], ctypes.c_int),
}
# Build variants: what the machine can run best, and for tests the AVX2 path, the VNNI path with
# its dot product emulated in AVX2 (for machines without VNNI) and the portable C.
# -ffp-contract=off: dequantization must round exactly as the reference does (see quant.c).
VARIANTS = {
    "native": ("-march=native", "-ffp-contract=off"),
    "avx2": ("-march=native", "-mno-avx512f", "-mno-avxvnni", "-ffp-contract=off"),
    "vnni-emulated": ("-march=native", "-DLLMKIT_EMULATE_VNNI", "-ffp-contract=off"),
    "portable": ("-march=native", "-DLLMKIT_SCALAR", "-ffp-contract=off"),
    "generic": ("-DLLMKIT_SCALAR", "-ffp-contract=off"),  # no -march: for compilers that lack it
}
SIMD_LEVELS = {0: "portable C", 1: "AVX2", 2: "AVX2 + VNNI", 3: "AVX2 + VNNI emulated"}


class _Matrix(ctypes.Structure):  # quant.c's Matrix: what each call would otherwise pass again
    _fields_ = [("type", ctypes.c_int64), ("w", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64)]


class QuantError(LLMKitError, ValueError):
    """A quantized matrix that cannot be made or used as asked (format, shape, no kernels)."""


class Kernels:
    """One loaded build of quant.c."""

    def __init__(self, lib: ctypes.CDLL, variant: str):
        self.variant = variant
        self.matmul = lib.llmkit_matmul
        self.matmul_m = lib.llmkit_matmul_m
        self.dequantize = lib.llmkit_dequantize
        self.quantize = lib.llmkit_quantize
        self.quantize_activations = lib.llmkit_quantize_activations
        self.pack = lib.llmkit_pack
        self.group_bytes = lib.llmkit_group_bytes
        self.simd = SIMD_LEVELS[lib.llmkit_simd_level()]

    def __repr__(self) -> str:
        return f"Kernels({self.variant!r}: {self.simd})"


_kernels: dict[str, Kernels | None] = {}
_lock = threading.Lock()


def kernels(variant: str = "native") -> Kernels | None:
    """The kernels built for ``variant`` (see VARIANTS), compiling them on first use; None where
    they cannot be built. "native" falls back to "generic" when the compiler rejects -march=native."""
    with _lock:
        if variant not in _kernels:
            lib = native.load(f"quant-{variant}", _SOURCE, VARIANTS[variant], _FUNCTIONS)
            _kernels[variant] = Kernels(lib, variant) if lib is not None else None
    if _kernels[variant] is None and variant == "native":
        return kernels("generic")
    return _kernels[variant]


def available() -> bool:
    """Whether the native kernels could be built here (building them on the first call)."""
    return kernels() is not None


def supported(ggml_type: int) -> bool:
    """Whether QuantMatrix holds and multiplies this GGUF tensor type."""
    return int(ggml_type) in TYPES


def row_bytes(ggml_type: int, in_features: int) -> int:
    _, elems, size = TYPES[ggml_type]
    return in_features // elems * size


class QuantMatrix:
    """A weight matrix [out_features, in_features] kept in a GGUF block format, multiplied directly.

    ``m(x)``: x [..., in_features] float32 or bfloat16 (other float types go through float32)
    -> x @ W.T [..., out_features] in x's dtype. No autograd: for inference."""

    def __init__(self, raw_ptr: int, ggml_type: int, shape: tuple[int, int], kern: Kernels):
        """Pack the GGUF-layout bytes at ``raw_ptr`` (see quant.c: rows in groups of 8, blocks side
        by side); the matrix keeps only its packed copy. Use from_gguf or quantize."""
        self.ggml_type = int(ggml_type)
        self.shape = (int(shape[0]), int(shape[1]))
        n, k = self.shape
        groups, blocks = (n + 7) // 8, k // TYPES[self.ggml_type][1]
        self._packed = torch.empty(groups * blocks * kern.group_bytes(self.ggml_type), dtype=torch.uint8)
        kern.pack(self.ggml_type, raw_ptr, n, k, self._packed.data_ptr(), torch.get_num_threads())
        self._ptr = self._packed.data_ptr()
        self.nbytes = self._packed.numel()  # what one product reads
        self.kernels = kern
        self._desc = _Matrix(self.ggml_type, self._ptr, n, k)
        self._call = functools.partial(kern.matmul_m, ctypes.addressof(self._desc))

    # ------------------------------------------------------------------ making one

    @classmethod
    def from_gguf(cls, raw, ggml_type: int, shape: tuple[int, int], *, kernels: Kernels | None = None) -> "QuantMatrix":
        """The tensor's bytes as stored in the GGUF file (numpy uint8, e.g. ``GGUFFile.raw(info)``,
        a memory mapping kept as it is, or a torch uint8 tensor); ``shape`` = (out, in), the
        tensor's shape in torch order."""
        if not supported(ggml_type):
            raise QuantError(f"GGUF tensor type {ggml_type} is not one QuantMatrix multiplies; "
                             f"it supports {', '.join(n for n, _, _ in TYPES.values())} (dequantize the others)")
        name, elems, _ = TYPES[int(ggml_type)]
        if len(shape) != 2 or shape[1] % elems:
            raise ModelFormatError(f"a {name} matrix needs rows of whole {elems}-value blocks, not shape {tuple(shape)}")
        need = int(shape[0]) * row_bytes(int(ggml_type), int(shape[1]))
        if isinstance(raw, torch.Tensor):
            if raw.dtype != torch.uint8 or raw.device.type != "cpu":
                raise QuantError(f"QuantMatrix.from_gguf takes the tensor's bytes (uint8 on the CPU), not {raw.dtype} on {raw.device}")
            raw = raw.contiguous().reshape(-1)
            size, ptr = raw.numel(), raw.data_ptr()
        else:
            raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
            size, ptr = raw.shape[0], raw.ctypes.data
        if size != need:
            raise ModelFormatError(f"a {name} matrix of shape {tuple(shape)} takes {need:,} bytes, got {size:,}; "
                                   "the file is corrupt or the shape is wrong")
        return cls(ptr, ggml_type, shape, _need(kernels))

    @classmethod
    def quantize(cls, weight: torch.Tensor, kind: str, *, kernels: Kernels | None = None) -> "QuantMatrix":
        """A float weight [out, in] quantized to ``kind``: "q8_0", "q4_0", "q5_0" or "q4_k" (for
        rows that are not whole blocks of 256, "q4_k" gives Q5_0, as llama.cpp does)."""
        if kind not in KINDS:
            raise QuantError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
        if weight.dim() != 2:
            raise QuantError(f"QuantMatrix.quantize takes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        n, k = weight.shape
        ggml_type = KINDS[kind]
        if k % TYPES[ggml_type][1]:
            ggml_type = FALLBACK.get(ggml_type, ggml_type)
        if k % TYPES[ggml_type][1]:
            raise QuantError(f"{kind} needs in_features to be a multiple of {TYPES[ggml_type][1]}, not {k}")
        kern = _need(kernels)
        w = weight.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(w).all():
            raise QuantError("the weight holds infinities or NaNs: it cannot be quantized")
        raw = torch.empty(n * row_bytes(ggml_type, k), dtype=torch.uint8)
        kern.quantize(ggml_type, w.data_ptr(), n, k, raw.data_ptr(), torch.get_num_threads())
        return cls(raw.data_ptr(), ggml_type, (n, k), kern)

    # ------------------------------------------------------------------ using one

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T. ``out``: an optional contiguous [rows, out_features] tensor of x's dtype to write
        into, for a 2-D contiguous float32 or bfloat16 x (unused on the tiled bfloat16 path)."""
        n, k = self.shape
        if x.dim() == 2 and x.is_contiguous() and x.shape[1] == k:  # the common case, kept short
            dtype = x.dtype
            m = x.shape[0]
            if dtype is torch.float32 or (dtype is torch.bfloat16 and (m < PREFILL_ROWS or not _native_bf16())):
                if out is None:
                    y = torch.empty(m, n, dtype=dtype)
                elif out.dtype is dtype and out.is_contiguous() and out.shape == (m, n):
                    y = out
                else:
                    raise QuantError(f"out must be a contiguous {dtype} tensor of shape ({m}, {n})")
                self._call(x.data_ptr(), y.data_ptr(), m, 3 if dtype is torch.bfloat16 else 0, torch.get_num_threads())
                return y
        if x.shape[-1] != k:
            raise QuantError(f"input has {x.shape[-1]} features; this matrix takes {k}")
        dtype = x.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        x2 = x.reshape(-1, k).contiguous()
        m = x2.shape[0]
        if x2.dtype is torch.bfloat16 and m >= PREFILL_ROWS and _native_bf16():
            y = self._prefill(x2)
        else:
            y = torch.empty(m, n, dtype=x2.dtype)
            self._call(x2.data_ptr(), y.data_ptr(), m, 3 if x2.dtype is torch.bfloat16 else 0, torch.get_num_threads())
        y = y.view(*x.shape[:-1], n)
        return y if y.dtype == dtype else y.to(dtype)

    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows: dequantize tiles of W and multiply by torch's matmul (in bfloat16 where
        oneDNN has native bfloat16, else in float32)."""
        n, k = self.shape
        low = x.dtype == torch.bfloat16 and _native_bf16()
        wdtype = torch.bfloat16 if low else torch.float32
        xx = x if x.dtype == wdtype else x.to(wdtype)
        rows = max(1, min(n, _TILE_BYTES // (k * wdtype.itemsize)))
        tile = torch.empty(rows, k, dtype=wdtype)
        y = torch.empty(x.shape[0], n, dtype=wdtype)
        for n0 in range(0, n, rows):
            r = min(rows, n - n0)
            ids = torch.arange(n0, n0 + r, dtype=torch.int64)
            self.kernels.dequantize(self.ggml_type, self._ptr, k, ids.data_ptr(), r, tile.data_ptr(), low,
                                    torch.get_num_threads())
            if r == n:
                torch.mm(xx, tile.t(), out=y)
            else:
                y[:, n0:n0 + r] = torch.mm(xx, tile[:r].t())
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole matrix as float32 [out, in] (bit for bit what gguf.quants.dequantize gives)."""
        n, k = self.shape
        out = torch.empty(n, k)
        self.kernels.dequantize(self.ggml_type, self._ptr, k, None, n, out.data_ptr(), 0, torch.get_num_threads())
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape, integers in [0, out)) dequantized: float32 [*ids.shape, in]. The
        embedding lookup of a quantized table."""
        n, k = self.shape
        flat = torch.as_tensor(ids).reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
            raise IndexError(f"row ids must lie in [0, {n}); got {int(flat.min())}..{int(flat.max())}")
        out = torch.empty(flat.numel(), k)
        self.kernels.dequantize(self.ggml_type, self._ptr, k, flat.data_ptr(), flat.numel(), out.data_ptr(), 0,
                                torch.get_num_threads())
        return out.view(*torch.as_tensor(ids).shape, k)

    def __deepcopy__(self, memo) -> "QuantMatrix":
        return self  # never changed after it is made: copies may share it

    def __repr__(self) -> str:
        return (f"QuantMatrix({TYPES[self.ggml_type][0]}, out={self.shape[0]}, in={self.shape[1]}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


def _need(kern: Kernels | None) -> Kernels:
    kern = kern or kernels()
    if kern is None:
        raise QuantError("llmkit's native kernels could not be built here (no C compiler, or LLMKIT_NO_KERNELS "
                         "is set): load the model dequantized instead")
    return kern


_bf16: list[bool] = []


def _native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively here (AVX512-BF16 or AMX)."""
    if not _bf16:
        _bf16.append(bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return _bf16[0]
