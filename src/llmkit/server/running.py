"""Running one HTTP request's engine requests: events brought from the engine's thread into
asyncio, the time limit, disconnects, metrics, and server-sent events for streamed answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmkit.errors import LLMKitError
from llmkit.server import errors
from llmkit.server.errors import APIError
from llmkit.server.offload import ClientGone

# How often (s) a whole-answer request asks whether its client is still there. A streamed one
# need not ask: Starlette notices the disconnect itself and cancels it.
POLL_INTERVAL = 0.25

# One encoder for every chunk (json.dumps with options builds a new one per call)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class Inbox:
    """Engine events for every Run of one event loop, brought over in batches.

    At the end of each step the engine calls back, on its own thread and back to back, one event
    per running request. Waking the loop once per event (a write to its self-pipe, a pass of its
    selector, a queued callback each) would cost a busy server thousands of wake-ups a second on
    the cores the engine computes on. Here the first event schedules one drain; the events that
    arrive before that drain runs ride along with it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: deque = deque()
        self._scheduled = False

    def deliver(self, run: "Run", i: int, event) -> None:
        """On the engine thread: keep it tiny, and never raise there."""
        self._pending.append((run, i, event, time.perf_counter()))
        if not self._scheduled:  # appended before this test: a drain already due will see it
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop is closed (server stopped)
                pass

    def _drain(self) -> None:
        self._scheduled = False  # cleared before popping: an event appended from now on schedules again
        pending = self._pending
        while pending:
            run, i, event, at = pending.popleft()
            run._arrive(i, event, at)


def inbox_for(state) -> Inbox:
    """The state's Inbox on the running loop (a new one if the server runs on a new loop)."""
    loop = asyncio.get_running_loop()
    inbox = state.inbox
    if inbox is None or inbox.loop is not loop:
        inbox = state.inbox = Inbox(loop)
    return inbox


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
        self.pending: deque = deque()  # (choice, event, time it left the engine), in order
        self._waiter: asyncio.Future | None = None
        self.prompt_lens = [len(job.prompt_ids) for job in jobs]
        self.handles = []
        self.last = [None] * len(jobs)
        inbox = inbox_for(state)
        try:
            for i, job in enumerate(jobs):
                self.handles.append(state.llm.submit(job, on_event=self._callback(inbox, i)))
        except LLMKitError as exc:
            self.cancel()
            from llmkit.engine import QueueFullError

            self.metrics.rejected.labels("queue_full" if isinstance(exc, QueueFullError) else "invalid").inc()
            raise
        state.runs.add(self)

    def _callback(self, inbox: Inbox, i: int):
        deliver = inbox.deliver
        return lambda event: deliver(self, i, event)

    def _arrive(self, i: int, event, at: float) -> None:  # on the loop, from Inbox
        self.pending.append((i, event, at))
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    def _tick(self) -> None:
        """Wake ``events()`` to look at the time limit and, for a whole answer, the client."""
        self._wake()
        self._timer = self.loop.call_later(self._period(), self._tick)

    def _period(self) -> float:
        left = self.deadline - time.perf_counter()
        if left <= 0:  # past it: events() raises when it next waits; until then a slow tick
            return POLL_INTERVAL
        return min(left, POLL_INTERVAL) if self.poll_disconnect else left

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        remaining = len(self.handles)
        self._checked = time.perf_counter()
        self._timer = self.loop.call_later(self._period(), self._tick)
        try:
            while remaining:
                if not self.pending:
                    await self._idle()
                    continue
                i, event, at = self.pending.popleft()
                self._observe(i, event, at)
                if event.finish_reason is not None:
                    remaining -= 1
                if event.error is not None:
                    raise APIError(500, f"Generation failed: {type(event.error).__name__}: {event.error}",
                                   code="internal_error")
                yield i, event
        finally:
            self._timer.cancel()
            for h in self.handles:
                if not h.done:  # abandoned: the client left, the time limit passed, or an error
                    h.cancel()
                    self.metrics.finished("cancelled")
                    self.metrics.e2e.observe(time.perf_counter() - self.arrival)
            self.state.runs.discard(self)

    async def _idle(self) -> None:
        """Nothing to hand on: check the time limit and the client, then wait for an event or a tick."""
        if time.perf_counter() >= self.deadline:
            raise APIError(504, f"The request took longer than the server's time limit of "
                                f"{self.timeout:g} s; ask for fewer tokens, or retry when the server is "
                                "less busy.", code="timeout")
        # A streamed response notices a disconnect itself (Starlette cancels this task); a
        # whole-answer one asks now and then, so that a client gone away frees its slots.
        now = time.perf_counter()
        if self.poll_disconnect and now - self._checked >= POLL_INTERVAL:
            self._checked = now
            if await self.request.is_disconnected():
                raise ClientGone()
        if self.pending:
            return
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

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
                yield b"data: " + _ENCODER.encode(chunk).encode() + b"\n\n"
        except APIError as exc:  # the response has started: the error goes into the stream
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        except LLMKitError as exc:
            yield b"data: " + json.dumps(errors.from_llmkit_error(exc).body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
