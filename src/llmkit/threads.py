"""Run one-off torch work in a short-lived thread, so that the engine's thread keeps its speed.

PyTorch's CPU ops run in parallel through OpenMP (libgomp), and every thread that starts a parallel
op keeps its own team of OpenMP threads for as long as it lives. Once more team threads exist than
cores, libgomp stops spin-waiting between parallel regions and puts idle workers to sleep at once,
so each of the engine's many small ops per decode step pays a wake-up: the engine's 16-stream
decode ran markedly slower after the model was loaded in the main thread than after it was
loaded in a thread that then ended (bench/NOTES.md).

So llmkit does heavy torch work outside the engine (reading a checkpoint, full-sequence logits) in
a thread that ends with it, taking its team with it.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def in_fresh_thread(fn: Callable[[], T]) -> T:
    """fn() in a new thread that ends when it returns; its result, or its exception re-raised."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller, who sees it as if fn ran here
            box["error"] = exc

    thread = threading.Thread(target=target, name="llmkit-oneoff", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
