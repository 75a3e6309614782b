"""Building and loading native kernels: a private kernel folder, atomic builds, and refusal of a
folder or library that someone else could have written."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat

import pytest

from llmkit.engine import native

SOURCE = "int answer(void) { return 42; }\n"
FUNCTIONS = {"answer": ([], ctypes.c_int)}

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "llmkit-home"
    monkeypatch.setenv("LLMKIT_HOME", str(home))
    monkeypatch.setattr(native, "_loaded", {})  # each test builds and loads afresh
    monkeypatch.setattr(native, "_warned", set())
    return home


def build():
    return native.load("probe", SOURCE, (), FUNCTIONS)


def library(home):
    (path,) = (home / "kernels").glob("probe-*.so")
    return path


def test_build_goes_to_a_private_folder_in_one_piece(home):
    lib = build()
    assert lib is not None and lib.answer() == 42
    folder = home / "kernels"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.name for p in folder.iterdir()] == [library(home).name]  # no temporary left behind
    assert not library(home).stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def test_a_later_process_loads_the_cached_build_without_compiling(home, monkeypatch):
    assert build() is not None
    built = library(home).stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("compiled again"))
    lib = build()
    assert lib.answer() == 42 and library(home).stat().st_mtime_ns == built


def test_a_folder_others_can_write_is_refused_with_one_warning(home):
    folder = home / "kernels"
    folder.mkdir(parents=True)
    folder.chmod(0o770)
    with pytest.warns(RuntimeWarning, match="can be written by other users") as caught:
        assert build() is None
        assert build() is None
    assert len(caught) == 1
    assert list(folder.iterdir()) == []  # nothing built into it


def test_a_library_others_can_write_is_not_loaded(home, monkeypatch):
    assert build() is not None
    library(home).chmod(0o666)
    monkeypatch.setattr(native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="can be written by other users"):
        assert build() is None


def test_a_symlink_in_place_of_the_library_is_not_followed(home, monkeypatch, tmp_path):
    assert build() is not None
    target = library(home)
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(target, elsewhere)
    target.unlink()
    target.symlink_to(elsewhere)
    monkeypatch.setattr(native, "_loaded", {})
    assert build() is None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give files to another user")
def test_a_folder_or_library_of_another_user_is_refused(home, monkeypatch):
    nobody = 65534
    assert build() is not None
    os.chown(library(home), nobody, nobody)
    monkeypatch.setattr(native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="belongs to user id 65534"):
        assert build() is None
    os.chown(home / "kernels", nobody, nobody)
    monkeypatch.setattr(native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="belongs to user id 65534"):
        assert build() is None


def test_no_compiler_or_kernels_switched_off_gives_none(home, monkeypatch):
    monkeypatch.setenv("CC", str(home / "no-such-cc"))
    assert build() is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("LLMKIT_NO_KERNELS", "1")
    assert build() is None


def test_source_that_does_not_compile_gives_none(home):
    assert native.load("broken", "this is not C", (), {}) is None
    assert [p.name for p in (home / "kernels").iterdir()] == []
