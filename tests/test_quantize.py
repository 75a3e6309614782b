"""Weight-only int8 / int4 quantization (llmkit.quantize): error bounds of the quantized linear
layers, tiny quantized models end to end, and a loose top-1 parity check on the default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import llmkit
from llmkit.api import LLM
from llmkit.errors import LLMKitError
from llmkit.quantize import Int4Linear, Int8Linear, QuantizationError, quantize_model

BF16_EPS = 2.0 ** -8  # bfloat16 rounding: relative error at most 2^-9, doubled for margin


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[:, :3] *= 8  # a few outlier columns, as real checkpoints have
    return lin


def _bound(x: torch.Tensor, w: torch.Tensor, w_err: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |quantized(x) - linear(x)|: the weight error, the bfloat16 rounding of
    the activations and of the output."""
    ax = x.abs()
    return ax @ w_err.t() + BF16_EPS * (ax @ w.abs().t()) + BF16_EPS * y.abs() + 1e-5


def test_int8_linear_within_bound():
    lin = _linear(256, 96)
    q = Int8Linear.from_linear(lin)
    w = lin.weight.detach()
    scale = q.scales.float()[:, None]
    # symmetric rounding: each weight within half a step of its channel's scale
    assert ((q.dequantize() - w).abs() <= scale / 2 + 1e-6 * scale).all()
    x = torch.randn(5, 7, 256)
    with torch.no_grad():
        y, yq = lin(x), q(x)
    assert yq.dtype == torch.float32 and yq.shape == y.shape
    bound = _bound(x, w, (scale / 2).expand_as(w), y)
    assert ((yq - y).abs() <= bound).all()
    assert (yq - y).norm() / y.norm() < 0.04  # measured 2.1%: the 8x outlier columns set the scales


def test_int8_float_prefill_path_agrees_with_kernel():
    q = Int8Linear.from_linear(_linear(128, 64))
    x = torch.randn(300, 128)
    with torch.no_grad():
        q.float_path_rows = 1 << 30
        kernel = q(x)
        q.float_path_rows = 256
        floatpath = q(x)
    exact = x @ q.dequantize().t() + q.bias
    assert (floatpath - exact).abs().max() < 1e-4
    assert (kernel - exact).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_within_bound(group):
    lin = _linear(256, 96)
    q = Int4Linear.from_linear(lin, group)
    w = lin.weight.detach()
    codes, sz = Int4Linear.quantize_weight(w, group)
    scale = sz[..., 0].float().t().repeat_interleave(group, 1)  # (N, K)
    zero = sz[..., 1].float().t().repeat_interleave(group, 1)
    deq = (codes.float() - 8) * scale + zero
    # min/max grid: half a step, plus what rounding the zero point to bfloat16 can add at the ends
    w_err = scale / 2 + BF16_EPS * zero.abs() + 1e-6
    assert ((deq - w).abs() <= w_err).all()
    x = torch.randn(3, 4, 256)
    with torch.no_grad():
        y, yq = lin(x), q(x)
    assert yq.dtype == torch.float32 and yq.shape == y.shape
    # the packed kernel computes exactly that dequantized weight (up to bfloat16 rounding)
    ref = x.to(torch.bfloat16).float() @ deq.t() + lin.bias.detach()
    assert (yq - ref).abs().max() <= BF16_EPS * ref.abs().max() + 1e-3
    assert ((yq - y).abs() <= _bound(x, w, w_err, y)).all()
    # measured 9% / 12% / 17%: 4-bit steps, with the 8x outlier columns widening the groups' ranges
    assert (yq - y).norm() / y.norm() < {32: 0.12, 64: 0.15, 128: 0.2}[group]


def test_unknown_mode_and_group_size_raise():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(64, 64)])
    with pytest.raises(QuantizationError, match="int8, int4") as info:
        quantize_model(model, "int3")
    assert isinstance(info.value, LLMKitError) and isinstance(info.value, ValueError)
    with pytest.raises(QuantizationError, match="group size 48"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(QuantizationError, match="group_size"):
        quantize_model(model, "int8", group_size=32)
    assert quantize_model(model, "none") is model and isinstance(model.layers[0], nn.Linear)


def test_non_divisible_widths_fall_back_or_stay_float():
    model = nn.Module()
    model.layers = nn.ModuleList([
        nn.Linear(96, 64),    # 64 does not divide 96: group 32
        nn.Linear(80, 64),    # no group size divides 80: stays float
        nn.Linear(64, 100),   # 100 outputs: not a multiple of the kernel's 16
        nn.Linear(128, 64),
    ])
    quantize_model(model, "int4", group_size=64)
    a, b, c, d = model.layers
    assert isinstance(a, Int4Linear) and a.group_size == 32
    assert isinstance(b, nn.Linear) and isinstance(c, nn.Linear)
    assert isinstance(d, Int4Linear) and d.group_size == 64
    info = model.quantization
    assert set(info["skipped"]) == {"layers.1", "layers.2"}
    assert "80" in info["skipped"]["layers.1"] and "16" in info["skipped"]["layers.2"]
    assert "used 32" in info["notes"]["layers.0"]
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert a(x).shape == (2, 64)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model, "int8")


