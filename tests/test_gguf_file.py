"""llmkit's fast GGUF reader against the gguf package's reader, on the real model and on files
written here with every tensor type the fast path dequantizes itself."""

from __future__ import annotations

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
