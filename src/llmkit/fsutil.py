"""Writing files and folders so that a reader never sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(target: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without an error it
    replaces ``target`` (an existing one is moved aside first, then deleted). On any error,
    Ctrl-C included, the temporary folder is removed and ``target`` is left as it was.

    ``durable``: fsync the files and the parent folder too, so the result survives a power cut
    or ``kill -9`` right after (checkpoints want this; model exports do not need it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if durable:
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        if durable:
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
