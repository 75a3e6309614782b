"""Writing files and folders so that a reader never sees half of one, and so that what a killed
writer leaves behind is cleaned up by the next one.

Every temporary folder is named after a *lease*: ``.NAME.TOKEN.lock`` beside it, a file that the
writing process holds an exclusive ``flock`` on. The operating system drops that lock when the
process ends, ``kill -9`` included, so a later writer in the same folder can tell the leftovers of
a dead process (lock free) from a folder in use (lock held) without trusting process ids or clocks.
Only names of that exact shape, whose lock file carries our marker line, are ever touched: a
user's own folders never are.

The folders of a lease, all in the lease's parent folder:

    .NAME.TOKEN.lock   the lock (held while the process works)
    .NAME.TOKEN.tmp    the folder being written
    .NAME.TOKEN.old    the previous NAME, moved aside for the instant of the swap
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # no flock (Windows): leases still name folders, nothing is cleaned up later
    fcntl = None

_MARKER = b"llmkit temporary folder lock\n"
_LOCK_NAME = re.compile(r"\.(?P<name>.+)\.(?P<token>[0-9a-f]{12})\.lock")


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (names created, renamed or removed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; nothing more can be done there
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, and ``root`` itself."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


class Lease:
    """A claim on the temporary names ``.NAME.TOKEN.*`` in ``parent``, held by this process."""

    def __init__(self, parent: str | Path, name: str):
        self.parent = Path(parent)
        self.name = name
        self.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.parent)
        self._fd = None
        while True:  # until the lock file at our path is the one we hold (see _take)
            self.token = secrets.token_hex(6)
            if self._take():
                break

    def _path(self, kind: str) -> Path:
        return self.parent / f".{self.name}.{self.token}.{kind}"

    @property
    def tmp(self) -> Path:
        return self._path("tmp")

    @property
    def old(self) -> Path:
        return self._path("old")

    def _take(self) -> bool:
        path = self._path("lock")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.write(fd, _MARKER)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        # A cleaner may have found the file between its creation and the flock, taken it for a
        # dead writer's and removed it: then the lock we hold guards nothing, so start again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        """Remove the lease's folders and its lock file (the work is done or abandoned)."""
        if self._fd is None:
            return
        _settle(self.parent, self.name, self.token)
        try:
            self._path("lock").unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def clean_stale(parent: str | Path) -> list[str]:
    """Remove what dead writers left in ``parent``: their temporary folders and lock files. If one
    died between moving a folder aside and putting its replacement in place, the folder moved
    aside is put back. Leases still held are left alone. Returns the names cleaned; a folder we
    may not write to is left as it is."""
    parent = Path(parent)
    if fcntl is None:
        return []
    cleaned = []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    for entry in names:
        m = _LOCK_NAME.fullmatch(entry)
        if m is None:
            continue
        try:
            if _clean_one(parent, entry, m["name"], m["token"]):
                cleaned.append(entry)
        except OSError:
            continue  # a read-only store, or another cleaner won the race: leave it
    return cleaned


def _clean_one(parent: Path, lock_name: str, name: str, token: str) -> bool:
    path = parent / lock_name
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        if os.read(fd, len(_MARKER) + 1) != _MARKER:
            return False  # not a lock file of ours, whatever its name
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is alive
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            return False  # another cleaner removed it (and maybe a writer made a new one) meanwhile
        _settle(parent, name, token)
        path.unlink()
        fsync_dir(parent)
        return True
    finally:
        os.close(fd)


def _settle(parent: Path, name: str, token: str) -> None:
    """Remove a lease's temporary folders; a folder moved aside whose replacement never arrived
    (a kill, or a failure, between the two renames of a swap) goes back in place first."""
    target, old = parent / name, parent / f".{name}.{token}.old"
    if old.exists() and not target.exists() and not target.is_symlink():
        os.replace(old, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(parent / f".{name}.{token}.tmp", ignore_errors=True)


@contextmanager
def scratch_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A new empty folder ``parent/.NAME.TOKEN.tmp`` for the duration of the block, removed at
    the end, and by the next writer in ``parent`` if this process is killed first."""
    lease = Lease(parent, name)
    try:
        lease.tmp.mkdir()
        yield lease.tmp
    finally:
        lease.release()


def replace_dir(source: str | Path, target: str | Path, *, durable: bool = False) -> None:
    """Put the complete folder ``source`` at ``target`` (same file system), replacing a folder
    already there: at every instant ``target`` is the old folder or the new one, and after a kill
    between the two renames the next writer in ``target``'s folder puts the old one back."""
    source, target = Path(source), Path(target)
    lease = Lease(target.parent, target.name)
    try:
        if target.exists():
            os.replace(target, lease.old)
        os.replace(source, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        lease.release()  # removes the old folder, or puts it back if the new one is not in place


@contextmanager
def atomic_dir(target: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without an error it
    replaces ``target`` (see ``replace_dir``). On any error, Ctrl-C included, the temporary folder
    is removed and ``target`` is left as it was; after ``kill -9`` the next writer beside
    ``target`` removes it.

    ``durable``: fsync every file and folder written, the temporary folder itself before it is
    renamed, and the parent folder after, so that the result survives a power cut right after
    (checkpoints want this; model exports do not need it)."""
    target = Path(target)
    with scratch_dir(target.parent, target.name) as tmp:
        yield tmp
        if durable:
            fsync_tree(tmp)
        replace_dir(tmp, target, durable=durable)
