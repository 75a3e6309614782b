"""Quantized matrices (llmkit.engine.quant): dequantization bit for bit against the gguf package,
products against "dequantize, then multiply" on every kernel path this machine builds, weight
quantization against gguf's and within each format's error, row lookups, and refusals."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from llmkit.engine import quant
from llmkit.errors import ModelFormatError

pytestmark = pytest.mark.skipif(not quant.available(), reason="no C compiler to build the kernels")

TYPES = sorted(quant.TYPES)
NAMES = {t: quant.TYPES[t][0] for t in TYPES}


def variants() -> list[str]:
    """The kernel paths to check: what the machine runs, the AVX2 path where the machine has more,
    the VNNI path (emulated where the machine lacks VNNI) and the portable C."""
    flags = set(quant.native.cpu_flags().split())
    names = ["native"]
    if "avx2" in flags and "avx512f" in flags:
        names.append("avx2")
    if "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}:
        names.append("vnni-emulated")
    return names + ["portable"]


@pytest.fixture(scope="module", params=variants())
def kernels(request):
    k = quant.kernels(request.param)
    if k is None:
        pytest.skip(f"the {request.param} kernels do not build here")
    return k


def random_blocks(ggml_type: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random block bytes [rows, row bytes] with realistic half-precision scales (random bytes
    elsewhere: every quantized value and every scale bit pattern occurs)."""
    rng = np.random.default_rng(seed)
    _, elems, size = quant.TYPES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // elems, size), dtype=np.uint8)

    def halves(n: int) -> np.ndarray:
        values = rng.uniform(0.5, 1.5, (rows, cols // elems, n)) * 10.0 ** rng.uniform(-3, -1, (rows, cols // elems, n))
        values *= rng.choice([-1.0, 1.0], values.shape)
        return values.astype(np.float16).view(np.uint8)

    scales = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}[ggml_type]
    for at in scales:
        raw[..., at:at + 2] = halves(1)
    return raw.reshape(rows, -1)


def reference(kern: quant.Kernels, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantized per block of 32 exactly as the kernels do, times the dequantized weight, in
    float64; and the bound on |terms| that scales the float32 rounding of the kernels' sums."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    d, s = torch.empty(m, k // 32), torch.empty(m, k // 32)
    b16 = torch.empty(m, k // 16, dtype=torch.int16)
    xx = x.contiguous()
    kern.quantize_activations(xx.data_ptr(), xx.dtype == torch.bfloat16, m, k, q.data_ptr(), d.data_ptr(),
                              s.data_ptr(), b16.data_ptr())
    xq = (q.double().view(m, -1, 32) * d.double()[..., None]).view(m, k)
    w = weight.double()
    return xq @ w.T, xq.abs() @ w.abs().T


def check_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, tol: float = 2e-6) -> None:
    err = (got.double() - want).abs()
    assert bool((err <= tol * scale + 1e-12).all()), f"max error {float((err / scale.clamp(min=1e-30)).max()):.3g} of |terms|"


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
def test_dequantize_equals_gguf_bit_for_bit(ggml_type):
    rows, cols = 13, 3 * quant.TYPES[ggml_type][1]  # 13 rows: the last group of 8 is padded
    raw = random_blocks(ggml_type, rows, cols)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_type))
    m = quant.QuantMatrix.from_gguf(raw, ggml_type, (rows, cols))
    got = m.dequantize()
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("rows", [1, 3, 8, 17, 70])
@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES.get)
def test_product_equals_dequantize_then_matmul(kernels, ggml_type, rows):
    """1 row (the decode kernel), a few, and more than one block of 64 activation rows; 13 and 24
    output rows (a partial group of 8 and whole ones); in_features of 2 and 3 blocks."""
    g = torch.Generator().manual_seed(ggml_type * 100 + rows)
    for out, blocks in ((13, 3), (24, 2)):
        cols = blocks * quant.TYPES[ggml_type][1]
        raw = random_blocks(ggml_type, out, cols, seed=rows)
        m = quant.QuantMatrix.from_gguf(torch.from_numpy(raw), ggml_type, (out, cols), kernels=kernels)
        x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
        want, scale = reference(kernels, x, m.dequantize())
        y = torch.empty(rows, out)
        kernels.matmul(ggml_type, m._ptr, out, cols, x.data_ptr(), 0, y.data_ptr(), 0, rows, 2)
        check_close(y, want, scale)


