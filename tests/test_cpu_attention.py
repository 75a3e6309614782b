"""The C decode-attention kernel: its numbers against float64 attention, its bounds checks, and the
model's torch path where it cannot be built."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler to build the kernel")


def reference(q, k, v, slots, positions, window):
    """float64 softmax(q k^T / sqrt(d)) v over each sequence's visible keys."""
    b, h, d = q.shape
    hk = k.shape[1]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        hi = int(positions[i]) + 1
        lo = max(0, hi - window) if window else 0
        keys = k[int(slots[i]), :, lo:hi].double().repeat_interleave(h // hk, dim=0)  # (H, n, D)
        values = v[int(slots[i]), :, lo:hi].double().repeat_interleave(h // hk, dim=0)
        scores = torch.einsum("hd,hnd->hn", q[i].double(), keys) / d ** 0.5
        out[i] = torch.einsum("hn,hnd->hd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("window", [None, 7])
def test_kernel_equals_float64_attention(dtype, tol, window):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(6, 2, 40, 16, generator=g).to(dtype)
    v = torch.randn(6, 2, 40, 16, generator=g).to(dtype)
    q = torch.randn(4, 6, 16, generator=g).to(dtype)  # 3 query heads per kv head
    slots = torch.tensor([5, 0, 3, 1])  # any order, not consecutive
    positions = torch.tensor([0, 39, 12, 25])  # one sequence sees only its own first key
    ranges = cpu_attention.prepare(slots, positions, window, 6, 40, 6, 2, 16)
    got = cpu_attention.decode_attention(q, k, v, ranges)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), reference(q, k, v, slots, positions, window), atol=tol, rtol=tol)


def test_positions_or_slots_outside_the_cache_are_refused():
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_attention.prepare(torch.tensor([0, 6]), torch.tensor([3, 3]), None, 6, 40, 6, 2, 16)
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_attention.prepare(torch.tensor([0]), torch.tensor([40]), None, 6, 40, 6, 2, 16)


def test_without_a_compiler_the_model_keeps_its_torch_path(tiny_model_dir, monkeypatch):
    llm = llmkit.load(tiny_model_dir("mistral"))  # grouped-query heads and a sliding window
    prompts = ["The quick brown fox", "def add(a, b):", "Paris"]
    with_kernel = llm.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(cpu_attention, "_lib", None)
    monkeypatch.setattr(cpu_attention, "_tried", False)
    assert not cpu_attention.available()
    fresh = llmkit.load(tiny_model_dir("mistral"))  # its executor asks for the kernel when it is built
    assert not fresh.engine.executor.ops.kernel
    without = fresh.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True)
    assert without == with_kernel


def test_a_kernel_folder_others_can_write_keeps_the_torch_path(tmp_path, monkeypatch):
    from llmkit.engine import native

    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path))
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels").chmod(0o777)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.setattr(cpu_attention, "_lib", None)
    monkeypatch.setattr(cpu_attention, "_tried", False)
    with pytest.warns(RuntimeWarning, match="can be written by other users"):
        assert not cpu_attention.available()
    assert list((tmp_path / "kernels").iterdir()) == []