def test_non_cpu_model_is_refused():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(64, 64, device="meta")])
    with pytest.raises(QuantizationError, match="CPU"):
        quantize_model(model, "int4")


def _load_tiny(folder: Path) -> LLM:
    llm = llmkit.load(folder, device="cpu")
    return LLM(llm.model, llm.tokenizer)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiny_model_quantized_logits_close_and_generates(tiny_model_dir, mode):
    folder = tiny_model_dir("llama")
    ref = _load_tiny(folder)
    llm = _load_tiny(folder)
    quantize_model(llm.model, mode)
    assert isinstance(llm.model.lm_head, Int8Linear)  # the head is int8 by default in both modes
    assert isinstance(llm.model.layers[1].attn.q_proj, Int8Linear if mode == "int8" else Int4Linear)
    assert all(not isinstance(m, nn.Linear) for m in llm.model.modules())
    ids = ref.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    a, b = ref.logits(ids), llm.logits(ids)
    assert b.dtype == torch.float32 and b.shape == a.shape
    rel = ((b - a).norm() / a.norm()).item()
    assert rel < {"int8": 0.02, "int4": 0.15}[mode]  # measured 0.009 / 0.069
    # decoding through the KV cache gives what a full recompute of the quantized model gives
    out = llm.generate_ids(ids[:5], max_tokens=12, temperature=0, ignore_eos=True)
    assert len(out) == 12
    full = llm.logits(ids[:5] + out)
    step = full[4:-1]
    picked = step.gather(1, torch.tensor(out)[:, None]).squeeze(1)
    assert (step.max(dim=1).values - picked).max() < 1e-3  # each greedy pick is (up to ties) the argmax
    text = llm.generate("The quick", max_tokens=8, temperature=0)
    assert isinstance(text, str)


def test_tied_head_is_untied_and_embedding_stays_float(tiny_model_dir):
    llm = _load_tiny(tiny_model_dir("qwen2"))  # qwen2 tiny model ties its embeddings
    assert llm.model.lm_head.weight is llm.model.embed.weight
    before = llm.model.embed.weight.detach().clone()
    quantize_model(llm.model, "int4", head="int4")
    assert isinstance(llm.model.lm_head, Int4Linear)
    assert llm.model.embed.weight.dtype == torch.float32 and torch.equal(llm.model.embed.weight, before)
    assert len(llm.generate_ids([5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True)) == 4


def test_head_can_stay_float(tiny_model_dir):
    llm = _load_tiny(tiny_model_dir("llama"))
    quantize_model(llm.model, "int8", head=False)
    assert isinstance(llm.model.lm_head, nn.Linear)
    assert isinstance(llm.model.layers[0].mlp.down_proj, Int8Linear)


PARITY_TEXT = (Path(llmkit.__file__).parent / "data" / "heldout.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mode, threshold", [("int8", 0.92), ("int4", 0.93)])
def test_default_model_top1_agreement(smollm2, smollm2_gguf, mode, threshold):
    ids = smollm2.tokenizer.encode(PARITY_TEXT, add_special_tokens=True)[:200]
    ref = smollm2.logits(ids)  # the shared float model: read, never modified
    llm = llmkit.load(smollm2_gguf, quantize=mode)
    assert llm.executor_name == "torch" and llm.quantize == mode
    got = llm.logits(ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # measured on these 200 tokens: int8 0.955, int4 0.970 (0.93-0.96 / 0.945-0.985 on two other
    # 200-token stretches of the text). int4 agrees better than int8 because this GGUF's block
    # weights are Q4_1 (4-bit, groups of 32, scale and minimum): int4 group 32 re-expresses them
    # almost exactly, while int8 per-channel re-rounds them; the head is int8 in both modes.
    assert agree >= threshold, f"{mode}: top-1 agreement {agree:.3f} < {threshold}"
