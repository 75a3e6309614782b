"""The server's resident memory under long load, with glibc's allocator (Linux); elsewhere nothing
here does anything.

Many threads allocate and free tensors of every size (the event loop, the engine, the worker
threads, the tokenizer's pool). glibc gives threads their own arenas, and it raises its mmap
threshold each time a large mapped block is freed, so that later large tensors are carved from
those arenas instead of being mapped; freed space in the middle of an arena stays resident. Two
remedies, both through the allocator's own controls:

- ``tune_allocator``: a bound on the number of arenas, and the mmap threshold fixed at glibc's
  own ceiling (blocks past it, the largest tensors, are mapped and go back to the system when
  freed). A low threshold returns more memory but maps and faults in every mid-sized tensor of
  every step anew: the server then ran markedly slower (bench/NOTES.md). Settings the user made
  through glibc's environment variables (``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_ARENA_MAX``) are left as they are.
- ``IdleTrim``: ``malloc_trim(0)`` (free pages of every arena back to the system) once the engine
  has gone idle after work, and at most once a minute while it stays busy.

And one for Python's own collector: ``freeze_startup`` once the model is loaded.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import sys
import time
from typing import Callable

log = logging.getLogger("llmkit.server")

# mallopt parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 1024 * 1024  # the highest value glibc's dynamic threshold reaches on 64-bit
TRIM_EVERY_S = 2.0  # how often the engine is looked at
BUSY_TRIM_S = 60.0  # while it never goes idle, trim this often


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, where this process runs on it (None elsewhere: musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def arena_max() -> int:
    """Arenas allowed: two per core this process may use (glibc's default is eight)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 2 * max(cores, 1)


def tune_allocator() -> dict[str, int]:
    """Fix glibc's mmap threshold and bound its arenas for this process, unless the environment
    already sets them; returns what was set (empty where nothing was, or not on glibc)."""
    libc = _libc()
    if libc is None:
        return {}
    done = {}
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                              ("MALLOC_ARENA_MAX", _M_ARENA_MAX, arena_max())):
        if env not in os.environ and libc.mallopt(param, value) == 1:
            done[env] = value
    return done


def release_free_memory() -> bool:
    """Give the allocator's free pages back to the system (``malloc_trim(0)``); whether any were."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


class IdleTrim:
    """Trims once the engine has gone idle after work (nothing running or waiting), or after
    ``BUSY_TRIM_S`` of uninterrupted work. ``engine()``: the engine, or None while none is loaded."""

    def __init__(self, engine: Callable[[], object | None]):
        self.engine = engine
        self.trims = 0
        self._seen: tuple | None = None  # the engine's token counters at the last trim (or first look)
        self._last = time.monotonic()

    @staticmethod
    def _work_done(engine) -> tuple:
        return (getattr(engine, "prompt_tokens_total", 0), getattr(engine, "generation_tokens_total", 0))

    def due(self) -> bool:
        """Whether to trim now (and if so, remembers that it did)."""
        engine = self.engine()
        if engine is None:
            return False
        done = self._work_done(engine)
        if self._seen is None:  # the first look: work is counted from here
            self._seen = done
        if done == self._seen:
            return False  # nothing ran since the last trim
        idle = not getattr(engine, "num_running", 0) and not getattr(engine, "num_waiting", 0)
        if not idle and time.monotonic() - self._last < BUSY_TRIM_S:
            return False
        self._seen, self._last = done, time.monotonic()
        return True

    async def run(self) -> None:
        """Until cancelled: look every ``TRIM_EVERY_S`` and trim (on a worker thread) when due."""
        if _libc() is None:
            return
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            if self.due():
                await asyncio.to_thread(release_free_memory)
                self.trims += 1


def freeze_startup() -> None:
    """Take every object alive now (the model, the libraries, the app) out of the garbage
    collector's view. Its full collections hold the interpreter's lock while they walk every
    tracked object, pausing all threads, the event loop's included, for as long as the libraries a
    server imports take to walk; frozen, they walk only what requests create."""
    gc.collect()
    gc.freeze()


def thaw() -> None:
    """Give the collector back what ``freeze_startup`` took from it (the server is stopping: what
    it held may go now)."""
    gc.unfreeze()
