"""The example plugin package (examples/llmkit-redact), installed the way pip installs it: its
folder on sys.path and a dist-info with its entry point, so no pip run and no network."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmkit import plugins
from llmkit.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llmkit-redact"


def _entry_point_line() -> str:
    text = (EXAMPLE / "pyproject.toml").read_text()
    section = text.split("[project.entry-points.llmkit]", 1)[1]
    name, value = next(line for line in section.splitlines() if "=" in line).split("=", 1)
    return f"{name.strip()} = {value.strip().strip(chr(34))}"  # TOML string -> entry_points.txt value


@pytest.fixture
def redact_installed(tmp_path, monkeypatch):
    # the entry point comes from the example's own pyproject.toml, so the test checks what pip would install
    info = tmp_path / "llmkit_redact-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmkit-redact\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[llmkit]\n{_entry_point_line()}\n")
    (tmp_path / "broken_example.py").write_text("raise RuntimeError('plugin bug')\n")
    broken = tmp_path / "broken_example-1.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-example\nVersion: 1.0\n")
    (broken / "entry_points.txt").write_text("[llmkit]\nbroken = broken_example\n")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LLMKIT_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()
    for name in [m for m in sys.modules if m.startswith(("llmkit_redact", "broken_example"))]:
        sys.modules.pop(name, None)


def test_redact_finds_pii_and_leaves_the_rest():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from llmkit_redact import find, redact
    finally:
        sys.path.remove(str(EXAMPLE))
    text = ("Write to jane.doe@example.com or call +1 (415) 555-0100. Card 4111 1111 1111 1111, "
            "IBAN GB82 WEST 1234 5698 7654 32, server 192.168.10.4, SSN 123-45-6789. "
            "Order 1234 5678 9012 3456 shipped on 2024-06-01; version 1.2.3.")
    out = redact(text)
    assert out == ("Write to [EMAIL] or call [PHONE]. Card [CARD], IBAN [IBAN], server [IP], SSN [SSN]. "
                   "Order 1234 5678 9012 3456 shipped on 2024-06-01; version 1.2.3.")
    assert [f.kind for f in find(text)] == ["EMAIL", "PHONE", "CARD", "IBAN", "IP", "SSN"]


def test_plugin_registers_through_four_hooks(redact_installed):
    assert "redact" in plugins.registry("commands")
    assert "redact-pii" in plugins.registry("cleaners")
    route = plugins.registry("routes")["redact"]
    assert (route.method, route.path) == ("POST", "/v1/redact")
    assert route.handler({"text": "mail a@b.io"})["text"] == "mail [EMAIL]"
    assert plugins.registry("cleaners")["redact-pii"]("ip 10.0.0.1") == "ip [IP]"

    middleware = plugins.registry("middleware")["redact"]
    request = {"model": "m", "messages": [{"role": "user", "content": "I am bob@example.org"},
                                          {"role": "user", "content": [{"type": "text", "text": "call 0044 20 7946 0958"}]}]}
    cleaned = middleware.on_request(request)
    assert cleaned["messages"][0]["content"] == "I am [EMAIL]"
    assert cleaned["messages"][1]["content"][0]["text"] == "call [PHONE]"
    assert request["messages"][0]["content"] == "I am bob@example.org"  # the caller's body is untouched
    assert middleware.on_request({"prompt": "to x@y.com"})["prompt"] == "to [EMAIL]"
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Her card is 4111111111111111"}}]}
    assert middleware.on_response(answer)["choices"][0]["message"]["content"] == "Her card is [CARD]"
    chunk = {"choices": [{"index": 0, "delta": {"content": "x@y.com"}}]}
    assert middleware.on_response(chunk)["choices"][0]["delta"]["content"] == "[EMAIL]"
    assert middleware.on_response({"choices": [{"text": "ip 8.8.8.8"}]})["choices"][0]["text"] == "ip [IP]"


def test_redact_command_runs_through_the_cli(redact_installed):
    runner = CliRunner()
    result = runner.invoke(main, ["redact", "Mail jane@example.com now"])
    assert result.exit_code == 0, result.output
    assert result.output == "Mail [EMAIL] now\n"
    result = runner.invoke(main, ["redact", "--show"], input="call +44 20 7946 0958\n")
    assert result.exit_code == 0, result.output
    assert result.output.split()[0] == "PHONE"
    assert "redact" in runner.invoke(main, ["--help"]).output


def test_llmkit_plugins_lists_what_each_registers_and_failures(redact_installed):
    runner = CliRunner()
    result = runner.invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "redact  (llmkit-redact 0.1.0)" in out
    assert "middleware: redact" in out and "routes: redact" in out and "cleaners: redact-pii" in out
    assert "builtin" in out and "exporters: gguf, hf, onnx, pt2, torchscript" in out
    assert "broken  failed: RuntimeError: plugin bug" in out

    info = json.loads(runner.invoke(main, ["plugins", "--json"]).output)
    redact = next(p for p in info["plugins"] if p["name"] == "redact")
    assert redact["registers"] == {"cleaners": ["redact-pii"], "commands": ["redact"], "middleware": ["redact"],
                                   "routes": ["redact"]}
    assert info["failed"] == [{"name": "broken", "reason": "RuntimeError: plugin bug"}]


def test_plugins_left_out_by_llmkit_plugins_are_listed_as_not_loaded(redact_installed, monkeypatch):
    monkeypatch.setenv("LLMKIT_PLUGINS", "")
    plugins.reset()
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "redact  (installed, not loaded" in result.output
    assert "redact" not in plugins.registry("commands")
