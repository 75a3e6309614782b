"""Native kernels: C source compiled on first use with the system's C compiler, loaded with ctypes.

One home for building and loading llmkit's C kernels (decode attention, quantized matrix
products). A build is keyed by a hash of its source, flags, compiler and this CPU's feature flags
(``-march=native`` makes the code specific to the CPU, so a home folder shared by machines of
several kinds keeps one build per kind), written to ``<store home>/kernels`` and reused by every
later process.

A shared library runs with the user's rights, so the folder and the file are checked before
loading: the kernel folder is created private (0700); a folder or file that another user owns, or
that group or others may write, is refused with one warning and the caller keeps its torch path.
The compiled file is written under a temporary name in that folder and renamed into place, so a
reader never sees half a file. The checks are made on the opened file itself (``/proc/self/fd``),
so swapping the file between the check and the load does not help an attacker.

No compiler, a failed build or ``LLMKIT_NO_KERNELS=1``: ``load`` returns None and the caller falls
back to torch. The kernels link OpenMP (``-fopenmp``); torch has already loaded its own
``libgomp.so.1``, so the kernels share torch's OpenMP runtime and thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")

_loaded: dict[str, ctypes.CDLL | None] = {}  # by target path: one build and one load per process
_warned: set[str] = set()
_open_fds: list[int] = []
_lock = threading.Lock()


class UnsafeKernelFolder(Exception):
    """The kernel folder or a file in it could be written by someone other than this user."""


def compiler() -> str | None:
    """The C compiler to use: $CC, else ``cc`` or ``gcc`` on the PATH; None when kernels are off."""
    if os.environ.get("LLMKIT_NO_KERNELS"):
        return None
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_flags() -> str:
    """This CPU's feature flags as /proc/cpuinfo lists them ('' where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def kernel_folder() -> Path:
    """``<store home>/kernels``, created private (0700) if missing; UnsafeKernelFolder if it is not
    a folder of this user's that only this user can write."""
    from llmkit.store import home

    folder = home() / "kernels"
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile: checked below like any other
            pass
    _check(os.stat(folder), folder, "folder")
    if not folder.is_dir():
        raise UnsafeKernelFolder(f"{folder} is not a folder")
    return folder


def _check(st: os.stat_result, path: Path, what: str) -> None:
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is not None and st.st_uid != uid:
        raise UnsafeKernelFolder(f"the kernel {what} {path} belongs to user id {st.st_uid}, not to this user ({uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeKernelFolder(f"the kernel {what} {path} can be written by other users (mode {stat.filemode(st.st_mode)})")


def load(name: str, source: str, flags: Sequence[str] = ("-march=native",),
         functions: dict[str, tuple[list, object]] | None = None) -> ctypes.CDLL | None:
    """The shared library built from C ``source`` with BASE_FLAGS + ``flags``, compiling it on first
    use; ``functions`` maps exported names to (argtypes, restype), set on the loaded library.
    None where it cannot be built or loaded (logged once; an unsafe kernel folder is warned about
    once): the caller keeps its torch path."""
    cc = compiler()
    if cc is None:
        return None
    all_flags = [*BASE_FLAGS, *flags]
    key = hashlib.sha256("\n".join([source, " ".join(all_flags), cc, cpu_flags()]).encode()).hexdigest()[:16]
    try:
        folder = kernel_folder()
    except UnsafeKernelFolder as exc:
        _warn_once(str(exc))
        return None
    except OSError as exc:
        log.info("native kernel %s not built: cannot create its folder (%s)", name, exc)
        return None
    target = folder / f"{name}-{key}.so"
    with _lock:
        if str(target) not in _loaded:
            _loaded[str(target)] = _build_and_open(name, source, cc, all_flags, target, functions or {})
        return _loaded[str(target)]


def _build_and_open(name, source, cc, flags, target: Path, functions) -> ctypes.CDLL | None:
    try:
        if not target.exists():
            if not _compile(name, source, cc, flags, target):
                return None
        lib = _open_checked(target)
    except UnsafeKernelFolder as exc:
        _warn_once(str(exc))
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("native kernel %s unavailable: %s", name, exc)
        return None
    for fn, (argtypes, restype) in functions.items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = restype
    return lib


def _compile(name: str, source: str, cc: str, flags: list[str], target: Path) -> bool:
    """Build into a private temporary folder next to ``target``, then rename: atomic, and a
    concurrent build of the same key writes the same bytes."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        r = subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            log.info("native kernel %s not built (%s %s): %s", name, cc, " ".join(flags), r.stderr[-2000:])
            return False
        os.chmod(lib, 0o700)  # the compiler's output follows the umask, which may let the group write
        os.replace(lib, target)
    return True


def _open_checked(target: Path) -> ctypes.CDLL:
    """Load ``target`` after checking the very file that is loaded (owner and mode)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(target, flags)
    try:
        _check(os.fstat(fd), target, "file")
        by_fd = f"/proc/self/fd/{fd}"
        if not os.path.exists(by_fd):
            return ctypes.CDLL(str(target))
        lib = ctypes.CDLL(by_fd)
    except BaseException:
        os.close(fd)
        raise
    # kept open for the life of the process: the dynamic loader knows the library by this name, and
    # a closed descriptor's number (so its name) would be reused by the next library loaded this way
    _open_fds.append(fd)
    return lib


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"{message}: llmkit's native kernels are off and it runs its slower torch path. "
                      "Remove that folder or make it yours alone (chmod 700), or set LLMKIT_HOME to a "
                      "private folder.", RuntimeWarning, stacklevel=3)
