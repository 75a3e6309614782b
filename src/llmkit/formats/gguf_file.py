"""A fast GGUF file reader: header and metadata parsed in one pass, tensors memory-mapped.

Why not ``gguf.GGUFReader``: it builds a numpy view for every part of every field, which takes
seconds for a 49k-token vocabulary; this reader parses the same header with ``struct`` in a
fraction of that. The common quantizations
(Q4_0, Q4_1, Q8_0) are dequantized with vectorised torch ops here; every other type goes to
``gguf.quants.dequantize``. Tests check both against ``GGUFReader``.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import ModelFormatError

# GGUF value types (gguf.constants.GGUFValueType)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_SIZES = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, _STRING: 8, _ARRAY: 4 + 8}  # smallest encoding
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: real files use one level at most


_U64 = struct.Struct("<Q")


class _Corrupt(ValueError):
    """A header value that cannot be right; GGUFFile turns it into ModelFormatError naming the file."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (outermost first): the reverse of GGUF's ne[]
    type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute offset in the file
    nbytes: int


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{self.path}: cannot open it ({exc})") from None
        self._buf = memoryview(self._data)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, OverflowError, TypeError) as exc:
            raise ModelFormatError(
                f"{self.path}: the GGUF header is truncated or corrupt ({exc}); download or export the file again"
            ) from None

    # ------------------------------------------------------------------ header

    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _count(self, what: str, smallest: int) -> int:
        """A count read from the file, refused when that many items of at least ``smallest``
        bytes each cannot fit in the rest of the file (a corrupt count would otherwise loop for
        hours or allocate without bound)."""
        n = self._read("<Q")
        left = len(self._buf) - self._pos
        if n * smallest > left:
            raise _Corrupt(f"{what}: {n:,} of them cannot fit in the {left:,} bytes left in the file")
        return n

    def _string(self) -> str:
        n = self._read("<Q")
        end = self._pos + n
        if end > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self._buf[self._pos : end]).decode("utf-8", errors="replace")
        self._pos = end
        return s

    def _strings(self, count: int) -> list[str]:
        """``count`` strings in a row: ``_string``'s steps in one tight loop (vocabularies hold
        tens of thousands of them, and this runs at every load)."""
        buf, pos, size = self._buf, self._pos, len(self._buf)
        length = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            end = pos + 8 + length(buf, pos)[0]
            if end > size:
                raise ValueError("a string runs past the end of the file")
            append(str(buf[pos + 8 : end], "utf-8", "replace"))
            pos = end
        self._pos = pos
        return out

    def _value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise _Corrupt(f"arrays nested more than {_MAX_NESTING} deep")
            etype = self._read("<I")
            if etype not in _SIZES:
                raise _Corrupt(f"unknown GGUF value type {etype} in an array")
            count = self._count("array elements", _SIZES[etype])
            if etype == _STRING:
                return self._strings(count)
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                end = self._pos + count * dtype.itemsize
                arr = np.frombuffer(self._buf[self._pos : end], dtype=dtype)
                self._pos = end
                return arr.tolist()
            return [self._value(etype, depth + 1) for _ in range(count)]
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        raise _Corrupt(f"unknown GGUF value type {vtype}")

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != b"GGUF":
            raise ModelFormatError(f"{self.path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise ModelFormatError(
                f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are); "
                "convert it again with a current llama.cpp or gguf package"
            )
        n_tensors = self._read("<Q")
        n_kv = self._count("metadata entries", 8 + 4 + 1)  # the smallest: an empty key, a type, one byte
        if n_tensors * (8 + 4 + 4 + 8) > len(self._buf) - self._pos:
            raise _Corrupt(f"{n_tensors:,} tensors cannot be described in the rest of the file")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.metadata:
                raise _Corrupt(f"metadata key {key!r} appears twice")
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("<I")
            if not 0 < n_dims <= _MAX_DIMS:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
            ne = [self._read("<Q") for _ in range(n_dims)]
            infos.append((name, ne, self._read("<I"), self._read("<Q")))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise _Corrupt(f"general.alignment is {align!r}, not a positive power of two")
        start = (self._pos + align - 1) // align * align
        self.tensors = [self._tensor_info(name, ne, ttype, offset, start, align)
                        for name, ne, ttype, offset in infos]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise _Corrupt(f"tensor {twice!r} appears twice")

    def _tensor_info(self, name: str, ne: list[int], ttype: int, offset: int, start: int, align: int) -> TensorInfo:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ModelFormatError(f"{self.path}: tensor {name} has unknown type {ttype}") from None
        if ne[0] % block:
            raise _Corrupt(f"tensor {name!r}: its rows of {ne[0]} values are not whole blocks of {block} "
                           f"({GGMLQuantizationType(ttype).name})")
        if offset % align:
            raise _Corrupt(f"tensor {name!r}: its offset {offset} is not a multiple of the alignment {align}")
        n = math.prod(ne)  # Python integers: a corrupt shape cannot overflow into a small size
        info = TensorInfo(name, tuple(reversed(ne)), ttype, start + offset, n // block * size)
        if info.offset + info.nbytes > len(self._data):
            raise ModelFormatError(
                f"{self.path}: the file is truncated or corrupt: tensor {name} needs bytes up to "
                f"{info.offset + info.nbytes:,} but the file has {len(self._data):,}. Download it again."
            )
        return info

    # ------------------------------------------------------------------ tensors

    def raw(self, info: TensorInfo) -> np.ndarray:
        return self._data[info.offset : info.offset + info.nbytes]

    def maps(self, data: torch.Tensor) -> bool:
        """Whether ``data`` is a view of this file's mapping (not a copy)."""
        start = data.data_ptr() - self._data.ctypes.data
        return 0 <= start < len(self._data)

    def release(self, data: torch.Tensor) -> None:
        """Drop the pages under ``data``, a view of this file's read-only mapping, from the process's
        resident memory: a loader that copied a tensor's bytes elsewhere (packed blocks) then does
        not hold the file twice. The mapping stays valid; a later read faults the pages in again."""
        start = data.data_ptr() - self._data.ctypes.data
        end = start + data.numel() * data.element_size()
        mapping = getattr(self._data, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise") or not 0 <= start < end <= len(self._data):
            return
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, first, end - first)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """The tensor dequantized to a float32 torch tensor of ``info.shape`` (a fresh copy)."""
        try:
            return self._dequantize(info)
        except (ValueError, RuntimeError) as exc:  # sizes the header promised and the data does not keep
            raise ModelFormatError(f"{self.path}: tensor {info.name} cannot be read ({exc}); the file is "
                                   "corrupt: download or export it again") from None

    def _dequantize(self, info: TensorInfo) -> torch.Tensor:
        raw = self.raw(info)
        kind = _DEQUANT.get(info.type)
        if kind is not None:
            return kind(torch.from_numpy(np.array(raw)), info.shape)
        from gguf.quants import dequantize
        from gguf.constants import GGMLQuantizationType

        rows = raw.reshape(int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1, -1)
        try:
            arr = dequantize(rows, GGMLQuantizationType(info.type))
        except NotImplementedError:
            raise ModelFormatError(
                f"{self.path}: tensor {info.name} uses {GGMLQuantizationType(info.type).name}, "
                "which cannot be dequantized here"
            ) from None
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(info.shape)


def _f32(b: torch.Tensor, shape) -> torch.Tensor:
    return b.view(torch.float32).reshape(shape).clone()


def _f16(b: torch.Tensor, shape) -> torch.Tensor:
    return b.view(torch.float16).float().reshape(shape)


def _bf16(b: torch.Tensor, shape) -> torch.Tensor:
    return b.view(torch.bfloat16).float().reshape(shape)


def _scale(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()  # (nb, 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # 32 values per block: low nibbles are elements 0..15, high nibbles 16..31
    return torch.cat((qs & 0x0F, qs >> 4), dim=1).float()


def _q8_0(b: torch.Tensor, shape) -> torch.Tensor:
    blocks = b.view(-1, 34)
    return (_scale(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()).reshape(shape)


def _q4_0(b: torch.Tensor, shape) -> torch.Tensor:
    blocks = b.view(-1, 18)
    return (_scale(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)).reshape(shape)


def _q4_1(b: torch.Tensor, shape) -> torch.Tensor:
    blocks = b.view(-1, 20)
    return (_scale(blocks, 0) * _nibbles(blocks[:, 4:]) + _scale(blocks, 2)).reshape(shape)


_DEQUANT = {0: _f32, 1: _f16, 30: _bf16, 8: _q8_0, 2: _q4_0, 3: _q4_1}
