"""Running one HTTP request's engine requests: events brought from the engine's thread into
asyncio, the time limit, disconnects, metrics, and server-sent events for streamed answers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmkit.errors import LLMKitError
from llmkit.server import errors
from llmkit.server.errors import APIError
from llmkit.server.offload import ClientGone


class Run:
    """The engine requests (one per choice) of one HTTP request, their events brought into asyncio.

    Submitting happens here, synchronously, through ``LLM.submit``, so that a full queue or a
    too-long prompt is an HTTP error before any response starts. Leaving ``events()`` early for
    any reason (the client went away, the time limit passed, an error) cancels every unfinished
    choice: its slot is free at the engine's next step.
    """

    def __init__(self, state, jobs: list, arrival: float, request: Request, poll_disconnect: bool):
        self.state = state
        self.metrics = state.metrics
        self.arrival = arrival
        self.deadline = arrival + state.config.request_timeout
        self.timeout = state.config.request_timeout
        self.request = request
        self.poll_disconnect = poll_disconnect
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_lens = [len(job.prompt_ids) for job in jobs]
        self.handles = []
        self.last = [None] * len(jobs)
        try:
            for i, job in enumerate(jobs):
                self.handles.append(state.llm.submit(job, on_event=self._callback(i)))
        except LLMKitError as exc:
            self.cancel()
            from llmkit.engine import QueueFullError

            self.metrics.rejected.labels("queue_full" if isinstance(exc, QueueFullError) else "invalid").inc()
            raise
        state.runs.add(self)

    def _callback(self, i: int):
        loop, queue = self.loop, self.queue

        def deliver(event) -> None:  # on the engine thread: keep it tiny, and never raise there
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, event, time.perf_counter()))
            except RuntimeError:  # the event loop is closed (server stopped)
                pass

        return deliver

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        remaining = len(self.handles)
        checked = time.perf_counter()
        try:
            while remaining:
                now = time.perf_counter()
                left = self.deadline - now
                if left <= 0:
                    raise APIError(504, f"The request took longer than the server's time limit of "
                                        f"{self.timeout:g} s; ask for fewer tokens, or retry when the server is "
                                        "less busy.", code="timeout")
                # A streamed response notices a disconnect itself (Starlette cancels this task); a
                # whole-answer one asks now and then, so that a client gone away frees its slots.
                if self.poll_disconnect and now - checked > 0.25:
                    checked = now
                    if await self.request.is_disconnected():
                        raise ClientGone()
                try:
                    i, event, at = await asyncio.wait_for(self.queue.get(), timeout=min(left, 0.25))
                except asyncio.TimeoutError:
                    continue
                self._observe(i, event, at)
                if event.finish_reason is not None:
                    remaining -= 1
                if event.error is not None:
                    raise APIError(500, f"Generation failed: {type(event.error).__name__}: {event.error}",
                                   code="internal_error")
                yield i, event
        finally:
            for h in self.handles:
                if not h.done:  # abandoned: the client left, the time limit passed, or an error
                    h.cancel()
                    self.metrics.finished("cancelled")
                    self.metrics.e2e.observe(time.perf_counter() - self.arrival)
            self.state.runs.discard(self)

    def _observe(self, i: int, event, at: float) -> None:
        m = self.metrics
        if event.token is not None:
            m.generation_tokens.inc()
            if self.last[i] is None:
                m.prompt_tokens.inc(self.prompt_lens[i])  # its prompt is in the cache now
                m.ttft.observe(at - self.arrival)
            else:
                m.itl.observe(at - self.last[i])
            self.last[i] = at
        if event.finish_reason is not None:
            m.e2e.observe(at - self.arrival)
            m.finished(event.finish_reason)


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: one ``data: {json}`` per chunk, then ``data: [DONE]``. An error after
    the response started is the last event before [DONE]."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        except APIError as exc:  # the response has started: the error goes into the stream
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        except LLMKitError as exc:
            yield b"data: " + json.dumps(errors.from_llmkit_error(exc).body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