@pytest.mark.parametrize("ggml_type", [3, 12, 14], ids=NAMES.get)
def test_bfloat16_in_bfloat16_out(kernels, ggml_type):
    cols = 2 * quant.TYPES[ggml_type][1]
    m = quant.QuantMatrix.from_gguf(random_blocks(ggml_type, 16, cols), ggml_type, (16, cols), kernels=kernels)
    x = torch.randn(2, 3, cols).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 16)
    want, scale = reference(kernels, x.reshape(-1, cols), m.dequantize())
    check_close(y.reshape(-1, 16).float(), want, scale + want.abs() * 2**-8 / 2e-6)  # bfloat16 output rounding


@pytest.mark.parametrize("ggml_type", [3, 8, 12, 14], ids=NAMES.get)
def test_many_rows(ggml_type):
    """Prefill-sized inputs: through the integer kernel, and through the tiled path (dequantize,
    then torch's matmul: float rounding only) that bfloat16 takes where oneDNN has it natively."""
    cols = 2 * quant.TYPES[ggml_type][1]
    m = quant.QuantMatrix.from_gguf(random_blocks(ggml_type, 40, cols), ggml_type, (40, cols))
    x = torch.randn(quant.PREFILL_ROWS + 3, cols)
    want, scale = reference(quant.kernels(), x, m.dequantize())
    check_close(m(x), want, scale)
    w = m.dequantize().double()
    for dtype in (torch.float32, torch.bfloat16):
        xx = x.to(dtype)
        exact = xx.double() @ w.T
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16 weights and output on the native path
        torch.testing.assert_close(m._prefill(xx).double(), exact, rtol=tol, atol=tol * float((xx.double().abs() @ w.abs().T).max()))


