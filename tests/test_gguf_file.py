"""llmkit's fast GGUF reader against the gguf package's reader, on the real model and on files
written here with every tensor type the fast path dequantizes itself."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from llmkit.errors import ModelFormatError
from llmkit.formats.gguf_file import GGUFFile


def _reference(path):
    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in r.tensors}
    return meta, tensors


def _check(path):
    f = GGUFFile(path)
    meta, tensors = _reference(path)
    assert f.metadata == meta
    assert [t.name for t in f.tensors] == list(tensors)
    for info in f.tensors:
        assert torch.equal(f.tensor(info), tensors[info.name]), info.name


@pytest.mark.slow
def test_matches_gguf_reader_on_the_default_model(smollm2_gguf):
    _check(smollm2_gguf)


def test_matches_gguf_reader_on_every_fast_type(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.flag", True)
    w.add_string("test.name", "caf\u00e9 \U0001f600")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.strings", ["a", "bc", ""])
    data = rng.standard_normal((8, 64)).astype(np.float32)
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):
        if qtype == Q.F32:
            w.add_tensor("t.f32", data)
        elif qtype == Q.F16:
            w.add_tensor("t.f16", data.astype(np.float16))
        else:
            q = quantize(data, qtype)
            w.add_tensor(f"t.{qtype.name}", q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _check(path)
    f = GGUFFile(path)
    assert f.metadata["test.strings"] == ["a", "bc", ""]
    assert all(info.shape == (8, 64) for info in f.tensors)


def test_truncated_and_foreign_files_are_refused(smollm2_gguf, tmp_path):
    blob = smollm2_gguf.read_bytes()
    for cut in (3, 1000, len(blob) // 2):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(blob[:cut])
        with pytest.raises(ModelFormatError, match="truncated|not a GGUF"):
            GGUFFile(bad)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + blob[4:1000])
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        GGUFFile(other)


# ------------------------------------------------------------------ damaged files: always ModelFormatError


def _kv_bytes(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _gguf_bytes(*kvs: bytes, n_tensors: int = 0) -> bytes:
    """A GGUF header written by hand: what a damaged file may hold, which a writer would refuse."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def test_zero_or_odd_alignment_is_a_format_error(tmp_path):
    for align in (0, 3, 2**32 - 1):
        path = tmp_path / f"align{align}.gguf"
        path.write_bytes(_gguf_bytes(_kv_bytes("general.alignment", 4, struct.pack("<I", align))))
        with pytest.raises(ModelFormatError, match="general.alignment") as info:
            GGUFFile(path)
        assert str(path) in str(info.value)


def test_deeply_nested_arrays_are_a_format_error(tmp_path):
    depth = 5000  # past Python's recursion limit, which a recursive reader would hit
    nested = b"".join(struct.pack("<IQ", 9, 1) for _ in range(depth)) + struct.pack("<IQ", 4, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(_gguf_bytes(_kv_bytes("x", 9, nested)))
    with pytest.raises(ModelFormatError, match="nested"):
        GGUFFile(path)


def test_impossible_counts_are_refused_at_once(tmp_path):
    # refused from the count alone, with what is wrong, before reading any element
    path = tmp_path / "counts.gguf"
    path.write_bytes(_gguf_bytes(_kv_bytes("x", 9, struct.pack("<IQ", 9, 2**40))))
    with pytest.raises(ModelFormatError, match="cannot fit"):
        GGUFFile(path)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0))
    with pytest.raises(ModelFormatError, match="tensors"):
        GGUFFile(path)


def test_a_huge_block_count_is_refused_before_building_the_model(tiny_llm_for, tmp_path):
    from llmkit.export import export
    from llmkit.formats.gguf import read_gguf_header

    path = export(tiny_llm_for("llama"), "gguf", tmp_path / "m.gguf")
    blob = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = blob.index(key) + len(key) + 4  # past the key and its value type (uint32)
    blob[at : at + 4] = struct.pack("<I", 2**32 - 1)
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelFormatError, match="block_count"):
        read_gguf_header(path)


def _corruptions(blob: bytes, header_end: int, count: int, seed: int):
    """(label, bytes): cuts inside the header, and a few header bytes set to edge values."""
    rng = random.Random(seed)
    for _ in range(count // 4):
        cut = rng.randrange(header_end + 64)
        yield f"cut at {cut}", blob[:cut]
    for _ in range(count - count // 4):
        data = bytearray(blob)
        where = []
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(header_end)
            data[at] = rng.choice([0, 0xFF, rng.randrange(256), data[at] ^ (1 << rng.randrange(8))])
            where.append(at)
        yield f"bytes {where} changed", bytes(data)


def test_fuzzed_files_load_or_raise_a_format_error_naming_the_file(tiny_llm_for, tmp_path):
    from llmkit.errors import UnsupportedArchitectureError
    from llmkit.export import export
    from llmkit.formats.gguf import read_gguf

    good = export(tiny_llm_for("llama"), "gguf", tmp_path / "good.gguf")
    blob = good.read_bytes()
    header_end = GGUFFile(good).tensors[0].offset
    path = tmp_path / "damaged.gguf"
    wrong = []
    for label, data in _corruptions(blob, header_end, 600, seed=0):
        path.write_bytes(data)
        try:
            read_gguf(path, torch.float32, "cpu")
        except (ModelFormatError, UnsupportedArchitectureError) as exc:
            if str(path) not in str(exc):
                wrong.append(f"{label}: the message does not name the file: {exc}")
        except Exception as exc:  # what this test is for: nothing else may escape
            wrong.append(f"{label}: {type(exc).__name__}: {exc}")
    assert not wrong, "\n".join(wrong[:10])


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # a read-only mapping
def test_release_drops_a_tensors_pages_from_resident_memory(tmp_path):
    path = tmp_path / "big.gguf"
    w = GGUFWriter(str(path), "llama")
    data = np.random.default_rng(0).integers(0, 255, (2048, 4096), dtype=np.uint8)
    w.add_tensor("big", data.view(np.int8), raw_dtype=Q.I8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    info = f.tensors[0]
    raw = torch.from_numpy(np.asarray(f.raw(info)))
    assert f.maps(raw) and not f.maps(raw.clone())
    assert int(raw.sum()) == int(data.sum())  # every page read in
    before = _mapped_kib(path)
    assert before >= 8000
    f.release(raw)
    assert _mapped_kib(path) < before - 7000
    assert int(raw.sum()) == int(data.sum())  # still readable: the pages come back from the file
