"""Plugins: third-party packages add architectures and sources through entry points."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest

import llmkit
from llmkit import plugins, store

PLUGIN = '''
from llmkit.plugins import hookimpl
from llmkit.formats.archs import BUILTIN_ARCHITECTURES
from llmkit.store import PathSource


@hookimpl
def register_architectures(register):
    # a renamed Llama: checkpoints whose config.json says model_type "myllama"
    llama = BUILTIN_ARCHITECTURES["llama"]

    def config_from_hf(cfg):
        config = llama.config_from_hf({**cfg, "model_type": "llama"})
        config.architecture = "myllama"
        return config

    register("myllama", type(llama)(name="myllama", config_from_hf=config_from_hf,
                                    weights_from_hf=llama.weights_from_hf))


@hookimpl
def register_sources(register):
    register("local", PathSource())   # llmkit pull local:/some/folder
'''


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """Install two plugin 'packages' the way pip would: modules plus dist-info entry points."""
    (tmp_path / "good_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs a library that is missing')\n")
    for name in ("good", "broken"):
        info = tmp_path / f"{name}_plugin-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[llmkit]\n{name} = {name}_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LLMKIT_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()
    for mod in ("good_plugin", "broken_plugin"):
        sys.modules.pop(mod, None)


def test_builtins_register_through_the_hooks():
    assert {"llama", "mistral", "qwen2", "gpt2"} <= set(plugins.registry("architectures"))
    assert {"pypi", "hf", "path"} <= set(plugins.registry("sources"))


def test_entry_point_plugin_adds_architecture_and_source(installed_plugins, tiny_model_dir, tmp_path,
                                                        monkeypatch):
    assert "myllama" in plugins.registry("architectures")
    assert "local" in plugins.registry("sources")
    # a broken plugin is reported by name and does not stop the good one
    failures = plugins.failures()
    assert [f.name for f in failures] == ["broken"]
    assert "needs a library that is missing" in failures[0].reason

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_model_dir("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "myllama"
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = llmkit.load(folder)
    reference = llmkit.load(tiny_model_dir("llama"))
    assert llm.config.architecture == "myllama"
    assert llm.generate("The quick", max_tokens=5, temperature=0) == reference.generate(
        "The quick", max_tokens=5, temperature=0)

    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    path = store.pull(f"local:{folder}", name="renamed", progress=False)
    assert store.show("renamed").source == f"local:{folder}"
    assert path.is_dir()


def test_llmkit_plugins_selects_a_subset(installed_plugins, monkeypatch):
    monkeypatch.setenv("LLMKIT_PLUGINS", "")
    plugins.reset()
    assert "myllama" not in plugins.registry("architectures")
    assert plugins.failures() == []
    monkeypatch.setenv("LLMKIT_PLUGINS", "good")
    plugins.reset()
    assert "myllama" in plugins.registry("architectures")
    assert plugins.failures() == []


def test_unknown_architecture_names_the_supported_ones():
    from llmkit.errors import UnsupportedArchitectureError
    from llmkit.formats.archs import get_architecture

    with pytest.raises(UnsupportedArchitectureError, match="llama.*mistral|gpt2"):
        get_architecture("mamba")