def test_activations_are_quantized_round_half_even_per_block_of_32(kernels):
    x = torch.randn(3, 96) * torch.tensor([[1.0], [1e-3], [50.0]])
    x[1, :32] = 0.0  # an all-zero block
    q = torch.empty(3, 96, dtype=torch.int8)
    d, s, b16 = torch.empty(3, 3), torch.empty(3, 3), torch.empty(3, 6, dtype=torch.int16)
    kernels.quantize_activations(x.data_ptr(), 0, 3, 96, q.data_ptr(), d.data_ptr(), s.data_ptr(), b16.data_ptr())
    blocks = x.view(3, 3, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    want = torch.round(blocks * inv[..., None]).to(torch.int8)
    assert torch.equal(q.view(3, 3, 32), want)
    assert torch.equal(d, amax / 127.0)
    assert torch.equal(b16.view(3, 3, 2), want.view(3, 3, 2, 16).sum(-1).to(torch.int16))
    assert torch.equal(s, d * want.sum(-1).float())


def test_results_do_not_depend_on_the_thread_count():
    m = quant.QuantMatrix.from_gguf(random_blocks(3, 100, 256), 3, (100, 256))
    x = torch.randn(5, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [m(x[:1]), m(x)]
        torch.set_num_threads(2)
        two = [m(x[:1]), m(x)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_0"])
def test_quantize_equals_gguf(kind):
    w = torch.randn(24, 96) * 0.05
    w[3, :32] = 0.0  # a zero block
    m = quant.QuantMatrix.quantize(w, kind)
    want = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(quant.KINDS[kind]))
    dq = gguf.quants.dequantize(want, gguf.GGMLQuantizationType(quant.KINDS[kind]))
    assert np.array_equal(m.dequantize().numpy().view(np.uint32), dq.view(np.uint32))


@pytest.mark.parametrize("kind, cols, ggml_type, bound", [
    ("q8_0", 512, 8, 0.01), ("q4_0", 512, 2, 0.12), ("q5_0", 512, 6, 0.06), ("q4_k", 512, 12, 0.10),
    ("q4_k", 576, 6, 0.06),  # not whole blocks of 256: Q5_0, as llama.cpp does
])
def test_quantize_round_trips_within_the_format_error(kind, cols, ggml_type, bound):
    w = torch.randn(40, cols) * 0.02
    m = quant.QuantMatrix.quantize(w, kind)
    assert m.ggml_type == ggml_type and m.shape == (40, cols)
    err = (m.dequantize() - w).pow(2).mean().sqrt() / w.std()
    assert float(err) < bound
    x = torch.randn(2, cols)
    want, scale = reference(quant.kernels(), x, m.dequantize())
    check_close(m(x), want, scale)


def test_q4_k_fits_each_sub_block_better_than_its_range():
    """Least-squares scales beat the plain min/max grid (what Q4_1 would store at this size)."""
    w = torch.randn(64, 256) * 0.02
    fitted = (quant.QuantMatrix.quantize(w, "q4_k").dequantize() - w).pow(2).mean()
    blocks = w.view(-1, 32)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    grid = ((blocks - lo) / step).round().clamp(0, 15) * step + lo
    assert float(fitted) < float((grid - blocks).pow(2).mean())


def test_rows_equal_the_dequantized_rows():
    m = quant.QuantMatrix.from_gguf(random_blocks(8, 50, 64), 8, (50, 64))
    ids = torch.tensor([[0, 49, 7], [7, 8, 31]])
    got = m.rows(ids)
    assert got.shape == (2, 3, 64) and got.dtype == torch.float32
    assert torch.equal(got, m.dequantize()[ids])
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        m.rows(torch.tensor([50]))


def test_refusals_say_what_is_wrong():
    raw = random_blocks(3, 4, 64)
    with pytest.raises(ModelFormatError, match="takes 160 bytes, got 159"):
        quant.QuantMatrix.from_gguf(raw.reshape(-1)[:-1], 3, (4, 64))
    with pytest.raises(ModelFormatError, match="whole 32-value blocks"):
        quant.QuantMatrix.from_gguf(raw, 3, (4, 60))
    with pytest.raises(quant.QuantError, match="supports Q4_0"):
        quant.QuantMatrix.from_gguf(raw, 10, (4, 64))  # Q2_K
    with pytest.raises(quant.QuantError, match="unknown quantization"):
        quant.QuantMatrix.quantize(torch.randn(4, 64), "q3")
    with pytest.raises(quant.QuantError, match="multiple of 32"):
        quant.QuantMatrix.quantize(torch.randn(4, 48), "q8_0")
    m = quant.QuantMatrix.from_gguf(raw, 3, (4, 64))
    with pytest.raises(quant.QuantError, match="takes 64"):
        m(torch.randn(2, 65))
    with pytest.raises(quant.QuantError, match=r"out must be a contiguous torch.float32 tensor of shape \(2, 4\)"):
        m(torch.randn(2, 64), out=torch.empty(1, 4))
    out = torch.empty(2, 4)
    assert m(torch.ones(2, 64), out=out) is out and torch.equal(out, m(torch.ones(2, 64)))
    assert quant.supported(3) and quant.supported(14) and not quant.supported(10) and not quant.supported(0)


def test_without_kernels_nothing_is_half_made(monkeypatch):
    monkeypatch.setenv("LLMKIT_NO_KERNELS", "1")
    monkeypatch.setattr(quant, "_kernels", {})
    assert not quant.available()
    with pytest.raises(quant.QuantError, match="could not be built"):
        quant.QuantMatrix.quantize(torch.randn(4, 64), "q8_0")


@pytest.mark.slow
def test_the_default_models_tensors(smollm2_gguf):
    """SmolLM2's GGUF: its Q4_1 layers and Q8_0 embedding, read as stored."""
    from llmkit.formats.gguf_file import GGUFFile

    f = GGUFFile(smollm2_gguf)
    infos = {i.name: i for i in f.tensors}
    for name in ("blk.0.ffn_down.weight", "blk.3.attn_k.weight", "token_embd.weight"):
        info = infos[name]
        m = quant.QuantMatrix.from_gguf(f.raw(info), info.type, info.shape)
        dense = f.tensor(info)
        assert torch.equal(m.dequantize(), dense)
        assert torch.equal(m.rows(torch.tensor([5, 0])), dense[[5, 0]])
        x = torch.randn(3, info.shape[1])
        want, scale = reference(quant.kernels(), x, dense)
        check_close(m(x), want, scale)
