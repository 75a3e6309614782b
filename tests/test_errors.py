"""Bad input gets a message that says what is wrong and what to do, a non-zero exit, no traceback.

Command-line cases run the real ``llmkit`` script; library cases check the exception types that
the command line and the server turn into messages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_llmkit

import llmkit
from llmkit.errors import (
    ContextLengthError,
    InvalidSamplingError,
    LLMKitError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)

LONG_PROMPT = " ".join(["Paris is the capital of France."] * 40)  # well over 128 tokens


def failed(result, *needles: str) -> str:
    """Assert a clean failure whose stderr holds every needle; return stderr."""
    assert result.returncode != 0, f"expected failure, got exit 0\nstdout: {result.stdout}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"
    return result.stderr


def _copy(tiny_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_dir, dest)
    return dest


# ------------------------------------------------------------------ names that are not models


@pytest.mark.parametrize("command", [["generate", "-m", "no-such-model", "hi"], ["show", "no-such-model"],
                                     ["rm", "no-such-model"], ["chat", "-m", "no-such-model"]])
def test_unknown_model_name(command, home):
    failed(run_llmkit(*command, home=home), "no-such-model", "llmkit pull", "llmkit list")


def test_catalogue_name_not_pulled_yet(home, monkeypatch):
    monkeypatch.setenv("LLMKIT_HOME", str(home))
    for name in ("smollm2-135m-instruct", "smollm2"):
        with pytest.raises(ModelNotFoundError, match="llmkit pull smollm2-135m-instruct"):
            llmkit.load(name, pull=False)
    failed(run_llmkit("show", "smollm2", home=home), "not pulled yet", "llmkit pull smollm2-135m-instruct")


# ------------------------------------------------------------------ damaged or foreign checkpoints


@pytest.mark.parametrize("cut", ["1000", "half"])
def test_truncated_gguf(cut, smollm2_gguf, tmp_path):
    size = smollm2_gguf.stat().st_size
    n = size // 2 if cut == "half" else int(cut)
    with open(smollm2_gguf, "rb") as f:
        data = f.read(n)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFormatError, match="truncated"):
        llmkit.load(path)


def test_truncated_gguf_on_the_command_line(smollm2_gguf, tmp_path, home):
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(1000))
    failed(run_llmkit("generate", "-m", path, "hi", home=home), "cut.gguf", "truncated", "again")


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garble(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled-header"])
def test_damaged_safetensors(damage, tiny_dir, tmp_path, home):
    folder = _copy(tiny_dir, tmp_path / "damaged")
    damage(folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        llmkit.load(folder)
    failed(run_llmkit("generate", "-m", folder, "hi", home=home), "model.safetensors", "safetensors file")


def _pickle_only_folder(tiny_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, dest / name)
    (dest / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    return dest


def test_pickle_weights_are_refused(tiny_dir, tmp_path, home):
    folder = _pickle_only_folder(tiny_dir, tmp_path / "pickled")
    with pytest.raises(ModelFormatError, match="never unpickles"):
        llmkit.load(folder)
    failed(run_llmkit("generate", "-m", folder, "hi", home=home), "pytorch_model.bin", "never unpickles",
           "safetensors")
    failed(run_llmkit("pull", folder, "--quiet", home=home), "never unpickles", "safetensors")


def test_unsupported_architecture(tiny_dir, tmp_path, home):
    folder = _copy(tiny_dir, tmp_path / "mamba")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        llmkit.load(folder)
    failed(run_llmkit("generate", "-m", folder, "hi", home=home),
           "'mamba' is not supported", "llama", "mistral", "qwen2", "gpt2")


# ------------------------------------------------------------------ context window


def test_prompt_longer_than_the_context_window(tiny_dir, tiny_llm, home):
    n = len(tiny_llm._prompt_ids(LONG_PROMPT))
    assert n > tiny_llm.context_length == 128
    with pytest.raises(ContextLengthError, match=f"{n} tokens.*128"):
        tiny_llm.generate(LONG_PROMPT, max_tokens=4)
    with pytest.raises(ContextLengthError):
        tiny_llm.stream(LONG_PROMPT, max_tokens=4)  # raised by the call, not at the first piece
    failed(run_llmkit("generate", "-m", tiny_dir, "-", "--max-tokens", "4", home=home, input=LONG_PROMPT),
           f"{n} tokens", "128")


def test_prompt_plus_max_tokens_longer_than_the_context_window(tiny_dir, tiny_llm, home):
    with pytest.raises(ContextLengthError, match="max_tokens"):
        tiny_llm.generate("The quick brown fox", max_tokens=200)
    failed(run_llmkit("generate", "-m", tiny_dir, "The quick brown fox", "--max-tokens", "200", home=home),
           "max_tokens", "128")


def test_chat_outgrowing_the_context_window(tiny_dir, home):
    # piped input: the failing turn ends the run with a non-zero exit and the reason
    failed(run_llmkit("chat", "-m", tiny_dir, "--max-tokens", "120", "--temperature", "0", home=home,
                      input="Paris is the capital of France. Berlin is the capital of Germany.\n"),
           "128", "max_tokens")


def test_logits_with_too_many_ids(tiny_llm):
    assert tuple(tiny_llm.logits(list(range(128))).shape) == (128, 400)
    with pytest.raises(ContextLengthError, match="129.*128"):
        tiny_llm.logits(list(range(129)))


# ------------------------------------------------------------------ sampling settings


BAD_SAMPLING = [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"),
                ("--top-p", "1.5", "top_p"), ("--max-tokens", "0", "max_tokens"),
                ("--top-k", "-1", "top_k"), ("--presence-penalty", "3", "presence_penalty")]


@pytest.mark.parametrize("flag,value,name", BAD_SAMPLING, ids=[f"{f}={v}" for f, v, _ in BAD_SAMPLING])
def test_invalid_sampling_on_the_command_line_fails_before_loading(flag, value, name, home):
    # The model does not exist: a sampling error (not a missing-model error) proves that the
    # settings were checked before any attempt to load it.
    missing = home / "not-there.gguf"
    err = failed(run_llmkit("generate", "-m", missing, "hi", flag, value, home=home), name, "out of range",
                 "must be")
    assert "not-there" not in err


def test_invalid_sampling_in_chat_fails_before_loading(home):
    # smollm2 is a catalogue name not pulled in this empty store: loading would start a download
    failed(run_llmkit("chat", "-m", "smollm2", "--temperature", "-0.5", home=home, input="hi\n"),
           "temperature")
    assert not (home / "models").exists() and not (home / "tmp").exists()


@pytest.mark.parametrize("settings", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5},
                                      {"max_tokens": 0}, {"min_p": 2.0}], ids=str)
def test_invalid_sampling_in_python(settings, tiny_llm):
    messages = [{"role": "user", "content": "hi"}]
    for call in (lambda: tiny_llm.generate("hi", **settings), lambda: tiny_llm.stream("hi", **settings),
                 lambda: tiny_llm.chat(messages, **settings), lambda: tiny_llm.chat_stream(messages, **settings)):
        with pytest.raises(InvalidSamplingError, match=next(iter(settings))) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, LLMKitError)


# ------------------------------------------------------------------ failed pulls


def test_failed_pull_leaves_the_store_unchanged(tiny_dir, tmp_path, home):
    ok = run_llmkit("pull", tiny_dir, "--name", "keep-me", "--quiet", home=home)
    assert ok.returncode == 0, ok.stderr
    before = run_llmkit("list", home=home).stdout
    models_before = sorted(p.name for p in (home / "models").iterdir())
    assert "keep-me" in before

    failed(run_llmkit("pull", tmp_path / "does-not-exist", "--quiet", home=home), "does not exist")
    failed(run_llmkit("pull", "./does-not-exist", "--name", "keep-me", "--force", "--quiet", home=home),
           "does not exist")
    failed(run_llmkit("pull", _pickle_only_folder(tiny_dir, tmp_path / "pickled"), "--quiet", home=home),
           "never unpickles")
    failed(run_llmkit("pull", "nosuchscheme:thing", "--quiet", home=home), "nosuchscheme")

    assert run_llmkit("list", home=home).stdout == before
    assert sorted(p.name for p in (home / "models").iterdir()) == models_before
    assert not any((home / "tmp").iterdir())  # no half-pulled leftovers


# ------------------------------------------------------------------ errors nobody planned for


def test_unexpected_errors_print_one_line_and_a_hint(monkeypatch):
    import click
    from click.testing import CliRunner

    from llmkit.cli import friendly_errors

    @click.command()
    @friendly_errors
    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.delenv("LLMKIT_DEBUG", raising=False)
    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1
    assert "error: RuntimeError: boom" in result.output
    assert "LLMKIT_DEBUG=1" in result.output
    assert "Traceback" not in result.output

    monkeypatch.setenv("LLMKIT_DEBUG", "1")
    result = CliRunner().invoke(broken, [])
    assert isinstance(result.exception, RuntimeError)  # re-raised, so the traceback shows


def test_usage_errors_stay_click_usage_errors(home):
    result = run_llmkit("generate", "--temperature", "warm", "hi", home=home)
    assert result.returncode == 2
    assert "Invalid value for '--temperature'" in result.stderr and "Traceback" not in result.stderr
