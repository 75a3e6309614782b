"""What a real ``kill -9`` leaves behind, and that the next run cleans it up: temporary folders of
``fsutil.atomic_dir``, a model moved aside in the middle of a forced pull, a pull killed while
fetching. Most tests start a real Python process, wait until it is exactly where the test wants
it (it writes a file saying so, then sleeps), and kill it with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from llmkit import fsutil, store


def _run_until(tmp_path: Path, code: str, env: dict | None = None) -> None:
    """Run ``code`` in a new process until it creates ``READY`` (a path it is given), then kill -9 it."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    script = f"READY = {str(ready)!r}\n" + textwrap.dedent(code)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before it was ready: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the process never got ready")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ atomic_dir


def test_a_killed_atomic_dir_leaves_the_target_whole_and_the_next_writer_cleans_up(tmp_path):
    target = tmp_path / "out" / "step-00000002"
    target.mkdir(parents=True)
    (target / "a.txt").write_text("old")
    _run_until(tmp_path, f"""
        import pathlib, time
        from llmkit.fsutil import atomic_dir
        with atomic_dir({str(target)!r}, durable=True) as tmp:
            (tmp / "a.txt").write_text("half of the new")
            pathlib.Path(READY).touch()
            time.sleep(600)
    """)
    assert (target / "a.txt").read_text() == "old"
    assert _hidden(target.parent), "the killed writer left its temporary folder (what this test cleans)"

    with fsutil.atomic_dir(target.parent / "step-00000003") as tmp:  # the next writer in that folder
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-00000002", "step-00000003"]


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    folder = tmp_path / "out"
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from llmkit.fsutil import atomic_dir
        with atomic_dir({str(folder / "x")!r}) as tmp:
            (tmp / "f").write_text("in progress")
            pathlib.Path({str(tmp_path / "ready")!r}).touch()
            sys.stdin.read()  # until the test says so
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        busy = _hidden(folder)
        assert busy
        assert fsutil.clean_stale(folder) == []
        with fsutil.atomic_dir(folder / "y") as tmp:  # another writer beside it
            (tmp / "f").write_text("y")
        assert set(busy) <= set(_hidden(folder))
        proc.communicate("go", timeout=60)
        assert proc.returncode == 0 and (folder / "x" / "f").read_text() == "in progress"
        assert _hidden(folder) == []
    finally:
        proc.kill()


def test_a_users_own_dot_folders_are_never_touched(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".git").mkdir()
    (folder / ".x.0123456789ab.tmp").mkdir()  # our shape of name, but no lock file of ours
    (folder / ".y.0123456789ab.lock").write_text("a user's file that happens to have this name\n")
    (folder / ".y.0123456789ab.tmp").mkdir()
    fsutil.clean_stale(folder)
    assert _hidden(folder) == [".git", ".x.0123456789ab.tmp", ".y.0123456789ab.lock", ".y.0123456789ab.tmp"]


def test_kill_between_the_two_renames_of_a_swap_puts_the_old_folder_back(tmp_path):
    target = tmp_path / "out" / "model"
    target.mkdir(parents=True)
    (target / "w").write_text("old")
    # the process stops right after moving the old folder aside, before the new one is renamed in
    _run_until(tmp_path, f"""
        import os, pathlib, time
        from llmkit import fsutil
        real = os.replace
        def replace(a, b):
            real(a, b)
            if str(b).endswith(".old"):
                pathlib.Path(READY).touch()
                time.sleep(600)
        os.replace = replace
        with fsutil.atomic_dir({str(target)!r}) as tmp:
            (tmp / "w").write_text("new")
    """)
    assert not target.exists()  # the worst moment: neither version in place
    fsutil.clean_stale(target.parent)
    assert (target / "w").read_text() == "old" and _hidden(target.parent) == []


# ------------------------------------------------------------------ the store


def test_a_pull_killed_while_fetching_leaves_nothing_and_is_cleaned(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LLMKIT_HOME", str(home))
    _run_until(tmp_path, """
        import pathlib, time
        from llmkit import store
        from llmkit.plugins import registry

        class Slow(store.Source):
            def fetch(self, spec, dest, *, file, progress):
                (dest / "half.gguf").write_bytes(b"GGUF" + bytes(1000))
                pathlib.Path(READY).touch()
                time.sleep(600)

        registry("sources")["slow"] = Slow()
        store.pull("slow:x", name="half", progress=False)
    """)
    assert os.listdir(home / "tmp"), "the killed pull left its temporary folder (what this test cleans)"
    assert store.list_models() == []
    assert os.listdir(home / "tmp") == [] and not (home / "models").exists()


def test_a_forced_pull_killed_mid_swap_keeps_the_old_model(tmp_path, monkeypatch):
    from llmkit.formats.gguf_file import GGUFFile
    from test_store import write_gguf

    home = tmp_path / "home"
    monkeypatch.setenv("LLMKIT_HOME", str(home))
    first = store.pull(str(write_gguf(tmp_path / "m.gguf")), name="m", progress=False)
    before = first.read_bytes()
    (tmp_path / "other").mkdir()
    other = write_gguf(tmp_path / "other" / "m.gguf", seed=1)
    _run_until(tmp_path, f"""
        import os, pathlib, time
        from llmkit import store
        real = os.replace
        def replace(a, b):
            real(a, b)
            if pathlib.Path(a).name == "m" and pathlib.Path(a).parent.name == "models":
                pathlib.Path(READY).touch()  # the stored model is moved aside, the new one not in yet
                time.sleep(600)
        os.replace = replace
        store.pull({str(other)!r}, name="m", force=True, progress=False)
    """)
    assert not (home / "models" / "m").exists()  # the worst moment: no model called m
    assert [m.name for m in store.list_models()] == ["m"]
    assert store.verify("m") and store.resolve("m").read_bytes() == before
    assert GGUFFile(store.resolve("m")).metadata["general.architecture"] == "llama"
    assert os.listdir(home / "tmp") == [] and _hidden(home / "models") == []


def test_list_shows_no_folder_of_a_swap_in_progress(tmp_path, monkeypatch):
    from test_store import write_gguf

    home = tmp_path / "home"
    monkeypatch.setenv("LLMKIT_HOME", str(home))
    store.pull(str(write_gguf(tmp_path / "m.gguf")), name="m", progress=False)
    lease = fsutil.Lease(home / "models", "m")  # as another process replacing m holds it
    try:
        (home / "models" / "m").rename(lease.old)  # the instant between its two renames
        assert store.list_models() == []  # not a model called ".m.<token>.old"
        assert lease.old.exists()  # and a swap still in progress is not undone
    finally:
        lease.release()  # its replacement never came: the old folder goes back
    assert [m.name for m in store.list_models()] == ["m"]
