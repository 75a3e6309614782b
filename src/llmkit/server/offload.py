"""Work beside the engine's batch: full forwards of the model for embeddings. It runs on one worker thread, one job at a time, behind a bounded queue (a full
queue is a 429, as the engine's is); a job is a list of steps, and between two steps the worker
stops a job whose client left or whose time ran out."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from typing import Any, Callable

from llmkit.engine import QueueFullError
from llmkit.server.errors import APIError


# Worker threads (this one, and the preparation pool) run below the event loop's priority: on a
# machine whose cores are all busy, the loop that answers /health and streams tokens goes first.
WORKER_NICENESS = 5


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority (threads it starts inherit it), where the
    system allows one thread its own (Linux); elsewhere nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
    except (AttributeError, OSError):
        pass


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Job:
    def __init__(self, steps: list[Callable[[], Any]], deadline: float, loop: asyncio.AbstractEventLoop):
        self.steps = steps
        self.deadline = deadline  # time.perf_counter() value
        self.cancelled = threading.Event()
        self.future: asyncio.Future = loop.create_future()
        self.loop = loop

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def put() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is closed (server stopped)
            pass


class Offload:
    def __init__(self, max_queue: int | None, metrics):
        self.max_queue = max_queue
        self.metrics = metrics
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending = 0  # waiting or running
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        with self._lock:
            waiting = self._pending - 1 if self._pending else 0
            if self.max_queue is not None and waiting >= self.max_queue:
                raise QueueFullError(f"{waiting} requests are already waiting for a forward pass (the limit is "
                                     f"{self.max_queue}); retry in a moment")
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="llmkit-offload", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)

    def _work(self) -> None:
        lower_priority()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                results = []
                for step in job.steps:
                    if job.cancelled.is_set() or time.perf_counter() > job.deadline:
                        job.settle(error=ClientGone())  # nobody waits for it any more
                        break
                    results.append(step())
                else:
                    job.settle(results)
            except BaseException as exc:  # the caller sees it as the step's own error
                job.settle(error=exc)
            finally:
                with self._lock:
                    self._pending -= 1

    async def run(self, steps: list[Callable[[], Any]], *, deadline: float, timeout: float, request) -> list:
        """The steps' results, in order; 429 when the queue is full, 504 past ``deadline``
        (a ``time.perf_counter()`` value), ClientGone if the client leaves first."""
        job = Job(steps, deadline, asyncio.get_running_loop())
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, even if unused
        try:
            self.submit(job)
        except QueueFullError:
            self.metrics.rejected.labels("queue_full").inc()
            raise
        try:
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    self.metrics.abandoned.labels("timeout").inc()
                    raise APIError(504, f"The request took longer than the server's time limit of {timeout:g} s; "
                                        "send less input, or retry when the server is less busy.", code="timeout")
                done, _ = await asyncio.wait({job.future}, timeout=min(left, 0.25))
                if done:
                    return job.future.result()
                if await request.is_disconnected():
                    self.metrics.abandoned.labels("client_gone").inc()
                    raise ClientGone()
        finally:
            job.cancelled.set()
