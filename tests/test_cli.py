"""The real ``llmkit`` command, run as a subprocess: what a user types is what is tested."""

from __future__ import annotations

import pytest
from cli_helpers import run_llmkit

COMMANDS = ["bench", "chat", "eval", "explain", "export", "finetune", "generate", "list", "plugins", "prepare",
            "pretrain", "pull", "rm", "run", "serve", "show", "tasks"]
PROMPT = "The quick brown fox"


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


# ------------------------------------------------------------------ help


def test_help_lists_every_command(home):
    from llmkit.cli import main

    assert sorted(main.list_commands(None)) == COMMANDS  # a new command gets its help checked below
    out = ok(run_llmkit("--help", home=home))
    for command in COMMANDS:
        assert f"  {command} " in out, command


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, home):
    out = ok(run_llmkit(command, "--help", home=home))
    assert f"Usage: llmkit {command}" in out


def test_version(home):
    assert "version" in ok(run_llmkit("--version", home=home))


# ------------------------------------------------------------------ generate


def test_generate_prints_what_the_library_generates(tiny_dir, tiny_llm, home):
    expected = tiny_llm.generate(PROMPT, max_tokens=8, temperature=0)
    args = ("generate", "-m", tiny_dir, "--temperature", "0", "--max-tokens", "8")
    assert ok(run_llmkit(*args, PROMPT, home=home)) == expected + "\n"
    assert ok(run_llmkit(*args, "--no-stream", PROMPT, home=home)) == expected + "\n"


def test_generate_reads_the_prompt_from_stdin(tiny_dir, tiny_llm, home):
    expected = tiny_llm.generate(PROMPT, max_tokens=8, temperature=0)
    args = ("generate", "-m", tiny_dir, "--temperature", "0", "--max-tokens", "8")
    # the newline echo adds is not part of the prompt
    assert ok(run_llmkit(*args, "-", home=home, input=PROMPT + "\n")) == expected + "\n"
    assert ok(run_llmkit(*args, home=home, input=PROMPT)) == expected + "\n"


def test_generate_with_the_default_model(smollm2_gguf, home):
    result = run_llmkit("generate", "-m", smollm2_gguf, "The capital of France is",
                        "--max-tokens", "20", "--temperature", "0", home=home)
    assert "Paris" in ok(result)


# ------------------------------------------------------------------ chat


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_chat_keeps_earlier_turns_in_context(tiny_dir, tiny_llm, home):
    user1, user2 = "The quick brown fox", "Paris is the capital"
    n = 8
    answer1 = tiny_llm.chat([_turn("user", user1)], temperature=0, max_tokens=n)
    answer2 = tiny_llm.chat([_turn("user", user1), _turn("assistant", answer1), _turn("user", user2)],
                            temperature=0, max_tokens=n)
    # the check below only proves something if the first turn changes the second answer
    assert answer2 != tiny_llm.chat([_turn("user", user2)], temperature=0, max_tokens=n)

    out = ok(run_llmkit("chat", "-m", tiny_dir, "--temperature", "0", "--max-tokens", n, home=home,
                        input=f"{user1}\n{user2}\n"))
    assert out == f"{answer1}\n{answer2}\n"


def test_chat_reset_starts_over_and_exit_leaves(tiny_dir, tiny_llm, home):
    user1, user2 = "The quick brown fox", "Paris is the capital"
    answer1 = tiny_llm.chat([_turn("user", user1)], temperature=0, max_tokens=8)
    fresh = tiny_llm.chat([_turn("user", user2)], temperature=0, max_tokens=8)
    in_context = tiny_llm.chat([_turn("user", user1), _turn("assistant", answer1), _turn("user", user2)],
                               temperature=0, max_tokens=8)
    assert fresh != in_context

    out = ok(run_llmkit("chat", "-m", tiny_dir, "--temperature", "0", "--max-tokens", "8", home=home,
                        input=f"{user1}\n/reset\n\n{user2}\n/exit\nnot read\n"))
    assert out == f"{answer1}\n{fresh}\n"


def test_chat_system_message(tiny_dir, tiny_llm, home):
    system, user = "You are terse.", "Paris is the capital"
    expected = tiny_llm.chat([_turn("system", system), _turn("user", user)], temperature=0, max_tokens=8)
    out = ok(run_llmkit("chat", "-m", tiny_dir, "--system", system, "--temperature", "0",
                        "--max-tokens", "8", home=home, input=user + "\n"))
    assert out == expected + "\n"


# ------------------------------------------------------------------ store commands


def test_pull_list_show_generate_rm(tiny_dir, tiny_llm, home):
    assert "No models stored yet" in ok(run_llmkit("list", home=home))

    out = ok(run_llmkit("pull", tiny_dir, "--name", "tiny-llama", "--quiet", home=home))
    assert "stored at" in out and (home / "models" / "tiny-llama").is_dir()
    assert "tiny-llama" in ok(run_llmkit("list", home=home))

    shown = ok(run_llmkit("show", "tiny-llama", home=home))
    assert "name:     tiny-llama" in shown
    assert "format:   hf" in shown
    assert "arch:     llama, 2 layers, hidden 64, context 128" in shown

    # a stored model is used by its name
    expected = tiny_llm.generate(PROMPT, max_tokens=4, temperature=0)
    out = ok(run_llmkit("generate", "-m", "tiny-llama", PROMPT, "--max-tokens", "4", "--temperature", "0",
                        home=home))
    assert out == expected + "\n"

    assert "removed tiny-llama" in ok(run_llmkit("rm", "tiny-llama", home=home))
    listing = ok(run_llmkit("list", home=home))
    assert "tiny-llama" not in listing and "No models stored yet" in listing


def test_show_reads_the_gguf_architecture(smollm2_gguf):
    store_home = smollm2_gguf.parents[2]  # <home>/models/<name>/<file>.gguf
    shown = ok(run_llmkit("show", "smollm2", home=store_home))
    assert "name:     smollm2-135m-instruct" in shown
    assert "arch:     llama, 30 layers, hidden 576, context 8192" in shown


def test_pull_file_picks_one_gguf(tmp_path, home):
    from gguf import GGUFWriter

    folder = tmp_path / "two-ggufs"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        w = GGUFWriter(str(folder / name), "llama")
        w.add_name(name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    refused = run_llmkit("pull", folder, "--quiet", home=home)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr + refused.stdout
    assert "--file" in refused.stderr

    ok(run_llmkit("pull", folder, "--file", "b.gguf", "--name", "picked", "--quiet", home=home))
    shown = ok(run_llmkit("show", "picked", home=home))
    assert "b.gguf" in shown and "a.gguf" not in shown
